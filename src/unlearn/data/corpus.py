"""Text corpora: one document per item.

The mini world writes JSONL corpora with a "text" field; local JSONL/JSON/parquet/text files are
read through `datasets` so that a local file and a hub dataset take the same path.
"""

from __future__ import annotations

import os
from pathlib import Path

from unlearn.errors import UsageError


def load_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of a local corpus file (JSONL with `text_field`, or plain text: one per line)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"corpus file {path} not found")
    if path.suffix in (".jsonl", ".json"):
        from unlearn.fsutil import read_jsonl

        rows = read_jsonl(path)
        if rows and text_field not in rows[0]:
            raise UsageError(f"{path}: rows have no {text_field!r} field (have {sorted(rows[0])})")
        return [r[text_field] for r in rows]
    if path.suffix == ".txt":
        return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    raise UsageError(f"{path}: unsupported corpus format {path.suffix!r} (use .jsonl or .txt)")
