"""A trainer's optimizer and RNG state as flat tensors and JSON, for checkpoints and digests.

safetensors stores flat name -> tensor maps and JSON stores lists: these turn an optimizer's nested
state dict and ``random.Random.getstate()``'s tuples into those forms and back.
"""

from __future__ import annotations

from typing import Any

import torch


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``{"<param id>.<key>": tensor}`` of the optimizer's per-parameter state, on the CPU."""
    flat = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            flat[f"{pid}.{key}"] = tensor.detach().cpu().contiguous()
    return flat


def param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's parameter groups (learning rates, betas ...), JSON-ready."""
    return optimizer.state_dict()["param_groups"]


def unflatten_optimizer(flat: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The state dict :func:`flatten_optimizer` and :func:`param_groups` came from."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    return {"state": state, "param_groups": groups}


def rng_state_to_json(value: Any) -> Any:
    """``random.Random.getstate()`` (nested tuples) as nested lists."""
    return [rng_state_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def rng_state_from_json(value: Any) -> Any:
    """The nested tuples ``random.Random.setstate`` takes, from :func:`rng_state_to_json`'s lists."""
    return tuple(rng_state_from_json(v) for v in value) if isinstance(value, list) else value
