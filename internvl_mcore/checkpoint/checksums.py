"""checksums.json of a training checkpoint: the size and sha256 of every other file, written by the
save (training/checkpoint.py) and checked before --load takes the checkpoint (`verify`, together with
the format version). Both are collective: the ranks share the files, each hashes every
world-size-th one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .format import FORMAT_VERSION, RUN_INFO

CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _my_share(names: list[str]) -> list[str]:
    """The files this rank hashes: every world-size-th, so a large checkpoint is hashed in parallel."""
    return names[dist.get_rank() :: dist.get_world_size()]


def write_checksums(path: Path, known: Optional[dict] = None) -> None:
    """Write checksums.json (size, sha256 of every file) into `path` (collective; the ranks share the files).
    `known`: {file: [size, sha256]} this rank has already hashed (--async-save: its writer process hashed
    the files it wrote); the ranks hash only the other files. Every rank passes `known` or none does."""
    names = _files(path) if dist.get_rank() == 0 else None
    box = [names]
    dist.broadcast_object_list(box, src=0)
    done: dict = {}
    if known is not None:
        given: list = [None] * dist.get_world_size()
        dist.all_gather_object(given, known)
        done = {name: value for part in given for name, value in part.items() if name in box[0]}
    error = None
    try:
        todo = [name for name in box[0] if name not in done]
        mine = {name: [(path / name).stat().st_size, _sha256(path / name)] for name in _my_share(todo)}
    except OSError as exc:  # still join the gather below: a rank that left it would stall the others
        mine, error = {}, exc
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if error is not None:
        raise error
    if dist.get_rank() == 0:
        table = {**done, **{name: value for part in parts for name, value in part.items()}}
        (path / CHECKSUMS).write_text(json.dumps(dict(sorted(table.items())), indent=1))


def write_checksums_here(path: Path, known: dict) -> None:
    """checksums.json written by this rank alone (not collective; the same file as `write_checksums`):
    `known` {file: [size, sha256]} for the files hashed already (--async-save: every rank's writer
    process hashed the tensor files it wrote and rank 0 gathered them), the rest, the small files
    (metadata, RNG, data position, run.json), hashed here: a collective per file list and per share
    would cost more than hashing them."""
    names = _files(path)
    table = {
        name: known[name] if name in known else [(path / name).stat().st_size, _sha256(path / name)] for name in names
    }
    (path / CHECKSUMS).write_text(json.dumps(dict(sorted(table.items())), indent=1))


def _check_file(path: Path, name: str, size: int, sha: str) -> Optional[str]:
    file = path / name
    if not file.is_file():
        return f"{file}: missing"
    if file.stat().st_size != size:
        return f"{file}: {file.stat().st_size} bytes, {size} when saved (truncated?)"
    if _sha256(file) != sha:
        return f"{file}: checksum mismatch (corrupt)"
    return None


def _format_problem(path: Path) -> Optional[str]:
    """Why --load cannot take checkpoint `path` as its format version says, or None."""
    try:
        version = json.loads((path / RUN_INFO).read_text()).get("format_version")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{path / RUN_INFO}: unreadable ({exc})"
    if version == 1:
        return (
            f"{path}: checkpoint format version 1 keeps its RNG and data-loader state in pickles, which "
            f"could run code when loaded, so --load does not read them; --pretrained {path} starts from "
            "its weights (fresh optimizer, RNG and data position)"
        )
    if version != FORMAT_VERSION:
        return f"{path / RUN_INFO}: format_version {version!r}, this version reads {FORMAT_VERSION}"
    if not (path / CHECKSUMS).is_file():
        return (
            f"{path / CHECKSUMS}: missing, but format version {FORMAT_VERSION} checkpoints always have one "
            "(an incomplete copy, or files removed): not loading it unverified"
        )
    return None


def verify(path: Path) -> Optional[str]:
    """The first problem of checkpoint directory `path` (collective), or None when its format version
    is one --load reads and every file matches its checksum."""
    problem = None
    table: dict = {}
    if not (path / RUN_INFO).is_file():
        problem = f"{path / RUN_INFO}: missing (incomplete checkpoint)"
    else:
        problem = _format_problem(path)
    if problem is None:
        try:
            table = json.loads((path / CHECKSUMS).read_text())
            assert isinstance(table, dict), "not a JSON object"
        except (OSError, ValueError, AssertionError) as exc:
            problem = f"{path / CHECKSUMS}: unreadable ({exc})"
    names = sorted(table)
    mine = [_check_file(path, n, *table[n]) for n in _my_share(names)] if problem is None else [problem]
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, [m for m in mine if m])
    problems = sorted(p for part in found for p in part)
    return problems[0] if problems else None
