"""--balance-dp-compute: the per-pack cost (the planner's FLOP model), the deal of a global batch's packs
to data-parallel ranks and microbatches (bounds, determinism), and the loader's balanced stream: the
same global batches, identical for any number of workers, resumable exactly (also from the middle of a
global batch, and into another data-parallel size); then the flag through pretrain_internvl.py."""

import json

import numpy as np
import pytest

from internvl_mcore.config import get_preset
from internvl_mcore.data.loader import Balance, PackedDataLoader, collate
from internvl_mcore.data.packing import PackShape, balanced_assignment, balanced_layout
from internvl_mcore.data.shards import EncodedSample, ShardWriter, encode_tiles
from internvl_mcore.errors import DataError
from internvl_mcore.plan.flops import forward_flops
from internvl_mcore.training.balance import pack_cost
from tests.conftest import digits_run_args, pretrain

TILE = (8, 8, 3)
SEQ = 64


# ----------------------------------------------------------------------------- the cost of a pack


def test_pack_cost_is_the_planner_flop_model():
    """Hand-made packs: the cost is plan/flops.py's count of the padded row (the padding tail its own
    causal segment), logits at the loss tokens, frozen parts at their passes; and it orders packs the
    way the work does."""
    cfg = get_preset("debug")
    two = PackShape(segment_lengths=(30, 20), tiles=3, loss_tokens=12)
    assert pack_cost(cfg, two, SEQ) == forward_flops(cfg, SEQ, 3, [30, 20, 14], lm_head_tokens=12).step()
    full = PackShape((SEQ,), 0, 5)
    assert pack_cost(cfg, full, SEQ) == forward_flops(cfg, SEQ, 0, [SEQ], lm_head_tokens=5).step()
    frozen = pack_cost(cfg, two, SEQ, trainable=["llm"])
    assert frozen == forward_flops(cfg, SEQ, 3, [30, 20, 14], lm_head_tokens=12).step(["llm"])
    assert frozen < pack_cost(cfg, two, SEQ)
    assert pack_cost(cfg, two, SEQ, all_token_logits=True) == forward_flops(cfg, SEQ, 3, [30, 20, 14]).step()
    text = PackShape((16,) * 4, 0, 40)
    assert pack_cost(cfg, PackShape((16,) * 4, 12, 40), SEQ) > pack_cost(cfg, text, SEQ)  # tiles cost
    assert pack_cost(cfg, PackShape((SEQ,), 0, 40), SEQ) > pack_cost(cfg, text, SEQ)  # attention ~ L^2
    with pytest.raises(DataError, match="does not fit"):
        pack_cost(cfg, PackShape((SEQ + 1,), 0, 1), SEQ)


# ----------------------------------------------------------------------------- the deal


def _mixed_costs(rng, n):
    """A third image packs (6-12 tiles), a third text, a third video frames, as relative costs."""
    kind = rng.integers(0, 3, n)
    tiles = np.where(kind == 0, rng.integers(6, 13, n), np.where(kind == 2, rng.integers(8, 33, n), 0))
    return (1.0 + 0.3 * tiles + rng.random(n)).tolist()


