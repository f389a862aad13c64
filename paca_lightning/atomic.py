"""Files that a crash cannot leave half-written: write a temporary file, flush it, rename it."""

from __future__ import annotations

import glob
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union


def _current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux): setting it
    to read it would, for a moment, change the permissions of files other threads create."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _temporary_prefix(target: Path) -> str:
    # host and pid in the name: a later write removes only temporary files of processes that died
    # on this host, never a file another live process (or another host, on shared storage) writes
    return f".{target.name}.{socket.gethostname()}.{os.getpid()}."


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, then move the finished file over ``path``.

    The temporary file lives in the target's directory (so the rename is atomic), is fsynced
    before the rename, and the directory is fsynced after it: at every moment ``path`` is either
    the previous complete file or the new one, even across a power loss. The file gets the usual
    permissions (0666 less the umask), like any file the process creates. A temporary file left by
    a process killed mid-write on this host is removed by the next successful write of the same
    target; those of live processes are left alone.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes files readable by their owner only
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
    _remove_orphans(target)
    return target


def _remove_orphans(target: Path) -> None:
    host = re.escape(socket.gethostname())
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{host}\.(\d+)\..*\.partial")
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        match = pattern.fullmatch(leftover.name)
        if match and not _process_alive(int(match.group(1))):
            leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
