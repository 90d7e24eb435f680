"""The tests' plumbing has one place each: the in-process `world` fixture and the shared shard sets in
tests/conftest.py, one free-port helper (parallel/ports.py's `free_port`, torch-free, which tests import through
tests/launch.py, which gives each pytest-xdist worker its own block of ports). Checked on the source (ast;
nothing is imported or run), but for the port blocks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from internvl_mcore.parallel import ports
from tests.launch import worker_ports

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    p
    for folder in ("internvl_mcore", "tests", "tools", "bench", "examples")
    for p in sorted((REPO / folder).rglob("*.py"))
] + [REPO / "pretrain_internvl.py"]
FREE_PORT_HOME = REPO / "internvl_mcore" / "parallel" / "ports.py"
SHARED_FIXTURES = {"world", "digits_shards", "preference_shards"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _binds_port_zero(node: ast.AST) -> bool:
    """`x.bind((host, 0))`: asking the OS for a free port."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "bind"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Tuple)
        and len(node.args[0].elts) == 2
        and isinstance(node.args[0].elts[1], ast.Constant)
        and node.args[0].elts[1].value == 0
    )


def test_one_free_port_helper():
    candidates = [p for p in SOURCES if ".bind(" in p.read_text(encoding="utf-8")]  # parse only these
    found = [f"{p.relative_to(REPO)}:{n.lineno}" for p in candidates for n in ast.walk(_tree(p)) if _binds_port_zero(n)]
    assert (
        found
        == [
            f"{FREE_PORT_HOME.relative_to(REPO)}:{n.lineno}"
            for n in ast.walk(_tree(FREE_PORT_HOME))
            if _binds_port_zero(n)
        ]
        and len(found) == 1
    ), found


def test_shared_fixtures_are_defined_once_and_not_imported():
    defined, imported = [], []
    names = ("conftest", *(f"def {name}" for name in SHARED_FIXTURES))
    for path in (p for p in SOURCES if p.parts[len(REPO.parts)] == "tests"):
        if not any(n in path.read_text(encoding="utf-8") for n in names):
            continue  # parse only the files that could define or import them
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef) and node.name in SHARED_FIXTURES:
                defined.append(f"{path.relative_to(REPO)}: {node.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("conftest"):
                imported += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names if a.name in SHARED_FIXTURES]
    assert sorted(defined) == sorted(f"tests/conftest.py: {name}" for name in SHARED_FIXTURES), defined
    assert not imported, imported


def test_asking_for_a_port_imports_no_torch():
    """tests/launch.py's free_port in a fresh interpreter: a test that needs no torch (flag errors, the
    planner) keeps its pytest process torch-free (torch + megatron-core: ~3 CPU-s)."""
    probe = "import sys, tests.launch as l; assert l.free_port() > 0; print(sorted(m for m in sys.modules if m.startswith(('torch', 'megatron'))))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_worker_port_blocks_are_disjoint_and_below_the_ephemeral_range(monkeypatch):
    """Two xdist workers' worlds never meet on a port: each worker's free_port walks its own block
    (tests/launch.py), below the ephemeral range outgoing gloo connections take their ports from."""
    blocks = [worker_ports(w) for w in (None, "gw0", "gw1", "gw2")]
    spans = [range(*(int(x) for x in b.split("-"))) for b in blocks]
    assert all(not set(a) & set(b) for i, a in enumerate(spans) for b in spans[i + 1 :]), blocks
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    assert max(s.stop for s in spans) <= low, (blocks, low)
    monkeypatch.setenv(ports.PORTS_ENV, blocks[2])
    monkeypatch.setattr(ports, "_walk", None)
    got = [ports.free_port() for _ in range(3)]
    assert all(p in spans[2] for p in got) and len(set(got)) == 3, got  # a fresh port each call
    monkeypatch.delenv(ports.PORTS_ENV)
    assert ports.free_port() > 0  # outside tests: the kernel's pick, as before
