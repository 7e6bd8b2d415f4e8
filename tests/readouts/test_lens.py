import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPTNeoXForCausalLM

from fit_helpers import FIT_TEXTS, count_fits, fitting_env
from tiny_models import tiny_gpt_neox
from unlearn.errors import UsageError
from unlearn.readouts.hooks import capture
from unlearn.readouts.lens_files import load_lens, save_lens
from unlearn.readouts.lens_training import train_lens
from unlearn.readouts.tuned_lens import TunedLens, evaluate_lens, find_final_norm

N = 4
D = 32


def tiny_model(initializer_range: float = 0.02) -> GPTNeoXForCausalLM:
    return tiny_gpt_neox(N, initializer_range=initializer_range)


def token_batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(64, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0  # some padding, which must not count
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def randomize(lens: TunedLens, seed: int = 0) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return lens


def test_identity_lens_at_last_block_reproduces_model_logits():
    model = tiny_model()
    ids = token_batches(1, 0)[0]["input_ids"]
    with capture(model, [N - 1]) as hs:
        logits = model(input_ids=ids).logits
    lens = TunedLens.for_model(model)
    assert not lens.has_translator(N - 1)
    torch.testing.assert_close(lens.to_logits(model, hs[N - 1], N - 1), logits, rtol=0, atol=0)


def test_lens_works_through_peft_wrapper():
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear"))
    assert find_final_norm(model) is model.base_model.model.gpt_neox.final_layer_norm
    ids = token_batches(1, 0)[0]["input_ids"]
    with capture(model, [N - 1]) as hs:
        logits = model(input_ids=ids).logits
    lens = TunedLens.for_model(model, [N - 1])
    torch.testing.assert_close(lens.to_logits(model, hs[N - 1], N - 1), logits, rtol=0, atol=0)


def test_hooked_layer_is_hidden_states_plus_one():
    model = tiny_model()
    ids = token_batches(1, 0)[0]["input_ids"]
    with capture(model, range(N)) as hs:
        out = model(input_ids=ids, output_hidden_states=True)
    for layer in range(N - 1):
        torch.testing.assert_close(hs[layer], out.hidden_states[layer + 1], rtol=0, atol=0)
    # The last entry of hidden_states is after the final norm, not the last block's output.
    norm = model.gpt_neox.final_layer_norm
    torch.testing.assert_close(out.hidden_states[N], norm(hs[N - 1]))
    assert not torch.allclose(out.hidden_states[N], hs[N - 1])


def test_lens_at_layer_l_consumes_block_l_output():
    """evaluate_lens at layer 1 equals a hand KL computed from hidden_states[2]."""
    model = tiny_model(initializer_range=0.2)
    batch = token_batches(1, 0)[0]
    lens = randomize(TunedLens.for_model(model, [1]))
    out = model(**batch, output_hidden_states=True)
    h = out.hidden_states[2]
    w, b = lens.translators["1"].weight, lens.translators["1"].bias
    logits = model.get_output_embeddings()(model.gpt_neox.final_layer_norm(h + h @ w.T + b))
    logp, logq = out.logits.log_softmax(-1), logits.log_softmax(-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    mask = batch["attention_mask"].bool()
    expected = per_token[mask].mean().item()
    assert evaluate_lens(model, lens, [batch])[1] == pytest.approx(expected, rel=1e-5)


def test_to_logits_trains_nothing_in_the_model():
    model = tiny_model()
    lens = randomize(TunedLens.for_model(model, [1]))
    h = torch.randn(2, 5, D, requires_grad=True)
    lens.to_logits(model, h, 1).sum().backward()
    assert h.grad is not None and lens.translators["1"].weight.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_training_reduces_kl_and_leaves_model_untouched():
    model = tiny_model(initializer_range=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lens, stats = train_lens(
        model, token_batches(4, 1), [1, N - 1], steps=20, lr=1.0, progress=False,
        heldout=token_batches(2, 2),
    )  # fmt: skip
    assert stats.steps == 20 and stats.passes == 5
    assert stats.heldout_kl[1] < 0.7 * stats.heldout_identity_kl[1]
    assert stats.last_kl[1] < stats.first_kl[1]
    # The last block's lens is the identity: no parameters, KL 0.
    assert stats.heldout_kl[N - 1] == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in lens.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


def test_frozen_forwards_reused_across_passes_give_the_same_lens(monkeypatch):
    import unlearn.readouts.lens_training as lens_module

    model = tiny_model(initializer_range=0.2)
    calls = []
    forward = lens_module.final_logits_and_hiddens
    monkeypatch.setattr(
        lens_module, "final_logits_and_hiddens", lambda *a: calls.append(1) or forward(*a)
    )
    kept, _ = train_lens(model, token_batches(4, 1), [1], steps=12, progress=False)
    assert len(calls) == 4  # 3 passes over 4 batches, each forward computed once
    monkeypatch.setattr(lens_module, "FROZEN_FORWARD_BYTES", 0)  # nothing fits: recompute
    recomputed, _ = train_lens(model, token_batches(4, 1), [1], steps=12, progress=False)
    assert len(calls) == 4 + 12
    for name, value in kept.state_dict().items():
        assert torch.equal(value, recomputed.state_dict()[name]), name


def test_one_shot_iterator_stops_training_early():
    model = tiny_model()
    _, stats = train_lens(model, iter(token_batches(3, 1)), [1], steps=10, progress=False)
    assert (stats.steps, stats.passes) == (3, 1)


def test_save_load_round_trip_in_tuned_lens_format(tmp_path):
    model = tiny_model()
    lens = randomize(TunedLens.for_model(model, [0, 2, N - 1]))
    save_lens(lens, tmp_path / "lens", model_name="tiny", revision="step-100")

    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert config == {
        "base_model_name_or_path": "tiny",
        "d_model": D,
        "num_hidden_layers": N,
        "bias": True,
        "base_model_revision": "step-100",
        "unembed_hash": None,
        "lens_type": "linear_tuned_lens",
    }
    params = torch.load(tmp_path / "lens" / "params.pt", weights_only=True)
    assert set(params) == {f"{i}.{k}" for i in range(N) for k in ("weight", "bias")}
    # Our layer l is the library's translator l + 1; translator 0 (embeddings) and uncovered
    # layers are identity (zeros).
    assert torch.equal(params["1.weight"], lens.translators["0"].weight)
    assert torch.equal(params["3.bias"], lens.translators["2"].bias)
    assert not params["0.weight"].any() and not params["2.weight"].any()

    loaded = load_lens(tmp_path / "lens")
    assert loaded.layers == lens.layers == (0, 2, N - 1)
    for key, p in lens.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], p), key
    h = torch.randn(2, 3, D)
    torch.testing.assert_close(loaded.to_logits(model, h, 2), lens.to_logits(model, h, 2))
    # Layer 1 is stored as an all-zero placeholder; the sidecar keeps it from passing for a lens.
    sidecar = json.loads((tmp_path / "lens" / "unlearn_lens.json").read_text())
    assert sidecar == {"layers": [0, 2, N - 1], "stats": None}
    assert load_lens(tmp_path / "lens", layers=[2]).layers == (2,)
    with pytest.raises(UsageError, match=r"covers layers \[0, 2, 3\], not \[1\]"):
        load_lens(tmp_path / "lens", layers=[1, 2])


def test_saved_lens_keeps_training_stats(tmp_path):
    model = tiny_model()
    lens, stats = train_lens(model, token_batches(2, 1), [1], steps=2, progress=False)
    save_lens(lens, tmp_path / "lens", model_name="tiny", stats=stats)
    sidecar = json.loads((tmp_path / "lens" / "unlearn_lens.json").read_text())
    assert sidecar["layers"] == [1]
    assert sidecar["stats"]["steps"] == 2
    assert set(sidecar["stats"]["first_kl"]) == {"1"}


def test_loads_a_lens_written_by_the_library_layout(tmp_path):
    """The library saves its `layer_translators` ModuleList state dict; also accept the prefix."""
    translators = nn.ModuleList([nn.Linear(D, D) for _ in range(N)])
    config = {"base_model_name_or_path": "x", "d_model": D, "num_hidden_layers": N}
    for prefix in ("", "layer_translators."):
        lens_dir = tmp_path / f"lib{len(prefix)}"
        lens_dir.mkdir()
        (lens_dir / "config.json").write_text(json.dumps(config))
        state = {prefix + k: v for k, v in translators.state_dict().items()}
        torch.save(state, lens_dir / "params.pt")
        lens = load_lens(lens_dir)
        assert lens.layers == tuple(range(N))
        for layer in range(N - 1):
            assert torch.equal(lens.translators[str(layer)].weight, translators[layer + 1].weight)
            assert torch.equal(lens.translators[str(layer)].bias, translators[layer + 1].bias)
        lens.check_model(tiny_model())


def test_loads_a_bias_free_half_precision_library_lens(tmp_path):
    """The library's full config (hash set, bias false) and fp16 translators without biases."""
    translators = nn.ModuleList([nn.Linear(D, D, bias=False).half() for _ in range(N)])
    config = {
        "base_model_name_or_path": "EleutherAI/pythia-70m",
        "d_model": D,
        "num_hidden_layers": N,
        "bias": False,
        "base_model_revision": None,
        "unembed_hash": "0123abcd",
        "lens_type": "linear_tuned_lens",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(translators.state_dict(), tmp_path / "params.pt")
    assert set(torch.load(tmp_path / "params.pt")) == {f"{i}.weight" for i in range(N)}
    lens = load_lens(tmp_path)
    assert lens.translators["1"].weight.dtype == torch.float32
    torch.testing.assert_close(lens.translators["1"].weight, translators[2].weight.float())
    assert not lens.translators["1"].bias.any()


def test_not_a_lens_dir_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a tuned-lens directory"):
        load_lens(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "params.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="not a tuned-lens config"):
        load_lens(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": D, "num_hidden_layers": N}))
    with pytest.raises(UsageError, match="cannot read"):
        load_lens(tmp_path)
    torch.save({"0.weight": torch.zeros(D, D)}, tmp_path / "params.pt")
    with pytest.raises(UsageError, match="no translator 1"):
        load_lens(tmp_path)


def test_layer_and_model_mismatch_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="outside"):
        TunedLens(N, D, [N])
    wide = TunedLens(N, 2 * D)
    with pytest.raises(UsageError, match="width"):
        wide.check_model(tiny_model())
    with pytest.raises(UsageError, match="identity"):
        train_lens(tiny_model(), token_batches(1, 0), [N - 1], steps=1, progress=False)


def test_lens_stays_float32_with_a_bf16_model():
    model = tiny_model().to(torch.bfloat16)
    lens = randomize(TunedLens.for_model(model, [1]))
    assert lens.translators["1"].weight.dtype == torch.float32
    h = torch.randn(2, 3, D, dtype=torch.bfloat16)
    logits = lens.to_logits(model, h, 1)
    assert logits.dtype == torch.bfloat16
    expected = F.linear(h.float(), lens.translators["1"].weight, lens.translators["1"].bias)
    torch.testing.assert_close(lens(h, 1), h + expected.bfloat16())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_lens_is_exact_for_other_families(family):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64,
        )  # fmt: skip
        model, norm_name = LlamaForCausalLM(cfg).eval(), "model.norm"
    else:
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4)
        model, norm_name = GPT2LMHeadModel(cfg).eval(), "transformer.ln_f"
    assert find_final_norm(model) is model.get_submodule(norm_name)
    ids = token_batches(1, 0)[0]["input_ids"]
    with capture(model, [2]) as hs:
        logits = model(input_ids=ids).logits
    lens = TunedLens.for_model(model)
    torch.testing.assert_close(lens.to_logits(model, hs[2], 2), logits, rtol=0, atol=0)


# ---- the fitted-lens cache (unlearn.readouts.fitting) --------------------------------------------


def test_cached_lens_is_keyed_on_model_revision_weights_dtype_and_corpus(
    tiny_hf_models, tmp_path, monkeypatch
):
    import shutil

    from unlearn.models.load import load_model
    from unlearn.models.refs import resolve_model
    from unlearn.readouts.fitting import fitted_lens

    model_dir = shutil.copytree(tiny_hf_models["gpt_neox"], tmp_path / "model")
    model = load_model(resolve_model(str(model_dir)))
    fits = count_fits(monkeypatch, "unlearn.readouts.fitting", "train_lens")
    env = fitting_env(model_dir, tmp_path)
    fitted_lens(model, env, [1], steps=2)
    fitted_lens(model, env, [0, 1], steps=2)
    assert len(fits) == 1  # a hit: same model, revision, dtype and corpus (layers covered)
    changes = [
        {"revision": "step-100"},
        {"dtype": "bfloat16"},
        {"fit_texts": FIT_TEXTS[:2]},
        {"heldout_texts": FIT_TEXTS[2:]},
    ]
    for i, change in enumerate(changes, start=2):
        fitted_lens(model, fitting_env(model_dir, tmp_path, **change), [1], steps=2)
        assert len(fits) == i, change  # a miss: fitted again
    revisions = {
        json.loads(p.read_text())["base_model_revision"]
        for p in (tmp_path / "world" / "lenses").glob("*/config.json")
    }
    assert revisions == {None, "step-100"}
    # New weights written to the same directory (a rerun into the same run dir) are another model.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2.0)
    model.save_pretrained(model_dir)
    fitted_lens(model, env, [1], steps=2)
    assert len(fits) == len(changes) + 2


def test_read_only_world_caches_the_lens_in_the_run_dir(tiny_hf_models, tmp_path, capsys):
    import os

    from unlearn.models.load import load_model
    from unlearn.models.refs import resolve_model
    from unlearn.readouts.fitting import fitted_lens

    model_dir = tiny_hf_models["gpt_neox"]
    model = load_model(resolve_model(str(model_dir)))
    world = tmp_path / "world"
    world.mkdir()
    # A file where the cache directory would go: nobody, root included, can create it (root
    # ignores the mode bits below, which stand for the usual read-only world).
    (world / "lenses").write_text("")
    os.chmod(world, 0o555)
    try:
        env = fitting_env(model_dir, tmp_path, world_root=world)
        fitted_lens(model, env, [1], steps=2)
        notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
        assert len(notes) == 1 and "not writable" in notes[0]
        assert str(tmp_path / "run" / "lenses") in notes[0]
        assert len(list((tmp_path / "run" / "lenses").glob("*/config.json"))) == 1
        assert (world / "lenses").is_file() and sorted(os.listdir(world)) == ["lenses"]
    finally:
        os.chmod(world, 0o755)


def test_read_only_world_still_serves_its_cached_lens(
    tiny_hf_models, tmp_path, capsys, monkeypatch
):
    import unlearn.readouts.fitting
    from unlearn.models.load import load_model
    from unlearn.models.refs import resolve_model
    from unlearn.readouts.fitting import fitted_lens

    model_dir = tiny_hf_models["gpt_neox"]
    model = load_model(resolve_model(str(model_dir)))
    env = fitting_env(model_dir, tmp_path)
    fitted_lens(model, env, [1], steps=2)  # cached in the (writable) world
    monkeypatch.setattr(unlearn.readouts.fitting, "_can_write", lambda directory: False)
    fits = count_fits(monkeypatch, "unlearn.readouts.fitting", "train_lens")
    capsys.readouterr()
    fitted_lens(model, env, [1], steps=2)
    assert fits == [] and "note:" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_can_write_makes_a_real_write_attempt(tmp_path):
    from unlearn.readouts.fitting import _can_write

    assert _can_write(tmp_path / "new" / "cache")
    (tmp_path / "file").write_text("")
    assert not _can_write(tmp_path / "file" / "cache")


# -- --lens by hub id (tuned-lens layout, served from a fake offline hub cache) -----------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache and HF_HUB_OFFLINE=1 (also for this process, whose
    huggingface_hub read its environment at import). Returns the cache directory."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_lens(cache, repo_id, lens_dir, folder="", revision="main", repo_type="model"):
    """Put the lens at `lens_dir` in the hub cache as hf_hub_download leaves a download:
    refs/<revision> names a commit, snapshots/<commit>/<folder>/ holds config.json + params.pt."""
    import hashlib
    import shutil

    commit = hashlib.sha1(f"{repo_id}:{folder}@{revision}".encode()).hexdigest()
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit / folder
    snapshot.mkdir(parents=True)
    for name in ("config.json", "params.pt"):  # what a published lens has (no sidecar)
        shutil.copy(lens_dir / name, snapshot / name)
    return snapshot


