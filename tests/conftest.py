"""pytest fixtures for every test: a private compile cache, Lightning's rank marker restored, tiny models."""

import os

import pytest

from tests.helpers import make_tiny_gpt2, make_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def _private_compile_cache(tmp_path_factory):
    """torch.compile's cache in this run's own folder: two test runs on one machine sharing
    inductor's default folder under /tmp broke each other's compiled artifacts. Subprocesses the
    tests start inherit it. A cache folder the user chose is left alone."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor-cache"))
    yield
    del os.environ["TORCHINDUCTOR_CACHE_DIR"]


@pytest.fixture(autouse=True)
def _restore_lightning_rank():
    """A Trainer built for a non-zero rank (tests of multi-process wiring) sets Lightning's global
    rank-zero marker, which would silence the logging and warnings of every later test."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # the same object as Fabric's

    saved = rank_zero_only.rank
    yield
    rank_zero_only.rank = saved


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()
