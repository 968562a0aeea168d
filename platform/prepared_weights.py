"""The prepared copy on disk: a model converted once to a precision, then loaded memory-mapped, fast.

In a Flower deployment every message starts a fresh ClientApp process, so the backbone is loaded
again and again; it must load fast, and a low-precision backbone must not be converted each time.

:func:`prepare_quantized_backbone` converts a model once into a folder
(``$MOBIFLOWER_HOME/models/<name>-<precision>/``): ``model.safetensors`` (the tensors in their
stored precision, tied weights once), ``config.json``, the tokenizer, and a manifest
``mobiflower-weights.json`` (precision, quantized layers, the backbone digest, a stamp of the
source files). :func:`load_prepared_backbone` builds the module tree on the ``meta`` device (no
allocation, no random init; :mod:`mobiflower.platform.device_forward`), swaps in the quantized
layers, and assigns the tensors of a memory-mapped ``safetensors`` file without copying: the load
takes no memory until the forward touches the pages. The digest comes from the manifest, so the
load does not read every weight either. ``Backbone.load(ref, weights="int8")`` does all of it,
building the copy first if it is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch
from torch import nn

from mobiflower.platform.assets import BUNDLED_MODEL, home
from mobiflower.platform.atomic import atomic_directory, exclusive_lock, remove_partial
from mobiflower.platform.device_forward import build_empty_model, forward_implementation, load_prepared_tokenizer
from mobiflower.platform.file_rows import read_rows_from_file
from mobiflower.platform.hf_model import DECODER_TYPES, BackboneError, load_hf_model, resolve_model, weights_digest
from mobiflower.platform.precision import (
    DEFAULT_INT4_GROUP_SIZE,
    PRECISION_DTYPE_NAMES,
    WEIGHT_PRECISIONS,
    WeightPrecisionError,
    normalize_precision,
)
from mobiflower.platform.process_memory import release_free_heap
from mobiflower.platform.quantized_layers import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear
from mobiflower.platform.weight_conversion import quantize_backbone_weights, set_module, weight_bytes

FORMAT_VERSION = 2
MANIFEST = "mobiflower-weights.json"
WEIGHTS_FILE = "model.safetensors"


def _source_path(ref: str) -> str:
    """Where ``ref``'s checkpoint is, without building a shipped shape's (a device that has only the
    prepared copy keeps using it)."""
    return resolve_model(ref, materialize=False)


def prepared_dir(
    ref: str, precision: str, cache_dir: str | Path | None = None, group_size: int = DEFAULT_INT4_GROUP_SIZE
) -> Path:
    """Where the prepared copy of ``ref`` at ``precision`` lives (``<cache>/<name>-<precision>``).

    ``cache`` is ``cache_dir`` or ``$MOBIFLOWER_HOME/models``. A local folder's name carries a
    hash of its absolute path, so two folders with the same base name never share a copy.
    """
    precision = normalize_precision(precision)
    root = Path(cache_dir) if cache_dir is not None else home() / "models"
    if ref == BUNDLED_MODEL:
        name = ref
    elif Path(ref).expanduser().exists():
        path = Path(ref).expanduser().resolve()
        name = f"{path.name}-{hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()}"
    else:  # a hub id
        name = ref.replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    suffix = precision + (f"-g{group_size}" if precision == "int4" and group_size != DEFAULT_INT4_GROUP_SIZE else "")
    return root / f"{name}-{suffix}"


def _source_stamp(path: str) -> list | None:
    """Names, sizes and mtimes of a local model folder's weight and config files (None for a hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")
    )
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_manifest(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def manifest_problem(
    folder: str | Path, ref: str | None = None, precision: str | None = None, group_size: int | None = None
) -> str | None:
    """Why the prepared copy at ``folder`` cannot be used (None when it can)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return "no manifest"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')} (want {FORMAT_VERSION})"
    if precision is not None and manifest.get("precision") != normalize_precision(precision):
        return f"precision {manifest.get('precision')} (want {precision})"
    if group_size is not None and manifest.get("precision") == "int4" and manifest.get("group_size") != group_size:
        return f"group size {manifest.get('group_size')} (want {group_size})"
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or _file_stamp(weights) != manifest.get("file_stamp"):
        return f"{WEIGHTS_FILE} is missing or changed since it was prepared"
    if ref is not None:
        try:
            stamp = _source_stamp(_source_path(ref))
        except Exception:  # noqa: BLE001 - the source is gone (a device shipped only the copy): use the copy
            stamp = None
        if stamp is not None and stamp != manifest.get("source", {}).get("stamp"):
            return "the source model changed since the copy was prepared"
    return None


def is_prepared_folder(ref: str | Path) -> bool:
    """Whether ``ref`` is itself a prepared copy (a folder with a weights manifest)."""
    try:
        return (Path(ref).expanduser() / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


def _disk_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Tensors to save (each storage once), aliases of tied tensors, and the non-persistent buffers."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple, str] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous()
    non_persistent = []
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name not in state and buf is not None:
            tensors[name] = buf.detach().contiguous()
            non_persistent.append(name)
    return tensors, aliases, sorted(non_persistent)


def prepare_quantized_backbone(
    ref: str,
    precision: str,
    out_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    group_size: int = DEFAULT_INT4_GROUP_SIZE,
    force: bool = False,
    log=None,
) -> Path:
    """Convert ``ref`` once into a ready-to-map folder at ``precision``; return the folder.

    Idempotent: a current copy (same precision, format, and unchanged source files) is reused.
    Safe when several processes prepare the same copy at once (each writes a private folder and
    renames it into place; the first one wins).
    """
    from safetensors.torch import save_file

    precision = normalize_precision(precision)
    out = Path(out_dir) if out_dir is not None else prepared_dir(ref, precision, cache_dir, group_size)
    if not force and manifest_problem(out, ref, precision, group_size) is None:
        return out
    log = log or (lambda msg: None)
    start = time.perf_counter()
    log(f"[weights] preparing a {precision} copy of {ref} at {out} (once)...")
    path = _source_path(ref)
    model, tokenizer = load_hf_model(ref, torch.float32)
    model.eval().requires_grad_(False)
    quantize_backbone_weights(model, precision, group_size)
    digest = weights_digest(model)
    tensors, aliases, non_persistent = _disk_state(model)
    quantized = _quantized_modules(model)
    sizes = weight_bytes(model)

    try:
        with atomic_directory(out, private=True) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mobiflower_precision": precision})
            del tensors
            model.config.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            manifest = {
                "format_version": FORMAT_VERSION,
                "precision": precision,
                "dtype_name": PRECISION_DTYPE_NAMES[precision],
                "group_size": group_size if precision == "int4" else None,
                "digest": digest,
                "model_type": str(model.config.model_type),
                "auto": "causal_lm" if model.config.model_type in DECODER_TYPES else "base",
                "quantized": quantized,
                "aliases": aliases,
                "non_persistent": non_persistent,
                "weight_bytes": sizes,
                "file_stamp": _file_stamp(tmp / WEIGHTS_FILE),
                "source": {"ref": ref, "path": str(path), "stamp": _source_stamp(path)},
                "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
                "prepare_s": round(time.perf_counter() - start, 3),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except OSError:  # another process renamed its copy into place first: use that one
        if manifest_problem(out, None, precision, group_size) is not None:
            raise
    del model
    log(
        f"[weights] {precision} copy ready in {time.perf_counter() - start:.1f} s: "
        f"{sizes['total'] / 2**20:.0f} MiB of weights"
    )
    return out


def _quantized_modules(model: torch.nn.Module) -> dict[str, dict]:
    """What the manifest records of each quantized module, to rebuild it before mapping the weights."""
    quantized = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            quantized[name] = {
                "kind": m.precision,
                "in": m.in_features,
                "out": m.out_features,
                "bias": m.bias is not None,
                **({"group_size": m.group_size} if m.precision == "int4" else {}),
            }
        elif isinstance(m, Int8Embedding):
            quantized[name] = {
                "kind": "int8-embedding",
                "num": m.num_embeddings,
                "dim": m.embedding_dim,
                "padding_idx": m.padding_idx,
            }
    return quantized


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def ensure_prepared(
    ref: str, precision: str, cache_dir: str | Path | None = None, group_size: int = DEFAULT_INT4_GROUP_SIZE, log=None
) -> Path:
    """The prepared copy's folder, building (or rebuilding a stale) one first."""
    folder = prepared_dir(ref, precision, cache_dir, group_size)
    if manifest_problem(folder, ref, precision, group_size) is None:
        return folder
    # one process at a time rebuilds: the others wait, find the copy current and use it (a second
    # rebuild would delete the first's copy under whoever is loading it)
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):
        remove_partial(folder)  # what a build killed mid-write left (we hold the lock)
        return prepare_quantized_backbone(ref, precision, folder, group_size=group_size, log=log)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise BackboneError(f"the prepared weights name {name!r}, which the model does not have")


