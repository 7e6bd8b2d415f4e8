"""The frozen-output cache: hits and misses by key, bad entries recomputed, and runs that reach the
same weights with and without it."""

from __future__ import annotations

import os

import pytest
import torch

from unlearn.errors import UsageError
from unlearn.training import frozen_cache as fc
from unlearn.training.frozen_cache import FrozenCache, FrozenCacheArgs

WHAT = {"frozen": "reference", "model": {"name": "m", "revision": "r1"}, "dtype": "float32",
        "device": "cpu", "outputs": "hiddens", "layers": [1, 2]}  # fmt: skip
NAMES = ["1", "2"]


@pytest.fixture(autouse=True)
def empty_memory():
    fc.MEMORY.clear()
    yield
    fc.MEMORY.clear()


class Frozen:
    """A stand-in frozen model: row i's outputs alone (`[1, length, width]`), counting forwards."""

    def __init__(self, lengths: list[int], width: int = 3) -> None:
        self.lengths, self.width, self.calls = lengths, width, 0

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        n = self.lengths[i]
        h = torch.arange(n * self.width, dtype=torch.float32).view(1, n, self.width) + 100 * i
        return {"1": h, "2": -h}


def rows(cache: FrozenCache, what=WHAT, ids=("a", "b"), lengths=(4, 2), frozen=None):
    frozen = frozen or Frozen(list(lengths))
    return cache.rows(what, NAMES, list(ids), list(lengths), frozen, "cpu"), frozen


def assert_valid_equal(got, want, lengths):
    for name in NAMES:
        for i, n in enumerate(lengths):
            torch.testing.assert_close(got[name][i, :n], want[name][i, :n], rtol=0, atol=0)


def test_second_lookup_hits_and_pads_into_the_batch_layout(tmp_path):
    cache = FrozenCache(tmp_path)
    first, frozen = rows(cache)
    again, _ = rows(cache, frozen=frozen)
    assert frozen.calls == 2 and (cache.hits, cache.misses) == (2, 2)  # one forward per example
    assert_valid_equal(again, first, [4, 2])
    assert again["1"].shape == (2, 4, 3) and bool((again["1"][1, 2:] == 0).all())  # padding
    # A batch drawn in another order and with other neighbours reads the same entries.
    swapped, frozen2 = rows(cache, ids=("b", "a"), lengths=(2, 4), frozen=Frozen([2, 4]))
    assert frozen2.calls == 0
    torch.testing.assert_close(swapped["2"][1], first["2"][0])


def test_disk_entries_serve_another_process(tmp_path):
    first, _ = rows(FrozenCache(tmp_path))
    fc.MEMORY.clear()  # what a new process starts with
    cache = FrozenCache(tmp_path)
    again, frozen = rows(cache)
    assert frozen.calls == 0 and cache.hits == 2
    assert_valid_equal(again, first, [4, 2])
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"name": "m", "revision": "r2"}},  # another revision
        {"dtype": "bfloat16"},
        {"layers": [1, 3]},
        {"outputs": "logits"},
    ],
)
def test_another_key_misses(tmp_path, change):
    cache = FrozenCache(tmp_path)
    rows(cache)
    _, frozen = rows(cache, what={**WHAT, **change})
    assert frozen.calls == 2


def test_another_example_misses_and_only_it_is_computed(tmp_path):
    cache = FrozenCache(tmp_path)
    rows(cache)
    _, frozen = rows(cache, ids=("a", "c"))  # "c" is new: one forward, of "c" alone
    assert frozen.calls == 1
    _, frozen = rows(cache, ids=("c", "a"), lengths=(2, 4), frozen=Frozen([2, 4]))
    assert frozen.calls == 0


def test_example_identity_is_the_token_ids():
    assert fc.example_digest([1, 2, 3]) == fc.example_digest((1, 2, 3))
    assert fc.example_digest([1, 2, 3]) != fc.example_digest([1, 2, 4])


def _only_file(tmp_path, example="a"):
    (path,) = tmp_path.glob(f"*/{example}{fc.SUFFIX}")
    return path


