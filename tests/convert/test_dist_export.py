"""Training checkpoints read without a model (internvl_mcore/checkpoint/dist_reader.py, dist_canonical.py)
and exported to HF by streaming (tools/convert_to_hf.py --load TRAINING_CKPT).

One training run per model: a tiny transformers checkpoint -> convert_from_hf.py (sharded) ->
pretrain_internvl.py --pretrained (one step at lr 0, --save) at TP2 x PP2 (dense debug-6b: padded
InternViT heads, padded vocabulary, tied embeddings, distributed optimizer) and at TP2 x EP2 + SP
(debug-moe: experts split over expert-TP too, chained optimizers). On each:

- the reader's canonical view equals the canonical checkpoint the run started from, bit for bit (the
  model that saved it held exactly those weights), and box reads equal slices of whole reads;
- convert_to_hf writes both HF formats bit-exact (transformers: the original files' tensors;
  internvl: what the canonical checkpoint exports to), in-process: no spawned world;
- the export's live tensor memory stays under 3x its largest tensor while the model is > 5x larger;
- the checkpoint index is never unpickled by plain pickle, and chunks are read weights-only.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from internvl_mcore.checkpoint.dist_canonical import DistCanonicalView, is_model_key
from internvl_mcore.checkpoint.dist_reader import DistCheckpointReader
from internvl_mcore.checkpoint.canonical import CanonicalCheckpoint, model_config_from_dict
from internvl_mcore.checkpoint.format import resolve_iteration_dir
from internvl_mcore.errors import CheckpointError
from internvl_mcore.checkpoint.safetensors_io import SafetensorsDir
from tests.convert.tiny_hf import save_transformers_dir, tiny_transformers_model
from tests.fixtures import new_tensor_bytes
from tests.launch import REPO
from tests.worldpool import run_in_world

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(400)

RUNS = {  # name: (tiny HF model (text, vision, tied), preset, pretrain layout flags)
    "dense": (
        ("llama", "6b", True),
        "debug-6b",
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
    ),
    "moe": (
        ("qwen3_moe", "300m", False),
        "debug-moe",
        ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"],
    ),
}


def _tool(name: str):
    """`main` of tools/NAME.py."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main


def _pretrain_at_lr0(preset: str, canonical: Path, save: Path, layout: list[str]) -> None:
    """pretrain_internvl.py on the session's 4-rank world (tests/worldpool.py: its main() returns on
    success): the CLI is not the subject here, and a torchrun launch costs an agent and 4 imports."""
    argv = [
        "--model",
        preset,
        "--mock-data",
        "--seq-length",
        "64",
        *layout,
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--train-iters",
        "1",
        "--lr",
        "0",
        "--pretrained",
        str(canonical),
        "--save",
        str(save),
    ]
    run_in_world(REPO / "pretrain_internvl.py", 4, argv, timeout=300)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tmp_path_factory) -> dict:
    """HF dir, its canonical checkpoint and the TP2 x PP2 / TP2 x EP2 training checkpoint saved from it."""
    (text, vision, tie), preset, layout = RUNS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf = save_transformers_dir(tiny_transformers_model(text, vision, tie, seed=13), root / "hf")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the import CLI, in this process
        assert (
            _tool("convert_from_hf")(
                ["--hf-dir", str(hf), "--save", str(root / "canonical"), "--max-shard-size", "20KB"]
            )
            == 0
        )
    assert f"model {preset}" in out.getvalue()  # the architecture and ids are the preset's
    assert len(list((root / "canonical").glob("model-*.safetensors"))) > 1
    _pretrain_at_lr0(preset, root / "canonical", root / "train", layout)
    iteration_dir, info = resolve_iteration_dir(root / "train")
    return dict(
        name=request.param,
        hf=hf,
        canonical=root / "canonical",
        train=root / "train",
        iter=iteration_dir,
        cfg=model_config_from_dict(info["model"]),
    )


def test_reader_gives_the_canonical_model_bit_for_bit(run) -> None:
    want = CanonicalCheckpoint.open(run["canonical"]).tensors
    view = DistCanonicalView(DistCheckpointReader(run["iter"]), run["cfg"])
    assert sorted(view) == sorted(want)
    for name in want:
        got = view[name]
        assert view.shape(name) == tuple(got.shape) and view.dtype(name) == got.dtype, name
        assert torch.equal(got, want[name].to(got.dtype)), name
    if run["name"] == "moe":  # experts are numbered globally from the EP shards
        assert "language_model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in view


