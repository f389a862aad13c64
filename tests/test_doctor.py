"""`paca-lightning doctor` names a `lightning` command that is not ours and how to get ours back."""

import subprocess
import sys

import pytest

from paca_lightning import doctor


def test_our_lightning_command_is_recognised(tmp_path):
    script = tmp_path / "lightning"
    script.write_text("#!/usr/bin/python\nimport sys\nfrom paca_lightning.launcher import main\nsys.exit(main())\n")
    assert doctor.lightning_command_problem(str(script)) is None


def test_a_lightning_command_of_another_package_is_named_with_both_fixes(tmp_path):
    script = tmp_path / "lightning"  # what lightning-sdk installs over ours
    script.write_text("#!/usr/bin/python\nimport sys\nfrom lightning_sdk.cli.entrypoint import main_cli\n"
                      "sys.exit(main_cli())\n")
    problem = doctor.lightning_command_problem(str(script))
    assert f"the `lightning` command at {script} is not paca-lightning's launcher" in problem
    assert "paca-lightning run recipes/oasst1.py" in problem and "--force-reinstall --no-deps" in problem


@pytest.mark.slow
def test_paca_lightning_run_is_the_same_launcher_under_its_own_name(tmp_path):
    script = tmp_path / "show_args.py"
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    result = subprocess.run([sys.executable, "-m", "paca_lightning.cli", "run", "--devices", "1", str(script), "--x=1"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("'--x=1']") and "--trainer.devices=1" in result.stdout


def test_doctor_reports_versions_and_exits_zero_without_problems(monkeypatch, capsys, tmp_path):
    ours = tmp_path / "lightning"
    ours.write_text("from paca_lightning.launcher import main\n")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: str(ours))
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "lightning " in out and out.rstrip().endswith("no problems found")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert doctor.main([]) == 1
    assert "problem: no `lightning` command on PATH" in capsys.readouterr().out
