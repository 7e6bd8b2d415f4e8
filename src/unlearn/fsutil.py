"""Atomic file-system writes.

Every artifact directory (world, model, run, lens, affine maps) is built in a temporary sibling
directory and renamed into place only when complete, so a crash or a bad input never leaves a
half-written artifact where a later stage would mistake it for a finished one.

The rule for outputs: a command replaces only what it can prove it wrote earlier (a marker file
or the exact layout of its own artifact, `check_output_dir`; for a single file, its content,
`check_output_file`); a file or a foreign directory at an output path is a one-line UsageError,
never deleted or mixed into. Checks create nothing: parent directories appear only when
something is actually written.

Permissions: what is written gets the usual permissions, 0666 (files) or 0777 (directories)
minus the umask, also where a library writes through an owner-only temp file (safetensors'
`save_file` makes 0600 files): a model in a 0755 directory is readable where the directory is.

Temp folders: `atomic_dir` names its temp sibling `.NAME.tmp-PID@HOST-XXXXXXXX`. A process
killed before the rename (SIGKILL, a node failure) leaves it behind; the next `atomic_dir` for
the same NAME removes those whose HOST is this machine and whose PID is no longer running, the
only ones it can prove are abandoned (a build of the same NAME still running elsewhere keeps
its folder). Nothing else is removed.

The readers (`read_text`, `jsonl_rows`, `read_jsonl`) decode UTF-8 explicitly and turn bad bytes
or a bad JSON line into one UsageError naming FILE:LINE: input files (questions, corpora) are
bad input, not a traceback. `check_safetensors` does the same for a weight file, from its header
and size alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unlearn.errors import UsageError


def current_umask() -> int:
    """The process's umask: from /proc on Linux, else by setting and restoring it (there is no
    getter; the set-and-restore briefly leaves umask 0, which another thread creating a file at
    that instant would get, so /proc is preferred)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_permissions(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a directory and everything under it) the usual permissions:
    0666 for files (0777 if the owner may execute it) and 0777 for directories, minus the umask.

    Libraries that write through `tempfile` leave owner-only files (safetensors' `save_file`
    writes 0600), which in a 0755 model directory others could list but not read. Symlinks are
    left alone (chmod would follow them out of the tree)."""
    mask = current_umask()
    root = Path(path)

    def fix(p: Path) -> None:
        if p.is_symlink():
            return
        executable = p.is_dir() or p.stat().st_mode & 0o100
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)

    fix(root)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                fix(Path(dirpath) / name)


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


def check_output_file(
    path: str | os.PathLike, what: str, is_ours: Callable[[Path], bool], flag: str = "output"
) -> Path:
    """`path` as an absolute Path, after checking a command may write (and replace) the file.

    Allowed: a new path, or an existing file that `is_ours` proves the same command wrote
    earlier (from its content), described by `what` ("an eval results file"). A directory, or a
    file that is not ours (the user's notes, a run's run.json), is a UsageError naming `flag`
    ("--output"): it is never replaced. Creates nothing."""
    path = check_writable_parent(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path for {what}")
    if path.exists() or path.is_symlink():
        if not path.is_file() or not is_ours(path):
            raise UsageError(
                f"{flag} {path} exists and is not {what}; give a new path (it is never replaced)"
            )
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"output directory {path.parent} is not writable")
    return path


def _owner_tag() -> str:
    """PID@HOST of this process, for the names of `atomic_dir`'s temp folders."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40] or "host"
    return f"{os.getpid()}@{host}"


def _running(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temp_dirs(final: str | os.PathLike) -> list[Path]:
    """Remove the temp folders that an `atomic_dir(final)` killed before its rename left beside
    `final` (`.NAME.tmp-PID@HOST-*` and `.NAME.old-PID@HOST-*` whose HOST is this machine and
    whose PID no longer runs); returns them. A folder of another naming, of another machine or
    of a live process is kept: only what is provably abandoned is removed."""
    final = Path(final)
    host = _owner_tag().split("@", 1)[1]
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)@(.+)-[a-z0-9_]{{8}}")
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or match[2] != host or not entry.is_dir() or entry.is_symlink():
            continue
        if _running(int(match[1])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            print(f"note: removed {entry}, left by an interrupted write", file=sys.stderr)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final` in one rename.

    On an exception the temp directory is removed and `final` is left as it was. Everything in
    it gets the usual permissions before the rename (`default_permissions`), not mkdtemp's
    owner-only 0700 or a library's 0600 files, so others on a shared cluster can read models
    and worlds when the umask lets them. Temp folders of an earlier `atomic_dir(final)` that was
    killed are removed first (`remove_stale_temp_dirs`).
    """
    final = check_writable_parent(final)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(final)
    prefix = f".{final.name}.%s-{_owner_tag()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix % "tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        default_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # Rename the old one aside first so that `final` is never missing a complete artifact
        # for longer than two renames, and is never a mix of old and new files.
        old = Path(tempfile.mkdtemp(prefix=prefix % "old", dir=final.parent))
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


def check_safetensors(path: str | os.PathLike) -> None:
    """UsageError naming `path` unless it is a whole safetensors file: an 8-byte header length,
    a JSON header, and exactly as many data bytes as the header's offsets cover (a truncated
    download or copy otherwise fails inside the weight load with a traceback). Reads only the
    header, so it is cheap even for a 7B model's shards."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= size - 8 else None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if raw is None or n is None:
        raise UsageError(f"{path} is not a whole safetensors file ({size} bytes: header cut off)")
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise UsageError(f"{path} is not a safetensors file (unreadable header)") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise UsageError(
            f"{path} is {state}: its header covers {expected} bytes, the file has {size}"
            " (download or copy it again)"
        )
