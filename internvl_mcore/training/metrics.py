"""What a training run reports each --log-interval: stdout, --log-jsonl and tensorboard."""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.utils import get_model_config

from ..config.training import RunConfig
from ..errors import ConfigError
from ..parallel.state import comm_device
from ..plan.flops import train_step_flops

# megatron-core's timer names (config.timers). SCHEDULE wraps its whole pipeline schedule, gradient
# reduction included (finalize_model_grads runs inside it); COMPUTE the forward and backward steps;
# GRADIENT_WAIT finalize_model_grads' reductions over data-parallel (and, for tied embeddings, the first
# and last pipeline) ranks. The rest of the schedule is pipeline wait: the timed P2P regions
# (PIPELINE_RECV in the name) of the 1F1B schedule, and the interleaved schedule's waits on its
# overlapped receives, which megatron-core does not time (overlap_p2p_comm: handle.wait() in the schedule)
SCHEDULE = "forward-backward"
PIPELINE_RECV = "recv"  # forward-recv, backward-send-forward-recv, ...
GRADIENT_WAIT = ("all-grads-sync", "non-tensor-parallel-grads-all-reduce", "embedding-grads-all-reduce")
COMPUTE = ("forward-compute", "backward-compute")


def measure_peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: Optional[int] = None,
    seconds: float = 0.5,
) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`: the practical peak MFU is measured against.

    On a GPU this must be the training dtype's tensor-core peak: a bf16 run measured against an
    fp32 matmul would report an MFU several times too high. The GPU matrix (8192^2) is large
    enough to reach that peak; the CPU one (1024^2) keeps start-up short."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    size = size or (8192 if on_gpu else 1024)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm up
    if on_gpu:
        torch.cuda.synchronize(device)
    n, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        n += 1
        if on_gpu:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * size**3 * n / elapsed


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def step_flops(run: RunConfig, stats: dict) -> Optional[float]:
    """Model FLOPs of one optimizer step (forward + backward), from the capacity planner's count."""
    t = run.train
    return float(
        train_step_flops(
            run.model,
            tokens_per_step=t.global_batch_size * t.seq_length,
            tiles_per_step=stats["tiles"],
            attention_lengths=stats.get("attention_lengths"),
            seq_length=t.seq_length,
            trainable=stats.get("trainable"),
            lm_head_tokens=stats.get("logit_tokens"),
        )
    )


@contextmanager
def _naming_flag(flag: str) -> Iterator[None]:
    """An OSError opening the output of `flag` as one ConfigError line naming the flag and the path."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or not exc.strerror:
            raise
        raise ConfigError(f"{flag}: {exc.strerror}: {exc.filename}") from exc


class _Timer:
    """Wall and process CPU seconds of one named region (CPU time: what a shared CPU host's
    time-slicing does not inflate)."""

    def __init__(self, totals: dict[str, float], name: str) -> None:
        self.totals, self.name, self.started = totals, name, None

    def start(self, barrier: bool = False) -> None:  # never a barrier: it would hide the wait measured
        self.started = (time.perf_counter(), time.process_time())

    def stop(self, barrier: bool = False) -> None:
        if self.started is not None:
            wall, cpu = self.started
            self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - wall
            cpu_name = self.name + " cpu"
            self.totals[cpu_name] = self.totals.get(cpu_name, 0.0) + time.process_time() - cpu
            self.started = None


class StepTimers:
    """megatron-core's `config.timers` (--log-straggler): its schedules, pipeline communication and
    finalize_model_grads time named regions with it; this one adds up the seconds per name."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._timers: dict[str, _Timer] = {}

    def __call__(self, name: str, log_level: Optional[int] = None) -> _Timer:
        if name not in self._timers:
            self._timers[name] = _Timer(self.totals, name)
        return self._timers[name]

    def take(self) -> dict[str, float]:
        """Seconds since the last `take`: compute, pipeline wait, gradient wait; they partition the
        schedule's time (`schedule_s`), so with the data time and the rest (optimizer, loss
        reduction) they sum to the step."""
        t, self.totals = self.totals, {}
        for timer in self._timers.values():
            timer.totals = self.totals
        compute = sum(t.get(n, 0.0) for n in COMPUTE)
        gradient = sum(t.get(n, 0.0) for n in GRADIENT_WAIT)
        recv = sum(v for n, v in t.items() if PIPELINE_RECV in n and not n.endswith(" cpu"))
        # no schedule timer (a schedule of our own): the timed receives are all that is known
        schedule = t.get(SCHEDULE, compute + gradient + recv)
        return {
            "compute_s": compute,
            "compute_cpu_s": sum(t.get(n + " cpu", 0.0) for n in COMPUTE),
            "pipeline_wait_s": schedule - compute - gradient,
            "gradient_wait_s": gradient,
            "schedule_s": schedule,
        }


STRAGGLER_COLUMNS = ("step", "data", "compute", "compute cpu", "pipeline wait", "gradient wait", "other")
_SPLIT = ("compute_s", "compute_cpu_s", "pipeline_wait_s", "gradient_wait_s")


def straggler_times(step_s: float, data_s: float, split: dict[str, float]) -> dict[str, list[float]]:
    """Every rank's seconds of this iteration per STRAGGLER_COLUMNS name (collective): `other` is
    the step less data, compute, pipeline wait and gradient wait (optimizer step, loss reduction)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    times = torch.zeros(world, len(STRAGGLER_COLUMNS), dtype=torch.float64, device=comm_device())
    mine = [step_s, data_s, *(split.get(n, 0.0) for n in _SPLIT)]
    other = step_s - data_s - sum(split.get(n, 0.0) for n in _SPLIT if n != "compute_cpu_s")
    times[rank] = torch.tensor([*mine, other], dtype=torch.float64)
    dist.all_reduce(times)
    return {name: times[:, col].tolist() for col, name in enumerate(STRAGGLER_COLUMNS)}


def straggler_report(iteration: int, times: dict[str, list[float]]) -> str:
    """--log-straggler's line (rank 0 prints it): the fastest and slowest rank of each column of
    `straggler_times`, and the largest share of the step a rank spent waiting (pipeline + gradient)."""
    parts = []
    for name in STRAGGLER_COLUMNS:
        col = times[name]
        lo, hi = min(range(len(col)), key=col.__getitem__), max(range(len(col)), key=col.__getitem__)
        parts.append(f"{name} min {col[lo]:.3f} s (rank {lo}) max {col[hi]:.3f} s (rank {hi})")
    wait = [(p + g) / max(s, 1e-12) for p, g, s in zip(times["pipeline wait"], times["gradient wait"], times["step"])]
    worst = max(range(len(wait)), key=wait.__getitem__)
    parts.append(f"wait fraction max {wait[worst]:.3f} (rank {worst}) mean {sum(wait) / len(wait):.3f}")
    return f"straggler iteration {iteration}: " + " | ".join(parts)


class Reporter:
    """Collects per-iteration records; the last rank (on the last pipeline stage) writes them."""

    def __init__(self, run: RunConfig, trainer: Any) -> None:
        self.run = run
        self.records: list[dict] = []
        self.world = dist.get_world_size()
        self.is_writer = dist.get_rank() == self.world - 1
        log = run.log
        self.jsonl = self.tb = None
        if log.log_jsonl and self.is_writer:
            with _naming_flag("--log-jsonl"):  # changed since output_problems looked (a race): one line still
                self.jsonl = open(log.log_jsonl, "a")
        if log.tensorboard_dir and self.is_writer:
            from torch.utils.tensorboard import SummaryWriter

            with _naming_flag("--tensorboard-dir"):
                self.tb = SummaryWriter(log.tensorboard_dir)
        self.wandb = _start_wandb(run) if (log.wandb_project and self.is_writer) else None
        model = trainer.model[0] if getattr(trainer, "model", None) else None
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        self.timers: Optional[StepTimers] = None
        if log.log_straggler and model is not None:  # megatron-core times its regions with it from now on
            self.timers = StepTimers()
            get_model_config(model).timers = self.timers
        dtype = torch.bfloat16 if run.train.bf16 else torch.float32
        self.peak_flops = run.train.peak_flops or measure_peak_flops(self.device, dtype)

    def report(self, iteration: int, stats: dict, elapsed: float) -> dict:
        t = self.run.train
        tokens = t.global_batch_size * t.seq_length
        record = {
            "iteration": iteration,
            "loss": stats["loss"],
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "tokens_per_s": tokens / elapsed,
            "nonpad_tokens_per_s": stats["nonpad_tokens"] / elapsed,
            "samples_per_s": t.global_batch_size / elapsed,
            "step_time_s": elapsed,
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
        if stats.get("moe_aux_loss") is not None:  # MoE: megatron-core's load-balancing loss per layer
            record["moe_aux_loss"] = stats["moe_aux_loss"]
        # --stage mpo: the loss components, rewards and reward accuracy (training/mpo.py METRICS);
        # --stage gspo / grpo: rewards, ratios, clip fraction, KL, rollout time (training/rl/stage.py)
        record.update({k: v for k, v in stats.items() if k.startswith(("loss_", "reward", "rl_"))})
        if "skipped" in stats:  # --skip-spike-factor: was this step's update skipped
            record["skipped"] = stats["skipped"]
        flops = step_flops(self.run, stats)
        if flops is not None:
            record["model_tflops_per_s_per_rank"] = flops / elapsed / self.world / 1e12
            record["mfu"] = flops / elapsed / self.world / self.peak_flops
            record["peak_flops_per_rank"] = self.peak_flops
        self.records.append(record)
        due = iteration % self.run.log.log_interval == 0
        self._straggler(record, stats, elapsed, due)
        if self.is_writer:
            self._write(record, "train")
            if due:
                mfu = f" | MFU {record['mfu'] * 100:.1f}%" if "mfu" in record else ""
                mfu += f" | moe aux {record['moe_aux_loss']:.4f}" if "moe_aux_loss" in record else ""
                print(
                    f"iteration {iteration:6d}/{t.train_iters} | loss {record['loss']:.6e} | "
                    f"lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.4f} | "
                    f"tokens/s {record['tokens_per_s']:.1f} | samples/s {record['samples_per_s']:.2f}{mfu} | "
                    f"peak mem {record['peak_memory_bytes'] / 2**30:.2f} GiB"
                    + (
                        f" | pref {record['loss_preference']:.4f} qual {record['loss_quality']:.4f} gen "
                        f"{record['loss_generation']:.4f} reward acc {record['reward_accuracy']:.3f} margin "
                        f"{record['reward_margin']:.4f}"
                        if "loss_preference" in record
                        else ""
                    )
                    + (
                        f" | reward {record['reward_mean']:.4f} acc {record['reward_accuracy']:.3f} clip "
                        f"{record['rl_clip_fraction_last']:.4f} kl {record['rl_kl']:.4g} len "
                        f"{record['rl_response_length']:.1f} rollout {record['rl_rollout_s']:.2f} s"
                        if "rl_ratio" in record
                        else ""
                    ),
                    flush=True,
                )
        return record

    def _straggler(self, record: dict, stats: dict, elapsed: float, due: bool) -> None:
        """--log-straggler when `due` (collective: every rank's times): the line on rank 0, every
        rank's times into `record` (--log-jsonl; bench/pipeline.py reads them)."""
        split = self.timers.take() if self.timers is not None else {}  # this step's times only
        if due and self.run.log.log_straggler:
            times = straggler_times(elapsed, stats.get("data_s", 0.0), split)
            record["straggler"] = times
            if dist.get_rank() == 0:
                print(straggler_report(record["iteration"], times), flush=True)

    def _write(self, record: dict, section: str) -> None:
        """One record to --log-jsonl, tensorboard (`section`/key) and wandb."""
        iteration = record["iteration"]
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{section}/{key}", value, iteration)
            self.tb.flush()
        if self.wandb:
            self.wandb.log({f"{section}/{k}": v for k, v in scalars.items()}, step=iteration)

    def report_eval(self, iteration: int, loss: float, elapsed: float, final: bool = False) -> dict:
        """The validation loss (and perplexity) after `iteration`; `final`: the held-out evaluation at the end."""
        record = {
            "iteration": iteration,
            "valid_loss": loss,
            "valid_ppl": math.exp(min(loss, 20.0)),
            "valid_time_s": elapsed,
            "final": final,
        }
        self.records.append(record)
        if self.timers is not None:  # the evaluation's forward passes are no step's compute
            self.timers.take()
        if self.is_writer:
            self._write(record, "valid")
            what = "held-out evaluation at the end" if final else "validation"
            print(
                f"{what} at iteration {iteration:6d} | valid loss {loss:.6e} | valid ppl {record['valid_ppl']:.4f} "
                f"| {elapsed:.2f} s",
                flush=True,
            )
        return record

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _start_wandb(run: RunConfig) -> Any:
    """A wandb run for --wandb-project (WANDB_MODE=offline: files only, no network)."""
    import wandb  # optional: validate() refused --wandb-project without it

    log = run.log
    kwargs = {
        "project": log.wandb_project,
        "name": log.wandb_exp_name,
        "config": json.loads(json.dumps(dataclasses.asdict(run), default=str)),
    }
    if log.wandb_save_dir:
        kwargs["dir"] = log.wandb_save_dir
    return wandb.init(**kwargs)