def test_hub_lens_forms():
    from unlearn.readouts.lens_hub import HubLens, parse_hub_lens

    assert parse_hub_lens("EleutherAI/deep-ignorance-unfiltered-lens") == HubLens(
        "EleutherAI/deep-ignorance-unfiltered-lens"
    )
    assert parse_hub_lens("spaces/AlignmentResearch/tuned-lens:lens/gpt2-large@v1") == HubLens(
        "AlignmentResearch/tuned-lens", "space", "lens/gpt2-large", "v1"
    )
    assert parse_hub_lens("o/n@global_step38144").revision == "global_step38144"
    for not_hub in ("/abs/lens", "./lens", "lens", "a/b/c", "~/x/y"):
        assert parse_hub_lens(not_hub) is None, not_hub


def test_lens_loads_by_hub_id_offline(tmp_path, offline_hub):
    from unlearn.models.refs import ModelRef
    from unlearn.readouts.lens_hub import resolve_lens

    lens = randomize(TunedLens.for_model(tiny_model()))
    save_lens(lens, tmp_path / "lens", model_name="someone/tiny-model")
    root = cache_lens(offline_hub, "someone/tiny-lens", tmp_path / "lens")
    cache_lens(offline_hub, "someone/lenses", tmp_path / "lens", "lens/someone/tiny-model")
    cache_lens(offline_hub, "someone/lenses", tmp_path / "lens", "lens/other", "v1", "space")
    model = ModelRef("someone/tiny-model")
    found = {
        "someone/tiny-lens": resolve_lens("someone/tiny-lens"),  # files at the root
        "library layout": resolve_lens("someone/lenses", model),  # lens/<model id>/
        "folder + revision": resolve_lens("spaces/someone/lenses:lens/other@v1"),
    }
    assert found["someone/tiny-lens"] == root
    assert found["library layout"].parts[-3:] == ("lens", "someone", "tiny-model")
    for path in found.values():
        loaded = load_lens(path)
        for layer in range(N - 1):
            assert torch.equal(
                loaded.translators[str(layer)].weight, lens.translators[str(layer)].weight
            )
    # A local directory that exists wins over the hub.
    assert resolve_lens(str(tmp_path / "lens")) == tmp_path / "lens"


