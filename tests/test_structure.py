"""The package's structural rules, checked on its source (ast; nothing is imported or run).

- no function longer than MAX_LINES, except the ones listed in LONG_FUNCTIONS_OWNED_ELSEWHERE
  (the training loop, which its own issue splits);
- the packages form one order (PACKAGE_ORDER, as README states it): training -> plan -> convert ->
  checkpoint -> models -> data -> parallel -> config -> the top-level modules; no import, at module
  level or inside a function, reaches a package above its own;
- only parallel/state.py (and cpu_compat) reads megatron-core's global parallel_state: model code,
  the context-parallel attention, training, conversion, the tools and pretrain_internvl.py use the
  ProcessGroupCollection init_distributed returned;
- every call to a megatron-core function that would otherwise fall back to that global state (DDP,
  optimizer, schedules, finalize_model_grads, MoE aux-loss reduction, ...) passes the groups;
- no function-level import of a package module (such imports hide cycles), except the listed ones;
- test fixtures live under tests/, not in the package;
- a user's mistake is a UserError (internvl_mcore/errors.py, the only place such classes are defined):
  outside the modules of BUILTIN_RAISES (code that checks its own callers, whose errors are bugs),
  nothing in the package, tools/ or pretrain_internvl.py raises ValueError, KeyError or OSError.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "internvl_mcore"
MAX_LINES = 60

# function -> owner; each entry must still be too long (so the list shrinks as they are split)
LONG_FUNCTIONS_OWNED_ELSEWHERE: dict[str, str] = {}

# modules whose function-level package imports are owned elsewhere and do not hide a cycle
LOCAL_IMPORTS_OWNED_ELSEWHERE: set[str] = set()

GLOBAL_GROUP_LOOKUPS = (
    "use_mpu_process_groups",
    "get_tensor_model_parallel_group",
    "get_context_parallel_group",
    "get_pipeline_model_parallel_group",
    "get_data_parallel_group",
    "get_expert_model_parallel_group",
    "get_expert_tensor_parallel_group",
    "get_hierarchical_context_parallel_groups",
    "get_model_parallel_group",
)


@functools.cache  # parsed once for all the tests below (none changes a tree)
def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))
    ]


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
    too_long = {
        f"{rel}::{fn.name}": fn.end_lineno - fn.lineno + 1
        for rel, tree in _modules()
        for fn in _functions(tree)
        if fn.end_lineno - fn.lineno + 1 > MAX_LINES
    }
    unexpected = {k: v for k, v in too_long.items() if k not in LONG_FUNCTIONS_OWNED_ELSEWHERE}
    assert not unexpected, f"functions over {MAX_LINES} lines (split them): {unexpected}"
    fixed = sorted(set(LONG_FUNCTIONS_OWNED_ELSEWHERE) - set(too_long))
    assert not fixed, f"no longer too long, drop from LONG_FUNCTIONS_OWNED_ELSEWHERE: {fixed}"


# the packages, highest first: each imports only packages after it ("" = the top-level modules,
# errors.py, cli_errors.py, faults.py, staging.py). README's Architecture section states this order.
PACKAGE_ORDER = ("inference", "training", "plan", "convert", "checkpoint", "models", "data", "parallel", "config", "")


@functools.cache
def _subpackages() -> frozenset[str]:
    return frozenset(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def _area(dotted: str) -> str | None:
    """The package a dotted module name belongs to ("" for a top-level module), None outside ours."""
    parts = dotted.split(".")
    if parts[0] != "internvl_mcore" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in _subpackages() else ""


def _import_targets(tree: ast.AST, rel: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import anywhere in `tree`: module level, inside functions and
    `if TYPE_CHECKING:` blocks, and `importlib.import_module("...")` with a literal name."""
    package = ".".join(["internvl_mcore", *rel.split("/")[:-1]])
    out = [(node.lineno, mod) for node in ast.walk(tree) for mod in _imported_modules(node, rel)]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            name = node.args[0].value
            out.append((node.lineno, package + name if name.startswith(".") else name))
    return out


def _back_edges(tree: ast.AST, rel: str) -> list[tuple[str, int, str]]:
    rank = {area: i for i, area in enumerate(PACKAGE_ORDER)}
    src = rel.split("/")[0] if "/" in rel else ""
    return [
        (rel, line, mod)
        for line, mod in _import_targets(tree, rel)
        if (dst := _area(mod)) is not None and rank[dst] < rank[src]
    ]


