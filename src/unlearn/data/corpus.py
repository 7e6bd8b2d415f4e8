"""Text corpora: one document per item, from a local file or a hub dataset.

A corpus is named by a *spec* string:

- a local file: `.jsonl`, `.json` (JSON lines or one JSON array), `.parquet` or `.txt` (one
  document per non-empty line). Local files are read directly, without `datasets`, so they cost
  no cache directory and no conversion (the mini world's corpora are JSONL);
- a hub dataset, `ID[:CONFIG[:SPLIT]]`, loaded with `datasets.load_dataset` (split default
  `train`; `ID::SPLIT` skips the config), e.g. `wikitext:wikitext-103-raw-v1:train`,
  `Unlearning/WMDP-Bio-Remove-Dataset`, `HuggingFaceH4/ultrachat_200k::train_sft`.

Design choices:

- Text comes from a list of fields; the ones a corpus has are joined (blank line between) in the
  order given, so one list serves every corpus of a run: the default (title, abstract, text,
  messages) gives the WMDP bio corpus's title + abstract + text, wikitext's text and ultrachat's
  messages. A chat field (a list of {"role", "content"} turns) is joined turn by turn.
- Wikitext rows are lines, not documents. A corpus whose name contains "wikitext" is grouped into
  articles at its top-level " = Title = " heading lines (sub-headings " = = ... = = " stay
  inside), so "num_train_examples documents" means the same thing on every corpus.
- Sampling is a seeded shuffle, then the first n (`sample_documents`); the forget side is
  shuffled like the retain side. A mixed retain set (`mix_documents`) takes round(fraction x n)
  documents from the mix corpus and the rest from the main one, then shuffles them together.
- Offline with nothing cached, a hub spec fails with one line naming the dataset and the three
  ways to make it available (UsageError, exit 2), before any weights load.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unlearn.errors import UsageError
from unlearn.fsutil import json_kind, jsonl_rows, read_text

DEFAULT_TEXT_FIELDS = ("title", "abstract", "text", "messages")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_WIKITEXT_TITLE = re.compile(r"^= [^=].* =$")


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus spec: a local file, or a hub dataset id with optional config and split."""

    source: str
    config: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> CorpusSpec:
        spec = str(spec)
        if not spec:
            raise UsageError("empty corpus spec")
        path = Path(spec).expanduser()
        if path.exists() or path.suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
            return cls(str(path))
        name, config, split = [*spec.split(":"), "", ""][:3]
        if not name or spec.count(":") > 2:
            raise UsageError(f"bad corpus spec {spec!r} (a local file or ID[:CONFIG[:SPLIT]])")
        return cls(name, config or None, split or "train")

    @property
    def is_local(self) -> bool:
        return Path(self.source).suffix in LOCAL_SUFFIXES or Path(self.source).exists()

    @property
    def is_wikitext(self) -> bool:
        return "wikitext" in self.source.lower()

    def __str__(self) -> str:
        if self.is_local:
            return self.source
        return ":".join([self.source, self.config or "", self.split])


def load_documents(
    spec: str | os.PathLike | CorpusSpec, text_fields: Sequence[str] = DEFAULT_TEXT_FIELDS
) -> list[str]:
    """Every document of a corpus, in its stored order (empty documents dropped)."""
    spec = spec if isinstance(spec, CorpusSpec) else CorpusSpec.parse(spec)
    if spec.is_local and Path(spec.source).suffix == ".txt":
        return _read_txt(Path(spec.source))
    fields = ("text",) if spec.is_wikitext else tuple(text_fields)
    rows = _read_local(Path(spec.source)) if spec.is_local else _read_hub(spec, fields)
    texts = _row_texts(rows, fields, spec)
    if spec.is_wikitext:
        return group_wikitext(texts)
    return [t for t in texts if t.strip()]


