"""The documentation matches the code: every CLI's --help runs, every flag the docs use exists in
the --help of the program it is given to, the generated tables are current, the documented data
examples are the shipped files, every file, folder and `file.py: name` a page names exists."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USAGE = REPO / "docs" / "usage.md"
OWN_DOCS = [USAGE, REPO / "docs" / "gpu.md"]
ALL_DOCS = sorted({REPO / "README.md", REPO / "examples" / "README.md", *(REPO / "docs").glob("*.md")})
CLIS = ["pretrain_internvl.py", *sorted(f"tools/{p.name}" for p in (REPO / "tools").glob("*.py"))]
# torchrun's own flags appear in commands before the script it starts
TORCHRUN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port"}


def _help(cli: str) -> tuple[str, subprocess.CompletedProcess]:
    return cli, subprocess.run(
        [sys.executable, cli, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """cli -> its --help text (all run at once: each is a fresh Python process)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(_help, CLIS))
    for cli, proc in results.items():
        assert proc.returncode == 0, f"{cli} --help failed:\n{proc.stderr[-3000:]}"
        assert proc.stdout.startswith("usage:"), cli
    return {cli: proc.stdout for cli, proc in results.items()}


def options(help_text: str) -> set[str]:
    """The option strings argparse lists in the options part of a --help text (not in prose)."""
    found = set()
    for line in help_text.splitlines():
        if re.match(r"^ {2,6}-", line):
            invocation = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]  # before the help column
            found.update(re.findall(r"--[A-Za-z0-9][-A-Za-z0-9_]*", invocation))
    return found


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", text, re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Shell commands of a code block: continuation lines joined, comments dropped, split at ; && |."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # not a shell line (e.g. a diagram)
        current: list[str] = []
        for w in words:
            if w in (";", "&&", "|", "||"):
                out.append(current)
                current = []
            else:
                current.append(w)
        out.append(current)
    return [c for c in out if c]


def target_cli(word: str) -> str | None:
    """Which CLI's flags follow `word` in a command (example scripts pass theirs to pretrain)."""
    if word.endswith("pretrain_internvl.py"):
        return "pretrain_internvl.py"
    m = re.search(r"(tools/[A-Za-z0-9_]+\.py)$", word)
    if m:
        return m.group(1)
    if word.endswith("examples/preprocess.sh"):
        return "tools/preprocess_mm_data.py"
    if re.search(r"examples/.*\.sh$", word):
        return "pretrain_internvl.py"  # stage scripts and launchers end with pretrain flags
    return None


def documented_command_flags(path: Path) -> list[tuple[str, str, str]]:
    """(cli, flag, command) for every flag after a CLI in the code blocks of `path`."""
    found = []
    for block in code_blocks(path.read_text(encoding="utf-8")):
        for words in commands(block):
            cli = None
            for w in words:
                target = target_cli(w)
                if target:
                    cli = target
                elif cli and w.startswith("--"):
                    found.append((cli, w.split("=", 1)[0], " ".join(words)))
    return found


def test_every_cli_help_runs(helps):
    assert "--tensor-model-parallel-size" in options(helps["pretrain_internvl.py"])
    assert set(helps) == set(CLIS)


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_flags_in_documented_commands_exist(helps, doc):
    problems = [
        f"{cli} has no {flag}: {cmd}"
        for cli, flag, cmd in documented_command_flags(doc)
        if flag not in options(helps[cli])
    ]
    assert not problems, "\n".join(problems)


def test_every_inline_flag_in_our_docs_exists(helps):
    """A `--flag` mentioned in prose or tables of docs/usage.md and docs/gpu.md is some CLI's flag."""
    known = set().union(*(options(h) for h in helps.values())) | TORCHRUN_FLAGS
    problems = []
    for doc in OWN_DOCS:
        text = doc.read_text(encoding="utf-8")
        prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for flag in re.findall(r"(?<![\w-])--[A-Za-z0-9][-A-Za-z0-9_]*", span):
                if flag not in known:
                    problems.append(f"{doc.name}: `{span}` names {flag}")
    assert not problems, "\n".join(problems)