def test_package_order_names_every_package():
    assert set(PACKAGE_ORDER) - {""} == _subpackages(), "place every package in PACKAGE_ORDER (and README)"
    line = " → ".join(f"`{area}/`" for area in PACKAGE_ORDER if area)
    for page in ("README.md", "docs/architecture.md"):
        text = (PACKAGE.parent / page).read_text()
        assert line in text, f"{page}'s dependency line must read: {line}"


def test_back_edge_detection_sees_every_import():
    """The check below catches a back-edge however it is written (so a hidden one cannot pass)."""
    src = (
        "import internvl_mcore.training\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..convert import export\n"
        "def f():\n    from ..models.internvl import build_model\n"
        "    importlib.import_module('internvl_mcore.plan')\n"
        "    from .. import checkpoint\n"
        "    from . import device\n"
    )
    found = {mod for _, _, mod in _back_edges(ast.parse(src), "config/x.py")}
    assert {
        "internvl_mcore.training",
        "internvl_mcore.convert",
        "internvl_mcore.models.internvl",
        "internvl_mcore.plan",
        "internvl_mcore.checkpoint",
    } <= found
    assert not any(m.startswith("internvl_mcore.config") for m in found)


def test_dependencies_run_one_way():
    bad = [edge for rel, tree in _modules() for edge in _back_edges(tree, rel)]
    assert not bad, f"imports against the package order {' -> '.join(a or 'top-level' for a in PACKAGE_ORDER)}: {bad}"


# parallel_state's rank/size/stage look-ups (the group look-ups are GLOBAL_GROUP_LOOKUPS)
GLOBAL_RANK_LOOKUP = re.compile(r"^(get_\w*parallel\w*_(rank|ranks|world_size)|is_pipeline_\w+)$")

# what builds megatron-core's global state and its collection (init_distributed, process_groups) and
# the CPU patches of megatron-core; everything else gets the collection passed in
PARALLEL_STATE_OWNERS = {"internvl_mcore/parallel/state.py", "internvl_mcore/parallel/cpu_compat.py"}


def _code() -> list[tuple[str, ast.Module]]:
    """The package, the tools and the training entry point, by path from the repository root."""
    tools = [*sorted((REPO / "tools").glob("*.py")), REPO / "pretrain_internvl.py"]
    return [(f"internvl_mcore/{rel}", tree) for rel, tree in _modules()] + [
        (p.relative_to(REPO).as_posix(), ast.parse(p.read_text(), str(p))) for p in tools
    ]


def _imports_parallel_state(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.module == "megatron.core.parallel_state" or (
            node.module == "megatron.core" and any(a.name == "parallel_state" for a in node.names)
        )
    return isinstance(node, ast.Import) and any(a.name == "megatron.core.parallel_state" for a in node.names)


def _global_lookups(tree: ast.AST) -> list[tuple[int, str]]:
    return [
        (node.lineno, "parallel_state") if _imports_parallel_state(node) else (node.lineno, node.attr)
        for node in ast.walk(tree)
        if _imports_parallel_state(node)
        or (
            isinstance(node, ast.Attribute)
            and (node.attr in GLOBAL_GROUP_LOOKUPS or GLOBAL_RANK_LOOKUP.match(node.attr))
        )
    ]


def test_process_groups_are_passed_in():
    """No module but parallel/state.py (and cpu_compat) reads megatron-core's global parallel_state:
    model code, the context-parallel attention, training, conversion and the tools use the
    ProcessGroupCollection init_distributed returned."""
    bad = [
        (rel, line, name)
        for rel, tree in _code()
        if rel not in PARALLEL_STATE_OWNERS
        for line, name in _global_lookups(tree)
    ]
    assert not bad, f"use the ProcessGroupCollection init_distributed returned, not parallel_state: {bad}"


# megatron-core functions that fall back to its global parallel_state unless given the groups:
# name -> the keywords every call must pass
GROUP_KEYWORDS: dict[str, tuple[str, ...]] = {
    "DistributedDataParallel": ("pg_collection",),
    "get_megatron_optimizer": ("pg_collection",),
    "finalize_model_grads": ("pg_collection",),
    "forward_backward_no_pipelining": ("pg_collection",),
    "forward_backward_pipelining_without_interleaving": ("pg_collection", "p2p_communicator"),
    "forward_backward_pipelining_with_interleaving": ("pg_collection", "p2p_communicator"),
    "get_forward_backward_func": ("pp_size", "vp_size"),
    "P2PCommunicator": ("pp_group",),
    "reduce_aux_losses_tracker_across_ranks": ("pg_collection",),
    "track_moe_metrics": ("pg_collection",),
    "make_sharded_tensors_for_checkpoint": ("tp_group", "dp_cp_group"),
    "model_parallel_cuda_manual_seed": ("tp_rank", "ep_rank", "etp_rank"),
    "scatter_to_sequence_parallel_region": ("group",),
    "gather_from_sequence_parallel_region": ("group",),
    "reduce_scatter_to_sequence_parallel_region": ("group",),
    "copy_to_tensor_model_parallel_region": ("group",),
    "reduce_from_tensor_model_parallel_region": ("group",),
    "gather_from_tensor_model_parallel_region": ("group",),
    "scatter_to_tensor_model_parallel_region": ("group",),
}


def _called_name(call: ast.Call) -> str | None:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)


