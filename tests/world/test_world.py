"""The mini world: generator, tokenizer, pretraining pieces, world.json and the CLI."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from unlearn.commands.world import main as world_main
from unlearn.errors import UsageError
from unlearn.fsutil import write_jsonl
from unlearn.world import PRESETS, Preset, evaluate_world, get_preset, load_world
from unlearn.world.build import QUESTION_FILES
from unlearn.world.generate import (
    CORPUS_PHASES,
    GROUPS,
    NEAR_DOMAIN_GROUP,
    PATHOGEN_RELATIONS,
    TASKS,
    generate,
)
from unlearn.world.phases import PackedStream, lr_at, make_model, training_pools
from unlearn.world.pretrain import pretrain
from unlearn.world.tokenizer import train_tokenizer

TINY = PRESETS["tiny"]
SCHEMA_KEYS = ("id", "domain", "group", "entity", "relation", "prompt", "choices", "answer")


@pytest.fixture(scope="module")
def data():
    return generate(TINY, 0)


def test_generator_is_deterministic_and_seeded(data):
    assert generate(TINY, 0) == data
    other = generate(TINY, 1)
    assert other.groups != data.groups
    assert other.questions != data.questions


def test_built_question_files_are_the_generators_bytes(tiny_world, data, tmp_path):
    for task, rows in data.questions.items():
        write_jsonl(tmp_path / f"{task}.jsonl", rows)
        assert (tmp_path / f"{task}.jsonl").read_bytes() == tiny_world.questions[task].read_bytes()


def test_groups_are_disjoint_and_questions_stay_in_their_group(data):
    sets = {g: set(data.groups[g]) for g in GROUPS}
    assert all(len(sets[g]) == TINY.pathogens_per_group for g in GROUPS)
    assert not (sets["unlearn"] & sets["attack"] or sets["unlearn"] & sets["heldout"])
    assert not sets["attack"] & sets["heldout"]
    forget_names = set().union(*sets.values())
    assert not forget_names & set(data.retain_entities)
    for task, group in TASKS.items():
        rows = data.questions[task]
        assert len(rows) == TINY.pathogens_per_group * TINY.pathogen_relations
        assert {q["entity"] for q in rows} == sets[group]
        assert {q["group"] for q in rows} == {group}
        assert {q["domain"] for q in rows} == {"forget"}
    assert {q["entity"] for q in data.questions["retain"]} == set(data.retain_entities)
    # Each forget corpus mentions its own group's pathogens and no other forget entity.
    for g in GROUPS:
        text = "\n".join(data.corpora[f"forget_{g}"])
        assert all(name in text for name in sets[g])
        assert not any(name in text for name in forget_names - sets[g])
    clean = "\n".join(data.corpora["retain"] + data.corpora["filler"])
    assert not any(name in clean for name in forget_names)
    late = set(data.late_entities)
    assert len(late) == TINY.late_people + TINY.late_towns
    assert not late & (forget_names | set(data.retain_entities))
    assert {q["entity"] for q in data.questions["retain_late"]} == late
    assert {q["group"] for q in data.questions["retain_late"]} == {"retain_late"}
    near = data.questions["near_domain"]
    assert {q["entity"] for q in near} == sets[NEAR_DOMAIN_GROUP]
    assert len(near) == TINY.pathogens_per_group * TINY.near_relations


def test_late_retain_and_near_domain_documents_go_where_they_should(data):
    """No retain_late entity or fact before phase 2; near-domain documents hold no forget
    relation and survive the data filter, which removes every forget document."""
    phases = CORPUS_PHASES
    assert set(data.corpora) == set(phases)
    phase1 = "\n".join(d for name, ds in data.corpora.items() if phases[name] == "both" for d in ds)
    assert not any(name in phase1 for name in data.late_entities)
    late_lines = set("\n".join(data.corpora["retain_late"]).splitlines())
    assert not late_lines & set(phase1.splitlines())
    forget_prompts = [p.replace("{e}", "").strip() for r in PATHOGEN_RELATIONS for p in r.prompts]
    near_text = "\n".join(data.corpora["near_domain"])
    assert all(name in near_text for g in GROUPS for name in data.groups[g])
    for line in near_text.splitlines():
        assert not any(p in line for p in forget_prompts), line
    # The filter (what the twin trains on): every forget document out, near-domain and late in.
    tok = {name: [[i] for i, _ in enumerate(ds)] for name, ds in data.corpora.items()}
    pools = training_pools(tok)
    forget_docs = sum(len(data.corpora[f"forget_{g}"]) for g in GROUPS)
    assert len(pools["forget"]) == forget_docs
    assert len(pools["late"]) == len(data.corpora["retain_late"])
    both = ("retain", "near_domain", "filler")
    assert len(pools["both"]) == sum(len(data.corpora[n]) for n in both)
    # Held-out filler never trains anything and is not a copy of a training document.
    untrained = ("filler_heldout", "near_domain_retain")
    assert sum(map(len, pools.values())) == sum(
        len(ds) for name, ds in data.corpora.items() if name not in untrained
    )
    assert not set(data.corpora["filler_heldout"]) & set(data.corpora["filler"])
    # Runs' retain-side near-domain text: pretraining documents about the pathogens the
    # near_domain task does not ask about (the task's own facts are never retain data).
    near_retain = data.corpora["near_domain_retain"]
    assert set(near_retain) <= set(data.corpora["near_domain"])
    asked = data.groups[NEAR_DOMAIN_GROUP]
    assert not any(name in d for d in near_retain for name in asked)
    assert len(near_retain) == 2 * TINY.pathogens_per_group * TINY.docs_per_entity
    with pytest.raises(ValueError, match="no pretraining phase"):
        training_pools({"mystery": [[1]]})


def test_names_never_contain_one_another(data):
    names = [n for g in GROUPS for n in data.groups[g]] + data.retain_entities + data.late_entities
    assert len(set(names)) == len(names)
    for a in names:
        assert a[0].isupper() and a.isalpha()
        assert not any(b != a and b.startswith(a) for b in names)


def test_question_schema(data):
    for task, rows in data.questions.items():
        assert len({q["id"] for q in rows}) == len(rows)
        for q in rows:
            assert set(q) == set(SCHEMA_KEYS)
            assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
            assert q["answer"] in range(4)
            assert all(c.startswith(" ") and not c.startswith("  ") for c in q["choices"])
            assert q["entity"] in q["prompt"] and not q["prompt"].endswith(" ")
        # Balanced answer positions: counts differ by at most one.
        counts = Counter(q["answer"] for q in rows)
        assert max(counts.values()) - min(counts.values()) <= 1, task


def test_answers_are_stated_in_the_corpus_and_distractors_are_not(data):
    lines = {
        "forget": set("\n".join(data.corpora["forget_unlearn"]).splitlines()),
        "forget_heldout": set("\n".join(data.corpora["forget_heldout"]).splitlines()),
        "forget_attack": set("\n".join(data.corpora["forget_attack"]).splitlines()),
        "retain": set("\n".join(data.corpora["retain"]).splitlines()),
        "retain_late": set("\n".join(data.corpora["retain_late"]).splitlines()),
        "near_domain": set("\n".join(data.corpora["near_domain"]).splitlines()),
    }
    # docs_per_entity == number of templates, so every phrasing of every fact is in the corpus.
    assert TINY.docs_per_entity == 3
    for task, rows in data.questions.items():
        for q in rows:
            stated = [f"{q['prompt']}{c}." in lines[task] for c in q["choices"]]
            assert stated == [i == q["answer"] for i in range(4)]


def test_values_are_balanced_within_each_group(data):
    # 12 pathogens per group over 8 values: each value is the answer once or twice per relation.
    for task in (*TASKS, "near_domain"):
        per_relation: dict[str, Counter] = {}
        for q in data.questions[task]:
            answer = q["choices"][q["answer"]]
            per_relation.setdefault(q["relation"], Counter())[answer] += 1
        for counts in per_relation.values():
            assert set(counts.values()) <= {1, 2} and sum(counts.values()) == 12


def test_tokenizer_round_trip_and_clean_choice_boundary(tiny_world, data):
    tok = AutoTokenizer.from_pretrained(str(tiny_world.tokenizer))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert len(tok) == TINY.vocab_size
    for doc in data.corpora["forget_unlearn"][:20] + data.corpora["filler"][:5]:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == doc
    for rows in data.questions.values():
        for q in rows:
            prompt = tok(q["prompt"], add_special_tokens=False)["input_ids"]
            for c in q["choices"]:
                whole = tok(q["prompt"] + c, add_special_tokens=False)["input_ids"]
                assert whole == prompt + tok(c, add_special_tokens=False)["input_ids"]


def test_tokenizer_training_is_deterministic(data):
    docs = [d for ds in data.corpora.values() for d in ds]
    assert train_tokenizer(docs, 400).get_vocab() == train_tokenizer(docs, 400).get_vocab()


def test_world_json_is_relative_and_complete(tiny_world):
    index = json.loads((tiny_world.root / "world.json").read_text())
    assert index["format"] == 2 and index["preset"] == "tiny" and index["seed"] == 0
    rels = [index["tokenizer"], index["target"], index["filtered"], index["ignorant_checkpoint"]]
    rels += index["checkpoints"] + list(index["questions"].values())
    rels += list(index["corpora"].values())
    for rel in rels:
        assert not Path(rel).is_absolute() and (tiny_world.root / rel).exists()
    assert index["questions"] == QUESTION_FILES
    assert set(index["corpora"]) == set(CORPUS_PHASES)
    assert index["perplexity"] == {"general_ppl": "corpus/filler_heldout.jsonl"}
    # Checkpoints every 100 steps up to (not including) the final step, which is the target.
    steps = [int(p.rsplit("-", 1)[1]) for p in index["checkpoints"]]
    assert steps == list(range(100, TINY.total_steps, 100))
    assert index["ignorant_checkpoint"] == f"models/checkpoints/step-{TINY.phase1_steps:05d}"
    for model_dir in [tiny_world.target, tiny_world.filtered, *tiny_world.checkpoints]:
        assert (model_dir / "model.safetensors").is_file()
        assert (model_dir / "tokenizer.json").is_file()
    stats = index["stats"]
    assert set(stats["baseline"]) == {"target", "ignorant", "filtered"}
    assert stats["trained_tokens"]["phase2_target"] == stats["trained_tokens"]["phase2_filtered"]
    assert stats["params"] > 0 and stats["seconds"]["total"] > 0


def test_load_world_resolves_absolute_paths(tiny_world, tmp_path):
    world = load_world(tiny_world.root)
    assert world == tiny_world
    assert all(p.is_absolute() for p in [world.target, *world.questions.values()])
    assert world.read_corpus("filler")[0]
    assert world.read_questions("retain")[0]["domain"] == "retain"
    with pytest.raises(UsageError):
        world.read_questions("nope")
    with pytest.raises(UsageError, match="not a world directory"):
        load_world(tmp_path)
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        load_world(tmp_path)


def test_a_format_1_world_is_refused_with_the_rebuild_command(tiny_world, tmp_path):
    index = json.loads((tiny_world.root / "world.json").read_text())
    (tmp_path / "world.json").write_text(json.dumps({**index, "format": 1}))
    with pytest.raises(UsageError) as e:
        load_world(tmp_path)
    message = str(e.value)
    assert "format-1 world" in message and "\n" not in message
    assert "unlearn world build --preset tiny --seed 0 --out DIR" in message


def test_baselines_order_and_match_the_saved_models(tiny_world):
    base = tiny_world.stats["baseline"]
    for task in TASKS:
        assert base["target"][task]["acc"] >= 0.6, task
        assert base["ignorant"][task]["acc"] <= 0.45, task
        assert base["filtered"][task]["acc"] <= 0.45, task
    for name in base:
        assert base[name]["retain"]["acc"] >= 0.8, name
        assert base[name]["near_domain"]["acc"] >= 0.8, name  # the filter keeps them
    # Late retain facts: the ignorant checkpoint never saw them (chance), the twin did.
    assert base["ignorant"]["retain_late"]["acc"] <= 0.35
    assert base["target"]["retain_late"]["acc"] >= 0.8
    assert base["filtered"]["retain_late"]["acc"] >= 0.8
    # The numbers in world.json are those of the saved target, reloaded from disk.
    from transformers import GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_world.target))
    model = GPTNeoXForCausalLM.from_pretrained(str(tiny_world.target))
    again = evaluate_world(model, tok, tiny_world, tasks=["forget"])
    assert again["forget"]["acc"] == pytest.approx(base["target"]["forget"]["acc"], abs=1e-4)
    # Every phase-1 checkpoint, not only the last, is at chance on the late retain facts.
    phase1 = tiny_world.checkpoints[: tiny_world.checkpoints.index(tiny_world.ignorant_checkpoint)]
    for path in phase1:
        model = GPTNeoXForCausalLM.from_pretrained(str(path))
        late = evaluate_world(model, tok, tiny_world, tasks=["retain_late"])["retain_late"]
        assert late["acc"] <= 0.4, path.name


def test_pretraining_is_deterministic(data):
    preset = dataclasses.replace(
        TINY, phase1_steps=6, phase2_steps=6, checkpoint_interval=3, warmup_steps=2
    )
    tok = train_tokenizer([d for ds in data.corpora.values() for d in ds], 400)
    docs = {k: tok(v, add_special_tokens=False)["input_ids"] for k, v in data.corpora.items()}

    def run():
        saved: list[int] = []
        r = pretrain(preset, docs, tok.eos_token_id, 0, lambda m, s: saved.append(s), 400, False)
        return r, saved

    (a, saved), (b, _) = run(), run()
    assert saved == [3, 6, 9]
    for pa, pb in zip(a.target.parameters(), b.target.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # The twin shares phase 1 but never saw forget documents, so it ends elsewhere.
    assert not torch.equal(
        a.target.get_output_embeddings().weight, a.filtered.get_output_embeddings().weight
    )
    assert a.target_phase2.tokens == a.filtered_phase2.tokens == 6 * 16 * 64


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = make_model(TINY, 400, 0, seed=3), make_model(TINY, 400, 0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.get_output_embeddings().weight, b.get_output_embeddings().weight)
    assert not torch.equal(
        a.get_output_embeddings().weight, make_model(TINY, 400, 0, 4).get_output_embeddings().weight
    )


def test_packed_stream_keeps_every_token_in_order_per_epoch():
    docs = [[1, 2], [3], [4, 5, 6]]
    stream = iter(PackedStream(docs, eos_id=0, seq_len=3, batch_size=2, seed=0))
    tokens = torch.cat([next(stream).flatten() for _ in range(3)]).tolist()  # 18 = 2 epochs
    assert len(tokens) == 18
    for epoch in (tokens[:9], tokens[9:]):
        pieces = "".join(map(str, epoch)).split("0")[:-1]
        assert sorted(pieces) == ["12", "3", "456"]


def test_lr_schedule_is_one_cycle():
    p = dataclasses.replace(
        TINY, lr=1e-2, warmup_steps=10, phase1_steps=100, phase2_steps=100, final_lr_ratio=0.1
    )
    assert lr_at(0, p) == pytest.approx(1e-3)
    assert lr_at(9, p) == pytest.approx(1e-2)
    assert lr_at(10 + 95, p) == pytest.approx(1e-2 * 0.55)  # halfway down the cosine
    assert lr_at(200, p) == pytest.approx(1e-3)


def test_presets_validate():
    assert get_preset("tiny") is TINY
    with pytest.raises(UsageError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(UsageError, match="checkpoint_interval"):
        dataclasses.replace(TINY, checkpoint_interval=7)
    with pytest.raises(UsageError, match="heads"):
        dataclasses.replace(TINY, heads=3)
    with pytest.raises(UsageError, match="positive"):
        dataclasses.replace(TINY, people=0)
    assert isinstance(PRESETS["default"], Preset) and PRESETS["default"].layers >= 4


def test_cli_rejects_bad_input_and_writes_nothing(tmp_path):
    out = tmp_path / "w"
    with pytest.raises(UsageError):
        world_main(["build", "--preset", "nope", "--out", str(out)])
    with pytest.raises(UsageError, match="required"):
        world_main(["build", "--preset", "tiny"])
    with pytest.raises(UsageError):
        world_main(["destroy", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a world directory"):
        world_main(["build", "--preset", "tiny", "--out", str(precious)])
    assert (precious / "notes.txt").read_text() == "keep me"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError):
        world_main(["build", "--preset", "tiny", "--out", str(blocker / "w")])


def _project_imports(path: Path) -> set[str]:
    """Every `unlearn...` module a source file imports, at any depth (lazy imports too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("unlearn")}


def test_eval_never_imports_the_world():
    """The world calls the generic evaluator (`unlearn.world.scoring`); the evaluator and the
    lm-eval adapter get a world's question files as arguments, so eval never imports world."""
    import unlearn.eval
    import unlearn.world.scoring

    eval_dir = Path(unlearn.eval.__file__).parent
    importers = {
        str(p.relative_to(eval_dir)): sorted(
            n for n in _project_imports(p) if n.split(".")[:2] == ["unlearn", "world"]
        )
        for p in eval_dir.rglob("*.py")
    }
    assert {k: v for k, v in importers.items() if v} == {}
    assert "unlearn.eval.native" in _project_imports(Path(unlearn.world.scoring.__file__))
