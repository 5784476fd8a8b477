"""Small file helpers shared across the package: atomic writes that fail in one line.

A failed write (a full disk, a lost mount) removes its temporary file, leaves the previous
version of the target in place, and raises ``WriteError`` (an ``OSError``) naming the file and
the reason, e.g. ``cannot write runs/x/model/model.safetensors: No space left on device``.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type's name where it has none (one-line errors)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class WriteError(OSError):
    """A file could not be written; the previous version (if any) is untouched."""

    def __str__(self) -> str:
        return str(self.strerror)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary sibling and rename it over ``path``: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise write_error(path, exc) from None


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` made atomic, with the umask's file mode (safetensors itself
    creates files readable by their owner only), and with ``WriteError`` on failure."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        apply_umask(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        _remove(tmp)
        raise write_error(path, exc) from None


@contextmanager
def exclusive_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; its folder must exist) for the
    with-block, so that one process at a time does what it guards; another holder makes this wait
    (``on_wait`` is called once first, e.g. to say so). The kernel drops the lock when its process
    dies: a crash never blocks the next one. The file stays (removing it would race a new holder)."""
    import fcntl

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode())
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the process umask lets a new file have it."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library the mode a plain ``open()`` would have given it."""
    os.chmod(path, umask_mode())


_SAFETENSORS_IO = re.compile(r'code: (\d+).*message: "([^"]+)"')


def write_error(path: Path, exc: BaseException) -> WriteError:
    """One-line ``WriteError`` for a failed write of ``path``: the OS reason, also out of a
    safetensors serialisation error (which carries it only in its text)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        code, reason = exc.errno, exc.strerror or str(exc)
    else:
        match = _SAFETENSORS_IO.search(str(exc))
        code, reason = (int(match.group(1)), match.group(2)) if match else (errno.EIO, first_line(exc))
    return WriteError(code, f"cannot write {path}: {reason}")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
