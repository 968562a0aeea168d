"""The README and the guides behind it: the configuration reference is what the code generates (never
stale), it lists every key pyproject declares and every node-config key the device reads, and every
relative link (and its #anchor) in README.md and docs/*.md resolves."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mobiflower.simulations.config_reference import node_config_keys, render, run_config_groups, run_config_keys

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_configuration_reference_is_not_stale():
    """Regenerate it: `python -m mobiflower.simulations.config_reference`."""
    assert (ROOT / "docs" / "configuration.md").read_text() == render()


def test_the_reference_lists_every_key_pyproject_declares_with_its_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    listed = run_config_keys()
    assert listed == declared
    assert {k: type(v) for k, v in listed.items()} == {k: type(v) for k, v in declared.items()}


def test_every_key_has_help_and_appears_once():
    keys = [k for _, _, group in run_config_groups() for k in group]
    assert len({k.key for k in keys}) == len(keys)
    assert [k.key for k in keys + node_config_keys() if not k.help.strip()] == []


def test_every_node_config_key_the_device_reads_is_listed():
    """What clients/ reads straight from a node config by its key (the dataclass-read ones are listed by
    construction)."""
    read = set()
    for path in (ROOT / "clients").glob("*.py"):
        read |= set(re.findall(r"node_config(?:\.get\(|\[)\s*[\"']([a-z0-9-]+)[\"']", path.read_text()))
    assert read, "no node-config reads found: has the ClientApp changed how it reads them?"
    assert read - {k.key for k in node_config_keys()} == set()


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _links() -> list[tuple[str, str]]:
    out = []
    for doc in DOCUMENTS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if not re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
                out.append((str(doc.relative_to(ROOT)), target))
    return out


def test_the_documents_link_to_each_other():
    assert (ROOT / "docs").is_dir() and len(_links()) >= 20


@pytest.mark.parametrize("doc, target", _links())
def test_every_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    resolved = (ROOT / doc).parent / path if path else ROOT / doc
    assert resolved.exists(), f"{doc} links to {target}: no such file"
    if anchor and resolved.suffix == ".md":
        assert anchor in _anchors(resolved), f"{doc} links to {target}: {resolved.name} has no such heading"


def test_the_codes_references_to_the_concepts_name_sections_it_has():
    """`docs/concepts.md §N` in the code (the design document it cites) names a numbered section there."""
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "concepts.md").read_text(), flags=re.M))
    cited = set()
    for folder in ("platform", "clients", "strategies", "simulations", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for refs in re.findall(r"docs/concepts\.md ((?:§\d+(?:, )?)+)", path.read_text()):
                cited |= set(re.findall(r"§(\d+)", refs))
    assert cited and cited <= sections
