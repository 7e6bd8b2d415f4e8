"""The lm-eval backend: bundled tasks, world tasks equal to the native evaluator, failures.

Everything runs offline: a tiny random GPT-NeoX and hand-written questions, and the command line
on the tiny mini world.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from unlearn.errors import UsageError
from unlearn.eval import harness
from unlearn.eval.harness import HarnessError, HarnessOptions
from unlearn.eval.native import evaluate_questions, score_questions
from unlearn.eval.saved import run_saved
from unlearn.eval.tasks import TASKS_DIR
from unlearn.eval.tasks.utils import cloze_results, correct_prob, mcq_results
from unlearn.world import evaluate_world
from unlearn.world.tokenizer import train_tokenizer

ROBUST_TOPICS = (
    "bioweapons_and_bioterrorism",
    "dual_use_virology",
    "enhanced_potential_pandemic_pathogens",
    "expanding_access_to_threat_vectors",
    "reverse_genetics_and_easy_editing",
    "viral_vector_research",
)
ENTITIES = ("Braxa", "Tolvin", "Mereth", "Quon", "Sadri", "Pellow", "Ixa", "Dunmore")
VALUES = (" fever", " rash", " cough", " blindness", " fatigue", " chills")


def world_questions(domain: str, seed: int, n_choices: int = 4) -> list[dict]:
    """Entity-first questions in the world's format (no trailing space; choices start with one)."""
    rows = []
    for i, entity in enumerate(ENTITIES):
        k = (i + seed) % len(VALUES)
        choices = [VALUES[(k + j) % len(VALUES)] for j in range(n_choices)]
        rows.append(
            {
                "id": f"{domain}-{i}",
                "domain": domain,
                "prompt": f"The main symptom of {entity} is",
                "choices": choices,
                "answer": (i + seed) % n_choices,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GPT-NeoX (peaked outputs, so no near-ties), its tokenizer and a fake world."""
    root = tmp_path_factory.mktemp("lm_eval")
    questions = {"forget": world_questions("forget", 0), "retain": world_questions("retain", 1)}
    questions["three"] = world_questions("forget", 2, n_choices=3)  # any number of choices
    texts = [q["prompt"] + c for qs in questions.values() for q in qs for c in q["choices"]]
    tokenizer = train_tokenizer(texts * 3, vocab_size=320)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, initializer_range=0.5, max_position_embeddings=128,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    files = {name: write_jsonl(root / f"{name}.jsonl", qs) for name, qs in questions.items()}
    world = SimpleNamespace(root=root, questions=files)
    return SimpleNamespace(model=model, tokenizer=tokenizer, world=world, root=root)


def test_correct_prob_is_softmax_at_the_answer():
    # logliks log(1), log(2), log(1), log(4) -> softmax 1/8, 2/8, 1/8, 4/8
    lls = [0.0, math.log(2), 0.0, math.log(4)]
    assert correct_prob(lls, 3) == pytest.approx(0.5)
    assert correct_prob(lls, 1) == pytest.approx(0.25)
    # Stable for very negative log-likelihoods (a naive exp underflows to 0/0).
    assert correct_prob([-1000.0, -1000.0 - math.log(3)], 0) == pytest.approx(0.75)


def test_process_results_on_hand_computed_logliks():
    doc = {"choices": [" a", " bbbbbbb", " cc", " d"], "answer": 1}
    results = [(-2.0, False), (-3.0, False), (-4.0, False), (-5.0, False)]
    cloze = cloze_results(doc, results)
    # argmax of the raw lls is choice 0 (wrong); per character: -1, -3/8, -4/3, -5/2 -> choice 1.
    assert cloze["acc"] == 0.0 and cloze["acc_norm"] == 1.0
    z = sum(math.exp(x) for x in (-2.0, -3.0, -4.0, -5.0))
    assert cloze["correct_prob"] == pytest.approx(math.exp(-3.0) / z)
    mcq = mcq_results({"answer": 0}, results)
    assert mcq == {"acc": 1.0, "correct_prob": pytest.approx(math.exp(-2.0) / z)}


def test_bundled_yamls_load_through_task_manager():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert "wmdp_bio_robust" in tm.all_groups
    subtasks = {f"wmdp_bio_robust_{t}" for t in ROBUST_TOPICS}
    assert subtasks | {"wmdp_bio_cloze"} <= set(tm.all_subtasks)
    for name in subtasks:
        cfg = load_yaml(tm.task_index[name].yaml_path)
        assert cfg["dataset_path"] == "EleutherAI/wmdp_bio_robust_mcqa"
        assert cfg["test_split"] == "robust" and cfg["num_fewshot"] == 0
        assert cfg["doc_to_text"].endswith("Answer:")
        assert cfg["process_results"].__name__ == "mcq_results"
    cloze = load_yaml(tm.task_index["wmdp_bio_cloze"].yaml_path)
    assert cloze["dataset_path"] == "EleutherAI/wmdp_bio_cloze"
    assert cloze["process_results"].__name__ == "cloze_results"
    assert [m["metric"] for m in cloze["metric_list"]] == ["acc", "acc_norm", "correct_prob"]


def test_world_tasks_equal_native(tiny):
    tasks = ["forget", "retain", "three"]
    native = evaluate_world(tiny.model, tiny.tokenizer, tiny.world, tasks)
    lm = harness.run_tasks(tiny.model, tiny.tokenizer, tasks, tiny.world)
    for task in tasks:
        assert lm[task]["n"] == native[task]["n"] == len(ENTITIES)
        assert lm[task]["acc"] == native[task]["acc"]
        assert lm[task]["acc_norm"] == native[task]["acc_norm"]
        assert lm[task]["correct_prob"] == pytest.approx(native[task]["correct_prob"], abs=1e-5)
        assert lm[task]["acc_stderr"] == pytest.approx(native[task]["acc_stderr"])
        assert lm[task]["collapse"] == native[task]["collapse"]


def _local_copy_of_bundled(tmp_path: Path, rows: list[dict]) -> Path:
    """Task YAMLs that include the bundled ones but read `rows` from a local JSONL."""
    data = write_jsonl(tmp_path / "bio.jsonl", rows)
    local = {"dataset_path": "json", "dataset_name": None}
    files = {"robust": str(data)}
    for topic in ROBUST_TOPICS[:2]:
        cfg = {
            "task": f"local_robust_{topic}",
            "include": str(TASKS_DIR / f"wmdp_bio_robust_{topic}.yaml"),
        }
        cfg |= local | {"dataset_kwargs": {"data_files": files}}
        (tmp_path / f"local_robust_{topic}.yaml").write_text(json.dumps(cfg))
    group = {
        "group": "local_robust",
        "task": [f"local_robust_{t}" for t in ROBUST_TOPICS[:2]],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
    }
    (tmp_path / "local_robust.yaml").write_text(json.dumps(group))
    cloze = {"task": "local_cloze", "include": str(TASKS_DIR / "wmdp_bio_cloze.yaml")}
    cloze |= local | {"dataset_kwargs": {"data_files": {"cloze_compatible": str(data)}}}
    (tmp_path / "local_cloze.yaml").write_text(json.dumps(cloze))
    return tmp_path


def test_bundled_tasks_run_on_local_data(tiny, tmp_path):
    rows = [
        {
            "question": q["prompt"],
            "choices": [c.strip() for c in q["choices"]],
            "answer": q["answer"],
        }
        for q in world_questions("bio", 2)
    ]
    include = _local_copy_of_bundled(tmp_path, rows)
    out = harness.evaluate_prepared(
        tiny.model,
        tiny.tokenizer,
        harness.prepare_tasks(["local_robust", "local_cloze"], include_path=[include]),
        HarnessOptions(batch_size=16),
    )
    robust, cloze = out["local_robust"], out["local_cloze"]
    assert robust["n"] == 2 * len(rows)  # a group: the sum of its subtasks
    assert 0.0 <= robust["acc"] <= 1.0 and robust["acc_stderr"] is not None
    # The cloze task scores " answer" after its prompt: the native evaluator on the same
    # prompt and continuations must agree exactly.
    described = "Complete the following biology questions with the correct answer.\n\n"
    as_world = [
        {"prompt": f"{described}Question: {r['question']}\nAnswer:",
         "choices": [" " + c for c in r["choices"]], "answer": r["answer"]}
        for r in rows
    ]  # fmt: skip
    native = evaluate_questions(tiny.model, tiny.tokenizer, as_world)
    assert cloze["n"] == len(rows)
    assert cloze["acc"] == native["acc"]
    assert cloze["correct_prob"] == pytest.approx(native["correct_prob"], abs=1e-5)
    # lm-eval normalises by the length of the choice *without* the target delimiter (" "), so
    # acc_norm is the native log-likelihoods per character of the bare answer strings.
    scores = score_questions(tiny.model, tiny.tokenizer, as_world)
    by_bare = [
        cloze_results(r, [(ll, False) for ll in s.loglik])["acc_norm"]
        for r, s in zip(rows, scores, strict=True)
    ]
    assert cloze["acc_norm"] == pytest.approx(sum(by_bare) / len(by_bare))


def test_an_eval_that_raises_is_failed_not_a_number(tiny, monkeypatch):
    import lm_eval

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    out = harness.run_tasks(tiny.model, tiny.tokenizer, ["forget"], tiny.world)
    assert out["forget"] == {
        "status": "failed",
        "error": "RuntimeError: CUDA error: device-side assert triggered",
    }
    assert "acc" not in out["forget"]
    assert tiny.model.training is False  # left as it was


def test_metrics_must_be_finite_numbers():
    entry = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A"}
    assert harness.parse_metrics(entry, "t") == {"acc": 0.5, "acc_stderr": None}
    with pytest.raises(HarnessError, match="non-finite"):
        harness.parse_metrics({"acc,none": float("nan")}, "t")
    with pytest.raises(HarnessError, match="no metric"):
        harness.parse_metrics({"alias": "t"}, "t")


# Scans lm-eval's own task index (~15k configs, ~8 s of CPU) once per session: see the last test.
def test_unknown_task_is_a_usage_error(tiny):
    with pytest.raises(UsageError, match="unknown task"):
        harness.prepare_tasks(["forget", "no_such_task_anywhere"], tiny.world)


def test_timeout_must_be_a_finite_positive_number(tiny):
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(UsageError, match="--timeout must be a finite number"):
            HarnessOptions(timeout=bad)
    from unlearn.cli import main

    argv = ["eval", "--model", str(tiny.root / "model"), "--backend", "lm-eval"]
    assert main([*argv, "--tasks", "mmlu", "--timeout", "nan"]) == 2


def test_world_task_question_files_are_validated_before_weights_load(tiny, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*world_questions("forget", 0)[:2], {"prompt": "P"}])
    world = SimpleNamespace(root=tmp_path, questions={**tiny.world.questions, "bad": bad})
    with pytest.raises(UsageError, match=rf"{bad}:3: missing field 'choices', 'answer'"):
        harness.prepare_tasks(["forget", "bad"], world)


def test_saved_model_timeout_is_failed(tiny):
    out = run_saved(
        str(tiny.root / "model"), ["forget", "retain"], tiny.world, HarnessOptions(timeout=0.2)
    )
    assert out == {
        t: {"status": "failed", "error": "timed out after 0.2 s"} for t in ("forget", "retain")
    }


def test_offline_hub_task_is_one_line_exit_2(tiny):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "unlearn", "eval", "--model", str(tiny.root / "model"),
         "--backend", "lm-eval", "--tasks", "wmdp_bio_cloze"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "task wmdp_bio_cloze: dataset not available" in lines[0]
    assert "EleutherAI/wmdp_bio_cloze" in lines[0]


def test_cli_lm_eval_equals_native_on_a_world(tiny_world, tmp_path):
    from unlearn.commands.eval import main

    args = ["--model", str(tiny_world.target), "--world", str(tiny_world.root)]
    assert main([*args, "--output", str(tmp_path / "n.json")]) == 0
    assert main([*args, "--backend", "lm-eval", "--output", str(tmp_path / "l.json")]) == 0
    native = json.loads((tmp_path / "n.json").read_text())
    lm = json.loads((tmp_path / "l.json").read_text())
    assert lm["backend"] == "lm-eval" and set(lm["results"]) == set(native["results"])
    # Perplexity has no lm-eval counterpart: scored natively by both backends.
    assert lm["results"]["general_ppl"] == native["results"].pop("general_ppl")
    for task, r in native["results"].items():
        assert lm["results"][task]["acc"] == r["acc"]
        assert lm["results"][task]["acc_norm"] == r["acc_norm"]
        assert lm["results"][task]["correct_prob"] == pytest.approx(r["correct_prob"], abs=1e-5)


def test_lm_eval_builtin_tasks_are_found_in_its_index():
    """A name that is neither a world nor a bundled task is looked up in lm-eval's own index
    (MMLU: the reference campaign's retain benchmark). Indexing loads no dataset, and the index is
    built once per process (the same cached scan as test_unknown_task_is_a_usage_error's)."""
    tm = harness._task_manager(["mmlu", "wmdp_bio_robust"])
    assert {"mmlu", "wmdp_bio_robust"} <= set(tm.all_tasks)
