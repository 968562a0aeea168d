"""Shared fixtures: tiny random models for fast tests, the real bundled assets where claimed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mobiflower.platform.assets import BUNDLED_MODEL, assets_ready, bundled_model_dir, corpus_path, speeches_path
from mobiflower.platform.precision import WEIGHT_PRECISIONS
from mobiflower.platform.prepared_weights import prepared_dir


def _bundled_assets() -> list[Path]:
    """Where the bundled model, its prepared copies and the corpus sit under the current home."""
    return [
        bundled_model_dir(),
        corpus_path(),
        speeches_path(),
        *(prepared_dir(BUNDLED_MODEL, p) for p in WEIGHT_PRECISIONS),
    ]


def pytest_configure(config):
    """The session's ``MOBIFLOWER_HOME`` is a temporary folder (subprocesses inherit it), so what tests
    build - prepared copies of tiny models, shapes, run folders - never piles up in the user's home.
    The bundled model and data (``mobiflower assets``) and the bundled model's prepared copies are
    linked in from the real home and read there: nothing is downloaded or converted again."""
    real = _bundled_assets()
    test_home = Path(tempfile.mkdtemp(prefix="mobiflower-test-home-"))
    config._mobiflower_home = (os.environ.get("MOBIFLOWER_HOME"), test_home)
    os.environ["MOBIFLOWER_HOME"] = str(test_home)
    for source, link in zip(real, _bundled_assets()):
        if source.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source, target_is_directory=source.is_dir())


def pytest_unconfigure(config):
    saved = getattr(config, "_mobiflower_home", None)
    if saved is None:
        return
    previous, test_home = saved
    if previous is None:
        os.environ.pop("MOBIFLOWER_HOME", None)
    else:
        os.environ["MOBIFLOWER_HOME"] = previous
    shutil.rmtree(test_home, ignore_errors=True)  # removes the links, never what they point to


def pytest_collection_modifyitems(config, items):
    """Files that start real processes (``slow``) or load the bundled model (``real_model``) run first.

    Why: with ``--dist loadfile`` each worker takes the next file as it frees; the few long files
    first and the many short ones after lets the two workers end together. (xdist's own order, most
    tests first, leaves the long files with few tests for last, one worker running alone.)"""

    def weight(item) -> int:
        return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("real_model") else 2

    items.sort(key=weight)  # stable: a file's tests keep their order


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """CI has 2 shared cores: intra-op threads only add contention for the small tensors of tests."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of tiny random-init models, one per family, built once per test session."""
    from mobiflower.platform.tiny import TINY_FAMILIES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: str(make_tiny_model(family, root / family)) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def real_assets():
    """The bundled model and data; CI prepares them with `mobiflower assets` before the tests."""
    if not assets_ready():
        if os.environ.get("MOBIFLOWER_ALLOW_MISSING_ASSETS") == "1":
            pytest.skip("bundled assets not prepared (MOBIFLOWER_ALLOW_MISSING_ASSETS=1)")
        pytest.fail("the bundled model/data are not prepared: run `mobiflower assets` first")
    return True
