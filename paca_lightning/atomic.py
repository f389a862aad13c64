"""Files that a crash cannot leave half-written: write a temporary file, flush it, rename it."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
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
    _fsync_directory(target.parent)
    _remove_orphans(target)
    return target


def _remove_orphans(target: Path, directories: bool = False) -> None:
    host = re.escape(socket.gethostname())
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{host}\.(\d+)\..*\.partial")
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        match = pattern.fullmatch(leftover.name)
        if match and not _process_alive(int(match.group(1))):
            if directories and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def atomic_directory_write(path: Union[str, os.PathLike], write: Callable[[Path], None],
                           last: tuple[str, ...] = ("config.json",)) -> Path:
    """Call ``write(temporary_directory)``, then make its files appear in ``path``.

    For exports such as ``save_pretrained`` folders, where a folder holding ``config.json`` but
    not the weights would look finished. A new ``path`` appears in one rename; into an existing
    ``path`` (other files there are kept) the files move one by one, each atomically, with
    ``last`` (the files that mark a folder as usable) moved last. A crash or a full disk during
    ``write`` leaves ``path`` as it was; a temporary folder left by a killed process is removed
    by the next export of the same target.
    """
    temporary = temporary_directory_for(path)
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return publish_directory(temporary, path, last)


def temporary_directory_for(path: Union[str, os.PathLike]) -> Path:
    """A new private folder beside ``path`` to write an export into (`publish_directory` then)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".partial", dir=target.parent))


def publish_directory(temporary: Path, path: Union[str, os.PathLike], last: tuple[str, ...] = ("config.json",)) -> Path:
    """Move a finished export from ``temporary`` into ``path`` (see `atomic_directory_write`)."""
    target = Path(path)
    try:
        os.chmod(temporary, 0o777 & ~_current_umask())  # mkdtemp makes folders private to their owner
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if not target.exists():
            os.replace(temporary, target)
        else:
            files = sorted((p for p in temporary.rglob("*") if p.is_file()), key=lambda p: p.name in last)
            for file in files:
                destination = target / file.relative_to(temporary)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, destination)
            shutil.rmtree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(target.parent)
    _remove_orphans(target, directories=True)
    return target


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


LOCK_NAME = ".paca-lightning.lock"


class FolderInUseError(OSError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: Union[str, os.PathLike]) -> Iterator[Path]:
    """Hold ``folder/.paca-lightning.lock`` for the block: a second process asking for the same
    folder meanwhile gets `FolderInUseError` naming the holder, instead of two runs writing
    checkpoints and exports over each other. A lock left by a process that died on this host is
    taken over; one held on another host (shared storage) is respected.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    ours = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock.read_text().strip() if lock.exists() else ""
            host, _, pid = holder.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
                lock.unlink(missing_ok=True)  # its process died: take the folder over
                continue
            raise FolderInUseError(f"{folder} is in use by another run (process {pid or '?'} on {host or '?'}, "
                                   f"recorded in {lock}). Wait for it to end, or write this run elsewhere; "
                                   f"if that process is gone, delete {lock}") from None
        with os.fdopen(handle, "w") as file:
            file.write(ours + "\n")
        break
    try:
        yield lock
    finally:
        if lock.exists() and lock.read_text().strip() == ours:
            lock.unlink()
