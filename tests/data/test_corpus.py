"""Corpora: local files of every format, text fields, wikitext articles, mixing, shuffling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unlearn.data import CorpusSpec, load_documents, load_texts, mix_documents, sample_documents
from unlearn.data.corpus import group_wikitext, row_text
from unlearn.errors import UsageError
from unlearn.recipes.unlearning import build_run_config, training_documents, validate


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_spec_parsing():
    assert CorpusSpec.parse("wikitext:wikitext-103-raw-v1:train") == CorpusSpec(
        "wikitext", "wikitext-103-raw-v1", "train"
    )
    assert CorpusSpec.parse("Unlearning/WMDP-Bio-Remove-Dataset") == CorpusSpec(
        "Unlearning/WMDP-Bio-Remove-Dataset", None, "train"
    )
    assert CorpusSpec.parse("HuggingFaceH4/ultrachat_200k::train_sft").split == "train_sft"
    assert CorpusSpec.parse("data/forget.parquet").is_local
    with pytest.raises(UsageError, match="bad corpus spec"):
        CorpusSpec.parse("a:b:c:d")


def test_every_local_format_gives_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "first doc"}, {"text": "second doc"}, {"text": "  "}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "c.txt").write_text("first doc\n\nsecond doc\n")
    for suffix in ("jsonl", "json", "parquet", "txt"):
        assert load_documents(tmp_path / f"c.{suffix}") == ["first doc", "second doc"], suffix
    assert load_texts(tmp_path / "c.jsonl") == ["first doc", "second doc"]
    with pytest.raises(UsageError, match="not found"):
        load_documents(tmp_path / "missing.jsonl")


def test_text_fields_are_joined_in_the_order_given(tmp_path):
    path = write_jsonl(
        tmp_path / "bio.jsonl",
        [{"title": "T", "abstract": "A", "text": "B", "doi": "x"}, {"title": "U", "text": "C"}],
    )
    assert load_documents(path) == ["T\n\nA\n\nB", "U\n\nC"]
    assert load_documents(path, ["text", "title"]) == ["B\n\nT", "C\n\nU"]
    with pytest.raises(UsageError, match=r"none of the text fields \['body'\]"):
        load_documents(path, ["body"])


def test_chat_messages_are_joined_turn_by_turn():
    row = {
        "prompt": "hi",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    assert row_text(row, ["title", "text", "messages"]) == "hi\nhello"


def test_wikitext_lines_are_grouped_into_articles(tmp_path):
    lines = [
        "",
        " = Valkyria Chronicles = \n",
        "",
        " Senjō no Valkyria is a game . \n",
        " = = Gameplay = = \n",
        " It is tactical . \n",
        "",
        " = Tower Building = \n",
        " The tower is tall . \n",
    ]
    expected = [
        "= Valkyria Chronicles =\nSenjō no Valkyria is a game .\n= = Gameplay = =\n"
        "It is tactical .",
        "= Tower Building =\nThe tower is tall .",
    ]
    assert group_wikitext(lines) == expected
    # A corpus named like wikitext is grouped on load.
    path = write_jsonl(tmp_path / "wikitext-sample.jsonl", [{"text": x} for x in lines])
    assert load_documents(path) == expected


def test_seeded_shuffle_same_seed_same_order():
    docs = [f"d{i}" for i in range(50)]
    a, b, c = (sample_documents(docs, 10, s) for s in (0, 0, 1))
    assert a == b and a != c
    assert len(a) == 10 and set(a) <= set(docs)
    assert sorted(sample_documents(docs, 100, 3)) == sorted(docs)  # all of them if fewer


def test_mix_fraction_sets_the_share_of_the_mix_corpus():
    main = [f"wiki{i}" for i in range(40)]
    chat = [f"chat{i}" for i in range(40)]
    mixed = mix_documents(main, chat, 0.25, 16, seed=0)
    assert len(mixed) == 16
    assert sum(d.startswith("chat") for d in mixed) == 4  # round(0.25 x 16)
    assert mixed == mix_documents(main, chat, 0.25, 16, seed=0)
    assert all(d.startswith("wiki") for d in mix_documents(main, chat, 0.0, 8, seed=0))


def test_run_samples_both_sides_by_seed_with_a_mix(tiny_hf_models, tmp_path):
    """The run's forget AND retain documents follow the seed; the mix enters the retain side."""
    forget = write_jsonl(tmp_path / "f.jsonl", [{"text": f"forget {i}"} for i in range(30)])
    retain = write_jsonl(tmp_path / "r.jsonl", [{"text": f"retain {i}"} for i in range(30)])
    chat = [{"messages": [{"role": "user", "content": f"chat {i}"}]} for i in range(30)]
    mix = write_jsonl(tmp_path / "m.jsonl", chat)
    base = {
        "model": str(tiny_hf_models["llama"]),
        "forget_corpus": str(forget),
        "retain_corpus": str(retain),
        "retain_mix": str(mix),
        "mix_fraction": 0.5,
        "num_train_examples": 8,
        "out": str(tmp_path / "run"),
    }

    def docs(seed):
        cfg = build_run_config("lens", {**base, "seed": seed})
        return training_documents(cfg, validate(cfg))

    (f0, r0), (f0b, r0b), (f1, r1) = docs(0), docs(0), docs(1)
    assert (f0, r0) == (f0b, r0b)
    assert f0 != f1 and r0 != r1
    assert sum(d.startswith("chat") for d in r0) == 4
    assert f0 != [f"forget {i}" for i in range(8)]  # shuffled, not the file's first rows
    with pytest.raises(UsageError, match="go together"):
        build_run_config("lens", {**base, "mix_fraction": 0.0})