def test_documented_commands_exist_at_all():
    """The usage guide shows each CLI at least once (a renamed tool cannot drop out silently)."""
    used = {cli for cli, _, _ in documented_command_flags(USAGE)}
    for cli in (
        "pretrain_internvl.py",
        "tools/preprocess_mm_data.py",
        "tools/inspect_shards.py",
        "tools/convert_from_hf.py",
        "tools/convert_to_hf.py",
        "tools/plan.py",
    ):
        assert cli in used, cli


def _gen_flag_docs():
    spec = importlib.util.spec_from_file_location("gen_flag_docs", REPO / "tools" / "gen_flag_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_flag_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_tables_are_up_to_date():
    gen = _gen_flag_docs()
    stale = gen.stale_blocks(USAGE.read_text(encoding="utf-8"))
    assert not stale, f"docs/usage.md blocks {stale} are out of date: run python tools/gen_flag_docs.py"


def test_generated_flag_table_lists_exactly_the_parsers_flags(helps):
    """Independent of the generator: the table's flags are the --help's flags (both directions)."""
    text = USAGE.read_text(encoding="utf-8")
    block = re.search(r"<!-- BEGIN GENERATED: flags -->(.*?)<!-- END GENERATED: flags -->", text, re.S).group(1)
    # a second name: the --no- form of an override, or the generated alias of a Megatron-LM spelling
    # with '_' (--override-opt_param-scheduler / --override-opt-param-scheduler)
    table = set(re.findall(r"^\| `(--[-a-z0-9_]+)`(?: / `(--[-a-z0-9_]+)`)?", block, re.M))
    table_flags = {f for pair in table for f in pair if f}
    assert table_flags == options(helps["pretrain_internvl.py"]) - {"--help"}


def test_generated_stage_table_matches_the_presets():
    from internvl_mcore.config.training import STAGES

    text = USAGE.read_text(encoding="utf-8")
    block = re.search(r"<!-- BEGIN GENERATED: stages -->(.*?)<!-- END GENERATED: stages -->", text, re.S).group(1)
    rows = {
        m[0]: m[1:] for m in re.findall(r"^\| `([0-9.a-z]+)` \| (\w+) \| (\w+) \| (\w+) \| ([0-9.e-]+) \|", block, re.M)
    }
    assert set(rows) == set(STAGES)
    for name, (vit, proj, llm, lr) in rows.items():
        s = STAGES[name]
        assert (vit == "trains", proj == "trains", llm == "trains") == (s.train_vit, s.train_projector, s.train_llm)
        assert float(lr) == s.lr


def test_documented_env_variables_are_read_by_the_launcher():
    text = USAGE.read_text(encoding="utf-8")
    section = text.split("Environment variables read by `examples/train.sh`")[1].split("###")[0]
    names = set(re.findall(r"^\| `([A-Z_]+)`|, `([A-Z_]+)`", section, re.M))
    names = {n for pair in names for n in pair if n}
    launcher = (REPO / "examples" / "train.sh").read_text()
    assert len(names) > 20
    missing = [n for n in names if not re.search(rf"\b{n}\b", launcher)]
    assert not missing, missing


def test_documented_data_examples_are_the_shipped_files():
    text = USAGE.read_text(encoding="utf-8")
    jsonl = [json.loads(line) for line in (REPO / "examples" / "data" / "example.jsonl").read_text().splitlines()]
    meta = json.loads((REPO / "examples" / "data" / "meta_example.json").read_text())
    shown = [json.loads(b) for b in re.findall(r"^```json\n(.*?)^```", text, re.S | re.M)]
    records = [s for s in shown if "conversations" in s]
    assert meta in shown
    assert records and all(r in jsonl for r in records)
    kinds = {
        ("image" in r and isinstance(r["image"], list)) * "multi"
        or ("image" in r) * "image"
        or ("video" in r) * "video"
        or "text"
        for r in records
    }
    assert kinds == {"text", "image", "multi", "video"}


def test_links_in_our_docs_resolve():
    for doc in OWN_DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


# --- file references: every `path.py`, `path.py: name` and `dir/` a page names exists ----------
REFERENCE_DOCS = ALL_DOCS
# where a relative path may start: the repo, the package (docs say `models/weights.py`), the page's folder
REFERENCE_ROOTS = [REPO, REPO / "internvl_mcore"]
# files of other projects the pages name (InternVL's training scripts and the like)
OTHER_PROJECTS = {"internvl_chat_mpo.py"}
PATH = r"((?:[\w.-]+/)*[\w-]+\.(?:py|sh))"
NAME = r"([A-Za-z_]\w*(?:\.\w+)*)"
# in one code span: `path.py`, `path.py: name`, `path.py::test_name` (`x.py: error: ...` is a message)
FILE_REF = re.compile(rf"(?<![\w./$-]){PATH}(?![\w/])(?:(?::\s*|::){NAME}(?![\w:]))?")
OWNED_NAME = re.compile(rf"`{PATH}`'s `{NAME}`")  # `tools/gpu_check.py`'s `device_tiling`
DIR_REF = re.compile(r"`((?:[a-z_][\w-]*/)+)`")
PLACEHOLDER = re.compile(r"[A-Z]{2,}[A-Z_]*")  # `tools/NAME.py`, `examples/internvl3_SIZE/stage1.sh`


def _resolve(ref: str, doc: Path) -> Path | None:
    for root in (*REFERENCE_ROOTS, doc.parent):
        found = sorted(root.glob(PLACEHOLDER.sub("*", ref)))
        if found:
            return found[0]
    if "/" not in ref:  # a bare file name: a module table's row (`keymaps.py`) names its folder elsewhere
        return _repo_files().get(ref)
    return None


@functools.lru_cache(maxsize=1)
def _repo_files() -> dict[str, Path]:
    """File name -> a file of that name in the repo (hidden folders, .venv and caches left out)."""
    files = {}
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and not d.endswith(".egg-info")]
        files.update({n: Path(folder, n) for n in names if n not in files})
    return files


