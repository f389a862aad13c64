"""The README and docs: the example runs as written and prints what it says, links and module
paths point at things that exist."""

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_quick_start_example_runs_and_prints_the_report_it_shows(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()
    assert (tmp_path / "out/merged/config.json").is_file()
    shown = re.search(r"print\(trainable_parameters\(model\)\)\s+# (.*)", blocks[0]).group(1)
    assert printed.getvalue().splitlines()[0] == shown


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_point_at_files_that_exist(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_module_path_named_imports(page):
    """A renamed or moved module leaves no stale `paca_lightning.x.y` behind in the docs."""
    for path in sorted(set(re.findall(r"paca_lightning(?:\.[a-z_0-9]+)+", page.read_text()))):
        parts = path.split(".")
        for end in range(len(parts), 0, -1):  # the longest prefix that is a module, then attributes
            try:
                found = importlib.import_module(".".join(parts[:end]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[end:]:
            assert hasattr(found, attribute), f"{page.name} names {path}, which does not exist"
            found = getattr(found, attribute)
