"""Prompt shards for online RL (--stage gspo / grpo): prompts with reference answers, images stored once.

    write_prompt_shards(records, P)  -> P.prompts.jsonl, P.prompt_images.bin, P.manifest.json
    read_prompt_shards(P)            -> PromptShards (a Sequence[PromptRecord], random access)

A prompt is not tokenized here: the RL stage renders and tiles it with inference/prompts.py, the
generation code path, so the policy samples from exactly the inputs `tools/generate.py` would build.
What preprocessing (`tools/preprocess_mm_data.py --prompts`) settles once is everything that can be
wrong with a record: its answer, its images (path inside the dataset root, decodable, stored as the
"source" tile format stores them: the bytes as given, or lossless WebP), the placeholders, a
conversation ending with the user's turn, and a prompt that fits --seq-length.

Files of a prompt set with prefix P:

    P.prompts.jsonl        one JSON object per record: {"id", "conversations", "answer", "meta",
                           "images": [[offset, length], ...], "tiling"?: [min, max, thumbnail]}
                           (byte ranges of P.prompt_images.bin; the tiling of records with images)
    P.prompt_images.bin    every record's encoded images back to back, each stored once
    P.manifest.json        {"format": PROMPT_FORMAT, "counts": {...}, "files": {name: sha256}, ...}

Nothing is unpickled; a reader trusts no offset: every range is checked against the file's size and
every field's type, and a bad one is a DataError naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, overload

import numpy as np

from ..cli_errors import user_path
from ..errors import DataError
from .image import plan_tiling, stored_image_bytes
from .sample import Reject
from .sources import (
    PreprocessOptions,
    RawRecord,
    RejectError,
    add_image_placeholders,
    copy_conversations,
    image_sources,
    read_image,
)
from .template import GPT_ROLES, HUMAN_ROLES, TEMPLATES, TemplateError, count_image_placeholders, tokenize_conversation
from .tokenizer import Tokenizer

PROMPT_FORMAT = "internvl-mcore-prompts-v1"
_SCAN_BYTES = 1 << 24  # the records file is scanned for line ends in pieces of this size


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt: an InternVL conversation ending with the user's turn, its images, its answer."""

    id: str
    conversations: list[dict]
    """InternVL turns ({"from", "value"}), the last one the human turn to answer (no gpt answer);
    `<image>` placeholders already in place, one per image."""
    images: tuple[bytes, ...]
    """Encoded image files, in placeholder order."""
    answer: str
    """The reference answer the reward compares responses with."""
    meta: dict = field(default_factory=dict)
    """The rest of the JSONL record (e.g. its "image" paths and any user keys), for --reward-fn's
    `prompt` argument."""
    tiling: tuple[int, int, bool] | None = None
    """(min tiles, max tiles per image, thumbnail): the dataset's tiling that preprocessing counted the
    prompt's length with (a multi-image record's cap divided by its images, as training divides it);
    the stage tiles with it. None: generation's defaults (a JSONL prompt file, a text-only prompt)."""


def records_path(prefix: str | Path) -> str:
    return f"{prefix}.prompts.jsonl"


def images_path(prefix: str | Path) -> str:
    return f"{prefix}.prompt_images.bin"


