"""The README's MPO commands run as written on the shipped example preference data (the torchrun line's
script and arguments as a job of the session's reused 2-rank world: the commands are the subject here,
not torchrun's launch, which tests/reliability covers; the losses are the launch's bit for bit)."""

import json
import re
import shlex
import subprocess
import sys

from tests.conftest import pretrain
from tests.launch import REPO


def test_readme_mpo_commands_run_on_the_example_data(tmp_path):
    block = re.search(r"<!-- BEGIN mpo-example -->\n```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = [line.replace("runs/mpo", str(tmp_path)) for line in block.strip().splitlines()]
    assert len(lines) == 3 and lines[2].startswith("torchrun --nproc_per_node 2 pretrain_internvl.py")
    for line in lines[:2]:
        args = shlex.split(line)
        assert args[0] == "python"
        subprocess.run([sys.executable, *args[1:]], cwd=REPO, check=True, capture_output=True, timeout=300)
    manifest = json.loads((tmp_path / "example.manifest.json").read_text())
    assert manifest["preference"] is True and manifest["counts"]["rejects"] == 0
    records = (REPO / "examples/data/example_mpo.jsonl").read_text().splitlines()
    assert manifest["counts"]["pairs"] == manifest["counts"]["samples"] // 2 == len(records)
    args = shlex.split(lines[2])
    assert args[:4] == ["torchrun", "--nproc_per_node", "2", "pretrain_internvl.py"]
    pretrain(2, args[4:], timeout=300)
    records = [json.loads(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for key in ("loss_preference", "loss_quality", "loss_generation", "reward_margin", "reward_accuracy"):
        assert all(key in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
