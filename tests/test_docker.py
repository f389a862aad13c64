"""The Docker images' recipes, checked without a Docker engine (none runs here).

Lint is hadolint's job (``.ci/run``); these tests check what a linter cannot: every file an
image copies exists in the repository (the build context), the default command names a recipe
and a console script the repository provides, the images run as a non-root user, and the pinned
dependency set covers the project's declared dependencies within their ranges.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

REPOSITORY = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPOSITORY / "docker").glob("*/Dockerfile"))
PYPROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
_GENERATOR_SPEC = importlib.util.spec_from_file_location("make_constraints",
                                                         REPOSITORY / "docker" / "make_constraints.py")
make_constraints = importlib.util.module_from_spec(_GENERATOR_SPEC)
_GENERATOR_SPEC.loader.exec_module(make_constraints)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    parsed, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        parsed.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{dockerfile}: the last instruction ends with a line continuation"
    return parsed


def copy_sources(arguments: str) -> list[str]:
    """Source paths of a COPY/ADD (shell or JSON form), flags such as --chown left out."""
    words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
    words = [word for word in words if not word.startswith("--")]
    return words[:-1]


def constraint_pins() -> dict[str, str]:
    lines = (REPOSITORY / "docker" / "constraints.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and version, f"docker/constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = version
    return pins


def test_there_is_one_image_per_accelerator():
    assert [path.parent.name for path in DOCKERFILES] == ["cpu", "cuda", "hpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_every_copy_source_exists_in_the_repository(dockerfile):
    copies = [(keyword, arguments) for keyword, arguments in instructions(dockerfile) if keyword in ("COPY", "ADD")]
    assert copies, f"{dockerfile} copies nothing"
    for keyword, arguments in copies:
        assert "--from" not in arguments, f"{dockerfile}: multi-stage copies are not checked here"
        for source in copy_sources(arguments):
            path = REPOSITORY / source
            assert path.exists(), f"{dockerfile}: {keyword} {source} does not exist in the repository"
            if path.is_dir():
                assert any(entry.is_file() for entry in path.rglob("*")), f"{dockerfile}: {source} is empty"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_default_command_runs_a_recipe_and_console_script_the_repository_provides(dockerfile):
    parsed = instructions(dockerfile)
    [command] = [json.loads(arguments) for keyword, arguments in parsed if keyword == "CMD"]
    assert command[:2] == ["lightning", "run"], command
    assert "lightning" in PYPROJECT["project"]["scripts"], "pyproject.toml declares no `lightning` console script"
    recipe = command[2]
    assert (REPOSITORY / recipe).is_file(), f"{dockerfile}: default command runs {recipe}, which does not exist"
    workdir = [arguments for keyword, arguments in parsed if keyword == "WORKDIR"][-1]
    copied = [copy_sources(arguments) + [shlex.split(arguments)[-1]]
              for keyword, arguments in parsed if keyword == "COPY"]
    assert any(recipe.split("/")[0] in sources[:-1] and sources[-1].rstrip("/") == f"{workdir}/{recipe.split('/')[0]}"
               for sources in copied), f"{dockerfile}: {recipe} is not copied into the working directory {workdir}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_the_image_runs_as_a_non_root_user(dockerfile):
    users = [arguments for keyword, arguments in instructions(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile} never switches away from root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile} runs as {users[-1]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_the_base_image_has_an_explicit_tag(dockerfile):
    [base] = [arguments.split()[0] for keyword, arguments in instructions(dockerfile) if keyword == "FROM"]
    name, _, tag = base.rpartition(":")
    assert "/" not in tag and tag not in ("", "latest"), f"{dockerfile}: base image {base} has no pinned tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_the_image_installs_the_pinned_dependency_set_and_the_package_without_unpinned_resolution(dockerfile):
    runs = " ".join(arguments for keyword, arguments in instructions(dockerfile) if keyword == "RUN")
    assert "--requirement /opt/paca-lightning/constraints.txt" in runs
    assert "--no-deps --no-build-isolation /opt/paca-lightning/src" in runs


def test_constraints_pin_every_runtime_dependency_within_its_declared_range():
    pins = constraint_pins()
    for text in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in make_constraints.SUPPLIED_BY_EACH_IMAGE:
            assert name not in pins, f"docker/constraints.txt pins {name}, which each image brings itself"
            continue
        assert name in pins, f"docker/constraints.txt has no pin for {name}; run docker/make_constraints.py"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), \
            f"docker/constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"


def test_constraints_pin_the_build_backend_within_the_build_requirements():
    pins = constraint_pins()
    backend = PYPROJECT["build-system"]["build-backend"].split(".")[0]
    [declared] = [Requirement(text) for text in PYPROJECT["build-system"]["requires"]
                  if canonicalize_name(Requirement(text).name) == backend]
    assert declared.specifier.contains(Version(pins[backend]))


def test_constraints_leave_out_torch_and_its_cuda_only_companions():
    pins = constraint_pins()
    assert "torch" not in pins and "triton" not in pins
    assert not [name for name in pins if name.startswith("nvidia-")]


def test_constraint_generator_follows_extras_and_torch_dependencies_but_pins_no_torch():
    pins = make_constraints.dependency_pins({
        "project": {"dependencies": ["jsonargparse[signatures]>=4.32", "torch>=2.4"]},
        "build-system": {"build-backend": "setuptools.build_meta"},
    })
    assert {"jsonargparse", "docstring-parser", "typeshed-client"} <= pins.keys()  # the [signatures] extra
    assert {"sympy", "networkx", "setuptools"} <= pins.keys()  # torch's dependencies, the build backend
    assert "torch" not in pins
