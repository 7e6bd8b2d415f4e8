"""Muon for matrices sharded by FSDP2.

Muon orthogonalises each weight matrix's momentum-smoothed gradient with a Newton-Schulz
iteration, which needs the whole matrix; FSDP2 keeps each rank's rows only (`Shard(0)`
DTensors). Per matrix and step, this optimizer updates the momentum on the local shard (an
element-wise operation), gathers the whole update matrix, runs torch's own Newton-Schulz
iteration on it (every rank computes the same result from the same gathered matrix), keeps the
rows of its local shard and applies them. The arithmetic is torch.optim.Muon's, step for step,
so a sharded run follows a one-process run up to summation order; plain tensors go through
torch's own step unchanged. The gathers cost one all-gather per matrix per step, the same
volume FSDP2 moves to gather the parameters for a forward.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


class ShardedMuon(torch.optim.Muon):
    """`torch.optim.Muon` whose parameters may be FSDP2-sharded DTensors."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        sharded = any(
            isinstance(p, DTensor) for group in self.param_groups for p in group["params"]
        )
        if not sharded:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                ortho = _zeropower_via_newtonschulz(
                    whole, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                if isinstance(p, DTensor):  # this rank's rows, no communication
                    ortho = distribute_tensor(
                        ortho, p.device_mesh, p.placements, src_data_rank=None
                    )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