@functools.lru_cache(maxsize=None)
def _defined_names(path: Path) -> set[str]:
    """Names a Python file defines (functions, classes, assigned names and attributes, imports) and
    the strings it names things by (a check's or a fault point's name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                names.update(n.attr for n in ast.walk(target) if isinstance(n, ast.Attribute))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)
    return names


def reference_problems(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    refs = [m for span in re.findall(r"`([^`\n]+)`", text) for m in FILE_REF.findall(span)]
    refs += OWNED_NAME.findall(text)
    refs += [(ref, "") for ref, _ in FILE_REF.findall(text)]  # outside code spans too: links, commands, prose
    problems = []
    for ref, name in refs:
        if ref in OTHER_PROJECTS:
            continue
        path = _resolve(ref, doc)
        if path is None:
            problems.append(f"{doc.name}: {ref} does not exist")
        elif name and path.suffix == ".py" and not set(name.split(".")) <= _defined_names(path):
            problems.append(f"{doc.name}: {ref} defines no {name}")
    for ref in DIR_REF.findall(text):
        # a folder of the repo or the package (`training/`); run-time folders (`iter_N/`) are not checked
        if any((root / ref.split("/")[0]).is_dir() for root in REFERENCE_ROOTS) and _resolve(ref, doc) is None:
            problems.append(f"{doc.name}: folder {ref} does not exist")
    return sorted(set(problems))


@pytest.mark.parametrize("doc", REFERENCE_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_file_references_in_docs_resolve(doc):
    problems = reference_problems(doc)
    assert not problems, "\n".join(problems)
