"""`lightning run`: the torchrun command line, the Trainer arguments, single-process runs, errors."""

import json
import os
import sys

import pytest

from paca_lightning import launcher


def parse(*argv):
    return launcher.build_parser().parse_args(["run", *argv])


def test_multi_process_launch_builds_the_torchrun_command_like_fabric_run():
    args = parse("--devices", "4", "--num-nodes", "2", "--node-rank", "1", "--main-address", "10.0.0.1",
                 "--main-port", "1234", "--strategy", "fsdp", "recipes/oasst1.py", "--config", "a.yaml")
    script_args = launcher.place_trainer_arguments(launcher.trainer_arguments(args), args.script_args)
    assert launcher.torchrun_arguments(args, script_args) == [
        "--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=1234",
        "recipes/oasst1.py", "--config", "a.yaml", "--trainer.devices=4", "--trainer.strategy=fsdp",
        "--trainer.num_nodes=2"]


def test_launch_options_go_after_the_last_config_and_before_the_users_own_arguments():
    place = launcher.place_trainer_arguments
    assert place(["--trainer.devices=2"], ["--x=1"]) == ["--trainer.devices=2", "--x=1"]
    assert place(["--trainer.devices=2"], ["--config", "a.yaml", "-c=b.yaml", "--x=1"]) == [
        "--config", "a.yaml", "-c=b.yaml", "--trainer.devices=2", "--x=1"]
    assert place(["--trainer.devices=2"], ["-c", "a.yaml"]) == ["-c", "a.yaml", "--trainer.devices=2"]
    # the user's own value wins wherever it stands
    assert place(["--trainer.devices=2", "--trainer.strategy=ddp"], ["--trainer.devices", "4", "-c", "a.yaml"]) == [
        "--trainer.devices", "4", "-c", "a.yaml", "--trainer.strategy=ddp"]


@pytest.mark.slow
def test_a_recipe_config_does_not_undo_the_launch_options(tmp_path):
    import subprocess
    from pathlib import Path

    config = tmp_path / "config.yaml"
    config.write_text("trainer:\n  accelerator: gpu\n  max_steps: 3\n")
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "oasst1.py"
    result = subprocess.run([sys.executable, "-m", "paca_lightning.launcher", "run", "--accelerator", "cpu",
                             str(recipe), "--config", str(config), "--print_config"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  accelerator: cpu" in result.stdout and "  max_steps: 3" in result.stdout


def test_trainer_arguments_mirror_only_the_options_given_and_can_be_turned_off():
    assert launcher.trainer_arguments(parse("s.py")) == []
    assert launcher.trainer_arguments(parse("--accelerator", "cpu", "--devices", "2", "s.py")) == [
        "--trainer.accelerator=cpu", "--trainer.devices=2"]
    assert launcher.trainer_arguments(parse("--devices", "2", "--no-trainer-args", "s.py")) == []


def test_environment_matches_what_fabric_reads():
    environment = launcher.launch_environment(parse("--accelerator", "cuda", "--devices", "2", "s.py"))
    assert environment == {"LT_CLI_USED": "1", "LT_DEVICES": "2", "LT_NUM_NODES": "1", "LT_ACCELERATOR": "cuda"}


@pytest.mark.parametrize("devices, processes", [(None, 1), ("auto", 1), ("3", 3), ("0,2", 2)])
def test_processes_per_node(devices, processes):
    assert launcher.processes_per_node(devices) == processes


def test_bad_devices_and_missing_script_exit_with_status_2(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("")
    assert launcher.main(["run", "--devices", "many", str(script)]) == 2
    assert launcher.main(["run", str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err


def test_single_process_runs_the_script_in_place_with_its_arguments(tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    script = tmp_path / "script.py"
    script.write_text("import json, os, sys\n"
                      f"json.dump({{'argv': sys.argv[1:], 'devices': os.environ['LT_DEVICES'], "
                      f"'name': __name__}}, open({str(record)!r}, 'w'))\n"
                      "sys.exit(3 if '--fail' in sys.argv else 0)\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert launcher.main(["run", "--accelerator", "cpu", str(script), "--data.batch_size=2"]) == 0
    assert json.loads(record.read_text()) == {"argv": ["--trainer.accelerator=cpu", "--data.batch_size=2"],
                                              "devices": "auto", "name": "__main__"}
    assert launcher.main(["run", str(script), "--fail"]) == 3


def test_a_script_exiting_with_a_message_prints_it_and_fails(tmp_path, capsys, monkeypatch):
    script = tmp_path / "script.py"
    script.write_text("import sys\nsys.exit('the data folder is empty')\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert launcher.main(["run", str(script)]) == 1
    assert "the data folder is empty" in capsys.readouterr().err


def test_two_devices_go_through_torchrun(tmp_path, monkeypatch):
    calls = []
    import torch.distributed.run as torchrun

    monkeypatch.setattr(torchrun, "main", calls.append)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    script = tmp_path / "s.py"
    script.write_text("")
    assert launcher.main(["run", "--devices", "2", str(script), "--x=1"]) == 0
    assert calls == [["--nproc_per_node=2", "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1",
                      "--master_port=29400", str(script), "--trainer.devices=2", "--x=1"]]
    assert os.environ["LT_DEVICES"] == "2" and "OMP_NUM_THREADS" in os.environ