def _calls_without_groups(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each call to a GROUP_KEYWORDS function missing one of its keywords; the
    schedule get_forward_backward_func returns must be called on the spot, with pg_collection."""
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    called_on_the_spot = {id(node.func): node for node in calls if isinstance(node.func, ast.Call)}
    bad = []
    for node in calls:
        name = _called_name(node)
        if name in GROUP_KEYWORDS and not set(GROUP_KEYWORDS[name]) <= {k.arg for k in node.keywords}:
            bad.append((node.lineno, name))
        if name == "get_forward_backward_func":
            outer = called_on_the_spot.get(id(node))
            if outer is None:
                bad.append((node.lineno, "get_forward_backward_func(...) not called on the spot"))
            elif "pg_collection" not in {k.arg for k in outer.keywords}:
                bad.append((outer.lineno, "get_forward_backward_func(...)(...) without pg_collection"))
    return bad


def test_group_check_sees_calls():
    """The check below flags a call without its groups however the function is reached."""
    src = (
        "DistributedDataParallel(config=c, ddp_config=d, module=m)\n"
        "optimizer.get_megatron_optimizer(cfg, [m], use_gloo_process_groups=False)\n"
        "fb = get_forward_backward_func()\n"
        "get_forward_backward_func(pp_size=2, vp_size=None)(model=[m])\n"
        "tensor_parallel.scatter_to_sequence_parallel_region(x)\n"
        "DistributedDataParallel(config=c, ddp_config=d, module=m, pg_collection=pg)\n"
        "get_forward_backward_func(pp_size=2, vp_size=None)(model=[m], pg_collection=pg, p2p_communicator=p)\n"
    )
    assert sorted(line for line, _ in _calls_without_groups(ast.parse(src))) == [1, 2, 3, 3, 4, 5]


def test_megatron_core_gets_the_groups():
    """Every call to a megatron-core function that would otherwise use its global parallel_state
    (DDP, the optimizer, the schedules, finalize_model_grads, the MoE aux-loss reduction, sharded
    checkpoint tensors, the TP mappings, the RNG seeding) passes the groups."""
    bad = [(rel, line, name) for rel, tree in _code() for line, name in _calls_without_groups(tree)]
    assert not bad, f"pass the ProcessGroupCollection (or its group) to megatron-core: {bad}"


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
BUILTIN_ERRORS = {
    "ValueError",
    "KeyError",
    "LookupError",
    "OSError",
    "IOError",
    "EnvironmentError",
    "FileNotFoundError",
    "FileExistsError",
    "IsADirectoryError",
    "NotADirectoryError",
    "PermissionError",
}
BUILTIN_RAISES = {
    "internvl_mcore/cli_errors.py": "naming() re-raises an OSError with the file it was writing",
    "internvl_mcore/training/async_save.py": "a /dev/shm failure, reported by the save as a CheckpointError",
    "internvl_mcore/training/guards.py": "the injected ENOSPC of the fault-injection hook",
    "internvl_mcore/training/checkpoint.py": "inside a state reader whose caller names the file (CheckpointError)",
    "internvl_mcore/plan/flops.py": "arguments from the planner's own code",
    "internvl_mcore/parallel/context_parallel.py": "shapes and groups our code passes (flags: training/loop.py)",
    "internvl_mcore/parallel/context_parallel_thd.py": "shapes and groups our code passes",
    "internvl_mcore/models/internvl.py": "batch/feature shapes our code passes",
    "internvl_mcore/parallel/attention.py": "cu_seqlens our collate builds",
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
    paths = [
        *sorted(PACKAGE.rglob("*.py")),
        *sorted((ERROR_ROOTS / "tools").glob("*.py")),
        ERROR_ROOTS / "pretrain_internvl.py",
    ]
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
    bad = [
        (rel, node.name)
        for rel, tree in _sources()
        if rel != "internvl_mcore/errors.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        for base in node.bases
        if (base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)) in user_classes | BUILTIN_ERRORS
    ]
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
