"""Expert linears built by transformer-engine.

megatron-core builds its expert linears with transformer-engine's `parallel_mode=None` whenever
expert-TP or EP > 1 (it does the expert communication itself), and TE's `Linear` / `GroupedLinear`
then tag every weight `tensor_model_parallel=True, partition_dim=0` in `reset_parameters` -- the
row-parallel fc2 included. The stand-ins below tag exactly so (no TE needed); after
`mark_tensor_parallel_params` fc2 must be split on dim 1, so its canonical shape, the pieces cut for
`--pretrained` and the export's concatenation all use the input axis."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from internvl_mcore.config import get_preset
from internvl_mcore.convert.distributed import unshard
from internvl_mcore.models.weights import ShardPlacement, canonical_shape, mark_tensor_parallel_params, shard

H, F = 8, 12  # hidden, ffn (fc1 is the gated [gate; up]: 2F rows)
PREFIX = "language_model.decoder.layers.0.mlp.experts"


class _TEModeNone(torch.nn.Module):
    """What TE's Linear / GroupedLinear leave behind with parallel_mode=None: every weight tagged as
    split on dim 0; megatron-core keeps is_expert and hands TE no tp group."""

    def __init__(self, out_f: int, in_f: int, gemms: int = 0) -> None:
        super().__init__()
        self.is_expert, self.tp_group = True, None
        names = [f"weight{i}" for i in range(gemms)] if gemms else ["weight"]
        for n in names:
            self.register_parameter(n, torch.nn.Parameter(torch.empty(out_f, in_f)))
            set_tensor_model_parallel_attributes(getattr(self, n), True, 0, 1)


class TEColumnParallelLinear(_TEModeNone):
    pass


class TERowParallelLinear(_TEModeNone):
    pass


class TEColumnParallelGroupedLinear(_TEModeNone):
    pass


class TERowParallelGroupedLinear(_TEModeNone):
    pass


def _experts(etp: int) -> torch.nn.Module:
    """SequentialMLP-like (local_experts.{j}.linear_fc1/2) and TEGroupedMLP-like (linear_fc1/2.weight{i})."""
    seq = torch.nn.ModuleDict(
        {
            "local_experts": torch.nn.ModuleList(
                [
                    torch.nn.ModuleDict(
                        {
                            "linear_fc1": TEColumnParallelLinear(2 * F // etp, H),
                            "linear_fc2": TERowParallelLinear(H, F // etp),
                        }
                    )
                ]
            )
        }
    )
    grouped = torch.nn.ModuleDict(
        {
            "linear_fc1": TEColumnParallelGroupedLinear(2 * F // etp, H, gemms=2),
            "linear_fc2": TERowParallelGroupedLinear(H, F // etp, gemms=2),
        }
    )
    root = torch.nn.Module()
    root.add_module("seq", seq)
    root.add_module("grouped", grouped)
    return root


@pytest.mark.parametrize("etp", [1, 2])
def test_te_expert_fc2_is_split_on_its_input_dim(etp: int) -> None:
    model = _experts(etp)
    mark_tensor_parallel_params(model)
    params = dict(model.named_parameters())
    assert params["seq.local_experts.0.linear_fc2.weight"].partition_dim == 1
    assert params["seq.local_experts.0.linear_fc1.weight"].partition_dim == 0
    assert [params[f"grouped.linear_fc2.weight{i}"].partition_dim for i in range(2)] == [1, 1]
    assert [params[f"grouped.linear_fc1.weight{i}"].partition_dim for i in range(2)] == [0, 0]


def test_te_expert_linears_round_trip_at_expert_tp2() -> None:
    """Shapes, the --pretrained cut and the export's concatenation of expert-TP 2 pieces."""
    cfg = get_preset("debug")
    full = {"linear_fc1": torch.randn(2 * F, H), "linear_fc2": torch.randn(H, F)}
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in full}
    for rank in range(2):
        model = _experts(2)
        mark_tensor_parallel_params(model)
        layout = ShardPlacement(0, 1, 0, etp_rank=rank, etp_size=2)
        for k, canon in full.items():
            p = model.seq.local_experts[0][k].weight
            name = f"{PREFIX}.local_experts.0.{k}.weight"
            assert canonical_shape(name, p, cfg, layout) == tuple(canon.shape)
            piece = shard(canon, name, p, cfg, layout)
            assert piece.shape == p.shape
            pieces[k].append(piece)
    for k, canon in full.items():
        p = model.seq.local_experts[0][k].weight
        assert torch.equal(unshard(pieces[k], f"{PREFIX}.local_experts.0.{k}.weight", p, cfg), canon)
