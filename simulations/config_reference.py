"""docs/configuration.md, made from the config dataclasses so the reference cannot drift from the code.

    python -m mobiflower.simulations.config_reference            # rewrite docs/configuration.md
    python -m mobiflower.simulations.config_reference --check    # exit 1 when it is stale (tests/test_docs.py)

Each run-config key comes from the dataclass field that reads it (``TaskConfig``, ``DeviceSetup``,
``SideTuningConfig``, ``StateDefense``): its key, default and type from the field, its help from the
field's comment (the comment on its line, or the comment block right above a field without one; a
block above a commented field heads a section). :data:`HELP` fills in (or replaces) what no comment
says. Keys the apps read outside a dataclass (:data:`APP_RUN_KEYS`, :data:`APP_NODE_KEYS`) are listed
here with their help.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobiflower.clients.device_setup import NODE_CONFIG_FIELDS, NODE_CONFIG_KEYS, RUN_CONFIG_KEYS, DeviceSetup
from mobiflower.platform.run_config import RETIRED_KEYS, key_of
from mobiflower.platform.state_defense import DEFENSE_KEYS, StateDefense
from mobiflower.platform.tasks import TaskConfig
from mobiflower.strategies.config import FAMILY_SETTINGS, SideTuningConfig

DOC = Path("docs/configuration.md")

HELP = {
    "task": "what the fleet fine-tunes for: `classification` or `causal-lm` (docs/tasks-and-data.md)",
    "model": "the device's backbone: `smollm2-135m` (bundled), a shape (`opt-1.3b-shape`, `smollm2-1.7b-shape`), "
    "a local model folder or a Hugging Face model id",
    "weight-precision": "the device's backbone weight precision: fp32, bf16, int8 or int4 (a prepared, memory-mapped copy)",
    "num-taps": "ladder / adapter: how many evenly spaced layers the device taps",
    "text-column": "the column holding a sample's text",
    "label-column": "classification: the column holding a label name from `labels`, or its integer id",
    "prompt-column": "causal-lm: the prompt column (the loss scores the completion only)",
    "completion-column": "causal-lm: the completion column",
    "messages-column": "causal-lm: a chat, a list of `{role, content}` messages (the loss scores assistant turns)",
    "user-column": "who wrote a sample (`partitioning = natural`: one device per user)",
    "validation-samples": "the bundled job's validation pool, shared across the fleet",
    "test-samples": "the bundled job's test pool, shared across the fleet",
    "test-fraction": "any other data: the share of each device's own samples held out for its test",
    "dirichlet-alpha": "`partitioning = dirichlet`: the Dirichlet concentration over labels (small = skewed)",
    "seed": "the data split and partition and, unless train-seed is set, the training",
    "device-threads": "torch threads of each device's forward",
    "lora-r": "tail: the LoRA rank (PEFT's `r`)",
    "lora-alpha": "tail: the LoRA scaling (PEFT's `lora_alpha`)",
    "lora-target-modules": "tail: the modules LoRA wraps, comma-separated (PEFT's `target_modules`)",
    "reduction": "ladder / adapter: the side network's width is the backbone's divided by this",
    "dropout": "ladder / adapter: dropout in the side network",
    "lr": "the server's learning rate (AdamW): the tail's 1e-3 was picked on validation over 1e-3 / 2e-3 "
    "(RESULTS.md); ladder / adapter train best near 3e-4",
    "bits": "bits per value in the frames: 16, 8, 4 or 2 (the tail's 4 cost it no measurable accuracy; "
    "ladder / adapter default to 8)",
    "eval-every": "validation every k server rounds (0 = only the final test)",
    "adapt-min-taps": "adaptation never sends fewer tapped layers than this (0 = half of them, rounded up)",
    "run-dir": 'where checkpoints, the summary and the server\'s side networks go ("" = '
    "`$MOBIFLOWER_HOME/runs/<run id>`)",
    "weight-decay": "AdamW weight decay of the side network",
    "batch-size": "the server's training minibatch (samples)",
    "cache-mb": "the activation cache's bound in MB",
    "personal-lr": "hybrid mode: the personal heads' learning rate",
    "personal-select": 'hybrid mode: how many personal epochs each device keeps: "validation", the count '
    '(0 to personal-epochs) that scores best on its validation frames, forwarded once; "last", all of them',
    "cache-threads": "torch threads of the server's training in cached rounds, when the devices are idle "
    "(0 = every core)",
    "device-batch-size": "samples per forward pass on the device",
    "deliver": "send each device its trained side network at the end (and test it there)",
    "partition-id": "a simulated or demo device: which share of the run's data it holds",
    "num-partitions": "... out of how many shares",
    "backbone-layers": "> 0: run only the model's first N blocks (a layer-truncated backbone)",
    "max-tokens": "most padded tokens one forward pass runs (the device's activation memory; 0 = whole batches)",
}
"""Help where a field has no comment, or where one comment serves several fields."""

APP_RUN_KEYS = {
    "delivery-dir": (
        "",
        "where devices save their delivered side network ('' = not saved; a node's `side-network-dir` wins)",
    ),
    "capture-dir": ("", "write every reply exactly as it leaves each device here, for audits ('' = off)"),
}
"""Run-config keys the ClientApp reads itself (clients/client_app.py): default, help."""

APP_NODE_KEYS = {
    "activation-cache": (
        True,
        "false: this device opts out of the server's activation cache (its frames are "
        "trained on once and never kept; it forwards again every round)",
    ),
    "label-private": (False, "true: this device keeps its labels whatever the server asks"),
    "label-epsilon": (0.0, "this device's randomized-response epsilon for its residuals (overrides the run's)"),
    "side-network-dir": ("", "where this device saves its delivered side network (overrides `delivery-dir`)"),
}
"""Node-config keys the ClientApp reads itself (clients/client_app.py): default, help."""


@dataclass(frozen=True)
class Key:
    key: str
    default: Any
    help: str

    @property
    def kind(self) -> str:
        return type(self.default).__name__

    def row(self, with_default: bool = True) -> str:
        cells = [f"`{self.key}`", f"`{toml_value(self.default)}`" if with_default else "", self.kind, self.help]
        if not with_default:
            del cells[1]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def toml_value(value: Any) -> str:
    """A default as TOML writes it (what pyproject's [tool.flwr.app.config] and `-c` take)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def field_comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """``cls``'s field comments: (help per field, the section heading a field starts)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line: text of the comment on it
    alone: set[int] = set()  # lines that hold a comment and nothing else
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                alone.add(tok.start[0])
    body = ast.parse(source).body[0].body
    helps, sections = {}, {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, line = [], node.lineno - 1
        while line in alone:
            above.insert(0, comments[line])
            line -= 1
        if own:
            helps[node.target.id] = " ".join(own)
            if above:
                sections[node.target.id] = " ".join(above)
        elif above:
            helps[node.target.id] = " ".join(above)
    return helps, sections


def dataclass_keys(cls: type, keys: dict[str, str] | None = None, only=None) -> list[tuple[str, Key]]:
    """(section heading or '', key) of each field of ``cls`` that is a config key, in field order."""
    helps, sections = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.default is dataclasses.MISSING:
            continue  # a nested config (a default_factory) reads keys of its own
        key = key_of(f.name, keys)
        out.append((sections.get(f.name, ""), Key(key, f.default, HELP.get(key) or helps.get(f.name, ""))))
    return out


def run_config_groups() -> list[tuple[str, str, list[Key]]]:
    """The run-config keys in groups: (heading, where they are read, keys)."""
    groups = [
        ("The task", "`TaskConfig`, platform/tasks.py", [k for _, k in dataclass_keys(TaskConfig)]),
        (
            "The device: backbone and data",
            "`DeviceSetup`, clients/device_setup.py",
            [k for _, k in dataclass_keys(DeviceSetup, RUN_CONFIG_KEYS, only=RUN_CONFIG_KEYS)],
        ),
    ]
    heading, keys = "Side networks and optimisation", []
    for section, key in dataclass_keys(SideTuningConfig):
        if section and keys:
            groups.append((heading, "`SideTuningConfig`, strategies/config.py", keys))
            heading, keys = section.split(" (")[0].capitalize(), []
        keys.append(key)
    groups.append((heading, "`SideTuningConfig`, strategies/config.py", keys))
    defense = [k for _, k in dataclass_keys(StateDefense, DEFENSE_KEYS)]
    groups.append(("Device defenses on the sent states", "`StateDefense`, platform/state_defense.py", defense))
    app = [Key(k, d, h) for k, (d, h) in APP_RUN_KEYS.items()]
    groups.append(("Read by the ClientApp itself", "clients/client_app.py", app))
    seen: set[str] = set()  # a key two dataclasses read (`seed`) is listed where it is read first
    return [(h, w, [k for k in keys if not (k.key in seen or seen.add(k.key))]) for h, w, keys in groups]


def run_config_keys() -> dict[str, Any]:
    """Every run-config key the reference lists, with its default (what pyproject must declare)."""
    return {k.key: k.default for _, _, keys in run_config_groups() for k in keys}


def node_config_keys() -> list[Key]:
    """The node-config keys a device reads: its own data and backbone, its defenses, its opt-outs."""
    own = [k for _, k in dataclass_keys(DeviceSetup, NODE_CONFIG_KEYS, only=NODE_CONFIG_FIELDS)]
    defense = [
        dataclasses.replace(k, help=f"{k.help} (a node can only make the run's defense stronger)")
        for _, k in dataclass_keys(StateDefense, DEFENSE_KEYS)
    ]
    return [*own, *defense, *(Key(k, d, h) for k, (d, h) in APP_NODE_KEYS.items())]


INTRO = """# Configuration reference

<!-- Generated by `python -m mobiflower.simulations.config_reference` from the config dataclasses:
do not edit by hand. tests/test_docs.py fails when this file is stale. -->

Every knob of a run is a Flower **run-config** key, the same on the server and on every device:
pyproject.toml's `[tool.flwr.app.config]` declares each with its default, and `mobiflower simulate`,
`mobiflower local`, `flwr run .` and the benches that run fleets take `-c KEY=VALUE` for any of them (an
unknown key or a bad value is refused before Flower starts; a key a bench sets itself, naming its option). A device's own settings are **node-config** keys, given to its SuperNode
(`flower-supernode --node-config 'key=value ...'`) or to a tier of a simulated fleet. Values are TOML:
strings in double quotes, `true` / `false`. How the pieces fit: [concepts.md](concepts.md); the
flags that stand for common keys: [simulation.md](simulation.md).
"""


def render() -> str:
    lines = [INTRO]
    lines += ["## Run config", ""]
    for heading, where, keys in run_config_groups():
        lines += [f"### {heading}", "", f"Read by {where}.", ""]
        lines += ["| key | default | type | what it does |", "|---|---|---|---|"]
        lines += [k.row() for k in keys] + [""]
    lines += ["### Each side-network family's defaults", ""]
    lines += ["`--family` (or `-c family=...` with `mobiflower simulate`) also sets these; a `-c` key still wins.", ""]
    names = list(next(iter(FAMILY_SETTINGS.values())))
    lines += ["| family | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for family, values in FAMILY_SETTINGS.items():
        lines.append(f"| `{family}` | " + " | ".join(toml_value(values[n]) for n in names) + " |")
    lines += ["", "### Renamed keys", ""]
    lines += ["These earlier names are refused, with a message naming the new key (no silent alias).", ""]
    lines += ["| earlier key | use |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in RETIRED_KEYS.items()]
    lines += ["", "## Node config", ""]
    lines += [
        "A SuperNode's `--node-config`, read by the device alone (clients/device_setup.py, clients/client_app.py).",
        "",
    ]
    lines += ["| key | default | type | what it does |", "|---|---|---|---|"]
    lines += [k.row() for k in node_config_keys()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(next((a for a in argv if not a.startswith("-")), DOC))
    text = render()
    if "--check" in argv:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run `python -m mobiflower.simulations.config_reference`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
