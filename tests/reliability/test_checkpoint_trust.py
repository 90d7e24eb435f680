"""A checkpoint directory cannot run code: payloads planted in each pickled part
of a checkpoint (checksums.json rewritten to match, as whoever writes the directory can) never run under
pretrain_internvl.py --load / --pretrained or tools/convert_to_hf.py --load; each tool ends with one
line naming the file, exit 2. --load refuses format version 1 (pickled RNG / data files) and a
version-2 checkpoint without checksums.json."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import pretrain
from tests.reliability.cli_helpers import assert_user_error, run
from tests.reliability.common import MOCK, one_line_error, plain

pytestmark = pytest.mark.timeout(600)

ARGS = MOCK + ["--global-batch-size", "2", "--train-iters", "4"]


class Payload:
    """Unpickled without restriction, creates `marker` (what a real payload would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One iter_ directory of a 2-step run (format version 2): a job of the session's reused 1-rank world
    (tests/conftest.py `pretrain`: no interpreter start or imports), since the checkpoint it writes is
    what the tests tamper with, not the run; the runs refusing the tampered copies are real processes."""
    root = tmp_path_factory.mktemp("trust") / "ckpt"
    pretrain(1, ARGS + ["--exit-interval", "2", "--save", str(root), "--save-interval", "2"])
    return root / "iter_0000002"


def _tampered(saved: Path, tmp_path: Path, tamper) -> Path:
    """A copy of the checkpoint changed by `tamper(copy)`, with checksums.json rewritten to match."""
    copy = tmp_path / "iter_0000002"
    shutil.copytree(saved, copy)
    tamper(copy)
    table = {
        str(p.relative_to(copy)): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
        for p in sorted(copy.rglob("*"))
        if p.is_file() and p.name != "checksums.json"
    }
    (copy / "checksums.json").write_text(json.dumps(table))
    return copy


def _evil_metadata(marker: Path):
    def tamper(path: Path) -> None:
        metadata = pickle.loads((path / ".metadata").read_bytes())
        metadata.planner_data = Payload(marker)  # a valid index that also runs code when unpickled
        (path / ".metadata").write_bytes(pickle.dumps(metadata))

    return tamper


def _evil_common(marker: Path):
    def tamper(path: Path) -> None:
        common = torch.load(path / "common.pt", weights_only=True)
        common["payload"] = Payload(marker)
        torch.save(common, path / "common.pt")

    return tamper


def _evil_byte_item(marker: Path):
    """Point one of megatron-core's ShardedObject items (unpickled by torch's load planner with
    weights_only=False) at a payload in a new .distcp file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def tamper(path: Path) -> None:
        metadata = pickle.loads((path / ".metadata").read_bytes())
        buf = io.BytesIO()
        torch.save(Payload(marker), buf)
        (path / "__9_0.distcp").write_bytes(buf.getvalue())
        index = next(
            i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
        )
        metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(buf.getvalue()))
        (path / ".metadata").write_bytes(pickle.dumps(metadata))

    return tamper


def test_our_files_are_json(saved):
    assert sorted(p.name for p in saved.glob("*.pt")) == ["common.pt"]  # megatron-core's; ours are JSON
    assert json.loads((saved / "run.json").read_text())["format_version"] == 2
    assert "rng" in json.loads((saved / "rank_00000.json").read_text())
    assert json.loads((saved / "data_dp00000.json").read_text()) == {"mock_iteration": 2}


def test_planted_payloads_do_not_run(saved, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil_index = _tampered(saved, tmp_path / "a", _evil_metadata(marker))
    line = one_line_error(plain(ARGS + ["--load", str(evil_index)]))
    assert f"{evil_index / '.metadata'}: not a checkpoint index we load (it refers to io.open" in line, line

    bad = _tampered(saved, tmp_path / "b", _evil_common(marker))
    line = one_line_error(plain(ARGS + ["--pretrained", str(bad)]))
    assert f"{bad / 'common.pt'}: holds more than tensors" in line, line

    bad = _tampered(saved, tmp_path / "c", _evil_byte_item(marker))
    proc = run("convert_to_hf", "--load", bad, "--save", tmp_path / "hf", "--format", "transformers")
    assert_user_error(proc, str(bad / "__9_0.distcp"), "holds more than tensors")
    assert not marker.exists()
    pickle.loads((evil_index / ".metadata").read_bytes())  # the payload is real: a plain unpickle runs it
    assert marker.exists()


def test_load_refuses_format_1_and_missing_checksums(saved, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"

    def format_1(path: Path) -> None:
        """What version 1 wrote: pickled rank / data files (here with payloads)."""
        info = json.loads((path / "run.json").read_text())
        (path / "run.json").write_text(json.dumps({**info, "format_version": 1}))
        for name in ("rank_00000", "data_dp00000"):
            (path / f"{name}.json").unlink()
            torch.save({"rng": Payload(marker)}, path / f"{name}.pt")

    # one --save root: the latest (2) lacks checksums.json, the older one (1) is format 1; --load
    # falls back from the first to the second and refuses both, naming each
    root = tmp_path / "root"
    bare = _tampered(saved, root / "x", lambda path: None)
    (bare / "checksums.json").unlink()
    old = _tampered(saved, root / "y", format_1)
    bare = bare.rename(root / "iter_0000002")
    old = old.rename(root / "iter_0000001")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    line = one_line_error(plain(ARGS + ["--load", str(root)]))
    assert f"{bare / 'checksums.json'}: missing, but format version 2" in line, line
    assert f"{old}: checkpoint format version 1" in line and f"--pretrained {old}" in line, line
    assert not marker.exists()