def test_missing_hub_lens_is_one_usage_line(tmp_path, offline_hub):
    from unlearn.readouts.lens_hub import resolve_lens

    with pytest.raises(UsageError) as e:
        resolve_lens("nobody/made-up-lens")
    message = str(e.value)
    assert "\n" not in message and "nobody/made-up-lens" in message
    assert "hf download nobody/made-up-lens config.json params.pt" in message
    # Validation looks for params.pt without downloading it: a half-cached lens fails there.
    save_lens(TunedLens.for_model(tiny_model()), tmp_path / "lens", model_name="tiny")
    (cache_lens(offline_hub, "someone/half", tmp_path / "lens") / "params.pt").unlink()
    with pytest.raises(UsageError, match="someone/half: not a local directory, and not in the"):
        resolve_lens("someone/half", download=False)
    with pytest.raises(UsageError, match="no such directory, and not a hub id"):
        resolve_lens(str(tmp_path / "absent"))


def _corpora(tmp_path):
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text(
        "".join(json.dumps({"text": f"Zargreisovir spreads {i}."}) + "\n" for i in range(6))
    )
    retain.write_text(
        "".join(json.dumps({"text": f"The river flows {i}."}) + "\n" for i in range(6))
    )
    return ["--forget_corpus", str(forget), "--retain_corpus", str(retain)]


