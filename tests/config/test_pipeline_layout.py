"""config/pipeline_layout.py reads --pipeline-model-parallel-layout as megatron-core 0.16.1's
PipelineParallelLayerLayout does: same stages, same [rank][chunk] decoder counts and offsets, and a
ConfigError naming the flag wherever megatron-core would refuse the layout."""

import random

import pytest
from megatron.core import parallel_state
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from internvl_mcore.config import pipeline_layout
from internvl_mcore.errors import ConfigError

WRITTEN = [
    ("Et|tt|ttt|tL", 2),
    ("Et*3|t*4|t*4|tL", 2),
    ("E|t*4|t*4|L", 2),
    ("E|tttt|tttt|L", 4),
    ("Ettt|(tt|)*3,tL", 5),
    ("Ettt|(tt|)*3tL", 5),
    ("(Et|)*1(tt|)*2ttL", 2),
    ("Et,t|t,t|tt,L", 3),
    ("EttL", 1),
    ("Et|tL", 1),
    ("E(t)*3|(t*2|)*2L", 2),
    ("|Et|tL|", 2),
    ("E|", 2),
    ("Et|tm|L", 3),
    ("Ett|ttL", 3),
    ("((t)*2)*2", 1),
    ("Ex|tL", 2),
    ("tE|tL", 2),
    ("Et|Lt", 2),
    ("EEt|tL", 2),
    ("Et|tLL", 2),
    ("", 1),
]


def _random_layouts(n: int, seed: int = 29) -> list[tuple[str, int]]:
    """Layouts built with every syntax the parser knows (repeats, groups, commas, empty stages)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pp = rng.choice([1, 2, 3, 4])
        chunks = rng.choice([1, 2, 3])
        parts = ["t" * rng.randint(0, 4) for _ in range(pp * chunks)]
        parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
        text = "|".join(parts)
        if rng.random() < 0.5 and "tt" in text:
            text = text.replace("tt", f"t*{2}", 1)
        if rng.random() < 0.3 and len(set(parts[1:-1])) == 1 and len(parts) > 3:
            text = f"{parts[0]}|({parts[1]}|)*{len(parts) - 2}{parts[-1]}"
        if rng.random() < 0.3:
            text = text.replace("|", ",|", 1)
        out.append((text, pp))
    return out


def _megatron(layout: str, pp: int, num_layers: int, monkeypatch) -> tuple[list[list[int]], list[list[int]]]:
    """megatron-core's decoder counts and offsets [rank][chunk]; AssertionError where it refuses."""
    ref = PipelineParallelLayerLayout(layout, pp)
    ref.validate_layer_layout(num_layers=num_layers, mtp_num_layers=None)
    vpp = ref.virtual_pipeline_model_parallel_size
    # its offsets read the global VPP size (None outside a world: every chunk would be chunk 0)
    monkeypatch.setattr(parallel_state, "get_virtual_pipeline_model_parallel_world_size", lambda: vpp)
    counts = [[ref.get_num_layers_to_build(LayerType.decoder, v, r) for v in range(vpp)] for r in range(pp)]
    offsets = [[ref.get_layer_offset(LayerType.decoder, v, r) for v in range(vpp)] for r in range(pp)]
    return counts, offsets


def _ours(layout: str, pp: int, num_layers: int) -> tuple[list[list[int]], list[list[int]]]:
    pipeline_layout.check(layout, pp, num_layers)
    counts = pipeline_layout.decoder_layers(layout, pp)
    vpp = pipeline_layout.virtual_size(layout, pp)
    assert vpp == len(counts[0])
    offsets = [[pipeline_layout.decoder_offset(layout, pp, r, v) for v in range(vpp)] for r in range(pp)]
    return counts, offsets


def _stricter(layout: str) -> bool:
    """Layouts megatron-core takes but we refuse: E not opening stage 0 or L not closing the last stage
    (megatron-core builds the embedding on rank 0's first chunk and the loss on the last rank's last
    chunk whatever the layout says, so such a layout would not mean what it says)."""
    flat = pipeline_layout.stages(layout)
    return not (flat[0].startswith("E") and flat[-1].endswith("L"))


def test_layouts_read_as_megatron_core_reads_them(monkeypatch):
    """Every layout (written edge cases and 300 generated ones), at its own layer count and one off:
    equal counts and offsets, or both refuse (ours with a ConfigError naming the flag)."""
    agreed = refused = 0
    for layout, pp in WRITTEN + _random_layouts(300):
        try:
            parsed = PipelineParallelLayerLayout.parse_str_to_list(layout)
            total = sum(x == LayerType.decoder for stage in parsed for x in stage)
        except AssertionError:
            total = 0
        for num_layers in (total, total + 1):
            try:
                want = _megatron(layout, pp, num_layers, monkeypatch)
            except (AssertionError, IndexError):  # IndexError: an empty layout
                want = None
            if want is not None and _stricter(layout):
                want = None
            if want is None:
                with pytest.raises(ConfigError, match="--pipeline-model-parallel-layout"):
                    _ours(layout, pp, num_layers)
                refused += 1
            else:
                assert _ours(layout, pp, num_layers) == want, (layout, pp, num_layers)
                agreed += 1
    # the generated layouts must exercise both sides
    assert agreed > 250 and refused > 300, (agreed, refused)


