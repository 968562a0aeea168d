"""A side network of any family: built fresh from its config, or loaded from a saved file.

A module of its own because it sits above every family: the ladder and adapter networks
(:mod:`mobiflower.platform.side_networks`) and the pretrained tail
(:mod:`mobiflower.platform.pretrained_tail`, which builds on the former's config and batch).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mobiflower.platform.pretrained_tail import PretrainedTailNetwork
from mobiflower.platform.side_networks import (
    LadderSideNetwork,
    ParallelAdapterSideNetwork,
    SideNetwork,
    SideNetworkConfig,
    SideNetworkError,
    read_side_network_config,
)


def build_side_network(
    config: SideNetworkConfig,
    frozen: dict[str, torch.Tensor] | None = None,
    frozen_by_backbone: dict[str, dict[str, torch.Tensor]] | None = None,
) -> SideNetwork:
    """A fresh side network of ``config.family``; ``frozen`` holds the backbone's final norm / LM head
    (``frozen_by_backbone``: a further backbone's own, by fingerprint; default ``frozen``)."""
    frozen = frozen or {}
    if config.family == "tail":  # frozen: the public weights of blocks cut.. and the final norm
        return PretrainedTailNetwork(config, frozen)  # type: ignore[return-value]
    cls = LadderSideNetwork if config.family == "ladder" else ParallelAdapterSideNetwork
    return cls(config, frozen, frozen_by_backbone)


def load_side_network(
    path: str | Path, frozen: dict[str, torch.Tensor] | None = None, fingerprint: str | None = None
) -> SideNetwork:
    """Rebuild a saved side network; ``fingerprint`` (the device's backbone) must match when given."""
    config = read_side_network_config(path)
    if fingerprint is not None and not config.serves(fingerprint):
        raise SideNetworkError(
            f"side network {path} was trained on backbone {config.fingerprint}, "
            f"but this device runs {fingerprint}: use a side network trained for this backbone"
        )
    net = build_side_network(config, frozen, {fingerprint: frozen or {}} if fingerprint else None)
    net.load_state_dict(load_file(str(path)))
    return net.eval()
