"""What pretrain_internvl.py checks of the shard sets before any process group or model exists: the
prefixes, the blend, each manifest against the model and --seq-length, the token ids, the files'
sizes and sha256 (one line, exit 2: a DataError).

Apart from training/data.py (the batches) so that a data error found here costs an interpreter start
and the manifests' reading, not torch's import: nothing here imports torch at module level (opening
the shard files, ShardReader, imports megatron-core's index reader where it is called), and
tests/reliability/test_cli_pretrain.py asserts it of the errors found before the files are opened.
"""

from __future__ import annotations

import glob
import json
import os

from tqdm import tqdm

from ..cli_errors import read_json, user_path
from ..config.model import ModelConfig
from ..config.training import RunConfig
from ..data.blend import parse_data_path
from ..data.shards import ShardReader, manifest_path, max_token_id, sha256_file, shard_files
from ..errors import DataError


def _prefix_problem(prefix: str, flag: str) -> str | None:
    """Why `prefix` is not a shard set (a folder, nothing there), or None."""
    if os.path.isdir(prefix):
        found = sorted(glob.glob(os.path.join(glob.escape(prefix), "*.manifest.json")))[:3]
        hint = (": it holds " + ", ".join(f[: -len(".manifest.json")] for f in found)) if found else ""
        return f"{flag} {prefix} is a directory; give a shard prefix DIR/NAME (of DIR/NAME.manifest.json){hint}"
    if not os.path.isfile(manifest_path(prefix)):
        return f"{flag} {prefix}: no shard set there ({manifest_path(prefix)} not found)"
    return None


def check_shard_sets(
    entries: list[str], run: RunConfig, flag: str = "--data-path", rank: int = 0, world: int = 1
) -> None:
    """Everything about the shard sets that can be known before training: the prefixes exist, the
    blend parses, each manifest fits the model and --seq-length and has packs, each set opens (file
    sizes match the indexes) and, unless --no-verify-shards, every file's sha256 matches its manifest.
    The hashing is split over the job: rank r hashes files r, r + world, ... Raises DataError."""
    prefixes = [e for e in entries if not _is_number(e)]
    for prefix in prefixes:
        if (problem := _prefix_problem(prefix, flag)) is not None:
            raise DataError(problem)
    try:
        blend = parse_data_path(entries)
    except DataError as exc:
        raise DataError(str(exc) if str(exc).startswith(flag) else f"{flag}: {exc}") from None
    for weight, prefix in blend:  # the manifests alone first: cheap, and megatron-core is not imported yet
        try:
            packs = check_manifest(prefix, run)
            check_token_range(prefix, run.model)
        except DataError as exc:
            raise DataError(f"{flag} {prefix}: {exc}") from None
        if weight > 0 and packs == 0:
            raise DataError(f"{flag} {prefix}: the shard set is empty (0 packs; see {prefix}.rejects.jsonl)")
    readers = []
    for prefix in prefixes:
        try:
            with user_path(DataError):  # a shard file that cannot be opened (permissions)
                readers.append(ShardReader(prefix))
        except DataError as exc:
            raise DataError(f"{flag} {prefix}: {exc}") from None
    if not run.data.no_verify_shards:
        verify_checksums(readers, rank, world, flag)


def check_token_range(prefix: str, cfg: ModelConfig) -> None:
    """Every token id of the shard set indexes the model's embedding (the manifest's recorded largest
    id; older manifests: a pass over the tokens file)."""
    path = manifest_path(prefix)
    with user_path(DataError):  # the pass over the tokens file of an older manifest
        top = max_token_id(prefix, read_json(path, DataError))
    if top >= cfg.llm.vocab_size:
        raise DataError(
            f"{path}: token id {top} is outside the model's vocabulary of {cfg.llm.vocab_size} rows "
            f"(--model {cfg.name}); the shards were made with another tokenizer"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def verify_checksums(readers: list, rank: int, world: int, flag: str) -> None:
    """sha256 of this rank's share of the shard files against the manifests (progress bar on rank 0)."""
    files = [(r, path) for r in readers for path in shard_files(r.prefix)][rank::world]
    total = sum(os.path.getsize(path) for _, path in files)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="verifying shards",
        disable=None if rank == 0 else True,
        leave=False,
    ) as bar:
        for reader, path in files:
            want = reader.expected_sha256(os.path.basename(path)[len(os.path.basename(reader.prefix)) + 1 :])
            if want is None:
                raise DataError(
                    f"{flag}: {manifest_path(reader.prefix)} has no sha256 for {path} "
                    "(--no-verify-shards to train on it unchecked)"
                )
            if sha256_file(path) != want:
                raise DataError(
                    f"{flag}: {path} does not match the sha256 in {manifest_path(reader.prefix)} "
                    "(changed or corrupted since preprocessing; re-run tools/preprocess_mm_data.py, "
                    "or --no-verify-shards to train on it anyway)"
                )
            bar.update(os.path.getsize(path))


def check_manifest(prefix: str, run: RunConfig) -> int:
    """Refuse shards made for another model: special-token ids, image tokens per tile, vocab, length.
    Returns the number of packs the manifest records."""
    path = manifest_path(prefix)
    try:
        manifest = json.loads(open(path, encoding="utf-8").read())
    except FileNotFoundError:
        raise DataError(
            f"--data-path {prefix}: no manifest {path} (not made by tools/preprocess_mm_data.py?)"
        ) from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # OSError: a directory, no permission
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a shard manifest (a JSON {type(manifest).__name__})")
    cfg, tok = run.model, manifest.get("tokenizer", {})
    expected = {
        "img_start_id": cfg.img_start_token_id,
        "img_end_id": cfg.img_end_token_id,
        "img_context_id": cfg.img_context_token_id,
    }
    problems = [
        f"{key} {tok.get(key)} (model --model {cfg.name}: {value})"
        for key, value in expected.items()
        if tok.get(key) != value
    ]
    if manifest.get("template", cfg.template) != cfg.template:
        problems.append(f"chat template {manifest.get('template')!r} (model: {cfg.template!r})")
    if manifest.get("num_image_token") != cfg.num_image_token:
        problems.append(f"num_image_token {manifest.get('num_image_token')} (model: {cfg.num_image_token})")
    if tok.get("vocab_size", 0) > cfg.llm.vocab_size:
        problems.append(f"tokenizer vocab {tok.get('vocab_size')} > model vocab {cfg.llm.vocab_size}")
    if bool(manifest.get("preference")) != (run.train.stage == "mpo"):
        problems.append(
            "preference (MMPR) shards need --stage mpo"
            if manifest.get("preference")
            else "--stage mpo needs preference shards (tools/preprocess_mm_data.py --preference)"
        )
    if manifest.get("seq_length", 0) > run.train.seq_length:
        problems.append(f"packs of up to {manifest.get('seq_length')} tokens > --seq-length {run.train.seq_length}")
    if problems:
        raise DataError(f"{path} does not fit the model: " + "; ".join(problems))
    return int(manifest.get("counts", {}).get("packs", 0))
