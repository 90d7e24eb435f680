"""Flags generated from the config dataclasses: one flag per field, help = the field's docstring.

A field `tensor_model_parallel_size` becomes `--tensor-model-parallel-size` (or the spelling in its
`metadata["flag"]`, where Megatron-LM's name is not regular); bools become
store-true flags; `list[str]` fields take one or more values; Literal fields get choices. Defaults
come from the dataclass, so they are written down exactly once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Iterable


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a dataclass (read from its source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag(name: str) -> str:
    """Field name -> flag (`micro_batch_size` -> `--micro-batch-size`)."""
    return "--" + name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str, skip: Iterable[str] = ()) -> None:
    """Add a flag group for every simple field of dataclass `cls`."""
    group = parser.add_argument_group(title, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "help": docs.get(f.name, ""), "default": default}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True  # a field without a default is a flag without one
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        optional = origin in (typing.Union, types.UnionType)  # Optional[X] / X | None
        if optional:
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            # Optional[bool]: an override that can say yes or no (--freeze-vit / --no-freeze-vit)
            kwargs["action"] = argparse.BooleanOptionalAction if optional else "store_true"
        elif origin is list:
            kwargs.update(nargs="+", type=args[0])
        elif origin is typing.Literal:
            kwargs.update(choices=list(args), type=type(args[0]))
        elif origin is dict or hint is dict:
            continue
        else:
            kwargs["type"] = hint
        if kwargs.get("help") and default not in (None, [], False):
            kwargs["help"] += f" (default: {default})"
        # a field may carry Megatron-LM's own spelling (--override-opt_param-scheduler); the generated
        # name stays accepted as an alias
        names = [f.metadata["flag"], flag(f.name)] if "flag" in f.metadata else [flag(f.name)]
        group.add_argument(*names, **kwargs)


def build_dataclass(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    """Instantiate `cls` from parsed flags (fields without a flag keep their defaults)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    values.update(overrides)
    return cls(**values)


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags `argv` gives, as opposed to those left at their defaults (a flag
    given with its default value counts as given). `argv` must already parse."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {name for name, value in vars(ns).items() if value is not unset}
