import functools
import http.server
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

from paca_lightning.training.checkpointing import AtomicCheckpointIO, atomic_torch_save


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "weights": torch.arange(4.0)}, target)

    def crash_after_some_bytes(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_after_some_bytes)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    script = (
        "import os, signal, sys, torch\n"
        "from paca_lightning.training.checkpointing import atomic_torch_save\n"
        "def killed_while_writing(obj, path):\n"
        "    handle = open(path, 'wb'); handle.write(b'partial bytes'); handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed_while_writing\n"
        "atomic_torch_save({'step': 2}, sys.argv[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=True)["step"] == 1
    leftovers = [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]
    assert len(leftovers) == 1
    atomic_torch_save({"step": 3}, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["step"] == 3


def test_remote_storage_options_are_refused_by_name():
    with pytest.raises(TypeError, match="does not accept storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, os.devnull, storage_options={"anon": True})


def test_a_write_removes_temporary_files_of_dead_processes_only(tmp_path):
    target = tmp_path / "last.ckpt"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(finished.stdout), os.getppid()
    host = socket.gethostname()
    dead = tmp_path / f".last.ckpt.{host}.{dead_pid}.abc123.partial"
    live = tmp_path / f".last.ckpt.{host}.{live_pid}.def456.partial"
    elsewhere = tmp_path / f".last.ckpt.other-host.{dead_pid}.ghi789.partial"  # shared storage, another machine
    for path in (dead, live, elsewhere):
        path.write_bytes(b"in flight")
    atomic_torch_save({"step": 1}, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["last.ckpt", live.name, elsewhere.name])


def test_atomic_writes_leave_the_process_umask_alone(tmp_path, monkeypatch):
    def umask_changed(mask):
        raise AssertionError(f"os.umask({mask:o}) called: other threads would create files with that mask")

    monkeypatch.setattr(os, "umask", umask_changed)
    atomic_torch_save({"step": 1}, tmp_path / "last.ckpt")
    current = int(next(line for line in open("/proc/self/status") if line.startswith("Umask:")).split()[1], 8)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~current


@pytest.mark.slow
def test_two_processes_writing_into_one_folder_never_break_each_other(tmp_path):
    script = (
        "import sys, torch\n"
        "from paca_lightning.training.checkpointing import atomic_torch_save\n"
        "for step in range(100):\n"
        "    atomic_torch_save({'step': step, 'writer': sys.argv[2]}, sys.argv[1])\n"
    )
    target = tmp_path / "last.ckpt"
    writers = [subprocess.Popen([sys.executable, "-c", script, str(target), name], stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    errors = [writer.communicate()[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    assert torch.load(target, weights_only=True)["step"] == 99
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A loopback HTTP server over a folder; torch.hub's download cache goes to tmp_path too."""
    served = tmp_path / "served"
    served.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_checkpoint_url_never_unpickles_code_and_a_plain_one_loads(http_folder, tmp_path):
    served, url = http_folder
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, served / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, served / "good.ckpt")
    with pytest.raises(ValueError, match=r"evil.ckpt cannot be loaded as a checkpoint: .*never unpickled"):
        AtomicCheckpointIO().load_checkpoint(f"{url}/evil.ckpt")
    assert not marker.exists()
    assert AtomicCheckpointIO().load_checkpoint(f"{url}/good.ckpt")["global_step"] == 3


@pytest.mark.parametrize("content", [b"", b"\x00\x01 random bytes, not a checkpoint \xff" * 8], ids=["empty", "random"])
def test_a_file_that_is_not_a_checkpoint_is_named_in_a_clear_error(tmp_path, content):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path} cannot be loaded as a checkpoint") as error:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "weights_only=False" not in str(error.value)  # never the advice to unpickle it after all


def _umask():
    return int(next(line for line in open("/proc/self/status") if line.startswith("Umask:")).split()[1], 8)


def test_an_export_that_fails_midway_leaves_no_folder_that_looks_finished(tmp_path):
    from paca_lightning.atomic import atomic_directory_write

    def config_then_full_disk(folder):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_directory_write(tmp_path / "merged", config_then_full_disk)
    assert list(tmp_path.iterdir()) == []

    atomic_directory_write(tmp_path / "merged", lambda folder: (folder / "config.json").write_text('{"v": 1}'))
    (tmp_path / "merged" / "notes.txt").write_text("the user's own file")
    with pytest.raises(OSError, match="No space left"):
        atomic_directory_write(tmp_path / "merged", config_then_full_disk)
    assert (tmp_path / "merged" / "config.json").read_text() == '{"v": 1}'  # the earlier export, untouched
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_an_export_has_the_usual_permissions_and_keeps_other_files_of_its_folder(tmp_path):
    from paca_lightning.atomic import atomic_directory_write

    def export(folder):
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text("{}")

    target = atomic_directory_write(tmp_path / "merged", export)
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()
    for file in target.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~_umask(), file.name
    (target / "notes.txt").write_text("kept")
    atomic_directory_write(target, export)
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_a_full_disk_is_reported_as_such_naming_the_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4032")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not write the checkpoint {target}: .* bytes free .*no space left"):
        atomic_torch_save({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    from paca_lightning.atomic import LOCK_NAME, FolderInUseError, folder_lock

    with folder_lock(tmp_path):
        with pytest.raises(FolderInUseError, match=rf"{tmp_path} is in use by another run \(process {os.getpid()}"):
            with folder_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {int(finished.stdout)}\n")  # a killed run's lock
    with folder_lock(tmp_path) as lock:
        assert lock.read_text().split() == [socket.gethostname(), str(os.getpid())]
    (tmp_path / LOCK_NAME).write_text(f"other-host {int(finished.stdout)}\n")  # shared storage: not ours to judge
    with pytest.raises(FolderInUseError, match="on other-host"):
        with folder_lock(tmp_path):
            pass
