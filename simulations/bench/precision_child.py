"""One ``mobiflower bench precision`` device process: a start (import, load, first frame) or the full
measurement of one weight precision, run as
``python -m mobiflower.simulations.bench.precision_child SPEC RESULT LAUNCHED`` so that its memory
figures are its own (see :func:`peak_rss_mb`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mobiflower.platform.tasks import BUNDLED_TASK


def _child_main(spec_path: str, result_path: str, launched: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = _measure(spec, float(launched))
    Path(result_path).write_text(json.dumps(result))


def _resident_mb(folder: str | None) -> float | None:
    """Resident MB of this process's mappings of files under ``folder`` (Linux ``smaps``)."""
    if not folder:
        return None
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    prefix = str(Path(folder).resolve())
    total, current = 0, False
    for line in text.splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            current = len(parts) >= 6 and parts[5].startswith(prefix)
        elif current and parts and parts[0] == "Rss:":
            total += int(parts[1])
    return total / 1024


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB: ``VmHWM`` of ``/proc/self/status`` where there is one.

    ``ru_maxrss`` is not used on Linux: it survives ``execve``, and Python spawns children with
    ``vfork``, so a child's ``ru_maxrss`` starts at its parent's peak (the bench parent's peak
    after preparing a copy - an fp32 checkpoint loaded and quantized - would show up as every later
    child's "model memory"). ``VmHWM`` belongs to the child's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    from mobiflower.simulations.baselines.on_device import peak_rss_mb as max_rss_mb

    return max_rss_mb()


def _rss_parts_mb() -> dict[str, float]:
    """``RssAnon`` and ``RssFile`` of ``/proc/self/status`` in MiB (empty where there is none)."""
    parts = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                parts[key] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return parts


def _measure(spec: dict, launched: float) -> dict:
    import gc

    import torch

    from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
    from mobiflower.platform.backbone import Backbone
    from mobiflower.platform.data import Example
    from mobiflower.platform.frames import encode_frame
    from mobiflower.simulations.baselines.on_device import current_rss_mb

    mode = spec["mode"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    examples = [Example(int(i), str(text), int(label)) for i, text, label in spec["samples"]]
    bs = int(spec["batch_size"])
    batches = [examples[i : i + bs] for i in range(0, len(examples), bs)]
    # as a device app's imports would: the baseline covers the code the device's forward runs
    forward = _import_runtime_code(spec["model"], spec["precision"], spec.get("weights_dir"), spec.get("group_size"))
    imported_at = time.time()
    gc.collect()
    baseline = current_rss_mb()
    parts0 = _rss_parts_mb()
    t0 = time.perf_counter()
    backbone = Backbone.load(
        spec["model"],
        num_taps=int(spec["num_taps"]),
        weights=spec["precision"],
        weights_dir=spec.get("weights_dir"),
        group_size=spec.get("group_size"),
    )
    runtime = DeviceRuntime(backbone, ForwardConfig(batch_size=bs, max_tokens=spec.get("max_tokens")))
    # as a device does with its local data (DeviceSetup.runtime): tokenize it all, then drop the
    # tokenizer before the forward pages the weights in
    runtime.pretokenize(examples)
    load_s = time.perf_counter() - t0
    after_load = current_rss_mb()
    t0 = time.perf_counter()
    frame, _stats = runtime.make_frame(batches[0])
    encode_frame(frame)
    first_frame_at = time.time()
    result: dict[str, Any] = {
        "start_to_first_frame_s": first_frame_at - launched,
        # CPU seconds of this process up to the first frame: with one thread, about what the start
        # takes on an idle machine (wall time above includes waiting for a busy CPU)
        "start_cpu_s": time.process_time(),
        "imports_s": imported_at - launched,
        "model_load_s": load_s,
        "first_frame_s": time.perf_counter() - t0,
        "forward": forward,
        "transformers_imported": "transformers" in sys.modules,
        "fingerprint": backbone.fingerprint,
    }
    if mode == "start":
        return result

    result.update(_steady_state(runtime, backbone, batches, baseline, after_load, parts0))
    _save_tapped_states(backbone, batches[0], spec["states_path"])
    return result


def _steady_state(runtime, backbone, batches: list, baseline: float, after_load: float, parts0: dict) -> dict:
    """Seconds per sample over the batches after the first, and where the model's memory went."""
    import torch

    from mobiflower.platform.frames import encode_frame
    from mobiflower.simulations.baselines.on_device import current_rss_mb

    result: dict[str, Any] = {}
    after_first = current_rss_mb()
    timed = batches[1:] if len(batches) > 1 else batches
    t0 = time.perf_counter()
    for batch in timed:
        frame, _stats = runtime.make_frame(batch)
        encode_frame(frame)
    elapsed = time.perf_counter() - t0
    n_timed = sum(len(b) for b in timed)
    peak = peak_rss_mb()
    end_rss, parts1 = current_rss_mb(), _rss_parts_mb()
    weights_resident = _resident_mb(backbone.weights_path)
    if parts0 and parts1:
        # where the model memory went (at the end; ``transient`` is the peak above it): the mapped
        # weights, other file pages the forward touched (library code), and anonymous memory
        # (tokenizer, activations, buffers and what the allocator keeps)
        result["memory_breakdown_mb"] = {
            "weights_resident": weights_resident,
            "code_and_other_files": parts1["RssFile"] - parts0["RssFile"] - (weights_resident or 0.0),
            "anonymous": parts1["RssAnon"] - parts0["RssAnon"],
            "transient_at_peak": peak - end_rss,
        }
    result.update(
        {
            "baseline_rss_mb": baseline,
            "rss_after_load_mb": after_load,
            "rss_after_first_frame_mb": after_first,
            "peak_rss_mb": peak,
            "model_memory_mb": peak - baseline,
            "weights_resident_mb": weights_resident,
            "s_per_sample": elapsed / n_timed,
            "samples": n_timed,
            "precision": backbone.precision,
            "parameters": backbone.describe()["parameters"],
            "machine": {
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "threads": torch.get_num_threads(),
            },
        }
    )
    return result


def _save_tapped_states(backbone, batch: list, path: str) -> None:
    """The tapped states (last real token of every sample, every tapped layer) of one batch."""
    import torch

    enc = backbone.tokenize([BUNDLED_TASK.render(e.text) for e in batch])
    positions = backbone.feature_positions(enc["attention_mask"])
    states: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        states[layer] = hidden[torch.arange(hidden.shape[0]), positions].float().clone()

    backbone.forward_taps(enc["input_ids"], enc["attention_mask"], keep)
    torch.save(states, path)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _import_runtime_code(ref: str, precision: str, weights_dir: str | None, group_size: int | None) -> str:
    """Import the code the device's forward will run; which forward that is (``lean``/``transformers``).

    A llama-family prepared copy runs on :mod:`mobiflower.platform.lean_llama` (torch and
    ``tokenizers`` only); anything else needs the architecture's transformers modeling module and
    tokenizer classes (lazy in transformers), imported here so that the baseline covers them.
    """
    from mobiflower.platform.device_forward import forward_implementation
    from mobiflower.platform.precision import DEFAULT_INT4_GROUP_SIZE
    from mobiflower.platform.prepared_weights import prepared_dir

    folder = prepared_dir(ref, precision, weights_dir, group_size or DEFAULT_INT4_GROUP_SIZE)
    try:
        forward = forward_implementation(folder)
    except Exception:  # noqa: BLE001 - no prepared copy yet: the load builds one through transformers
        forward = "transformers"
    if forward == "lean":
        import safetensors.torch  # noqa: F401
        import tokenizers  # noqa: F401

        import mobiflower.platform.lean_llama  # noqa: F401

        return forward
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    from mobiflower.platform.hf_model import DECODER_TYPES, resolve_model
    from mobiflower.platform.hf_quiet import quiet_transformers

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(resolve_model(ref))
        auto = AutoModelForCausalLM if config.model_type in DECODER_TYPES else AutoModel
        auto._model_mapping[type(config)]  # noqa: B018  (the lazy mapping imports the module)
    except Exception:  # an unusual architecture: it is imported during the load instead
        pass
    return forward


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