@pytest.mark.parametrize("dp", [2, 3, 8])
def test_balanced_assignment_bounds_and_determinism(dp):
    rng = np.random.default_rng(dp)
    for case in range(60):
        n = dp * int(rng.integers(1, 17))
        costs = _mixed_costs(rng, n) if case % 2 else rng.lognormal(0, 1.5, n).tolist()
        groups = balanced_assignment(costs, dp)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert {len(g) for g in groups} == {n // dp} and all(g == sorted(g) for g in groups)
        assert balanced_assignment(list(costs), dp) == groups  # a pure function of the costs
        load = [sum(costs[i] for i in g) for g in groups]
        plain = [sum(costs[g::dp]) for g in range(dp)]
        assert max(load) <= max(plain)  # never worse than the deal without balancing
        assert max(load) <= sum(costs) / dp + max(costs) + 1e-9  # greedy's bound: mean + one pack
    # the goal on a realistic global batch: max/mean <= 1.05 (plain dealing: ~1.3)
    ratios = []
    for _ in range(20):
        costs = _mixed_costs(rng, 64)
        load = [sum(costs[i] for i in g) for g in balanced_assignment(costs, 2)]
        ratios.append(max(load) / (sum(load) / 2))
    assert max(ratios) <= 1.05, ratios
    with pytest.raises(ValueError, match="equal groups"):
        balanced_assignment([1.0, 2.0, 3.0], 2)


def test_balanced_layout_orders_microbatches():
    """Ranks first (total 25: 13 / 12 is the best split), then each rank's microbatches of 2 packs: the
    heaviest pack goes with the lightest (9 + 1 = 10, where reading in order would give 9 + 2 = 11)."""
    costs = [9.0, 1.0, 1.0, 1.0, 8.0, 2.0, 2.0, 1.0]
    layout = balanced_layout(costs, 2, 2)
    assert sorted(i for r in layout for i in r) == list(range(8))
    assert sorted(sum(costs[i] for i in r) for r in layout) == [12.0, 13.0]
    heavy = next(r for r in layout if 0 in r)
    assert max(sum(costs[i] for i in heavy[m : m + 2]) for m in (0, 2)) == 10.0


# ----------------------------------------------------------------------------- the loader's stream


def write_mixed(prefix, n_packs=24):
    """Packs of three kinds (image: 6-12 tiles; text; video: 16 frames), first token = pack index."""
    rng = np.random.default_rng(7)
    w = ShardWriter(prefix, tile_format="raw", tile_shape=TILE)
    for i in range(n_packs):
        kind = i % 3
        tiles = [int(rng.integers(6, 13)), 0, 16][kind]
        lengths = [[40], [10, 12, 9, 20], [60]][kind]
        samples = []
        for k, n in enumerate(lengths):
            tokens = np.full(n, 7, np.int32)
            tokens[0] = i
            t = tiles if k == 0 else 0
            samples.append(
                EncodedSample(
                    tokens,
                    (np.arange(n) % 2).astype(np.uint8),
                    np.arange(n, dtype=np.float32),
                    np.array([t] if t else [], np.int32),
                    encode_tiles(np.zeros((t, *TILE), np.uint8), "raw") if t else [],
                    0,
                    i + 1,
                )
            )
        w.add_pack(samples)
    w.finalize(extra={"datasets": [{"name": "mixed", "source_file": "x.jsonl"}]})
    return prefix


def _cost(shape: PackShape) -> float:
    return 100.0 * shape.tiles + sum(n * n for n in shape.segment_lengths)


GBS, MBS = 8, 2


def _loader(prefix, rank, dp, balanced=True, workers=0):
    balance = Balance(_cost, GBS // dp, MBS) if balanced else None
    return PackedDataLoader([prefix], seed=3, dp_rank=rank, dp_size=dp, num_workers=workers, balance=balance)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed(str(tmp_path_factory.mktemp("mixed") / "m"))


def test_pack_shape_from_the_index(mixed):
    loader = _loader(mixed, 0, 1, balanced=False)
    sample = loader.load(0, 1, 0)  # a text pack: 4 segments
    shape = loader.pack_shape(0, 1)
    assert shape.segment_lengths == (10, 12, 9, 20) and shape.tiles == 0
    assert shape.loss_tokens == int(collate([sample], SEQ, 0)["loss_weight"].sum())
    assert loader.pack_shape(0, 2).tiles == 16


def test_balanced_stream_same_batches_resumable(mixed):
    """dp2: each global batch holds the plain stream's packs, dealt so the ranks' cost is closer; at a
    global batch's end the position equals the plain stream's (checkpoints move between the two)."""
    ranks = [_loader(mixed, r, 2) for r in range(2)]
    plain = [_loader(mixed, r, 2, balanced=False) for r in range(2)]
    stream = _loader(mixed, 0, 1, balanced=False).peek_draws(5 * GBS)
    moved = 0
    for b in range(4):
        got = [ld.peek_draws(GBS // 2) for ld in ranks]
        want = [ld.peek_draws(GBS // 2) for ld in plain]
        assert sorted(got[0] + got[1]) == sorted(stream[b * GBS : (b + 1) * GBS])

        def worst(split):
            return max(sum(_cost(ranks[0].pack_shape(d, p)) for _, d, p in share) for share in split)

        assert worst(got) <= worst(want)
        moved += got != want
        for ld in ranks + plain:
            [next(ld) for _ in range(GBS // 2)]
        assert [ld.state_dict() for ld in ranks] == [ld.state_dict() for ld in plain]
    assert moved  # the deal did change something on this data
    # resumed from the middle of a global batch (its deal is made again) and from its end
    first = _loader(mixed, 1, 2)
    [next(first) for _ in range(GBS // 2 + 1)]
    mid = json.loads(json.dumps(first.state_dict()))
    assert mid["balance_served"] == 1
    expected = first.peek_draws(7)
    again = _loader(mixed, 1, 2)
    again.load_state_dict(mid)
    assert again.peek_draws(7) == expected
    with pytest.raises(DataError, match="balance-dp-compute"):
        _loader(mixed, 1, 2, balanced=False).load_state_dict(mid)
    # into another data-parallel size: the next global batch is the same set of packs
    one = _loader(mixed, 0, 1)
    one.load_resharded_state([json.loads(json.dumps(ld.state_dict())) for ld in ranks])
    assert sorted(one.peek_draws(GBS)) == sorted(stream[4 * GBS : 5 * GBS])


def test_balanced_stream_independent_of_workers(mixed):
    sync, pooled = _loader(mixed, 1, 2), _loader(mixed, 1, 2, workers=1)
    try:
        for _ in range(GBS):
            x, y = next(sync), next(pooled)
            assert int(x.tokens[0]) == int(y.tokens[0]) and x.num_tiles.tolist() == y.num_tiles.tolist()
        assert pooled.state_dict() == sync.state_dict()
    finally:
        pooled.close()


# ----------------------------------------------------------------------------- through pretrain


def test_flag_refused_with_mock_data():
    from internvl_mcore.config import ParallelConfig
    from internvl_mcore.config.problems import data_problems
    from internvl_mcore.config.training import DataConfig, LogConfig, RunConfig, TrainConfig

    data = DataConfig(mock_data=True, balance_dp_compute=True)
    run = RunConfig(get_preset("debug"), ParallelConfig(), TrainConfig(), data, LogConfig())
    assert data_problems(run) == [
        "--balance-dp-compute deals shard packs (--data-path); it does nothing with --mock-data"
    ]


def _losses(log) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_pretrain_balanced_losses(digits_shards, pretrain_log, tmp_path):
    """DP2 with --balance-dp-compute: the same global batches, so the losses equal the single process
    (per-token loss: megatron-core sums over microbatches and ranks and divides once), also across a
    checkpoint (saved after step 5, resumed: the data position resumes exactly); --log-straggler
    splits each rank's step into compute and waiting. DP1: regrouping the microbatches changes nothing."""
    reference = [r["loss"] for r in pretrain_log(1, digits_run_args(digits_shards))]
    first, second, ckpt = tmp_path / "dp2a.jsonl", tmp_path / "dp2b.jsonl", str(tmp_path / "ckpt")
    flags = ["--balance-dp-compute", "--save", ckpt, "--save-interval", "5"]
    pretrain(2, digits_run_args(digits_shards, *flags, "--exit-interval", "5", "--log-jsonl", str(first)))
    resume = ["--balance-dp-compute", "--load", ckpt]  # no --save: nothing reads a checkpoint at step 10
    out = pretrain(2, digits_run_args(digits_shards, *resume, "--log-straggler", "--log-jsonl", str(second)))
    losses = _losses(first) + _losses(second)
    assert len(losses) == len(reference)
    for i, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i + 1}: {a} vs single-process {b}"
    lines = [x for x in out.splitlines() if x.startswith("straggler iteration")]
    assert len(lines) == 5 and all("compute cpu min" in x and "gradient wait" in x for x in lines)
    assert all("wait fraction max" in x for x in lines)
    runs = {}
    for name, flags in (("plain", []), ("balanced", ["--balance-dp-compute"])):
        log = tmp_path / f"{name}.jsonl"
        pretrain(
            1,
            digits_run_args(
                digits_shards, "--micro-batch-size", "2", "--train-iters", "3", *flags, "--log-jsonl", str(log)
            ),
        )
        runs[name] = _losses(log)
    assert len(runs["plain"]) == len(runs["balanced"]) == 3  # (--lr-warmup-iters 2 needs a third step)
    for a, b in zip(runs["balanced"], runs["plain"]):
        assert abs(a - b) <= 1e-5 * abs(b)
