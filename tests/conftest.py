"""Shared fixtures: tiny random models for fast tests, the real bundled assets where claimed."""

from __future__ import annotations

import os

import pytest

from mobiflower.platform.assets import assets_ready


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
