"""Write the pinned dependency set the Docker images install (``docker/constraints.txt``).

The pins are the versions installed in the environment this script runs in (the project's
tested virtual environment), limited to what the project needs: the closure of the runtime
dependencies in ``pyproject.toml`` (extras such as ``jsonargparse[signatures]`` followed,
environment markers evaluated for this interpreter), plus the build backend, because the images
build the package with ``--no-build-isolation``. Test-only extras are left out.

torch itself is not pinned: each image brings its own build (the CUDA base image, Intel's Gaudi
base image, or the CPU wheel). Its CUDA-only companions (``nvidia-*``, ``triton``) are left out
for the same reason; its portable dependencies (sympy, networkx, ...) are pinned like the rest.

Usage (Python 3.11+, from the repository root, with the project installed)::

    python docker/make_constraints.py > docker/constraints.txt
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPOSITORY = Path(__file__).resolve().parent.parent
#: Followed (its dependencies are pinned) but not pinned: each image brings its own build.
SUPPLIED_BY_EACH_IMAGE = {"torch"}
#: Neither followed nor pinned: companions of torch's CUDA build, present only on CUDA hosts.
CUDA_ONLY = {"triton"}
CUDA_ONLY_PREFIXES = ("nvidia-",)


def _cuda_only(name: str) -> bool:
    return name in CUDA_ONLY or name.startswith(CUDA_ONLY_PREFIXES)


def _applies(requirement: Requirement, extras: tuple[str, ...]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def _installed_version(name: str, needed_by: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError as error:
        raise SystemExit(
            f"make_constraints: {name} (needed by {needed_by}) is not installed in {sys.prefix}; "
            "install the project there first (pip install -e .)"
        ) from error


def dependency_pins(pyproject: dict) -> dict[str, str]:
    """``{canonical name: installed version}`` for the runtime closure and the build backend."""
    pins: dict[str, str] = {}
    queue = [(Requirement(text), "pyproject.toml") for text in pyproject["project"]["dependencies"]]
    backend = pyproject["build-system"]["build-backend"].split(".")[0]
    queue.append((Requirement(backend), "[build-system] build-backend"))
    followed: set[tuple[str, frozenset[str]]] = set()
    while queue:
        requirement, needed_by = queue.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in followed:
            continue
        followed.add(key)
        distribution = _installed_version(name, needed_by)
        if name not in SUPPLIED_BY_EACH_IMAGE:
            pins[name] = distribution.version
        for text in distribution.requires or []:
            dependency = Requirement(text)
            if _applies(dependency, tuple(requirement.extras)) and not _cuda_only(canonicalize_name(dependency.name)):
                queue.append((dependency, name))
    return pins


def render(pins: dict[str, str]) -> str:
    python = ".".join(platform.python_version_tuple()[:2])
    header = [
        "# Pinned dependency set of the Docker images (docker/*/Dockerfile). Do not edit by hand:",
        "#   python docker/make_constraints.py > docker/constraints.txt",
        f"# Versions of the project's tested environment (Python {python}, {platform.system()} {platform.machine()}).",
        "# torch is not pinned: each image brings its own build (CUDA image, Intel Gaudi image, CPU wheel).",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(pins.items())]) + "\n"


def main() -> None:
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    sys.stdout.write(render(dependency_pins(pyproject)))


if __name__ == "__main__":
    main()
