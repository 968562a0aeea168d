"""Flower's run config (``[tool.flwr.app.config]`` plus ``-c`` overrides) and node config into typed
dataclasses: one mapping from keys to fields, one conversion per type, one error that names the key.

A field's key is its name with dashes (``chunk_size`` is ``chunk-size``) unless the caller renames it;
its type is its default's (bool, int, float or str). Flower-free: the server and the device share it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

TRUE = ("1", "true", "yes", "on")

# run-config keys that were renamed to the names users know from Flower and PEFT: refused (no silent alias),
# with a message naming the new key
RETIRED_KEYS: dict[str, str] = {
    "rounds": "num-server-rounds",
    "lora-rank": "lora-r",
    "lora-targets": "lora-target-modules",
    "weights": "weight-precision",
}


def retired_key_message(key: str, where: str = "run config") -> str:
    """What to say about a retired ``key`` (in ``where``): the key it was renamed to."""
    return f"{where} key {key!r} was renamed: use {RETIRED_KEYS[key]}"


def refuse_retired(
    config: Mapping[str, Any], error: type[Exception] = ValueError, own: Iterable[str] = (), where: str = "run config"
) -> None:
    """Raise ``error`` naming the new key when ``config`` sets a retired key (one that is not in ``own``)."""
    for key in sorted(set(config) & set(RETIRED_KEYS) - set(own)):
        raise error(retired_key_message(key, where))


def flag(value: Any) -> bool:
    """A run-config boolean: a bool, a number, or one of ``1 true yes on`` (any case) for true."""
    if isinstance(value, str):
        return value.strip().lower() in TRUE
    return bool(value)


def key_of(name: str, keys: Mapping[str, str] | None = None) -> str:
    """The config key of dataclass field ``name``."""
    return (keys or {}).get(name, name.replace("_", "-"))


def typed_fields(
    cls: type,
    config: Mapping[str, Any],
    *,
    keys: Mapping[str, str] | None = None,
    only: Iterable[str] | None = None,
    error: type[Exception] = ValueError,
) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that ``config`` sets (a None value sets nothing), each converted to
    its default's type; ``only`` limits the fields read, ``keys`` renames their keys. A value that does
    not convert raises ``error`` naming the key, the value and the type it needs; a retired key
    (:data:`RETIRED_KEYS`) raises ``error`` naming the key that replaced it."""
    wanted = set(only) if only is not None else None
    refuse_retired(config, error, own=(key_of(f.name, keys) for f in dataclasses.fields(cls)))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = key_of(f.name, keys)
        if (wanted is not None and f.name not in wanted) or config.get(key) is None:
            continue
        raw, like = config[key], f.default
        try:
            if isinstance(like, bool):
                values[f.name] = flag(raw)
            elif isinstance(like, int):
                values[f.name] = int(raw)
            elif isinstance(like, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        except (TypeError, ValueError) as err:
            raise error(f"run config {key}={raw!r} is not a valid {type(like).__name__}") from err
    return values


def as_config(instance: Any, keys: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A dataclass instance as config keys and values (what :func:`typed_fields` reads back)."""
    return {key_of(f.name, keys): getattr(instance, f.name) for f in dataclasses.fields(instance)}