def manifest_path(prefix: str | Path) -> str:
    return f"{prefix}.manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_prompt_shards(
    records: Iterable[PromptRecord], prefix: str | Path, extra: dict | Callable[[], dict] | None = None
) -> int:
    """Write the prompt set P=`prefix` (files above; no staging: the CLI stages); returns the records
    written. `extra` is merged into the manifest (preprocessing adds its arguments and reject counts);
    a callable is called after the last record, for what is known only then."""
    prefix = str(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    counts = {"records": 0, "images": 0, "image_bytes": 0}
    with open(records_path(prefix), "w", encoding="utf-8") as rf, open(images_path(prefix), "wb") as imf:
        for rec in records:
            ranges = []
            for data in rec.images:
                ranges.append([counts["image_bytes"], len(data)])
                imf.write(data)
                counts["image_bytes"] += len(data)
            line = {
                "id": rec.id,
                "conversations": rec.conversations,
                "answer": rec.answer,
                "meta": rec.meta,
                "images": ranges,
            }
            if rec.tiling is not None:
                line["tiling"] = list(rec.tiling)
            rf.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
            counts["records"] += 1
            counts["images"] += len(ranges)
    extra = (extra() if callable(extra) else extra) or {}
    manifest = {**extra, "format": PROMPT_FORMAT, "counts": {**counts, **extra.get("counts", {})}}
    manifest["files"] = {os.path.basename(p): _sha256(p) for p in (records_path(prefix), images_path(prefix))}
    with open(manifest_path(prefix), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return counts["records"]


def _line_offsets(path: str) -> np.ndarray:
    """(n + 1,) int64 byte offsets of the n lines of `path` (each ends with a newline)."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(1, np.int64)
    found, start = [], 0
    with open(path, "rb") as f:  # in pieces: memory stays bounded for any number of prompts
        while block := f.read(_SCAN_BYTES):
            found.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n")).astype(np.int64) + start + 1)
            start += len(block)
    ends = np.concatenate(found)
    if not ends.size or ends[-1] != size:
        raise DataError(f"{path}: the last line has no newline (a truncated file); re-run the preprocessing")
    return np.concatenate([[0], ends])


def _read_manifest(prefix: str) -> dict:
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        raise DataError(
            f"no prompt manifest at {path} (is {prefix!r} a prefix written by preprocess_mm_data.py --prompts?)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable prompt manifest ({e})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != PROMPT_FORMAT:
        hint = " (packed training shards: give prompt shards from --prompts)" if isinstance(fmt, str) else ""
        raise DataError(f"{path}: format {fmt!r}, expected {PROMPT_FORMAT!r}{hint}")
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not all(isinstance(counts.get(k), int) for k in ("records", "image_bytes")):
        raise DataError(f"{path}: unreadable prompt manifest (no counts.records / counts.image_bytes)")
    return manifest


class PromptShards(Sequence[PromptRecord]):
    """Random access to the records of one prompt set; each record is read and checked when indexed."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.manifest = _read_manifest(self.prefix)
        self._records, self._images = records_path(self.prefix), images_path(self.prefix)
        for p in (self._records, self._images):
            if not os.path.isfile(p):
                raise DataError(f"prompt file missing: {p}")
        with user_path(DataError):  # unreadable (permissions): one line naming the file
            self._offsets = _line_offsets(self._records)
            self._image_size = os.path.getsize(self._images)
        counts = self.manifest["counts"]
        if len(self._offsets) - 1 != counts["records"]:
            raise DataError(
                f"{self._records}: {len(self._offsets) - 1} records, {manifest_path(self.prefix)} says {counts['records']}"
            )
        if self._image_size != counts["image_bytes"]:
            raise DataError(
                f"{self._images}: {self._image_size} bytes, {manifest_path(self.prefix)} says {counts['image_bytes']}"
                " (truncated or replaced); re-run the preprocessing"
            )

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> PromptRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[PromptRecord]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        k = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= k < n:
            raise IndexError(f"prompt {i} out of range [0, {n}) in {self.prefix}")
        a, b = int(self._offsets[k]), int(self._offsets[k + 1])
        with open(self._records, "rb") as f:
            f.seek(a)
            raw = f.read(b - a)
        where = f"{self._records}:{k + 1}"
        line = _parse_line(raw, where)
        return PromptRecord(
            id=line["id"],
            conversations=line["conversations"],
            images=tuple(self._image_bytes(line["images"], where)),
            answer=line["answer"],
            meta=line["meta"],
            tiling=tuple(line["tiling"]) if "tiling" in line else None,
        )

    def verify(self) -> dict[str, str]:
        """Recompute both files' sha256 and compare with the manifest; returns the mismatches (a
        same-size edit, which the size checks at open cannot see). The manifest's names are those the
        set was written under: a renamed prefix is matched by the files' suffixes."""
        files = self.manifest.get("files", {})
        bad = {}
        for path in (self._records, self._images):
            suffix = path[len(self.prefix) :]
            want = next((v for k, v in files.items() if k.endswith(suffix)), None)
            got = _sha256(path)
            if want != got:
                bad[os.path.basename(path)] = f"manifest {want}, file {got}"
        return bad

    def _image_bytes(self, ranges: list, where: str) -> list[bytes]:
        out = []
        with open(self._images, "rb") as f:
            for off, length in ranges:
                if off + length > self._image_size:
                    raise DataError(f"{where}: image bytes [{off}, {off + length}) past the end of {self._images}")
                f.seek(off)
                out.append(f.read(length))
        return out


def _parse_line(raw: bytes, where: str) -> dict:
    """One stored record, every field's type checked (DataError naming file:line)."""
    try:
        line = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a JSON record ({e})") from None
    if not isinstance(line, dict):
        raise DataError(f"{where}: not a JSON object")
    problems = [
        k
        for k, kind in (("id", str), ("answer", str), ("meta", dict), ("conversations", list), ("images", list))
        if not isinstance(line.get(k), kind)
    ]
    convs = line.get("conversations")
    if "conversations" not in problems and not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in convs
    ):
        problems.append("conversations")
    images = line.get("images")
    if "images" not in problems and not all(
        isinstance(r, list) and len(r) == 2 and all(type(x) is int and x >= 0 for x in r) for r in images
    ):
        problems.append("images")
    tiling = line.get("tiling")  # optional: records without it tile with generation's defaults
    if "tiling" in line and not (
        isinstance(tiling, list)
        and len(tiling) == 3
        and all(type(x) is int and x >= 1 for x in tiling[:2])
        and tiling[0] <= tiling[1]
        and type(tiling[2]) is bool
    ):
        problems.append("tiling")
    if problems:
        raise DataError(f"{where}: bad field(s) {', '.join(problems)}; re-run the preprocessing")
    return line


def read_prompt_shards(prefix: str | Path) -> PromptShards:
    """Open the prompt set at `prefix`; a missing, truncated or foreign file is a one-line DataError."""
    return PromptShards(prefix)


# ------------------------------------------------------------------------------------------------
# Preprocessing (tools/preprocess_mm_data.py --prompts): one JSONL / parquet record -> PromptRecord
# ------------------------------------------------------------------------------------------------

PROMPT_REJECT_REASONS = ("missing_answer",)
"""Reasons only --prompts gives (the rest are sources.REJECT_REASONS)."""
# keys of a record that become PromptRecord fields (or bytes) rather than `meta`
_NOT_META = ("conversations", "messages", "images")


def build_prompt_record(
    record: RawRecord, tokenizer: Tokenizer, opts: PreprocessOptions, answer_key: str = "answer"
) -> PromptRecord | Reject:
    """Check and convert one record; never raises for bad input (a Reject names the reason)."""
    try:
        return _build_prompt(record, tokenizer, opts, answer_key)
    except (RejectError, TemplateError) as e:
        return Reject(record.source_file, record.line, e.reason, e.detail)
    except Exception as e:  # an unforeseen input costs this record only, flagged as our bug
        return Reject(record.source_file, record.line, "internal_error", f"{type(e).__name__}: {e}")


def _answer(payload: dict, key: str) -> str:
    value = payload.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RejectError("missing_answer", f"no {key!r} field (the reference answer; --answer-key names the field)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RejectError("bad_record", f"{key!r} is a {type(value).__name__}, expected a string or a number")
    return value if isinstance(value, str) else json.dumps(value)


def _prompt_turns(payload: dict) -> list[dict]:
    """The conversation without its trailing gpt turn (an SFT answer), ending with the user's turn."""
    if payload.get("video") is not None:
        raise RejectError("bad_record", "'video' records are not supported as prompts (images only)")
    convs = copy_conversations(payload)
    if convs[-1].get("from") in GPT_ROLES:
        convs = convs[:-1]  # the reference answer is the answer field; generation drops this turn too
    if not convs or convs[-1].get("from") not in HUMAN_ROLES:
        raise RejectError("bad_record", "the conversation must end with a user turn (the prompt to answer)")
    return convs


def _prompt_images(
    record: RawRecord, convs: list[dict], opts: PreprocessOptions
) -> tuple[list[bytes], list[int], tuple[int, int, bool] | None]:
    """(each image's stored bytes, its <IMG_CONTEXT> count, the tiling used) with the training data's
    tiling rules."""
    sources = image_sources(record) or []
    stored, tokens, used = [], [], None
    if sources:
        multi = isinstance(record.payload.get("image"), list) or "images" in record.payload
        add_image_placeholders(convs, len(sources), multi)
        spec = record.dataset
        max_num = max(1, spec.max_dynamic_patch // len(sources)) if multi else spec.max_dynamic_patch
        used = (spec.min_dynamic_patch, max_num, opts.use_thumbnail)
        for src, what in sources:
            image, data, fmt = read_image(src, what)
            tiling = plan_tiling(*image.size, spec.min_dynamic_patch, max_num, opts.image_size, opts.use_thumbnail)
            stored.append(stored_image_bytes(data, image, fmt))
            tokens.append(tiling.num_tiles * opts.num_image_token)
    if count_image_placeholders(convs) != len(stored):
        raise RejectError(
            "image_count_mismatch", f"{count_image_placeholders(convs)} <image> placeholders for {len(stored)} image(s)"
        )
    return stored, tokens, used


def _build_prompt(record: RawRecord, tokenizer: Tokenizer, opts: PreprocessOptions, answer_key: str) -> PromptRecord:
    payload = record.payload
    answer = _answer(payload, answer_key)
    convs = _prompt_turns(payload)
    if opts.system_prompt is not None and convs[0].get("from") != "system":
        # stored as the record's own system turn: the RL stage renders the stored turns with the
        # template's default otherwise, a prompt other than the one checked here (and trained on in SFT)
        convs = [{"from": "system", "value": opts.system_prompt}, *convs]
    images, image_tokens, tiling = _prompt_images(record, convs, opts)
    # the prompt as generation renders it (an empty answer stands for the response): it must leave
    # room for at least one response token within --seq-length
    tokens, _ = tokenize_conversation(
        convs + [{"from": "gpt", "value": ""}], tokenizer, image_tokens, opts.system_prompt, TEMPLATES[opts.template]
    )
    if len(tokens) >= opts.max_seq_length:
        raise RejectError(
            "too_long",
            f"prompt of {len(tokens)} tokens leaves no room for a response in --seq-length {opts.max_seq_length}",
        )
    meta = {k: v for k, v in payload.items() if k not in (*_NOT_META, answer_key)}
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RejectError("bad_record", f"a field is not JSON ({e})") from None
    given = payload.get("id")
    rid = (
        str(given)
        if isinstance(given, (str, int)) and not isinstance(given, bool)
        else f"{record.dataset.name}:{record.line}"
    )
    return PromptRecord(
        rid + (f"#{record.repeat}" if record.repeat else ""), convs, tuple(images), answer, meta, tiling
    )
