"""The packages' import rules, checked: each module's "Must not import:" line, and the light
entry points (`graylane agent`, the CLI) that must start without etcd or scipy.

A rule lists names separated by commas, up to the sentence's end; a name may carry a note in
parentheses, and a note that starts with "except" names the sub-modules still allowed
("graylane.xds (except graylane.xds.view, ...)"). Every import in the module counts, those
inside functions too: a late import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {
    "controlplane": "graylane.controlplane",
    "agent": "graylane.agent",
    "xds": "graylane.xds",
    "deploy": "graylane.deploy",
    "lanes": "graylane.lanes",
}
# How the rules name things -> the import prefixes they forbid.
NAMES = {
    "etcd": ("etcd3",),
    "grpc": ("grpc",),
    "aiohttp": ("aiohttp",),
    "opentelemetry": ("opentelemetry",),
    "xds": ("graylane.xds",),
    "graylane.xds": ("graylane.xds",),
    "agent code": ("graylane.agent",),
    "graylane.agent": ("graylane.agent",),
    "graylane.controlplane": ("graylane.controlplane",),
}
_RULE = re.compile(r"Must not import:?\s*(.*?)\.(?:\s|$)")
_ITEM = re.compile(r"\s*(?P<name>[\w. ]+?)\s*(?:\((?P<note>[^)]*)\))?\s*(?:,|$)")


def _modules() -> list[pathlib.Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def rule_of(doc: str) -> list[tuple[str, tuple[str, ...]]] | None:
    """(forbidden prefix, allowed exceptions) pairs of a docstring's rule (None: no rule)."""
    text = " ".join(doc.split())
    found = _RULE.search(text)
    if found is None:
        return None
    # Parentheses may hold commas: take items with their notes whole.
    out: list[tuple[str, tuple[str, ...]]] = []
    for item in _ITEM.finditer(found.group(1)):
        name = item.group("name").strip()
        if not name:
            continue
        prefixes = NAMES.get(name.lower())
        assert prefixes is not None, f"a rule names {name!r}, which this test cannot check: add it to NAMES"
        note = item.group("note") or ""
        allowed = tuple(re.findall(r"graylane(?:\.\w+)+", note)) if note.startswith("except") else ()
        out += [(prefix, allowed) for prefix in prefixes]
    return out


def imports_of(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _forbidden(name: str, prefix: str, allowed: tuple[str, ...]) -> bool:
    def under(n: str, p: str) -> bool:
        return n == p or n.startswith(p + ".")

    return under(name, prefix) and not any(under(name, a) or under(a, name) for a in allowed)


def test_the_rule_reader_reads_names_notes_and_exceptions() -> None:
    doc = (
        "Owns x. Must not import: etcd (use the store), graylane.xds (except graylane.xds.view, for names), agent code."
    )
    assert rule_of(doc) == [("etcd3", ()), ("graylane.xds", ("graylane.xds.view",)), ("graylane.agent", ())]
    assert rule_of("No rule here.") is None
    assert _forbidden("graylane.xds.server", "graylane.xds", ("graylane.xds.view",))
    assert not _forbidden("graylane.xds.view.parse_cluster_name", "graylane.xds", ("graylane.xds.view",))
    assert not _forbidden("graylane.xdsx", "graylane.xds", ())


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_nothing_its_rule_forbids(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    rule = rule_of(ast.get_docstring(tree) or "")
    if rule is None:
        return
    broken = sorted(
        f"{name} (rule: not {prefix})"
        for name in imports_of(tree)
        for prefix, allowed in rule
        if _forbidden(name, prefix, allowed)
    )
    assert broken == [], f"{path.relative_to(ROOT)} imports what its docstring forbids: {broken}"


def test_rules_exist_where_the_packages_meet() -> None:
    """The rules are read, not skipped: the pure xds modules and the agent's wire all have one."""
    ruled = {
        p.relative_to(ROOT).as_posix() for p in _modules() if rule_of(ast.get_docstring(ast.parse(p.read_text())) or "")
    }
    assert {
        "xds/plan.py",
        "xds/render.py",
        "xds/view.py",
        "agent/wire.py",
        "controlplane/domain/model/validation.py",
    } <= ruled


@pytest.mark.parametrize("module", ["graylane.agent.app", "graylane.controlplane.cli"])
def test_light_entry_points_load_neither_etcd_nor_scipy(module: str) -> None:
    """`graylane agent` runs beside every Envoy and the CLI in every pipeline: neither needs
    the store's etcd client nor the analysis's statistics to start."""
    probe = f"import sys, {module}; print(sorted(m for m in ('etcd3', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-P", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"
