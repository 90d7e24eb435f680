"""What importing megatron-core costs every process of ours, without the parts nothing uses yet.

Every process of a run imports megatron-core again: torchrun's ranks, the loader's fork server, the
--async-save writer, the tools, the test workers (hundreds per suite run). Two parts of that import
do work that only a later call needs:

- torch.compile's compiler stack (torch._dynamo, torch._inductor, sympy: ~1.6 s of CPU per
  process). megatron/core/jit.py binds `jit_fuser = torch.compile` and its fusion modules decorate
  their functions with it at import time; `torch.compile(fn)` imports the whole stack to build its
  wrapper, although it compiles nothing before the first call. While megatron.core's package is
  first imported, `torch.compile` is `defer_compile(torch.compile)`: its wrapper calls the real
  torch.compile, with the same arguments, on its own first call, so the same function is compiled
  with the same options at the same moment as before. `torch.compile` itself is restored as soon as
  that import ends; only what megatron-core bound during it (`jit_fuser`) keeps the stand-in.
- wandb (~0.6 s), which megatron-core imports where installed, for writers we never hand it
  (timers, inference contexts). Imported during that window it is a lazy module: its body runs at
  its first use (--wandb-project's `wandb.init`, or megatron-core's writer if one were handed it).
  Should the installed wandb fail to import, the error then comes at that first use.

`install()` (internvl_mcore/__init__.py) puts a finder on sys.meta_path that acts on the first
import of `megatron.core` only and then leaves: every `import internvl_mcore.x` before megatron-core
gets it; a process that imports megatron-core before any module of ours gets megatron-core's import
unchanged. Nothing here imports torch until megatron-core's import does (the planner and the shard
tools stay torch-free).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Callable

_WINDOW = "megatron.core"  # the package whose first import runs with the stand-ins
_LAZY = frozenset({"wandb"})  # top-level modules imported lazily inside the window
# what `import`, `inspect.getmodule` and friends read from a module: no reason to run its body
_IMPORT_READS = frozenset({"__spec__", "__name__", "__file__", "__loader__", "__package__", "__cached__", "__class__"})


def defer_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for `real` (torch.compile) whose decorated functions call `real(fn, **options)` at
    their first call, and the result from then on. Modules and other callables go to `real` at once."""

    def compile(model: Any = None, **options: Any) -> Any:
        if model is None:  # @torch.compile(mode=...): the options first, the function next
            return functools.partial(compile, **options)
        if not isinstance(model, types.FunctionType):
            return real(model, **options)
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(real(model, **options))
            return compiled[0](*args, **kwargs)

        # traced inside a compiled region (--torch-compile), dynamo inlines `model` itself, as it
        # inlines the function a real torch.compile wrapper holds under the same attribute
        call._torchdynamo_inline = model  # type: ignore[attr-defined]
        return call

    compile.__doc__ = f"Deferred {getattr(real, '__qualname__', real)}: compiles at the first call."
    return compile


class _LazyModule(types.ModuleType):
    """A module whose body runs when anything but what `import` itself reads is looked up."""

    def __getattribute__(self, attr: str) -> Any:
        if attr in _IMPORT_READS:
            return super().__getattribute__(attr)
        self.__class__ = types.ModuleType  # from here on an ordinary module (also if the body fails)
        self.__spec__.loader.exec_module(self)
        return getattr(self, attr)


class _LazyLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module, as for any source module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # what the body runs with, later
        module.__class__ = _LazyModule


class _Window(importlib.abc.Loader):
    """megatron.core's own loader, run with torch.compile deferred and the _LAZY modules lazy."""

    def __init__(self, loader: importlib.abc.Loader, finder: _FirstMegatronImport):
        self.loader, self.finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        import torch  # megatron.core's first line would import it anyway

        real = torch.compile
        torch.compile = defer_compile(real)
        self.finder.window_open = True
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real
            self.finder.window_open = False
            if self.finder in sys.meta_path:
                sys.meta_path.remove(self.finder)


class _FirstMegatronImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.used = False  # megatron.core's import was seen (once)
        self.window_open = False

    def _real_spec(self, name: str, path: Any, target: Any) -> importlib.machinery.ModuleSpec | None:
        for finder in list(sys.meta_path):  # the other finders, in order (editable installs included)
            find = getattr(finder, "find_spec", None)
            if finder is not self and find is not None and (spec := find(name, path, target)) is not None:
                return spec
        return None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == _WINDOW and not self.used:
            self.used = True
            spec = self._real_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Window(spec.loader, self)
            return spec
        if name in _LAZY and self.window_open:
            spec = self._real_spec(name, path, target)
            if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                spec.loader = _LazyLoader(spec.loader)
            return spec
        return None


def install() -> None:
    """Defer megatron-core's unused import-time work (see the module docstring), once per process;
    a no-op where megatron.core is already imported."""
    if _WINDOW in sys.modules or any(isinstance(f, _FirstMegatronImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _FirstMegatronImport())
