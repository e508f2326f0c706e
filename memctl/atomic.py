"""Atomic file writing, the one way memctl writes a file: a temp file beside the destination, fsync, rename.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "a" / "b.txt", b"hello")
    >>> (folder / "a" / "b.txt").read_bytes(), sorted(p.name for p in (folder / "a").iterdir())
    (b'hello', ['b.txt'])

Readers see the old file or the new one, never half of one; on any failure the temp file goes, and so do the
folders the call made. Temp files are named `.NAME.memctl-XXXXXXXX.part` (`TEMP_MARK`), so a killed writer's
leftovers can be recognised, and the file gets the mode the user's umask says (`mkstemp` makes 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["TEMP_MARK", "atomic_file", "atomic_path", "atomic_write", "file_mode", "remove_empty"]

TEMP_MARK = ".memctl-"  # our temp files: "." + name + ".memctl-" + mkstemp's 8 characters + suffix


def file_mode() -> int:
    """The mode a new file gets under the user's umask (`mkstemp` makes 0600, which temp-then-rename keeps)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def make_parent(path: Path, what: str) -> None:
    """Make `path`'s folder (and its parents), or a ValueError naming `what` and why the folder cannot be made."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"Expected {what} in a folder that can be made, but {Path(path).parent}: {err.strerror or err}."
        ) from None


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders, deepest last in the list first, where they are empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_path(
    dest: str | os.PathLike,
    *,
    parents: bool = False,
    stop_at: Path | None = None,
    suffix: str = ".part",
    before_rename: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """A temp path beside `dest` for a writer that wants a path; on success it is fsynced, given the umask's mode,
    `before_rename` is called, and it is renamed over `dest`.

    `suffix` ends the temp name (writers that pick the format by extension need `dest`'s). `parents` makes missing
    folders (up to `stop_at`), removed again when the write fails."""
    dest = Path(dest)
    made = [p for p in [dest.parent, *dest.parent.parents] if not p.exists() and p != stop_at][::-1] if parents else []
    if parents:
        dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}{TEMP_MARK}", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_empty(made)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, **options) -> Iterator[IO[bytes]]:
    """`atomic_path` for a writer that wants an open binary file (same options)."""
    with atomic_path(dest, **options) as tmp, open(tmp, "wb") as f:
        yield f


def _write(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def atomic_write(
    dest: str | os.PathLike,
    data: bytes,
    before_rename: Callable[[], None] | None = None,
    stop_at: Path | None = None,
    write: Callable[[IO[bytes], bytes], None] | None = None,
) -> None:
    """Write `data` to `dest` atomically, making missing folders; `write(f, data)` replaces the plain write."""
    with atomic_file(dest, parents=True, stop_at=stop_at, before_rename=before_rename) as f:
        (write or _write)(f, data)
