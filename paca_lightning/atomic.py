"""Files that a crash cannot leave half-written: write a temporary file, flush it, rename it."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union

# mkstemp creates files readable by their owner only; give the result the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, then move the finished file over ``path``.

    The temporary file lives in the target's directory (so the rename is atomic), is fsynced
    before the rename, and the directory is fsynced after it: at every moment ``path`` is either
    the previous complete file or the new one, even across a power loss. A temporary file left by
    a process killed mid-write is removed by the next successful write of the same target.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        leftover.unlink(missing_ok=True)
    return target
