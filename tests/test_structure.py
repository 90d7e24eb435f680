"""The package's structural rules, checked on its source (ast; nothing is imported or run).

- no function longer than MAX_LINES, except the ones listed in LONG_FUNCTIONS_OWNED_ELSEWHERE
  (the training loop, which its own issue splits);
- dependencies run training -> convert -> checkpoint -> models: nothing under convert/ imports the
  training package, nothing under checkpoint/ imports training/ or convert/, nothing under models/
  imports checkpoint/;
- model code holds no global process-group look-ups: the groups are passed in (parallel/state.py:
  init_distributed returns them), and the context-parallel attention has no fallback either;
- the training package (loop, checkpointing, MPO, ...) reads no rank, size or group from megatron's
  global parallel_state either: it uses the collection init_distributed returned;
- no function-level import of a package module (such imports hide cycles), except the listed ones;
- test fixtures live under tests/, not in the package;
- a user's mistake is a UserError (internvl_mcore/errors.py, the only place such classes are defined):
  outside the modules of BUILTIN_RAISES (code that checks its own callers, whose errors are bugs),
  nothing in the package, tools/ or pretrain_internvl.py raises ValueError, KeyError or OSError.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "internvl_mcore"
MAX_LINES = 60

# function -> owner; each entry must still be too long (so the list shrinks as they are split)
LONG_FUNCTIONS_OWNED_ELSEWHERE: dict[str, str] = {
}

# modules whose function-level package imports are owned elsewhere and do not hide a cycle
LOCAL_IMPORTS_OWNED_ELSEWHERE: set[str] = set()

GLOBAL_GROUP_LOOKUPS = ("use_mpu_process_groups", "get_tensor_model_parallel_group", "get_context_parallel_group",
                        "get_pipeline_model_parallel_group", "get_data_parallel_group",
                        "get_expert_model_parallel_group", "get_expert_tensor_parallel_group",
                        "get_hierarchical_context_parallel_groups", "get_model_parallel_group")


def _modules() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _imported_modules(node: ast.AST, rel: str) -> list[str]:
    """Absolute dotted names a (From)Import node reads, relative imports resolved against `rel`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            return [node.module or ""]
        base = ["internvl_mcore", *rel.split("/")[:-1]]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
        return [mod] + [f"{mod}.{a.name}" for a in node.names]
    return []


def test_no_long_functions():
    too_long = {f"{rel}::{fn.name}": fn.end_lineno - fn.lineno + 1
                for rel, tree in _modules() for fn in _functions(tree) if fn.end_lineno - fn.lineno + 1 > MAX_LINES}
    unexpected = {k: v for k, v in too_long.items() if k not in LONG_FUNCTIONS_OWNED_ELSEWHERE}
    assert not unexpected, f"functions over {MAX_LINES} lines (split them): {unexpected}"
    fixed = sorted(set(LONG_FUNCTIONS_OWNED_ELSEWHERE) - set(too_long))
    assert not fixed, f"no longer too long, drop from LONG_FUNCTIONS_OWNED_ELSEWHERE: {fixed}"


# area -> the packages it must not import (training -> convert -> checkpoint -> models)
LOWER_LAYERS = {"convert/": ("training",), "checkpoint/": ("training", "convert"), "models/": ("checkpoint",)}


@pytest.mark.parametrize("area", sorted(LOWER_LAYERS))
def test_dependencies_run_one_way(area):
    forbidden = tuple(f"internvl_mcore.{name}" for name in LOWER_LAYERS[area])
    bad = [(rel, node.lineno, mod) for rel, tree in _modules() if rel.startswith(area)
           for node in ast.walk(tree) for mod in _imported_modules(node, rel)
           if mod in forbidden or mod.startswith(tuple(f + "." for f in forbidden))]
    assert not bad, f"{area} must not import {LOWER_LAYERS[area]} (training -> convert -> checkpoint -> models): {bad}"


@pytest.mark.parametrize("area", ["models/", "parallel/context_parallel"])
def test_no_global_process_group_lookups(area):
    bad = [(rel, node.lineno, node.attr) for rel, tree in _modules() if rel.startswith(area)
           for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in GLOBAL_GROUP_LOOKUPS]
    bad += [(rel, node.lineno, node.module) for rel, tree in _modules() if rel.startswith(area)
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "megatron.core"
            and any(a.name == "parallel_state" for a in node.names)]
    assert not bad, f"{area}: process groups must be passed in, not looked up: {bad}"


# parallel_state's rank/size/stage look-ups (the group look-ups are GLOBAL_GROUP_LOOKUPS)
GLOBAL_RANK_LOOKUP = re.compile(r"^(get_\w*parallel\w*_(rank|ranks|world_size)|is_pipeline_\w+)$")


