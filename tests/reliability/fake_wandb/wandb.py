"""A stand-in for the wandb package: records init/log/finish calls as JSON
lines in $FAKE_WANDB_LOG, so the --wandb-project code path runs through the real CLI."""

import json
import os


def _write(kind, **fields):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": kind, **fields}, default=str) + "\n")


class _Run:
    def log(self, data, step=None):
        _write("log", data=data, step=step)

    def finish(self):
        _write("finish")


def init(project=None, name=None, config=None, dir=None, **kwargs):
    _write(
        "init",
        project=project,
        name=name,
        dir=dir,
        mode=os.environ.get("WANDB_MODE"),
        has_config=isinstance(config, dict) and "train" in config,
    )
    return _Run()