DAMAGES = ["truncate", "garbage", "payload", "no_checksum", "other_key", "other_length"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_bad_entry_is_recomputed_never_used(tmp_path, damage):
    first, _ = rows(FrozenCache(tmp_path), ids=("a",), lengths=(4,))
    path = _only_file(tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "payload":
        # The header (names, shapes, metadata) intact, one tensor byte flipped: safetensors
        # reads it without complaint, only the checksum tells.
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        # A whole, readable file that holds something else under this name (or, without a
        # checksum, cannot show that its tensors are the ones written).
        from safetensors.torch import save_file

        key = fc.json.dumps({**WHAT, "layers": [9]}, sort_keys=True)
        t = torch.ones(3 if damage == "other_length" else 4, 3)
        entry = {"1": t, "2": t.clone()}
        meta = {"key": key if damage == "other_key" else fc.json.dumps(WHAT, sort_keys=True),
                "example": "a", "length": str(t.shape[0])}  # fmt: skip
        if damage != "no_checksum":
            meta["checksum"] = fc.entry_checksum(entry)
        save_file(entry, str(path), metadata=meta)
    fc.MEMORY.clear()
    cache = FrozenCache(tmp_path)
    again, frozen = rows(cache, ids=("a",), lengths=(4,))
    assert frozen.calls == 1 and cache.hits == 0
    assert_valid_equal(again, first, [4])
    fc.MEMORY.clear()  # the recomputed entry was written back, whole
    _, frozen = rows(FrozenCache(tmp_path), ids=("a",), lengths=(4,))
    assert frozen.calls == 0


def test_entry_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        rows(FrozenCache(tmp_path), ids=("a",), lengths=(4,))
    finally:
        os.umask(old)
    assert _only_file(tmp_path).stat().st_mode & 0o777 == 0o644  # save_file alone makes 0600


def test_unwritable_dir_warns_once_and_caches_in_memory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file (not even by root)
    cache = FrozenCache(blocker / "cache")
    rows(cache)
    _, frozen = rows(cache)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "not writable" in err
    assert cache.dir is None and frozen.calls == 0  # the memory cache still serves


def test_disk_cap_evicts_the_oldest_files(tmp_path):
    rows(FrozenCache(tmp_path), ids=("old",), lengths=(4,))
    old = _only_file(tmp_path, "old")
    os.utime(old, (1, 1))  # written long ago
    size = old.stat().st_size
    fc.MEMORY.clear()
    fc._DISK_BYTES.clear()  # a new process: it counts the directory once
    cache = FrozenCache(tmp_path, disk_gb=1.5 * size / 1e9)  # room for one entry
    rows(cache, ids=("new",), lengths=(4,))
    assert not old.exists() and _only_file(tmp_path, "new").exists()


def test_memory_cap_drops_least_recently_used(tmp_path):
    cache = FrozenCache(None, disk_gb=0, memory_gb=300e-9)  # 300 bytes
    # One entry is 2 tensors x 4 x 3 float32 = 96 bytes: three fit.
    for ex in "abcdef":
        rows(cache, ids=(ex,), lengths=(4,))
    assert fc.MEMORY.bytes <= 300 and len(fc.MEMORY.entries) == 3


def test_bad_flags():
    with pytest.raises(UsageError, match="frozen_cache_gb"):
        FrozenCacheArgs(frozen_cache_gb=-1)


# -- runs on the tiny world ------------------------------------------------------------------


LR = 3e-4
"""One learning rate for the cache-equivalence runs: the weight tolerance is a fraction of it."""


def _train(tiny_world, tmp_path, method, name, cache: bool, cache_dir, pdbs=4, steps=6):
    from unlearn.recipes.unlearning import build_run_config, prepare, validate
    from unlearn.training.loop import train

    out = tmp_path / name
    cfg = build_run_config(
        method,
        {"world": str(tiny_world.root), "out": str(out), "max_steps": steps, "pdbs": pdbs,
         "grad_accum": 1, "num_train_examples": 8, "progress": False, "eval": False, "lr": LR,
         "frozen_cache": cache, "frozen_cache_dir": str(cache_dir),
         **({"num_phases": 1} if method == "sequential" else {})},
    )  # fmt: skip
    p = prepare(cfg, validate(cfg), out)
    rows_seen: list[dict] = []
    train(p.model, p.method, p.reference, p.forget, p.retain, cfg.train, p.plan, progress=False,
          on_log=lambda step, values: rows_seen.append(values),
          frozen_cache=p.frozen_cache)  # fmt: skip
    weights = {k: v.detach().clone() for k, v in p.model.state_dict().items()}
    return weights, rows_seen, p.frozen_cache


@pytest.mark.parametrize("method", ["checkpoint_transfer", "lens", "sequential"])
def test_cached_run_reaches_the_uncached_weights(tiny_world, tmp_path, method):
    """8 examples, 4 per batch, 6 steps: three epochs. Step 1 computes live; from step 2 the
    frozen outputs come from the cache (computed there once per example). Weights equal the
    uncached run's up to float rounding, and a run whose cache was filled by another run with
    another batch layout reaches bit-identical weights: entries do not depend on their writer."""
    cache_dir = tmp_path / "cache"
    plain, plain_rows, none = _train(tiny_world, tmp_path, method, "plain", False, cache_dir)
    assert none is None and not cache_dir.exists()
    cached, cached_rows, cache = _train(tiny_world, tmp_path, method, "cold", True, cache_dir)
    sides = 2 if method == "checkpoint_transfer" else 1  # source targets; reference on retain
    # Step 2 computes examples 5-8, step 3 examples 1-4 (step 1 never touches the cache); the
    # other three steps read.
    assert (cache.misses, cache.hits) == (8 * sides, 12 * sides)
    other = tmp_path / "other-cache"
    fc.MEMORY.clear()  # the writer computes its own entries (memory is shared by directories)
    _train(tiny_world, tmp_path, method, "writer", True, other, pdbs=2, steps=12)  # 3 epochs
    fc.MEMORY.clear()
    warm, warm_rows, cache = _train(tiny_world, tmp_path, method, "warm", True, other)
    assert (cache.misses, cache.hits) == (0, 20 * sides)
    for k, v in cached.items():
        assert torch.equal(warm[k], v), k  # whoever wrote the entries, the same run
    assert warm_rows == cached_rows
    for name in ("forget", "retain"):
        torch.testing.assert_close(
            [r[name] for r in cached_rows], [r[name] for r in plain_rows], rtol=1e-5, atol=1e-6
        )
    for k, v in plain.items():
        # Adam turns rounding-level gradient differences on near-zero gradients into a
        # fraction of one lr-sized step, hence atol LR / 2 (checkpoint transfer's block-wise L2
        # retain differed by 0.23 lr at lr 1e-3 on one machine, by 0.42 lr at 3e-4 on another,
        # whose CPU kernels round differently). (Before StepContext.first_step a warm cache
        # moved sequential's upper blocks by whole steps at lr 1e-3: 1.4e-3.)
        torch.testing.assert_close(
            cached[k], v, rtol=1e-4, atol=LR / 2, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_ranks_agree_on_the_number_of_frozen_forwards(tmp_path):
    """Under FSDP2 a frozen forward is a collective: the ranks agree on the largest miss count
    *before* any forward (a rank computing a miss while another waits in the agreement would
    hang both), then a rank that missed fewer pads with forwards whose results are dropped."""
    cache = FrozenCache(tmp_path)
    rows(cache)  # "a" and "b" cached
    order: list[str] = []

    class Counted(Frozen):
        def __call__(self, i: int) -> dict[str, torch.Tensor]:
            order.append("forward")
            return super().__call__(i)

    def agree(misses: int) -> int:
        order.append(f"agree {misses}")
        return 3  # another rank missed three examples

    cache.agree = agree
    frozen = Counted([4, 2, 5])
    got, _ = rows(cache, ids=("a", "b", "c"), lengths=(4, 2, 5), frozen=frozen)
    assert order == ["agree 1", "forward", "forward", "forward"]  # one miss, two padding
    assert (cache.hits, cache.misses) == (2, 2 + 1)  # the first lookup missed a and b
    want, _ = rows(FrozenCache(None), ids=("a", "b", "c"), lengths=(4, 2, 5))
    assert_valid_equal(got, want, [4, 2, 5])  # padding forwards change nothing
    order.clear()
    rows(cache, ids=("a", "c"), lengths=(4, 5), frozen=Counted([4, 5]))
    assert order == ["agree 0", "forward", "forward", "forward"]  # all hits: three paddings