def load_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of a local corpus file, text from one field (the mini world's JSONL corpora)."""
    spec = CorpusSpec.parse(path)
    if not spec.is_local:
        raise UsageError(f"corpus file {path} not found")
    return load_documents(spec, (text_field,))


def sample_documents(documents: Sequence[str], n: int, seed: int) -> list[str]:
    """The first n documents after a shuffle seeded by `seed` (all of them if fewer)."""
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    return docs[:n]


def mix_documents(
    main: Sequence[str], mix: Sequence[str], fraction: float, n: int, seed: int
) -> list[str]:
    """n documents: round(fraction x n) sampled from `mix`, the rest from `main`, shuffled."""
    if not 0 <= fraction <= 1:
        raise UsageError(f"--mix_fraction must be in [0, 1], got {fraction}")
    n_mix = round(fraction * n)
    docs = sample_documents(main, n - n_mix, seed) + sample_documents(mix, n_mix, seed + 7919)
    random.Random(seed).shuffle(docs)
    return docs


def group_wikitext(lines: Sequence[str]) -> list[str]:
    """Wikitext lines -> articles, split at top-level " = Title = " headings.

    Lines before the first heading form no article (a dump starts with a blank line). Blank lines
    are dropped; each article keeps its title line and sub-headings, one line per row.
    """
    articles: list[list[str]] = []
    for line in lines:
        stripped = line.strip()
        if _WIKITEXT_TITLE.match(stripped):
            articles.append([])
        if articles and stripped:
            articles[-1].append(stripped)
    return ["\n".join(a) for a in articles if a]


def row_text(row: dict, fields: Sequence[str]) -> str:
    """The row's text fields that are present and non-empty, joined by blank lines."""
    parts = []
    for name in fields:
        value = row.get(name)
        if isinstance(value, list):
            value = "\n".join(
                turn.get("content", "") if isinstance(turn, dict) else str(turn) for turn in value
            )
        if isinstance(value, str) and value.strip():
            parts.append(value.strip())
    return "\n\n".join(parts)


def _row_texts(rows: Sequence[dict], fields: Sequence[str], spec: CorpusSpec) -> list[str]:
    if not rows:
        return []
    present = [f for f in fields if f in rows[0]]
    if not present:
        raise UsageError(
            f"corpus {spec}: none of the text fields {list(fields)} among its columns "
            f"{sorted(rows[0])} (choose with --text_fields)"
        )
    return [row_text(row, present) for row in rows]


def _read_txt(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"corpus file {path} not found")
    return [line.rstrip("\n") for line in read_text(path).splitlines() if line.strip()]


def _read_local(path: Path) -> list[dict]:
    """Rows of a local JSONL / JSON / parquet file."""
    if not path.is_file():
        raise UsageError(f"corpus file {path} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UsageError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    # Bad bytes or a bad line: one line naming FILE:LINE (read_text / jsonl_rows).
    text = read_text(path)
    if not (path.suffix == ".json" and text.lstrip().startswith("[")):
        return [row for _, row in jsonl_rows(path)]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            kind = json_kind(row)
            raise UsageError(f"{path}: item {i} of the JSON array is {kind}, not a JSON object")
    return rows


def _read_hub(spec: CorpusSpec, fields: Sequence[str]) -> list[dict]:
    """Rows (text fields only) of a hub dataset split through `datasets` (its cache offline)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except Exception as e:  # offline, missing, gated or bad config: all end the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        call = ", ".join(repr(a) for a in (spec.source, spec.config) if a)
        raise UsageError(
            f"dataset {spec} is not available ({first}); download it on a connected machine "
            f"(datasets.load_dataset({call}) fills the cache) and set HF_DATASETS_CACHE to "
            "that cache, or pass a local JSONL/parquet file"
        ) from None
    present = [f for f in fields if f in ds.column_names]
    if not present:
        raise UsageError(
            f"corpus {spec}: none of the text fields {list(fields)} among its columns "
            f"{sorted(ds.column_names)} (choose with --text_fields)"
        )
    return ds.select_columns(present).to_list()
