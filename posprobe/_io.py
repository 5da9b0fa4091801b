"""Safe writing of output directories: checked before work starts, swapped in atomically when done.

Owns two things the CLI, `Scan.save` and the model cache share:

- `check_output_dir(path, marker=...)`: is `path` a place a scan may be written to? It must be a directory that does
  not exist yet (its nearest existing ancestor writable), an empty directory, or a directory that already holds what
  is being replaced (a file named `marker`, e.g. a scan's `manifest.json`). Anything else (an existing file, a
  directory with other contents, an unwritable parent) raises `OutputPathError` at once, before any model is loaded.
- `replace_dir(target)`: a context manager yielding a fresh temporary sibling directory; on a clean exit it takes the
  place of `target` in one step (Linux `renameat2(RENAME_EXCHANGE)` where available, else two renames), and the old
  contents are deleted afterwards. An exception (or a kill) before the swap leaves `target` as it was; the temporary
  directory is removed on exceptions and ignored (hidden, dot-prefixed) otherwise.
- `write_text_atomic(path, text)`: one file written to a hidden temporary sibling and renamed into place, so a
  reader never sees half a file and a failure leaves a previous file as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from posprobe.errors import OutputPathError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_dir(path: str | Path, *, marker: str, what: str = "scan") -> str:
    """Return "new", "empty" or "overwrite" for a directory about to receive a `what`; raise OutputPathError if the
    directory cannot or must not be written (checked in microseconds, before any expensive work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputPathError(
            f"--out {out} is an existing file, but a {what} is saved as a directory. Choose a directory path "
            f"(it may not exist yet), or remove the file."
        )
    if out.is_dir():
        entries = [p.name for p in out.iterdir()]
        if not entries:
            state = "empty"
        elif marker in entries:
            state = "overwrite"
        else:
            shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
            raise OutputPathError(
                f"--out {out} is a directory that holds something other than a posprobe {what} ({shown}; no "
                f"{marker}). posprobe replaces the whole directory when it saves, so it refuses to write there. "
                f"Choose a new or empty directory."
            )
        if not os.access(out, os.W_OK) or not os.access(out.parent, os.W_OK):
            raise OutputPathError(f"--out {out} is not writable (no write permission on it or on its parent).")
        return state
    ancestor = _nearest_existing(out.parent if out.parent != out else out)
    if not ancestor.is_dir():
        raise OutputPathError(f"Cannot create --out {out}: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"Cannot create --out {out}: no write permission on {ancestor}. Choose a directory you can write to."
        )
    return "new"


def check_output_file(path: str | Path) -> None:
    """Raise OutputPathError unless `path` can be written as a file (not a directory, parent writable)."""
    out = Path(path)
    if out.is_dir():
        raise OutputPathError(f"--out {out} is a directory; give a file path to write the table to.")
    ancestor = _nearest_existing(out.parent)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"Cannot write --out {out}: {ancestor} is not a writable directory.")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS / libc cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def replace_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write into; swap it in for `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        tmp.rename(target)
        return
    if _exchange(tmp, target):  # tmp now holds the old contents
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary sibling renamed into place (`os.replace`)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique name opened with "x" (not mkstemp): the file gets the umask's permissions, not 0600
    tmp = out.with_name(f".{out.name}.writing-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out