def test_training_checkpoint_to_canonical_streams_the_same_tensors(run, tmp_path) -> None:
    from internvl_mcore.convert import training_checkpoint_to_canonical

    cfg = training_checkpoint_to_canonical(run["train"], tmp_path / "canon", max_shard_bytes=20_000)
    assert cfg == run["cfg"] and len(list((tmp_path / "canon").glob("model-*.safetensors"))) > 1
    _same_tensors(run["canonical"], tmp_path / "canon")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        training_checkpoint_to_canonical(run["canonical"], tmp_path / "no")


def test_box_reads_assemble_only_what_intersects(run) -> None:
    reader = DistCheckpointReader(run["iter"])
    key = next(k for k in reader.keys() if k.startswith("language_model.decoder.layers.") and k.endswith("fc1.weight"))
    whole = reader.read(key)
    assert whole.shape == reader.shape(key) and whole.shape[0] == run["cfg"].llm.num_layers
    reader.peak_bytes = 0
    layer = reader.read(key, (1,))
    assert torch.equal(layer, whole[1])
    assert reader.peak_bytes <= 2 * layer.nbytes  # the box plus one chunk, never the stacked tensor
    assert torch.equal(reader.read(key, (slice(1, 3), 0)), whole[1:3, 0])
    assert torch.equal(reader.read(key, (-1, slice(2, 5))), whole[-1, 2:5])
    assert not any(k.startswith("optimizer.") for k in DistCanonicalView(reader, run["cfg"]))
    # optimizer state is keys too, whose chunks tile them as well: both the distributed optimizer
    # (dense run) and the chained expert / dense optimizers (MoE run) save per-parameter state in the
    # model's space (training/checkpoint.py: fully_reshardable, no chained_N. prefix)
    optimizer = [k for k in reader.keys() if not is_model_key(k)]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in optimizer), optimizer[:5]
    assert all(reader.read(k).shape == reader.shape(k) for k in optimizer)  # optimizer state is keys too


def test_reader_unpickles_nothing_plainly(run, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("plain unpickling of checkpoint data")

    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", weights_only_load)
    reader = DistCheckpointReader(run["iter"])
    assert all(reader.read(k).numel() >= 0 for k in reader.keys()[:5])


def test_canonical_places_of_stacked_and_numbered_keys() -> None:
    """Layers and experts stacked on prepended axes, or numbered in the key (megatron-core's
    `singleton_local_shards` / non-homogeneous layers), name the same canonical tensors."""
    from internvl_mcore.checkpoint.dist_canonical import Place, canonical_places

    fc1 = "language_model.decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight"
    forms = {
        "language_model.decoder.layers.mlp.experts.experts.linear_fc1.weight": ((2, 3, 8, 4), lambda i, e: (i, e)),
        "language_model.decoder.layers.1.mlp.experts.experts.linear_fc1.weight": ((3, 8, 4), lambda i, e: (e,)),
        "language_model.decoder.layers.mlp.experts.experts.2.linear_fc1.weight": ((2, 8, 4), lambda i, e: (i,)),
        "language_model.decoder.layers.1.mlp.experts.experts.2.linear_fc1.weight": ((8, 4), lambda i, e: ()),
    }
    for key, (shape, index) in forms.items():
        got = dict(canonical_places(key, shape))
        assert got and all(
            got[fc1.format(i=i, e=e)] == Place(key, index(i, e))
            for i, e in (tuple(int(x) for x in n.split(".")[3:8:4]) for n in got)
        ), key
    assert len(dict(canonical_places(next(iter(forms)), (2, 3, 8, 4)))) == 6
    assert dict(canonical_places("vision_model.encoder.layers.ls1", (2, 64))) == {
        f"vision_model.encoder.layers.{i}.ls1": Place("vision_model.encoder.layers.ls1", (i,)) for i in range(2)
    }
    assert dict(canonical_places("projector.mlp.linear_fc1.weight", (64, 256))) == {
        "projector.mlp.linear_fc1.weight": Place("projector.mlp.linear_fc1.weight")
    }


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_reader_refuses_a_chunk_that_is_not_a_tensor(run, tmp_path) -> None:
    """A chunk's byte range holding another pickle: refused by name, the payload never runs."""
    if run["name"] != "dense":
        pytest.skip("one checkpoint suffices")
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    copy = tmp_path / "iter"
    shutil.copytree(run["iter"], copy)
    key = "vision_model.embeddings.patch_embedding.weight"
    marker = tmp_path / "PAYLOAD_RAN"
    blob = io.BytesIO()
    torch.save(_Payload(marker), blob)
    (copy / "__9_0.distcp").write_bytes(blob.getvalue())
    metadata = pickle.loads((copy / ".metadata").read_bytes())  # the test's own file: plain pickle is fine
    index = next(i for i in metadata.storage_data if i.fqn == key)
    metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(blob.getvalue()))
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=f"chunk .* of '{key}' is not a tensor record"):
        DistCheckpointReader(copy).read(key)
    assert not marker.exists()


