"""Output folders that are never left half-written: write into a temporary folder next to the
destination, then move into place with renames (a Ctrl-C during the renames is deferred until
they are done). The old contents stay until the new set is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path


class OutputDirError(ValueError):
    """An output folder that jadeis refuses to write to (it would lose files)."""


def package_weights_dir() -> Path:
    """The weights folder shipped inside the installed package."""
    return Path(str(resources.files("jadeis.digits") / "weights"))


def is_package_weights_dir(path) -> bool:
    """Whether ``path`` is (resolves to) the package's own weights folder."""
    try:
        return Path(path).resolve() == package_weights_dir().resolve()
    except OSError:
        return False


def check_writable(out) -> Path:
    """Raise :class:`OutputDirError` unless ``out`` is a folder, or can be created as one, that
    files can be written into.

    Permissions alone do not tell (root may write anywhere by permission bits, yet not under
    ``/proc``; a read-only mount allows nothing), so this tries: it creates the missing folders
    and a temporary file in ``out``, then removes what it created. Afterwards the file system is
    as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"cannot write to {str(out)!r}: it is a file, not a folder.")
    missing = []
    probe = out
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"cannot write to {str(out)!r}: {str(probe)!r} is not a folder.")
    created = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except OSError as e:
                raise OutputDirError(
                    f"cannot write to {str(out)!r}: cannot create the folder {str(folder)!r} "
                    f"({e.strerror or e})."
                ) from None
            created.append(folder)
        try:
            fd, name = tempfile.mkstemp(prefix=".jadeis-probe-", dir=out)
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            raise OutputDirError(
                f"cannot write to {str(out)!r}: cannot create a file in it ({e.strerror or e})."
            ) from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return out


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back SIGINT (Ctrl-C) inside the block; raise KeyboardInterrupt after it if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda *a: got.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


def write_files(out, writers: dict[str, Callable[[Path], object]]) -> list[Path]:
    """Write a set of files into folder ``out`` as a set: each ``writers[name](path)`` writes
    into a temporary folder inside ``out``; only when all succeeded are they renamed into place
    (an interrupt before then leaves the old files untouched). Returns the files that existed
    before and were replaced."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".jadeis-tmp-", dir=out))
    try:
        for name, write in writers.items():
            write(tmp / name)
        replaced = [out / name for name in writers if (out / name).exists()]
        with deferred_interrupt():
            for name in writers:
                os.replace(tmp / name, out / name)
        return replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staging_dir(out) -> Path:
    """A new empty temporary folder next to ``out`` (same file system, for the final rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def replace_dir(staging, out) -> bool:
    """Move the complete folder ``staging`` to ``out``, replacing ``out`` if it exists (the
    old folder is removed only after the new one is in place). Returns whether it replaced."""
    staging, out = Path(staging), Path(out)
    with deferred_interrupt():
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
            return True
        os.rename(staging, out)
        return False
