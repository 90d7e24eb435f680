"""internvl_mcore/startup.py: megatron-core's first import after any module of ours skips torch's
compiler stack and wandb until they are used, and changes nothing that runs: megatron-core's
jit-fused functions still go through the real torch.compile (at their first call, as before),
torch.compile itself is restored, wandb is the real module at its first use. And a training rank's
start-up imports none of the packages only some runs use (NOT_AT_START)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from internvl_mcore.startup import defer_compile
from tests.launch import REPO

# one fresh interpreter checks the whole story in order (each check needs a process whose first
# megatron-core import comes after internvl_mcore's)
_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    real = torch.compile
    import internvl_mcore
    import megatron.core
    from megatron.core import jit, timers
    from megatron.core.fusions.fused_bias_gelu import bias_gelu
    out = {"restored": torch.compile is real,
           "compiler_after_import": sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules),
           "jit_fuser_deferred": jit.jit_fuser is not real,
           "wandb_installed": "wandb" in sys.modules, "wandb_body_ran": "wandb.sdk" in sys.modules}
    y, b = torch.randn(4, 8), torch.randn(8)
    torch.compiler.set_stance("force_eager")  # through the real torch.compile without inductor's C++ build
    out["value"] = torch.equal(bias_gelu(b, y), bias_gelu.__wrapped__(b, y))
    cells = [c.cell_contents for c in bias_gelu.__closure__ or ()]  # the stand-in's: what the real one returned
    compiled = next((c for c in cells if isinstance(c, list)), [None])
    out["compiled_by_dynamo"] = getattr(compiled[0], "_torchdynamo_orig_callable", None) is bias_gelu.__wrapped__
    torch.compiler.set_stance("default")
    traced = torch.compile(lambda b, y: bias_gelu(b, y) * 2, backend="eager", fullgraph=True)
    out["inlined_in_compiled_region"] = torch.allclose(traced(b, y), 2 * bias_gelu.__wrapped__(b, y))
    if out["wandb_installed"]:
        out["megatron_sees_wandb"] = timers.wandb is sys.modules["wandb"]
        out["wandb_loads_on_use"] = bool(sys.modules["wandb"].__version__) and "wandb.sdk" in sys.modules
    import runpy  # last: a training rank's start-up (pretrain_internvl.py's imports, main's included)
    runpy.run_path("pretrain_internvl.py", run_name="pretrain")
    import internvl_mcore.training.loop, internvl_mcore.training.guards, internvl_mcore.training.preemption
    out["rank_imported"] = sorted(m for m in sys.argv[1:] if m in sys.modules)  # argv: NOT_AT_START
    print(json.dumps(out))
""")
# what a training rank's start-up must not import (each costs CPU in every rank of every run; those a
# run needs load when it needs them: HF checkpoints, real data's tokenizers, conversions, rollouts)
NOT_AT_START = (
    "transformers",
    "peft",
    "accelerate",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "sentencepiece",
    "tiktoken",
    "scipy",
    "pandas",
    "pyarrow",
    "matplotlib",
    "av",
    "datasets",
    "torchvision",
    "hypothesis",
    "internvl_mcore.inference",
)


def test_megatron_import_defers_compile_and_wandb_without_changing_them():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *NOT_AT_START], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["compiler_after_import"] == []  # the point: no torch._dynamo/_inductor after the import
    assert out["wandb_body_ran"] is False
    assert out["rank_imported"] == [], out["rank_imported"]  # the start-up's import budget, by module name
    for key in ("restored", "jit_fuser_deferred", "value", "compiled_by_dynamo", "inlined_in_compiled_region"):
        assert out[key] is True, (key, out)
    if out["wandb_installed"]:  # the dev extras install it
        assert out["megatron_sees_wandb"] and out["wandb_loads_on_use"], out


def test_deferred_compile_calls_the_real_one_at_first_call_only():
    calls = []

    def real(model, **options):
        calls.append((model, options))
        return lambda *a, **k: ("compiled", model(*a, **k))

    deferred = defer_compile(real)

    def f(x):
        """doc"""
        return x + 1

    g = deferred(f)
    assert calls == [] and g.__name__ == "f" and g.__doc__ == "doc" and g._torchdynamo_inline is f
    assert g(1) == ("compiled", 2) and g(2) == ("compiled", 3)
    assert calls == [(f, {})]  # once, with the function and no options
    h = deferred(mode="max-autotune")(f)  # the decorator form with options
    assert h(0) == ("compiled", 1) and calls[-1] == (f, {"mode": "max-autotune"})

    class Module:
        def __call__(self, x):
            return x

    m = Module()
    assert deferred(m, dynamic=True)(5) == ("compiled", 5) and calls[-1] == (m, {"dynamic": True})  # at once