def test_example_layout():
    """The docstring's example: rank 0 holds E+1 then 3 layers, rank 1 holds 2 then 1+L."""
    assert pipeline_layout.decoder_layers("Et|tt|ttt|tL", 2) == [[1, 3], [2, 1]]
    assert pipeline_layout.grid("Et|tt|ttt|tL", 2) == [["Et", "ttt"], ["tt", "tL"]]
    assert [pipeline_layout.decoder_offset("Et|tt|ttt|tL", 2, 1, v) for v in (0, 1)] == [1, 6]
    with pytest.raises(ConfigError, match="not a multiple of --pipeline-model-parallel-size 3"):
        pipeline_layout.decoder_layers("Et|tt|ttt|tL", 3)


def _layout_problems(*flags: str) -> list[str]:
    import pretrain_internvl
    from internvl_mcore.config.problems import problems

    run = pretrain_internvl.parse_run_config(["--mock-data", "--model", "debug", "--train-iters", "2", *flags])
    return [line for line in problems(run) if "--pipeline-model-parallel-layout" in line]


def test_layout_flag_checks_name_the_flag():
    """The debug model (4 decoder layers): each refusal one line naming the flag, a good layout none."""
    pp2 = ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout"]
    assert _layout_problems(*pp2, "E|ttt|t|L") == []
    assert _layout_problems(*pp2, "Et|tt|tL", "--pipeline-model-parallel-size", "3") == []
    cases = {
        "not a multiple of --pipeline-model-parallel-size 2": [*pp2, "Et|tt|tL"],
        "places 3 decoder layers, --num-layers is 4": [*pp2, "Et|ttL"],
        "E (embedding and ViT) must open the first stage": [*pp2, "|Ett|ttL|"],
        "L (output layer and loss) must close the last stage": [*pp2, "Ett|Ltt"],
        "unknown character 'm'": [*pp2, "Et|ttm|t|L"],
        "needs --pipeline-model-parallel-size > 1": ["--pipeline-model-parallel-layout", "EttttL"],
        "drop --decoder-first-pipeline-num-layers, --num-virtual-stages-per-pipeline-rank": [
            *pp2,
            "E|ttt|t|L",
            "--decoder-first-pipeline-num-layers",
            "2",
            "--num-virtual-stages-per-pipeline-rank",
            "2",
        ],
        "does not run LoRA yet": [*pp2, "E|ttt|t|L", "--lora-rank", "4"],
    }
    for message, flags in cases.items():
        found = _layout_problems(*flags)
        assert len(found) == 1 and message in found[0] and "\n" not in found[0], (message, found)


def test_layout_reaches_megatron_core_and_the_planner():
    """The chunks per rank come from the layout (VPP 2 here, none for one stage per rank), megatron-core
    gets the string and builds every chunk's layers and layer numbers from it, and the planner counts
    each rank's layers from it."""
    from internvl_mcore.config.megatron import llm_transformer_config
    from internvl_mcore.config.model import ParallelConfig, virtual_pipeline_size
    from internvl_mcore.config.presets import PRESETS
    from internvl_mcore.plan.params import decoder_layers_per_stage

    model = PRESETS["debug"]
    par = ParallelConfig(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="E|ttt|t|L")
    assert virtual_pipeline_size(par, 4) == 2
    assert (
        virtual_pipeline_size(
            ParallelConfig(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Et|tttL"), 4
        )
        is None
    )
    cfg = llm_transformer_config(model, par)
    assert cfg.virtual_pipeline_model_parallel_size == 2
    assert cfg.pipeline_model_parallel_layout.layout[0][1] == [LayerType.decoder]
    # (its per-chunk getters read the global VPP size of a world; the parsed grid is what they count)
    counts = [[stage.count(LayerType.decoder) for stage in row] for row in cfg.pipeline_model_parallel_layout.layout]
    assert counts == [[0, 1], [3, 0]]
    assert decoder_layers_per_stage(4, par) == [1, 3]
    # each rank's weights and activations as those of the one-chunk split that holds the same layers
    from internvl_mcore.plan.memory import activation_bytes, state_bytes

    first1 = ParallelConfig(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1)
    for rank in (0, 1):
        assert state_bytes(model, par, rank, 1) == state_bytes(model, first1, rank, 1)
        a, b = activation_bytes(model, par, rank, 64, 1, 4.0, 4), activation_bytes(model, first1, rank, 64, 1, 4.0, 4)
        assert (a.vision, a.llm, a.head) == (b.vision, b.llm, b.head) and a.chunk_in_flight
