"""The online-RL stage's prompts: which records each step samples, on which data-parallel rank, and
the position a checkpoint stores (exact resume).

A prompt set is `internvl_mcore/data/prompts.py: read_prompt_shards(prefix)` (shards from
tools/preprocess_mm_data.py --prompts), or a JSONL file of InternVL records with an `answer` field
(`--data-path FILE.jsonl`; images relative to the file's folder, read into memory), which yields the
same `PromptRecord`s. Order: epoch e visits the records in the permutation seeded by (--seed, e);
step k takes the next P = --global-batch-size / --rollouts-per-prompt of them, DP rank r the r-th
slice of P / DP. The position is one number (prompts consumed), the same on every rank, so a resume
on another data-parallel size continues with the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ...data.prompts import PromptRecord, read_prompt_shards
from ...errors import DataError


def _record(line: int, raw: dict, path: str) -> PromptRecord:
    """A JSONL line as a PromptRecord: its images read from disk, the trailing gpt turn dropped."""
    where = f"{path}:{line}"
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
        raise DataError(f"{where}: expected an InternVL record with 'conversations'")
    if "answer" not in raw:
        raise DataError(f"{where}: no 'answer' field (online RL compares each response with it)")
    image = raw.get("image")
    paths = [] if image is None else (image if isinstance(image, list) else [image])
    root = Path(path).resolve().parent
    images = []
    for rel in paths:
        full = (root / str(rel)).resolve()
        if root not in full.parents:  # a record names files in its data set's folder only
            raise DataError(f"{where}: image {rel} is outside {root}")
        try:
            images.append(full.read_bytes())
        except OSError as exc:
            raise DataError(f"{where}: image {rel}: {exc.strerror or exc}") from None
    convs = list(raw["conversations"])
    if convs and convs[-1].get("from") in ("gpt", "assistant"):
        convs = convs[:-1]
    meta = {k: v for k, v in raw.items() if k not in ("conversations", "answer")}
    return PromptRecord(str(raw.get("id", line)), convs, tuple(images), str(raw["answer"]), meta)


def read_prompt_jsonl(path: str) -> list[PromptRecord]:
    """Every record of the JSONL prompt file `path` (DataErrors name the file and line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"--data-path {path}: {exc.strerror or exc}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None
            records.append(_record(n, raw, path))
    return records


def open_prompts(path: str) -> Sequence[PromptRecord]:
    """The prompt set of --data-path: a .jsonl file, else a prompt-shard prefix."""
    if path.endswith(".jsonl"):
        records = read_prompt_jsonl(path)
    else:
        records = read_prompt_shards(path)
    if len(records) == 0:
        raise DataError(f"--data-path {path}: no prompts")
    return records


class PromptOrder:
    """Which prompts each step samples (module docstring); `state_dict` is the data position."""

    def __init__(self, records: Sequence[PromptRecord], seed: int, prompts_per_step: int, dp_rank: int, dp: int):
        if prompts_per_step % dp:
            raise DataError(
                f"{prompts_per_step} prompts per step (--global-batch-size / --rollouts-per-prompt) are not "
                f"divisible by the data-parallel size {dp}"
            )
        self.records, self.seed, self.per_step, self.dp_rank, self.dp = records, seed, prompts_per_step, dp_rank, dp
        self.consumed = 0
        self._epoch, self._order = -1, None

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.records))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.records), generator=g).tolist()
        return self._order[i]

    def next_step(self) -> list[int]:
        """This rank's record indices for the next step (advances the position)."""
        share = self.per_step // self.dp
        first = self.consumed + self.dp_rank * share
        out = [self._index(k) for k in range(first, first + share)]
        self.consumed += self.per_step
        return out

    def state_dict(self) -> dict:
        return {"prompts_consumed": self.consumed, "prompts": len(self.records), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("prompts") != len(self.records) or state.get("seed") != self.seed:
            raise DataError(
                f"the checkpoint sampled {state.get('prompts')} prompts with --seed {state.get('seed')}, "
                f"this run has {len(self.records)} with --seed {self.seed}"
            )
        self.consumed = int(state["prompts_consumed"])

    def load_resharded_state(self, states: list[dict]) -> None:
        """Another data-parallel size: the position is global, every saved rank has the same."""
        self.load_state_dict(states[0])


def rollout_seed(seed: int, iteration: int, dp_rank: int) -> int:
    """The sampling seed of a step's rollouts on a data-parallel rank: a function of the run's --seed
    and the step, so a resumed run draws the responses the uninterrupted one drew."""
    return (seed * 1_000_003 + iteration) * 65_537 + dp_rank
