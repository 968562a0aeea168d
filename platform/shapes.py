"""Billion-sized backbones without a model hub: shipped configurations, random weights.

Why: what a device pays (memory, seconds per sample, start-up) depends on a model's shape, not on
its weights' values. This machine reaches no model hub, yet the method's claim is about 1-2B
models on CPU-only devices. So the project ships the published ``config.json`` of two such models
(:data:`SHAPES`) and builds a checkpoint of that exact shape with seeded random weights, once,
under ``$MOBIFLOWER_HOME/shapes/<name>/``: a plain transformers folder (``config.json``,
``model.safetensors`` in the dtype the hub ships, the tokenizer). From there everything runs
through the code path of any local folder or hub id (:func:`mobiflower.platform.hf_model.resolve_model`
maps the name to the folder): prepared copies at every precision, the device, the baselines, the
server. A user with hub access passes the real id (``ModelShape.hub_id``) instead and gets the
same code path with real weights.

Every figure measured on a shape is a *cost* figure of random weights (accuracy means nothing).

The tokenizer: the shapes borrow the bundled SmolLM2 tokenizer (``mobiflower assets``). It is
SmolLM2-1.7B's own vocabulary (49,152 tokens); OPT's GPT-2 BPE is not available offline, so the
OPT shape uses it too (a byte-level BPE of similar size: similar token counts on English text;
its ids fit OPT's 50,272-row table).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mobiflower.platform.atomic import atomic_directory, exclusive_lock, remove_partial

MARKER = "mobiflower-shape.json"
"""Written last into a built shape folder: which shape, which seed, that the weights are random."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class ShapeError(ValueError):
    """A shape cannot be built; the message says what to do."""