def test_missing_hub_dataset_offline_is_one_line_exit_2(tiny_hf_models, tmp_path):
    retain = write_jsonl(tmp_path / "r.jsonl", [{"text": "retain"}])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty cache
    argv = ["run", "--model", str(tiny_hf_models["llama"]), "--out", str(tmp_path / "run")]
    argv += ["--forget_corpus", "nobody/made-up-dataset", "--retain_corpus", str(retain)]
    proc = subprocess.run(
        [sys.executable, "-m", "unlearn", *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "dataset nobody/made-up-dataset" in lines[0]
    assert "HF_DATASETS_CACHE" in lines[0] and "local JSONL/parquet file" in lines[0]


def test_bad_corpus_files_name_the_file_and_line(tmp_path):
    """Non-UTF-8 bytes and bad JSON in every local format: one line naming FILE:LINE."""
    good = '{"text": "first doc"}\n'
    cases = {
        "bytes.jsonl": (good.encode() + b'{"text": "caf\xe9"}\n', ":2: not UTF-8"),
        "bytes.txt": (b"first doc\nsecond\n\ncaf\xe9\n", ":4: not UTF-8"),
        "bytes.json": (b'[{"text": "a"},\n {"text": "caf\xe9"}]', ":2: not UTF-8"),
        "json.jsonl": ((good * 2 + '{"text": "cut off\n').encode(), ":3: not valid JSON"),
        "array.json": (b'[{"text": "a"},\n {"text": b},\n {"text": "c"}]', ":2: not valid JSON"),
        "lines.json": ((good + "not json\n").encode(), ":2: not valid JSON"),
        "row.jsonl": ((good + '["a list"]\n').encode(), ":2: expected a JSON object, got an array"),
        "row.json": (b'[{"text": "a"}, "b"]', ": item 1 of the JSON array is a string"),
    }
    for name, (content, where) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UsageError) as e:
            load_documents(path)
        message = str(e.value)
        assert message.startswith(f"{path}{where}") and "\n" not in message, (name, message)
    # A JSON string may hold a raw U+2028 (line separator): it is not a line break of the file.
    write = tmp_path / "sep.jsonl"
    write.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + good)
    assert load_documents(write) == ["a\u2028b", "first doc"]


def test_bad_corpus_is_exit_2_before_weights_load(
    tiny_world, tiny_hf_models, tmp_path, capsys, monkeypatch
):
    """run, attack, fit-lens and fit-affine: one line naming FILE:LINE, no weights, no output."""
    import shutil

    from tiny_models import linked_world_copy
    from unlearn.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the corpus was validated")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    model = str(tiny_hf_models["gpt_neox"])
    out = tmp_path / "out"
    commands = [
        ["run", "--model", model, "--forget_corpus", str(bad), "--retain_corpus", str(good)],
        ["run", "--model", model, "--forget_corpus", str(good), "--retain_corpus", str(bad)],
        ["attack", "--model", model, "--world", str(tiny_world.root), "--corpus", str(bad)],
        ["fit-lens", "--model", model, "--texts", str(bad)],
        ["fit-affine", "--source", model, "--target", model, "--texts", str(bad)],
    ]
    # The world's own filler corpus (read for lens / affine fitting) is checked up front too.
    world = linked_world_copy(tiny_world, tmp_path / "w")
    (world / "corpus").unlink()
    shutil.copytree(tiny_world.root / "corpus", world / "corpus")
    filler = world / "corpus" / "filler.jsonl"
    filler.write_bytes(filler.read_bytes() + b'{"text": "caf\xe9"}\n')
    commands.append(["run", "--world", str(world)])
    for argv in commands:
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        where = filler if "--world" in argv and "attack" not in argv else bad
        assert len(err) == 1 and f"{where}:" in err[0] and "not UTF-8" in err[0], (argv, err)
        assert not out.exists(), argv
