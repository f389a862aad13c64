"""The package's import structure: layers import one way, the core needs no Lightning."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "paca_lightning"

# Each module may import only modules of its own layer or of the layers before it.
LAYERS = [
    ["_version", "atomic", "config", "loss"],
    ["layers"],
    ["experts", "quantized", "selection"],
    ["model"],
    ["adapter"],
    ["parallel", "planning"],
    ["accelerators", "data"],
    ["training"],
    ["bench", "cli", "doctor", "launcher"],
]
CORE = ["paca_lightning.layers", "paca_lightning.config", "paca_lightning.model", "paca_lightning.adapter",
        "paca_lightning.quantized", "paca_lightning.selection", "paca_lightning.loss",
        "paca_lightning.experts"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every paca_lightning module ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("paca_lightning")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("paca_lightning"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import accelerators` imports a submodule
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or \
                        (PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").exists():
                    found.add(candidate)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else None
    return next(index for index, names in enumerate(LAYERS) if top in names)


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    wrong = [f"{module} ({LAYERS[layer_of(module)]}) imports {target} ({LAYERS[layer_of(target)]})"
             for module, targets in import_graph().items() if module != "paca_lightning"
             for target in targets if target != "paca_lightning" and layer_of(target) > layer_of(module)]
    assert not wrong, "\n".join(wrong)


def test_no_module_below_the_top_imports_the_package_facade():
    importers = [module for module, targets in import_graph().items()
                 if "paca_lightning" in targets and module.count(".") and not module.startswith("paca_lightning.bench")
                 and module not in ("paca_lightning.cli", "paca_lightning.doctor", "paca_lightning.launcher")]
    assert not importers, importers


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    # a package's __init__ importing its own submodules is not a cycle through them
    edges = {module: {t for t in targets if not module.startswith(t + ".")} for module, targets in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, path: list[str]) -> bool:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycle.extend(path[path.index(target):] + [target] if target in path else [module, target])
                return True
            if target not in state and visit(target, path + [target]):
                return True
        state[module] = 2
        return False

    assert not any(visit(module, [module]) for module in sorted(edges) if module not in state), " -> ".join(cycle)


@pytest.mark.slow
def test_importing_the_core_loads_neither_lightning_nor_the_training_or_parallel_code():
    code = ("import json, sys\n" + "".join(f"import {name}\n" for name in CORE)
            + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' "
              "or m.startswith(('paca_lightning.training', 'paca_lightning.parallel', 'pytorch_lightning')))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    assert loaded == []


@pytest.mark.slow
def test_the_lightning_names_of_the_package_load_on_first_use():
    code = ("import sys, paca_lightning\nassert 'lightning' not in sys.modules\n"
            "from paca_lightning import PaCACallback, PaCAFineTuneModule\n"
            "from paca_lightning.training import PaCACallback as C, PaCAFineTuneModule as M\n"
            "assert PaCACallback is C and PaCAFineTuneModule is M\n")
    subprocess.run([sys.executable, "-c", code], check=True)
