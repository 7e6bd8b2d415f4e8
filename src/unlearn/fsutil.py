"""Atomic file-system writes.

Every artifact directory (world, model, run, lens, affine maps) is built in a temporary sibling
directory and renamed into place only when complete, so a crash or a bad input never leaves a
half-written artifact where a later stage would mistake it for a finished one.

The rule for outputs: a command replaces only what it can prove it wrote earlier (a marker file
or the exact layout of its own artifact, `check_output_dir`); a file or a foreign directory at an
output path is a one-line UsageError, never deleted or mixed into. Checks create nothing: parent
directories appear only when something is actually written.

The readers (`read_text`, `jsonl_rows`, `read_jsonl`) decode UTF-8 explicitly and turn bad bytes
or a bad JSON line into one UsageError naming FILE:LINE: input files (questions, corpora) are
bad input, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_writable_parent(path: str | os.PathLike) -> Path:
    """`path` as an absolute Path, after checking it can be created: its nearest existing
    ancestor is a writable directory (UsageError if not).

    Creates nothing, so a command that later refuses another input (exit 2) leaves no empty
    directories behind; the writers (`atomic_dir`, `atomic_write_text`, ...) create the parents.
    """
    path = Path(path).expanduser().absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot create {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {ancestor} is not writable")
    return path


def check_output_dir(path: str | os.PathLike, what: str, is_ours: Callable[[Path], bool]) -> Path:
    """`path` as an absolute Path, after checking a command may write (and replace) it.

    Allowed: a new path, an empty directory, or a directory that `is_ours` proves the same tool
    wrote earlier (a marker file or its exact layout), described by `what` ("a lens directory").
    Anything else belongs to the user, a file or a foreign directory, and is a UsageError: a
    command never replaces or mixes files into what it cannot prove it wrote. Creates nothing.
    """
    path = check_writable_parent(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a directory")
        if any(path.iterdir()) and not is_ours(path):
            raise UsageError(
                f"{path} is not empty and is not {what}; give a new or empty directory"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"output directory {path} is not writable")
    return path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final` in one rename.

    On an exception the temp directory is removed and `final` is left as it was. The directory
    gets the usual permissions (0777 minus the umask), not mkdtemp's owner-only 0700, so others
    on a shared cluster can read models and worlds when the umask lets them.
    """
    final = check_writable_parent(final)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # Rename the old one aside first so that `final` is never missing a complete artifact
        # for longer than two renames, and is never a mix of old and new files.
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file + rename (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates the file owner-only; give it the usual permissions (umask applies).
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON version of `atomic_write_text` (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}
_JSON_KINDS |= {bool: "a boolean", type(None): "null"}


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "a string", ...)."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; UsageError naming FILE:LINE at the first byte that is not UTF-8.

    Decoded explicitly (not with the locale's encoding), so a file reads the same everywhere.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UsageError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file.

    Bad bytes, a line that is not JSON or not a JSON object: UsageError naming FILE:LINE. Lines
    are split at "\n" only (not `str.splitlines`, which also splits at U+2028 and other
    separators that JSON strings may hold raw), so the numbers are an editor's line numbers.
    """
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            error = f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})"
            raise UsageError(error) from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object, got {json_kind(row)}")
        rows.append((number, row))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file into a list of dicts (blank lines skipped; bad lines: see jsonl_rows)."""
    return [row for _, row in jsonl_rows(path)]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows as JSONL atomically, with sorted-free stable formatting (byte-reproducible)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