# --- the streaming export ------------------------------------------------------------------------


def _same_tensors(a: Path, b: Path) -> None:
    x, y = SafetensorsDir(a), SafetensorsDir(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x.dtype(k) == y.dtype(k) and torch.equal(x[k], y[k]), k


def test_cli_exports_both_formats_bit_exact_in_bounded_memory(run, tmp_path, monkeypatch) -> None:
    from internvl_mcore.convert import convert_checkpoint_to_hf
    from internvl_mcore.checkpoint.safetensors_io import ShardedWriter, StoredBytes

    main = _tool("convert_to_hf")
    # transformers: the original files' tensors, from the training checkpoint, in several shards
    assert (
        main(
            [
                "--load",
                str(run["train"]),
                "--save",
                str(tmp_path / "tf"),
                "--format",
                "transformers",
                "--hf-template-dir",
                str(run["hf"]),
                "--max-shard-size",
                "64KB",
            ]
        )
        == 0
    )
    _same_tensors(run["hf"], tmp_path / "tf")
    assert len(list((tmp_path / "tf").glob("model-*.safetensors"))) > 2
    # internvl: what the canonical checkpoint exports to; live memory recorded at every tensor written
    convert_checkpoint_to_hf(run["canonical"], tmp_path / "ivl_ref", "internvl")
    peaks, add, copied = [], ShardedWriter.add, []

    def recording_add(self, name, tensor):
        peaks.append(new_tensor_bytes())
        copied.append(isinstance(tensor, StoredBytes))
        add(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "add", recording_add)
    load_chunk = DistCheckpointReader._load_chunk

    def recording_load(self, *args):
        chunk = load_chunk(self, *args)
        peaks.append(new_tensor_bytes())  # the box being assembled, this chunk and whatever else is alive
        return chunk

    monkeypatch.setattr(DistCheckpointReader, "_load_chunk", recording_load)
    readers: list[DistCheckpointReader] = []
    monkeypatch.setattr(DistCheckpointReader, "__init__", _recording_init(readers))
    gc.collect()
    gc.disable()
    try:
        assert main(["--load", str(run["train"]), "--save", str(tmp_path / "ivl"), "--format", "internvl"]) == 0
    finally:
        gc.enable()
    _same_tensors(tmp_path / "ivl_ref", tmp_path / "ivl")
    # pieces along dim 0 were copied file to file; row-parallel ones (split along dim 1) went through memory
    assert any(copied) and not all(copied), copied
    out = SafetensorsDir(tmp_path / "ivl")
    largest = max(out[k].nbytes for k in out)
    model = sum(out[k].nbytes for k in out)
    assert model > 5 * largest, (model, largest)
    assert max(peaks) < 3 * largest and readers[0].peak_bytes < 3 * largest, (
        max(peaks),
        readers[0].peak_bytes,
        largest,
    )
    print(
        f"{run['name']}: model {model} B, largest tensor {largest} B, export peak {max(peaks)} B, reader "
        f"peak {readers[0].peak_bytes} B"
    )


def _recording_init(readers: list):
    init = DistCheckpointReader.__init__

    def recording(self, path, *args):
        init(self, path, *args)
        readers.append(self)

    return recording