@dataclass(frozen=True)
class ModelShape:
    """A published model's configuration, to be instantiated with random weights.

    ``config`` is the model's ``config.json`` as published for ``hub_id``; ``checkpoint_dtype`` is
    the dtype its weights ship in (the built checkpoint uses it too, so loading it costs what the
    real one does); ``tokenizer_from`` is a folder holding ``tokenizer.json`` (None: the bundled
    SmolLM2 model's).
    """

    name: str
    hub_id: str
    config: Mapping[str, Any]
    checkpoint_dtype: str = "float32"
    seed: int = 0
    tokenizer_from: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def transformers_config(self):
        """The ``transformers`` config object of this shape (``OPTConfig``, ``LlamaConfig``, ...)."""
        from transformers import AutoConfig

        values = {k: v for k, v in self.config.items() if k not in ("model_type", "architectures")}
        return AutoConfig.for_model(self.model_type, **values)

    def parameter_names(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every parameter the checkpoint stores (tied weights once), read off a
        model built on the ``meta`` device (no memory, no initialisation)."""
        import torch
        from transformers import AutoModelForCausalLM

        from mobiflower.platform.hf_quiet import quiet_transformers

        quiet_transformers()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.transformers_config())
        return {name: tuple(p.shape) for name, p in model.named_parameters()}  # dedups tied tensors

    def num_parameters(self) -> int:
        return sum(_numel(s) for s in self.parameter_names().values())


OPT_1_3B = ModelShape(
    name="opt-1.3b-shape",
    hub_id="facebook/opt-1.3b",
    checkpoint_dtype="float16",
    config={
        "_name_or_path": "facebook/opt-1.3b",
        "activation_dropout": 0.0,
        "activation_function": "relu",
        "architectures": ["OPTForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "do_layer_norm_before": True,
        "dropout": 0.1,
        "eos_token_id": 2,
        "ffn_dim": 8192,
        "hidden_size": 2048,
        "init_std": 0.02,
        "layerdrop": 0.0,
        "max_position_embeddings": 2048,
        "model_type": "opt",
        "num_attention_heads": 32,
        "num_hidden_layers": 24,
        "pad_token_id": 1,
        "prefix": "</s>",
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": 50272,
        "word_embed_proj_dim": 2048,
    },
    notes=("OPT's GPT-2 tokenizer is not available offline: the bundled SmolLM2 tokenizer stands in",),
)
SMOLLM2_1_7B = ModelShape(
    name="smollm2-1.7b-shape",
    hub_id="HuggingFaceTB/SmolLM2-1.7B",
    checkpoint_dtype="bfloat16",
    config={
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 24,
        "num_key_value_heads": 32,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 130000,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 49152,
    },
)
SHAPES: dict[str, ModelShape] = {s.name: s for s in (OPT_1_3B, SMOLLM2_1_7B)}
"""The shipped shapes by name: what ``--model`` / the ``model`` run-config key accept besides the
bundled model, a folder or a hub id."""


def is_shape(ref: str) -> bool:
    return str(ref) in SHAPES


def shape_dir(shape: ModelShape | str) -> Path:
    """Where the shape's random checkpoint lives (``$MOBIFLOWER_HOME/shapes/<name>``)."""
    from mobiflower.platform.assets import home

    name = shape.name if isinstance(shape, ModelShape) else str(shape)
    return home() / "shapes" / name


def shape_problem(shape: ModelShape, folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete build of ``shape`` (None when it is)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return "not built"
    if (
        marker.get("shape") != shape.name
        or marker.get("config") != dict(shape.config)
        or marker.get("seed") != shape.seed
        or marker.get("checkpoint_dtype") != shape.checkpoint_dtype
    ):
        return "built from another configuration"
    weights = folder / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size != marker.get("bytes"):
        return "model.safetensors is missing or truncated"
    return None


def _init(name: str, shape: tuple[int, ...], std: float) -> tuple[str, float]:
    """How transformers initialises this parameter: zero biases, unit norms, normal(0, std) matrices."""
    if name.endswith(".bias"):
        return "zeros", 0.0
    if len(shape) == 1:  # LayerNorm / RMSNorm weights
        return "ones", 1.0
    return "normal", std


def _tensor_seed(seed: int, name: str) -> int:
    """Each tensor's own seed: the values do not depend on the order tensors are written in."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def _random_rows(name: str, shape: tuple[int, ...], std: float, seed: int, dtype, chunk: int = 1 << 23):
    """The tensor's bytes in pieces of at most ``chunk`` values (a 50,272 x 2,048 table never sits in
    float32 at once)."""
    import torch

    kind, value = _init(name, shape, std)
    numel = _numel(shape)
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        if kind == "normal":
            piece = torch.empty(n, dtype=torch.float32).normal_(0.0, value, generator=g)
        else:
            piece = torch.full((n,), value, dtype=torch.float32)
        yield piece.to(dtype).view(torch.uint8).numpy().tobytes()


def write_random_safetensors(
    path: str | Path, tensors: Mapping[str, tuple[int, ...]], dtype_name: str, std: float, seed: int
) -> int:
    """Write ``tensors`` (name -> shape) with seeded random values to a safetensors file, streaming
    (memory: one piece, not the model); return the file's size in bytes.

    The format is an 8-byte little-endian header length, a JSON header of ``dtype``/``shape``/
    ``data_offsets`` per tensor (padded with spaces to 8 bytes), then the raw little-endian data.
    """
    import torch

    if dtype_name not in _ST_DTYPES:
        raise ShapeError(f"checkpoint dtype {dtype_name!r}: choose one of {', '.join(_ST_DTYPES)}")
    dtype = getattr(torch, dtype_name)
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "mobiflower_random_weights": "true"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        n = _numel(tensors[name])
        header[name] = {
            "dtype": _ST_DTYPES[dtype_name],
            "shape": list(tensors[name]),
            "data_offsets": [offset, offset + n * size],
        }
        offset += n * size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in names:
            for piece in _random_rows(name, tensors[name], std, seed, dtype):
                fh.write(piece)
    return Path(path).stat().st_size


def _tokenizer_source(shape: ModelShape) -> Path:
    if shape.tokenizer_from is not None:
        return Path(shape.tokenizer_from)
    from mobiflower.platform.assets import BUNDLED_MODEL, bundled_model_dir

    folder = bundled_model_dir()
    if not (folder / "tokenizer.json").is_file():
        raise ShapeError(
            f"{shape.name} borrows the tokenizer of the bundled {BUNDLED_MODEL}, which is not "
            f"prepared at {folder}: run `mobiflower assets` first"
        )
    return folder


def materialize_shape(
    shape: ModelShape | str, folder: str | Path | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Build ``shape``'s random checkpoint folder once (idempotent) and return it.

    Several processes may ask at once (simulated devices and the server): they take turns under a
    lock, and the folder appears whole (built beside it, then renamed) or not at all.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ShapeError(f"unknown model shape {shape!r}: the shipped ones are {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    folder = Path(folder) if folder is not None else shape_dir(shape)
    if shape_problem(shape, folder) is None:
        return folder
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):
        if shape_problem(shape, folder) is None:
            return folder
        remove_partial(folder)  # what a builder killed mid-write left (we hold the lock)
        start = time.perf_counter()
        (log or (lambda _m: None))(
            f"[shapes] building {shape.name} ({shape.hub_id}'s configuration, random weights, "
            f"{shape.checkpoint_dtype}) at {folder} (once)..."
        )
        tokenizer = _tokenizer_source(shape)
        tensors = shape.parameter_names()
        std = float(shape.config.get("initializer_range", shape.config.get("init_std", 0.02)))
        with atomic_directory(folder, private=True) as tmp:
            size = write_random_safetensors(tmp / "model.safetensors", tensors, shape.checkpoint_dtype, std, shape.seed)
            (tmp / "config.json").write_text(json.dumps(dict(shape.config), indent=2))
            for name in _TOKENIZER_FILES:
                if not (tokenizer / name).is_file():
                    raise ShapeError(
                        f"{tokenizer} has no {name}: a shape's tokenizer needs {', '.join(_TOKENIZER_FILES)}"
                    )
                shutil.copyfile(tokenizer / name, tmp / name)
            marker = {
                "shape": shape.name,
                "hub_id": shape.hub_id,
                "config": dict(shape.config),
                "seed": shape.seed,
                "checkpoint_dtype": shape.checkpoint_dtype,
                "bytes": size,
                "random_weights": True,
                "tokenizer_from": str(tokenizer),
                "notes": list(shape.notes),
                "parameters": sum(_numel(s) for s in tensors.values()),
                "build_s": round(time.perf_counter() - start, 1),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        (log or (lambda _m: None))(
            f"[shapes] {shape.name} ready in {time.perf_counter() - start:.0f} s ({size / 2**30:.2f} GiB)"
        )
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = [
    "ModelShape",
    "ShapeError",
    "SHAPES",
    "OPT_1_3B",
    "SMOLLM2_1_7B",
    "MARKER",
    "is_shape",
    "shape_dir",
    "shape_problem",
    "materialize_shape",
    "write_random_safetensors",
]