def _imports_parallel_state(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.module == "megatron.core.parallel_state" or (
            node.module == "megatron.core" and any(a.name == "parallel_state" for a in node.names))
    return isinstance(node, ast.Import) and any(a.name == "megatron.core.parallel_state" for a in node.names)


def test_training_passes_process_groups():
    bad = [(rel, node.lineno) for rel, tree in _modules() if rel.startswith("training/")
           for node in ast.walk(tree)
           if _imports_parallel_state(node) or (isinstance(node, ast.Attribute) and (
               node.attr in GLOBAL_GROUP_LOOKUPS or GLOBAL_RANK_LOOKUP.match(node.attr)))]
    assert not bad, f"training/: use the ProcessGroupCollection init_distributed returned, not parallel_state: {bad}"


def test_no_function_level_package_imports():
    bad = []
    for rel, tree in _modules():
        if rel in LOCAL_IMPORTS_OWNED_ELSEWHERE:
            continue
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if any(m.startswith("internvl_mcore") for m in _imported_modules(node, rel)):
                    bad.append((rel, fn.name, node.lineno))
    assert not bad, f"function-level imports of package modules (move them to the module top): {bad}"


def test_fixtures_are_not_in_the_package():
    assert not (PACKAGE / "data" / "testing.py").exists()
    assert (Path(__file__).parent / "fixtures.py").exists()


# ValueError / KeyError / OSError (and their subclasses) a module may raise, with why they are not a
# user's mistake there. Everywhere else a wrong input raises errors.py's class (CLI boundary: only a
# UserError is one line; these are bugs and keep their traceback).
BUILTIN_ERRORS = {"ValueError", "KeyError", "LookupError", "OSError", "IOError", "EnvironmentError",
                  "FileNotFoundError", "FileExistsError", "IsADirectoryError", "NotADirectoryError",
                  "PermissionError"}
BUILTIN_RAISES = {
    "internvl_mcore/cli_errors.py": "naming() re-raises an OSError with the file it was writing",
    "internvl_mcore/training/async_save.py": "a /dev/shm failure, reported by the save as a CheckpointError",
    "internvl_mcore/training/guards.py": "the injected ENOSPC of the fault-injection hook",
    "internvl_mcore/training/batch.py": "batch shapes from our own collate",
    "internvl_mcore/training/checkpoint.py": "inside a state reader whose caller names the file (CheckpointError)",
    "internvl_mcore/plan/flops.py": "arguments from the planner's own code",
    "internvl_mcore/parallel/context_parallel.py": "shapes and groups our code passes (flags: training/loop.py)",
    "internvl_mcore/parallel/context_parallel_thd.py": "shapes and groups our code passes",
    "internvl_mcore/models/internvl.py": "batch/feature shapes our code passes",
    "internvl_mcore/models/attention.py": "cu_seqlens our collate builds",
    "internvl_mcore/models/weights.py": "canonical tensors checked by the converters first",
    "internvl_mcore/models/vision.py": "the model spec's wiring",
    "internvl_mcore/models/lora.py": "LoRA wiring our code does (checkpoint mismatches: CheckpointError)",
    "internvl_mcore/data/image.py": "one record's media: the preprocessor rejects the record",
    "internvl_mcore/data/packing.py": "one record's tokens: the preprocessor rejects the record",
    "internvl_mcore/data/preference.py": "packs our preprocessor wrote",
    "internvl_mcore/data/synthetic.py": "test-data generator arguments",
    "internvl_mcore/data/resample.py": "image shapes our code passes",
    "internvl_mcore/data/tokenizer.py": "KeyError: a token the vocabulary lacks (a reject); an unknown kind is a bug",
    "internvl_mcore/data/loader.py": "arguments checked before (training/data.py) and packs our collate builds",
    "internvl_mcore/data/workers.py": "arguments our loader passes",
    "internvl_mcore/data/shards.py": "the writer's own arguments and payloads; IndexError of a pack index",
    "internvl_mcore/checkpoint/safetensors_io.py": "KeyError: the mapping protocol of a tensor look-up",
    "internvl_mcore/checkpoint/dist_reader.py": "KeyError: the mapping protocol of a tensor look-up",
    "tools/gen_flag_docs.py": "a developer tool (the docs' generated blocks)",
    "tools/gpu_check.py": "a developer check on a GPU machine",
}
ERROR_ROOTS = Path(__file__).resolve().parents[1]


def _sources() -> list[tuple[str, ast.Module]]:
    paths = [*sorted(PACKAGE.rglob("*.py")), *sorted((ERROR_ROOTS / "tools").glob("*.py")),
             ERROR_ROOTS / "pretrain_internvl.py"]
    return [(p.relative_to(ERROR_ROOTS).as_posix(), ast.parse(p.read_text(), str(p))) for p in paths]


def _raised_name(node: ast.Raise) -> str | None:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else None


def test_user_error_classes_live_in_errors_py():
    """No exception class outside errors.py derives from a user-error class or from ValueError /
    KeyError / OSError (what the CLI boundary used to take for a user's mistake)."""
    errors_tree = ast.parse((PACKAGE / "errors.py").read_text())
    user_classes = {n.name for n in ast.walk(errors_tree) if isinstance(n, ast.ClassDef)}
    assert {"UserError", "ConfigError", "DataError", "CheckpointError", "ConversionError"} <= user_classes
    bad = [(rel, node.name) for rel, tree in _sources() if rel != "internvl_mcore/errors.py"
           for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
           for base in node.bases
           if (base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)) in user_classes | BUILTIN_ERRORS]
    assert not bad, f"define user-error classes in internvl_mcore/errors.py: {bad}"


def test_user_input_errors_are_user_errors():
    """A wrong input raises an errors.py class; bare ValueError / KeyError / OSError only in BUILTIN_RAISES."""
    raising = {}
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None and _raised_name(node) in BUILTIN_ERRORS:
                raising.setdefault(rel, []).append(node.lineno)
    bad = {rel: lines for rel, lines in raising.items() if rel not in BUILTIN_RAISES}
    assert not bad, f"raise a class of internvl_mcore/errors.py for a user's mistake (else list the module): {bad}"
    stale = sorted(set(BUILTIN_RAISES) - set(raising))
    assert not stale, f"BUILTIN_RAISES lists modules that no longer raise those: {stale}"