def test_run_with_a_hub_lens_offline(tiny_hf_models, tmp_path, offline_hub, monkeypatch, capsys):
    """`unlearn run --method lens --lens OWNER/NAME` with the lens in the hub cache; with an id
    that is not cached: one line, exit 2, and no weights loaded."""
    import unlearn.recipes.unlearning
    from unlearn.cli import main
    from unlearn.models.load import load_model
    from unlearn.models.refs import resolve_model
    from unlearn.runs.rundir import RunDir

    model_dir = tiny_hf_models["gpt_neox"]
    lens = TunedLens.for_model(load_model(resolve_model(model_dir)))
    save_lens(randomize(lens), tmp_path / "lens", model_name="tiny")
    cache_lens(offline_hub, "someone/tiny-lens", tmp_path / "lens")
    argv = ["run", "--method", "lens", "--model", str(model_dir), *_corpora(tmp_path)]
    argv += ["--layers", "1", "--max_steps", "2", "--num_train_examples", "4", "--pdbs", "2"]
    argv += ["--grad_accum", "1", "--max_length", "16", "--progress", "false", "--eval", "false"]

    assert main([*argv, "--lens", "someone/tiny-lens", "--out", str(tmp_path / "run")]) == 0
    record = RunDir(tmp_path / "run").read()
    assert record.meta.status == "done" and record.meta.config["lens"] == "someone/tiny-lens"
    capsys.readouterr()

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the lens was checked")

    monkeypatch.setattr(unlearn.recipes.unlearning, "load_model", no_weights)
    out = tmp_path / "bad"
    assert main([*argv, "--lens", "nobody/made-up-lens", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nobody/made-up-lens" in err[0] and "hf download" in err[0], err
    assert not out.exists()
