"""The memory plan of `unlearn run --dry-run`: exact parameter, weight, gradient and optimizer
bytes from the config alone, sharding under FSDP2, LoRA and Muon, activations with and without
checkpointing; nothing written and no weight loaded."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_llama
from unlearn.cli import main as cli
from unlearn.config.settings import LoraSettings, TrainConfig
from unlearn.models.lora import attach_lora
from unlearn.training.memory_plan import plan_memory


def _meta_llama():
    with torch.device("meta"):
        return tiny_llama(4)


def test_full_finetuning_bytes_are_exact_and_fsdp2_divides_them():
    model = _meta_llama()
    params = sum(p.numel() for p in model.parameters())
    one = plan_memory(model, TrainConfig(), LoraSettings(lora=False), 1)
    assert (one.params, one.trainable) == (params, params)
    assert (one.weights, one.gradients, one.optimizer) == (4 * params, 4 * params, 8 * params)
    assert one.frozen == 4 * params  # the frozen full fine-tuning reference
    four = plan_memory(model, TrainConfig(distributed="fsdp2"), LoraSettings(lora=False), 4)
    assert four.weights == -(-4 * params // 4) and four.optimizer == -(-8 * params // 4)
    assert four.frozen == one.frozen  # the reference is not sharded


def test_lora_counts_the_adapters_peft_attaches_and_no_reference_copy():
    plan = plan_memory(_meta_llama(), TrainConfig(), LoraSettings(lora_r=4), 1)
    real = attach_lora(tiny_llama(4), LoraSettings(lora_r=4))
    adapters = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert plan.trainable == adapters and plan.frozen == 0
    assert plan.optimizer == 8 * adapters


def test_muon_keeps_one_buffer_for_the_block_matrices_and_checkpointing_saves_activations():
    model = _meta_llama()
    adamw = plan_memory(model, TrainConfig(), LoraSettings(lora=False), 1)
    muon = plan_memory(model, TrainConfig(optimizer="muon"), LoraSettings(lora=False), 1)
    assert muon.optimizer < adamw.optimizer
    assert adamw.activations_checkpointed < adamw.activations
    bf16 = plan_memory(model, TrainConfig(mixed_precision="bf16"), LoraSettings(lora=False), 1)
    assert bf16.activations < adamw.activations  # saved in the compute dtype
    checkpointed = TrainConfig(gradient_checkpointing=True)
    assert plan_memory(model, checkpointed, LoraSettings(lora=False), 1).total() < adamw.total()


def test_dry_run_prints_the_plan_and_writes_and_loads_nothing(
    tiny_world, tmp_path, monkeypatch, capsys
):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded by a dry run")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "r"
    argv = ["run", "--method", "rmu", "--world", str(tiny_world.root), "--out", str(out)]
    assert cli([*argv, "--dry-run", "--gpu_memory", "0.001"]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "optimizer state" in text and "fits in" in text
    assert "NO" in text  # 1 MB cannot hold it
    assert not out.exists()
    assert cli([*argv, "--dry-run", "--gpu_memory", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu_memory must be > 0" in err[0]


@pytest.mark.parametrize("gb", [80.0])
def test_a_large_device_fits_a_tiny_model(tiny_world, tmp_path, capsys, gb):
    argv = ["run", "--method", "npo", "--world", str(tiny_world.root), "--out", str(tmp_path / "r")]
    assert cli([*argv, "--dry-run", "--gpu_memory", str(gb)]) == 0
    assert "yes" in capsys.readouterr().out
