"""pretrain_internvl.py with the interleaved pipeline schedule, on the digits shards (jobs of the session's
reused worlds: tests/conftest.py `pretrain`): the PP2 x 2-virtual-stage run's losses equal the single
process's, it resumes exactly from its checkpoint (given by the other VPP flag), a run without virtual
stages resumes from that checkpoint and the interleaved run from that run's checkpoint, and the converter
exports both runs' checkpoints alike (the chunks' layers are numbered globally in the checkpoint);
validation runs through the same schedule."""

import json

import pytest

from tests.conftest import DIGITS_ITERS as ITERS, digits_run_args, pretrain

TOL = 1e-5
HALF = ITERS // 2


def _records(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def _losses(log):
    return [r["loss"] for r in _records(log) if "loss" in r]


def _final_valid_loss(log):
    (final,) = [r["valid_loss"] for r in _records(log) if r.get("final")]
    return final


def _eval(shards):  # validation through the interleaved schedule's forward-only path (training/eval.py)
    return ["--valid-data-path", shards, "--eval-interval", str(HALF), "--eval-iters", "1"]


@pytest.fixture(scope="module")
def vpp_run(digits_shards, tmp_path_factory):
    """PP2 with 2 model chunks per rank, checkpoints at HALF and ITERS, validation at both."""
    d = tmp_path_factory.mktemp("vpp")
    flags = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
    pretrain(
        2,
        digits_run_args(
            digits_shards,
            *flags,
            *_eval(digits_shards),
            "--save",
            str(d / "ckpt"),
            "--save-interval",
            str(HALF),
            "--log-jsonl",
            str(d / "a"),
        ),
    )
    return d, _losses(d / "a"), _final_valid_loss(d / "a")


def _export(ckpt, out) -> dict:
    """The HF export of checkpoint `ckpt`, as {name: tensor}."""
    from safetensors.torch import load_file

    from internvl_mcore.convert.export import convert_checkpoint_to_hf

    convert_checkpoint_to_hf(ckpt, out, "internvl")
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def vpp_hf(vpp_run, tmp_path_factory):
    """The VPP run's final checkpoint exported once: the reference of both export comparisons."""
    return _export(vpp_run[0] / "ckpt" / f"iter_{ITERS:07d}", tmp_path_factory.mktemp("vpp_hf"))


def _same_weights(a: dict, b: dict) -> None:
    """The same weights up to the runs' rounding (a misplaced layer differs by O(1))."""
    assert a.keys() == b.keys() and any(".layers.3." in k for k in a)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert float((a[k] - b[k]).abs().max()) <= 1e-4 * max(float(b[k].abs().max()), 1e-3), k


def test_interleaved_run_matches_single_process_and_resumes(digits_shards, pretrain_log, vpp_run, tmp_path):
    d, losses, _ = vpp_run
    reference = [r["loss"] for r in pretrain_log(1, digits_run_args(digits_shards))]
    assert len(losses) == len(reference) == ITERS
    for i, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= TOL * abs(b), f"iteration {i + 1}: {a} vs single-process {b}"
    # exact resume (and the evaluation changed nothing), the same chunking spelled with the other flag: 4 layers / PP2 / 1 per chunk = 2 chunks
    half = d / "ckpt" / f"iter_{HALF:07d}"
    flags = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    stop = ["--exit-interval", str(HALF + 2)]  # two steps show the exact resume as well as five
    pretrain(2, digits_run_args(digits_shards, *flags, "--load", str(half), *stop, "--log-jsonl", str(tmp_path / "b")))
    assert _losses(tmp_path / "b") == losses[HALF : HALF + 2]


def test_checkpoint_loads_without_virtual_stages_and_exports_alike(digits_shards, vpp_run, vpp_hf, tmp_path):
    d, losses, valid = vpp_run
    half = d / "ckpt" / f"iter_{HALF:07d}"
    run = [
        *_eval(digits_shards),
        "--pipeline-model-parallel-size",
        "2",
        "--load",
        str(half),
        "--save",
        str(tmp_path / "ckpt"),
        "--save-interval",
        str(HALF + 1),  # the checkpoint the VPP run below resumes from (and the final one at ITERS)
        "--log-jsonl",
        str(tmp_path / "c"),
    ]
    out = pretrain(2, digits_run_args(digits_shards, *run))
    assert "restored model weights" in out  # another layout: the optimizer state resharded
    for i, (a, b) in enumerate(zip(_losses(tmp_path / "c"), losses[HALF:]), start=HALF + 1):
        assert abs(a - b) <= TOL * abs(b), f"iteration {i}: {a} (PP2 from the VPP checkpoint) vs {b} (VPP)"
    assert abs(_final_valid_loss(tmp_path / "c") - valid) <= TOL * abs(valid)
    # and back: the VPP layout resumes from the checkpoint without virtual stages
    vpp_flags = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
    back = tmp_path / "ckpt" / f"iter_{HALF + 1:07d}"
    stop = ["--exit-interval", str(HALF + 3)]  # two steps after the PP2 checkpoint at HALF + 1
    pretrain(
        2, digits_run_args(digits_shards, *vpp_flags, "--load", str(back), *stop, "--log-jsonl", str(tmp_path / "d"))
    )
    for i, (a, b) in enumerate(zip(_losses(tmp_path / "d"), losses[HALF + 1 : HALF + 3], strict=True), start=HALF + 2):
        assert abs(a - b) <= TOL * abs(b), f"iteration {i}: {a} (VPP from the PP2 checkpoint) vs {b} (VPP)"
    _same_weights(vpp_hf, _export(tmp_path / "ckpt" / f"iter_{ITERS:07d}", tmp_path / "pp"))


# PP2 x 2 chunks with uneven counts: rank 0 holds E (embedding, ViT, projector; no decoder layer) then
# layer 3, rank 1 layers 0-2 then L alone (output layer and loss; no decoder layer)
LAYOUT = "E|ttt|t|L"


def test_layout_run_matches_single_process_resumes_elsewhere_and_exports_alike(
    digits_shards, pretrain_log, vpp_hf, tmp_path
):
    """--pipeline-model-parallel-layout: the losses equal the single process's; its checkpoint resumes
    under the even 2-chunk split and without virtual stages under a one-chunk layout (layers placed
    elsewhere, the same losses) and exports to HF as the even VPP run's checkpoint does."""
    flags = ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", LAYOUT]
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", str(HALF)]
    out = pretrain(2, digits_run_args(digits_shards, *flags, *save, "--log-jsonl", str(tmp_path / "a")))
    losses = _losses(tmp_path / "a")
    reference = [r["loss"] for r in pretrain_log(1, digits_run_args(digits_shards))]
    assert len(losses) == len(reference) == ITERS, out
    for i, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= TOL * abs(b), f"iteration {i + 1}: {a} (layout {LAYOUT}) vs single-process {b}"
    half = tmp_path / "ckpt" / f"iter_{HALF:07d}"
    stop = ["--exit-interval", str(HALF + 2)]
    others = (
        ("even", ["--num-virtual-stages-per-pipeline-rank", "2"]),
        # no virtual stages, uneven (the even PP2 split resumes from a VPP checkpoint in the test above)
        ("novpp-layout", ["--pipeline-model-parallel-layout", "Et|tttL"]),
    )
    for name, other in others:
        run = ["--pipeline-model-parallel-size", "2", *other, "--load", str(half), *stop]
        said = pretrain(2, digits_run_args(digits_shards, *run, "--log-jsonl", str(tmp_path / name)))
        assert "restored model weights" in said, name  # another layout: the optimizer state resharded
        resumed = _losses(tmp_path / name)
        assert len(resumed) == 2, name
        for i, (a, b) in enumerate(zip(resumed, losses[HALF:]), start=HALF + 1):
            assert abs(a - b) <= TOL * abs(b), f"iteration {i}: {a} ({name} from the layout checkpoint) vs {b}"
    _same_weights(_export(tmp_path / "ckpt" / f"iter_{ITERS:07d}", tmp_path / "hf"), vpp_hf)
