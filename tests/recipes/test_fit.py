"""recipes/fit: the inputs fit-lens and fit-affine share, validated before any weights load."""

from __future__ import annotations

import json

import pytest

from unlearn.config.settings import ModelArgs
from unlearn.errors import UsageError
from unlearn.recipes.fit import fit_inputs


def test_fit_inputs_resolve_the_model_default_the_layers_and_read_the_texts(
    tiny_hf_models, tmp_path
):
    texts = tmp_path / "general.jsonl"
    texts.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    model = ModelArgs(str(tiny_hf_models["llama"]))
    inputs = fit_inputs(None, model, str(texts), [], lambda n: list(range(n - 1)))
    assert inputs.world is None and inputs.model.name == str(tiny_hf_models["llama"])
    assert inputs.layers == [0, 1]  # the default for a 3-block model
    assert inputs.texts == [f"doc {i}" for i in range(5)]
    assert fit_inputs(None, model, str(texts), [2], list).layers == [2]
    with pytest.raises(UsageError, match=r"--layers \[3\] outside the model's blocks 0..2"):
        fit_inputs(None, model, str(texts), [3], list)
    with pytest.raises(UsageError, match="--model is required"):
        fit_inputs(None, ModelArgs(), str(texts), [], list)


def test_a_cache_entry_is_fitted_under_a_lock_other_fitters_wait_for(tmp_path):
    import fcntl

    from unlearn.readouts.fitting import _fitting

    cache = tmp_path / "lenses" / "abc123"

    def lock_is_free() -> bool:
        with open(tmp_path / "lenses" / ".abc123.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    with _fitting(cache):
        assert not lock_is_free()  # a second worker fitting the same entry would wait here
    assert lock_is_free()