def _share(model: nn.Module, name: str, target: str) -> None:
    """Make ``name`` the very same parameter (or buffer) object as ``target`` (tied weights)."""
    t_module, _, t_attr = target.rpartition(".")
    t_owner = model.get_submodule(t_module) if t_module else model
    obj = t_owner._parameters.get(t_attr)
    if obj is None:
        obj = t_owner._buffers[t_attr]
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(obj, nn.Parameter):
        module._parameters[attr] = obj
    else:
        module._buffers[attr] = obj


def load_prepared_backbone(folder: str | Path, precision: str | None = None, implementation: str | None = None):
    """``(model, tokenizer, manifest)`` from a prepared folder, the weights memory-mapped, not copied.

    A llama-family or OPT copy runs on the lean forward (:mod:`mobiflower.platform.lean_llama`,
    :mod:`mobiflower.platform.lean_opt`: same names,
    same arithmetic, no transformers import) unless ``implementation`` (or
    ``MOBIFLOWER_DEVICE_FORWARD``) says ``transformers``; the manifest returned names the one used
    (``forward``).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    problem = manifest_problem(folder, None, precision)
    if problem is not None:
        raise BackboneError(
            f"{folder} is not a usable prepared backbone ({problem}): prepare it with prepare_quantized_backbone()"
        )
    manifest = read_manifest(folder)
    forward = forward_implementation(folder, implementation)
    dtype = torch.bfloat16 if manifest["precision"] == "bf16" else torch.float32
    tokenizer = load_prepared_tokenizer(folder, forward)
    model = build_empty_model(folder, forward, manifest["auto"] == "causal_lm", dtype)
    with torch.device("meta"):
        for name, spec in manifest["quantized"].items():
            if spec["kind"] == "int8":
                layer = Int8Linear(spec["in"], spec["out"], spec["bias"])
            elif spec["kind"] == "int8-embedding":
                layer = Int8Embedding(spec["num"], spec["dim"], spec.get("padding_idx"))
            else:
                layer = Int4Linear(spec["in"], spec["out"], spec["bias"], spec["group_size"])
            set_module(model, name, layer)
    # Tensors shared in the skeleton (tied embeddings) are saved once; remember who shares what.
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    state = load_file(str(folder / WEIGHTS_FILE))  # memory-mapped: no copy, no page read yet
    for name, tensor in state.items():
        _assign(model, name, tensor)
    del state
    for alias, target in manifest["aliases"].items():
        _share(model, alias, target)
    for names in shared.values():  # ties the file did not spell out: share what was loaded
        loaded = [n for n in names if not model.get_parameter(n).is_meta]
        for name in names:
            if loaded and model.get_parameter(name).is_meta:
                _share(model, name, loaded[0])
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise BackboneError(
            f"the prepared weights at {folder} lack {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}: prepare the copy again"
        )
    model.eval().requires_grad_(False)
    # the few table rows a batch looks up are read from the file, not faulted in a read-ahead window at a time
    embedding = "file rows" if read_rows_from_file(model, folder / WEIGHTS_FILE, manifest["aliases"]) else "mapped"
    release_free_heap()  # what parsing tokenizer.json and the config left behind
    return model, tokenizer, {**manifest, "forward": forward, "embedding": embedding}


def load_backbone_weights(
    ref: str,
    precision: str | None,
    cache_dir: str | Path | None = None,
    group_size: int = DEFAULT_INT4_GROUP_SIZE,
    log=None,
):
    """``(model, tokenizer, manifest)`` of ``ref`` at ``precision``, preparing the copy once if needed.

    ``ref`` may also be a prepared folder itself (``precision`` None or the folder's).
    """
    if is_prepared_folder(ref):
        folder = Path(ref).expanduser()
        model, tokenizer, manifest = load_prepared_backbone(
            folder, None if precision is None else normalize_precision(precision)
        )
        return model, tokenizer, {**manifest, "path": str(folder)}
    if precision is None:
        raise WeightPrecisionError(
            f"{ref!r} is not a prepared copy: name a weight precision ({', '.join(WEIGHT_PRECISIONS)})"
        )
    precision = normalize_precision(precision)
    folder = ensure_prepared(ref, precision, cache_dir, group_size, log=log)
    model, tokenizer, manifest = load_prepared_backbone(folder, precision)
    manifest = {**manifest, "path": str(folder)}
    return model, tokenizer, manifest


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "WEIGHTS_FILE",
    "prepared_dir",
    "read_manifest",
    "manifest_problem",
    "is_prepared_folder",
    "prepare_quantized_backbone",
    "ensure_prepared",
    "load_prepared_backbone",
    "load_backbone_weights",
]
