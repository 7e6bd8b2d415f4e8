"""Reading trackers' files back: TensorBoard event files (tensorboard's own reader) and a W&B
offline run (its .wandb file: W&B's records in LevelDB's log format)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from unlearn.tracking import TRACKING_FIELDS

# The tiny-world flags of a run of one optimizer step per phase (tests/recipes/test_unlearning).
RUN_FLAGS = ["--method", "sequential", "--num_phases", "1", "--pdbs", "2", "--grad_accum", "1",
             "--num_train_examples", "4", "--progress", "false", "--eval_limit", "8"]  # fmt: skip


def run_argv(world, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["run", *RUN_FLAGS, "--world", str(world.root), "--out", str(out),
            "--max_steps", str(steps), *extra]  # fmt: skip


def attack_argv(world, out: Path, *extra: str) -> list[str]:
    return ["attack", "--model", str(world.filtered), "--world", str(world.root),
            "--out", str(out), "--max_steps", "4", "--eval_every", "2", "--pdbs", "4",
            "--progress", "false", "--eval_limit", "8", *extra]  # fmt: skip


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files of `log_dir`, as
    TensorBoard shows them (an earlier attempt's purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def texts(log_dir: Path) -> dict[str, str]:
    """{tag: text} of the text entries (the last of each tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        (value,) = acc.Tensors(tag)[-1].tensor_proto.string_val
        out[tag.removesuffix("/text_summary")] = value.decode()
    return out


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline run under RUN_DIR/wandb (W&B's protobuf `Record`s).

    The .wandb file is W&B's header (":W&B", magic, version: 7 bytes) then LevelDB's log format:
    32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes; a block's tail too short for a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_items(items) -> dict:
    """A history row's, a summary's or a config's items as {key: value}."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def tracking_free(config: dict) -> bool:
    """Whether a run config holds no tracking setting (they are operational)."""
    return not set(config) & set(TRACKING_FIELDS)
