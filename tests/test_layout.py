"""The design card's layout: folders mapped into `mobiflower`, stdlib `platform` unshadowed."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_platform_from_repo_root_is_stdlib():
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    path = out.stdout.splitlines()[0]
    assert not path.startswith(str(ROOT)), path
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_folders_map_into_package():
    import mobiflower.clients.runtime as runtime
    import mobiflower.platform.backbone as backbone
    import mobiflower.simulations.cli as cli

    assert pathlib.Path(backbone.__file__).parent == ROOT / "platform"
    assert pathlib.Path(runtime.__file__).parent == ROOT / "clients"
    assert pathlib.Path(cli.__file__).parent == ROOT / "simulations"


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_import_directions():
    """Core never imports flwr or simulations; the strategy (the ServerApp included) never imports
    simulations; the device never imports the side-tuning trainer or simulations (the federated LoRA
    baseline, whose device trains by design, lives in simulations/baselines/)."""
    flower_speaking = {"messages.py"}  # the message protocol both sides share (docs/concepts.md §4, §7)
    for path in (ROOT / "platform").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith("mobiflower.simulations"), f"{path.name} imports {name}"
            if path.name in flower_speaking:
                continue
            assert not name.startswith("flwr"), f"{path.name} imports {name}: the core must not speak Flower"
            assert name != "mobiflower.platform.messages" and not name.startswith("mobiflower.strategies"), (
                f"core module {path.name} imports {name}"
            )
    training = ("mobiflower.platform.trainer", "mobiflower.platform.side_store", "torch.optim")
    for path in (ROOT / "clients").rglob("*.py"):
        for name in _imports(path):
            assert name not in training, f"device module {path.name} imports {name}"
            assert not name.startswith("mobiflower.strategies"), f"device module {path.name} imports {name}"
            assert not name.startswith("mobiflower.simulations"), f"device module {path.name} imports {name}"
    for path in (ROOT / "strategies").rglob("*.py"):  # the ServerApp's fleet model enters through its run config
        for name in _imports(path):
            assert not name.startswith("mobiflower.simulations"), f"strategy module {path.name} imports {name}"
    for folder in ("platform", "clients", "strategies", "simulations"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                top = name.split(".")[0]
                assert top not in ("platform", "clients", "strategies", "simulations"), f"{path} imports bare {name}"


def test_the_tree_is_formatted_and_linted():
    """`ruff format` and `ruff check` (pyproject's [tool.ruff]) leave the whole tree unchanged."""
    ruff = [sys.executable, "-m", "ruff"]
    fmt = subprocess.run([*ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, f"run `ruff format .`:\n{fmt.stdout}{fmt.stderr}"
    lint = subprocess.run([*ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, f"run `ruff check --fix .`:\n{lint.stdout}{lint.stderr}"
