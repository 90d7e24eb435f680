"""Megatron-LM's `--pipeline-model-parallel-layout`, read without torch or megatron-core.

A layout names what each pipeline stage holds, stages separated by `|` in virtual order (stage
i is pipeline rank i % PP, model chunk i // PP), so its stage count is PP x the chunks per rank:
`E` the embedding (for InternVL also the ViT and the projector, which live in the first model
chunk), `t` one decoder layer, `L` the final norm, output layer and loss; a stage may be empty.
`x*N` repeats one character and `(..)*N` a group (no nesting), commas are cosmetic, exactly as
megatron-core 0.16.1's `PipelineParallelLayerLayout.parse_str_to_list` reads them; e.g. with
PP 2, "Et|tt|ttt|tL" puts E+1 layer and then 3 layers on rank 0, 2 and then 1+L on rank 1.

The planner (plan/) and the config checks (config/problems.py) read layouts here, before any
process imports torch; megatron-core gets the same string (config/megatron.py) and builds the
model from it. Every error is a one-line `ConfigError` naming the flag.
"""

from __future__ import annotations

import re

from internvl_mcore.errors import ConfigError

FLAG = "--pipeline-model-parallel-layout"

# megatron-core's two unrolling rules, in its order: groups first, then single characters
_UNROLL = (re.compile(r"\(([^)]+)\)\*(\d+)"), re.compile(r"(.)\*(\d+)"))
_KNOWN = frozenset("EtL")


def stages(layout: str) -> list[str]:
    """The layout's stages in virtual order (megatron-core's order), each a string of E / t / L."""
    text = layout.replace(",", "")
    for pattern in _UNROLL:
        text = pattern.sub(lambda m: m.group(1) * int(m.group(2)), text)
    parts = text.split("|")
    for part in parts:
        bad = sorted(set(part) - _KNOWN)
        if bad:
            raise ConfigError(
                f"{FLAG} {layout!r}: unknown character {bad[0]!r} (known: E embedding+ViT, t decoder layer, "
                "L output layer+loss, | between stages, x*N and (..)*N repeats)"
            )
    return parts


def grid(layout: str, pp: int) -> list[list[str]]:
    """The stages as [pipeline rank][model chunk] (megatron-core's 2D layout)."""
    flat = stages(layout)
    if pp < 1 or len(flat) % pp:
        raise ConfigError(
            f"{FLAG} {layout!r} has {len(flat)} stages: not a multiple of --pipeline-model-parallel-size {pp}"
        )
    chunks = len(flat) // pp
    return [[flat[v * pp + r] for v in range(chunks)] for r in range(pp)]


def decoder_layers(layout: str, pp: int) -> list[list[int]]:
    """Decoder layers of each model chunk, [pipeline rank][model chunk]."""
    return [[stage.count("t") for stage in row] for row in grid(layout, pp)]


def virtual_size(layout: str, pp: int) -> int:
    """Model chunks per pipeline rank the layout gives (1: no interleaving)."""
    return len(grid(layout, pp)[0])


def decoder_offset(layout: str, pp: int, pp_rank: int, vp_stage: int) -> int:
    """Index of the first decoder layer of chunk `vp_stage` of rank `pp_rank` (megatron-core's
    `get_layer_offset`): the decoder layers of every stage before it in virtual order."""
    flat = stages(layout)
    return sum(stage.count("t") for stage in flat[: vp_stage * pp + pp_rank])


def check(layout: str, pp: int, num_layers: int) -> None:
    """ConfigError unless the layout can build this model: its stages a multiple of PP, exactly one E
    opening the first stage (pipeline rank 0's first chunk, where the embedding and the ViT are
    built) and one L closing the last, and `num_layers` decoder layers in all."""
    grid(layout, pp)  # the stage count first: its message is the one a PP mismatch needs
    flat = stages(layout)
    text = "".join(flat)
    if text.count("E") != 1 or not flat[0].startswith("E"):
        raise ConfigError(f"{FLAG} {layout!r}: E (embedding and ViT) must open the first stage, once")
    if text.count("L") != 1 or not flat[-1].endswith("L"):
        raise ConfigError(f"{FLAG} {layout!r}: L (output layer and loss) must close the last stage, once")
    if text.count("t") != num_layers:
        raise ConfigError(f"{FLAG} {layout!r} places {text.count('t')} decoder layers, --num-layers is {num_layers}")
