"""From a user's files to `TokenizedSample`s: InternVL meta JSON, JSONL / parquet records, images, videos.

    read_meta(meta.json)            -> [DatasetSpec]            (InternVL's meta format)
    iter_records(spec, seed)        -> RawRecord | Reject ...   (one per selected line/row, repeat_time applied)
    build_sample(record, tok, opts) -> TokenizedSample | Reject (pure; safe in worker processes)

`build_sample` follows InternVL's LazySupervisedDataset (internvl_chat_finetune.py): which record is text,
single-image, multi-image or video; where a missing `<image>` / `<video>` placeholder is added; each
image's tile limit; video frames as `Frame-i: <image>` lines with one tile per frame. Deviations (all in
the direction of rejecting instead of silently training on a broken sample) are listed in the docstrings.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from ..cli_errors import user_path
from ..errors import DataError
from .image import (
    ImageTiling,
    VideoDecoderMissing,
    cut_tiles,
    frame_to_tile,
    lossless_bytes,
    load_video_frames,
    plan_tiling,
    sample_frame_files,
    stored_image_bytes,
)
from .sample import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Reject, StoredImage, TokenizedSample
from .template import (
    IMAGE_PLACEHOLDER,
    PROMPT_ROLES,
    TEMPLATES,
    VIDEO_PLACEHOLDER,
    TemplateError,
    count_image_placeholders,
    tokenize_conversation,
)
from .tokenizer import Tokenizer

REJECT_REASONS = (
    "missing_image",
    "corrupt_image",
    "image_count_mismatch",
    "empty_conversation",
    "no_assistant_turn",
    "too_long",
    "bad_json",
    "undecodable_text",
    "video_decoder_missing",
    "bad_record",
    "outside_root",
)


# --------------------------------------------------------------------------------------------------
# Meta file
# --------------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """One entry of InternVL's meta JSON (`{name: {root, annotation, ...}}`)."""

    name: str
    root: str
    """Folder that image/video paths in the annotation are relative to."""
    annotation: str
    """JSONL file (InternVL chat format) or parquet file (HF-datasets `messages` + `images`)."""
    data_augment: bool = False
    """InternVL's is_train: random JPEG re-compression of tiles at load time."""
    max_dynamic_patch: int = 12
    repeat_time: float = 1.0
    """< 1: seeded subsample of int(n * repeat_time) records; >= 1: int(repeat_time) passes (as InternVL)."""
    length: int | None = None
    """Informational record count from the meta file (InternVL uses it for weighting)."""
    min_dynamic_patch: int = 1
    allow_outside_root: bool = False
    """The meta file's explicit permission for image / video paths that resolve (symlinks followed)
    outside `root`; without it such a record is rejected as 'outside_root' and the file is not opened."""

    @property
    def format(self) -> str:
        """'parquet' or 'jsonl', from the annotation's extension."""
        return "parquet" if self.annotation.lower().endswith(".parquet") else "jsonl"

    @property
    def expected_records(self) -> int:
        """How many items `iter_records` yields (counts the file; meant for progress bars)."""
        n = (
            _count_parquet_rows(self.annotation)
            if self.format == "parquet"
            else len(_jsonl_line_numbers(self.annotation))
        )
        return len(_selected_indices(n, self.repeat_time, 0, self.name)) * _passes(self.repeat_time)


def _resolve(path: str, meta_dir: str) -> str:
    """As InternVL: relative to the working directory; failing that, relative to the meta file's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    alt = os.path.join(meta_dir, path)
    return os.path.abspath(alt) if os.path.exists(alt) else os.path.abspath(path)


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise DataError(f"{where}: key {key!r} must be true or false, got {value!r}")
    return value


def read_meta(path: str) -> list[DatasetSpec]:
    """Parse an InternVL meta JSON; errors name the file and the offending key."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"meta file {path} does not exist") from e
    except IsADirectoryError:
        raise DataError(f"meta file {path} is a directory, not a JSON file") from None
    except OSError as e:  # unreadable (permissions): the line a user error has always had
        raise DataError(f"{e.strerror}: {path}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"meta file {path}: not UTF-8 text at byte {e.start} (is it a meta JSON file?)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from e
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"{path}: expected a non-empty JSON object {{dataset_name: {{root, annotation, ...}}}}")
    meta_dir = os.path.dirname(os.path.abspath(path))
    specs = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        for key in ("annotation",):
            if key not in entry:
                raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(entry["annotation"], str):
            raise DataError(f"{where}: key 'annotation' must be a path string")
        root = entry.get("root", "")
        if not isinstance(root, str):
            raise DataError(f"{where}: key 'root' must be a path string")

        def num(key: str, default, kind=float, minimum=0):
            value = entry.get(key, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
                raise DataError(f"{where}: key {key!r} must be a number >= {minimum}, got {value!r}")
            if kind is int and value != int(value):
                raise DataError(f"{where}: key {key!r} must be an integer, got {value!r}")
            return kind(value)

        spec = DatasetSpec(
            name=str(name),
            root=_resolve(root, meta_dir) if root else "",
            annotation=_resolve(entry["annotation"], meta_dir),
            data_augment=bool(entry.get("data_augment", False)),
            max_dynamic_patch=num("max_dynamic_patch", 12, int, 1),
            repeat_time=num("repeat_time", 1.0, float, 0),
            length=num("length", None, int, 0) if entry.get("length") is not None else None,
            min_dynamic_patch=num("min_dynamic_patch", 1, int, 1),
            allow_outside_root=_flag(entry, "allow_outside_root", where),
        )
        _check_annotation(spec, entry["annotation"], where)
        if spec.repeat_time == 0:
            raise DataError(f"{where}: key 'repeat_time' is 0 (the dataset would be empty)")
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass
class RawRecord:
    """One annotation line / parquet row, not yet decoded into a sample."""

    dataset: DatasetSpec
    source_file: str
    line: int
    """1-based line of a JSONL file, or row index + 1 of a parquet file."""
    payload: dict
    """The parsed JSON object, or the parquet row as a dict (image bytes included)."""
    repeat: int = 0
    """Which pass over the file (repeat_time > 1); seeds per-record randomness together with `line`."""


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _passes(repeat_time: float) -> int:
    return max(1, int(repeat_time))


def _selected_indices(n: int, repeat_time: float, seed: int, name: str) -> np.ndarray:
    """Record indices kept in each pass. InternVL keeps the first int(n * r) lines for r < 1; we keep the
    same number but draw them with a seeded RNG (in file order), so a sorted file is not cut to a prefix."""
    if repeat_time >= 1:
        return np.arange(n)
    k = int(n * repeat_time)
    rng = np.random.default_rng([seed, _stable_hash(name), 0x5EED])
    return np.sort(rng.choice(n, size=k, replace=False))


# A line is blank (not a record) when it is at most this long and only whitespace; longer lines are
# read in pieces of this size and never held whole when they exceed the line limit.
_PROBE = 1 << 16


def _jsonl_lines(f, limit: int | None = None) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based line number, the line's bytes, its length) of each non-blank line of a binary file; the
    bytes are None for a line longer than `limit` bytes, which is skipped in pieces, never read whole."""
    cap = max(limit, _PROBE) if limit is not None else None
    lineno = 0
    while True:
        head = f.readline(cap + 1) if cap is not None else f.readline()
        if not head:
            return
        lineno += 1
        size = len(head)
        if cap is not None and size > cap and not head.endswith(b"\n"):  # longer than the cap: skip the rest
            while not head.endswith(b"\n") and (head := f.readline(_PROBE)):
                size += len(head)
            yield lineno, None, len(head.rstrip(b"\r\n")) - len(head) + size
            continue
        if size <= _PROBE + 1 and not head.strip():
            continue
        body = len(head.rstrip(b"\r\n"))
        yield lineno, (head if limit is None or body <= limit else None), body


def _jsonl_line_numbers(path: str) -> list[int]:
    """1-based numbers of the non-blank lines (blank lines are not records)."""
    with open(path, "rb") as f:
        return [lineno for lineno, _, _ in _jsonl_lines(f, 0)]


def _check_annotation(spec: DatasetSpec, given: str, where: str) -> None:
    """The annotation is a file (not a folder, not missing) and, for JSONL, not one JSON array."""
    if os.path.isdir(spec.annotation):
        raise DataError(f"{where}: key 'annotation': {given!r} is a directory, not a .jsonl / .parquet file")
    if not os.path.isfile(spec.annotation):
        raise DataError(f"{where}: key 'annotation': file {given!r} not found")
    with user_path(DataError):  # an annotation that cannot be read (permissions)
        if spec.format == "jsonl":
            _check_jsonl_shape(spec.annotation)
        # as repeat_time 0: a dataset that can give no sample is a mistake in the meta file, not a quiet no-op
        has_records = _count_parquet_rows(spec.annotation) if spec.format == "parquet" else _has_record(spec.annotation)
    if not has_records:
        raise DataError(
            f"{where}: key 'annotation': {given!r} has no records (an empty file); fill it or "
            "remove the dataset from the meta file"
        )


def _has_record(path: str) -> bool:
    with open(path, "rb") as f:
        return next(_jsonl_lines(f, 0), None) is not None


def _check_jsonl_shape(path: str) -> None:
    """Refuse a JSON array file (LLaVA's `[{...}, {...}]`) given as a JSONL annotation: read as JSONL,
    every line would be rejected one by one. A one-line array of non-objects stays a record (rejected)."""
    with open(path, "rb") as f:
        lineno, raw, _ = next(_jsonl_lines(f, 16 * _PROBE), (0, None, 0))
    if raw is None:  # empty, or a first line too long to be worth parsing here (it is a too_long record)
        return
    first = raw.lstrip(b"\xef\xbb\xbf").strip()
    if not first.startswith(b"["):
        return
    try:
        value = json.loads(first)
    except (ValueError, UnicodeDecodeError):  # '[' opening a multi-line document
        value = [{}]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        raise DataError(f"{path}:{lineno}: a JSON array, not JSON Lines (one record object per line)")


def _count_parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow's ArrowInvalid / OSError name no file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _iter_jsonl(
    spec: DatasetSpec, wanted: set[int], repeat: int, max_line_bytes: int | None = None
) -> Iterator[RawRecord | Reject]:
    path = spec.annotation
    index = -1
    with open(path, "rb") as f:
        for lineno, raw, size in _jsonl_lines(f, max_line_bytes):
            index += 1
            if index not in wanted:
                continue
            if raw is None:  # rejected unparsed: no record of that size can fit (docs/data.md)
                yield Reject(
                    path,
                    lineno,
                    "too_long",
                    f"line of {size} bytes > {max_line_bytes} bytes, the most "
                    "a record within the sequence length can take; not parsed",
                )
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Reject(path, lineno, "undecodable_text", f"not UTF-8 at byte {e.start}")
                continue
            try:
                payload = json.loads(text)
            except json.JSONDecodeError as e:
                yield Reject(path, lineno, "bad_json", f"{e.msg} at column {e.colno}")
                continue
            except RecursionError:
                yield Reject(path, lineno, "bad_json", "nested too deeply")
                continue
            if not isinstance(payload, dict):
                yield Reject(path, lineno, "bad_record", f"line is a JSON {type(payload).__name__}, not an object")
                continue
            yield RawRecord(spec, path, lineno, payload, repeat)


def _iter_parquet(
    spec: DatasetSpec, wanted: set[int], repeat: int, max_line_bytes: int | None = None
) -> Iterator[RawRecord | Reject]:
    import pyarrow.parquet as pq

    path = spec.annotation
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet file ({e})") from e
    index = 0
    for batch in pf.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            if index in wanted:
                yield RawRecord(spec, path, index + 1, row, repeat)
            index += 1


def iter_records(spec: DatasetSpec, seed: int, max_line_bytes: int | None = None) -> Iterator[RawRecord | Reject]:
    """Records of one dataset in file order, with `repeat_time` applied deterministically from `seed`.

    JSONL: one record per non-blank line; a line that is not UTF-8, not JSON or not a JSON object becomes a
    Reject ('undecodable_text', 'bad_json', 'bad_record') with its line number. Parquet: one record per row.
    repeat_time r < 1 keeps a seeded subset of int(n * r) records; r >= 1 yields int(r) passes over the
    file (InternVL's rule: the fraction of r > 1 is dropped). A JSONL line longer than `max_line_bytes`
    is a 'too_long' Reject without being parsed (or held in memory whole).
    """
    n = _count_parquet_rows(spec.annotation) if spec.format == "parquet" else len(_jsonl_line_numbers(spec.annotation))
    wanted = set(_selected_indices(n, spec.repeat_time, seed, spec.name).tolist())
    reader = _iter_parquet if spec.format == "parquet" else _iter_jsonl
    for repeat in range(_passes(spec.repeat_time)):
        yield from reader(spec, wanted, repeat, max_line_bytes)


# --------------------------------------------------------------------------------------------------
# role/content messages (HF / TRL style) -> InternVL conversations
# --------------------------------------------------------------------------------------------------

_ROLE_MAP = {"system": "system", "user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


def messages_to_conversations(messages: list[dict]) -> list[dict]:
    """`[{"role", "content"}]` -> InternVL `[{"from", "value"}]`.

    `content` is a string or a list of parts `{"type": "text", "text": ...}` / `{"type": "image"}` /
    `{"type": "video"}`. An image part becomes "<image>\\n" (InternVL's own convention for a placeholder
    before the question), a video part "<video>\\n", text parts are appended as they are.
    """
    if not isinstance(messages, list):
        raise TemplateError("bad_record", f"messages must be a list, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise TemplateError("bad_record", f"message {i} has no 'role'")
        role = _ROLE_MAP.get(msg["role"]) if isinstance(msg["role"], str) else None
        if role is None:
            raise TemplateError("bad_record", f"message {i}: unknown role {msg['role']!r}")
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            value = content
        elif isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(part.get("text") or "")
                elif kind == "image":
                    pieces.append(IMAGE_PLACEHOLDER + "\n")
                elif kind == "video":
                    pieces.append(VIDEO_PLACEHOLDER + "\n")
                else:
                    raise TemplateError("bad_record", f"message {i}: content part {str(part)[:60]} has unknown type")
            value = "".join(pieces)
        else:
            raise TemplateError("bad_record", f"message {i}: content is {type(content).__name__}")
        out.append({"from": role, "value": value})
    return out


# --------------------------------------------------------------------------------------------------
# Building a sample
# --------------------------------------------------------------------------------------------------


@dataclass
class PreprocessOptions:
    """What shapes samples beyond the dataset spec (from the CLI / model config)."""

    image_size: int = 448
    num_image_token: int = 256
    """<IMG_CONTEXT> tokens per tile: (image_size / patch)^2 * downsample_ratio^2, computed by the caller."""
    use_thumbnail: bool = True
    min_num_frames: int = 8
    max_num_frames: int = 32
    system_prompt: str | None = None
    """None: the template's default; a leading system turn in the data always wins."""
    seed: int = 0
    max_seq_length: int = 16384
    truncate: bool = False
    frame_sampling: str = "rand"
    """InternVL's video sampling_method: 'rand' (training default) or 'middle'."""
    template: str = "internvl2_5"
    """Chat template (data/template.py TEMPLATES), the model config's `template`."""
    source_images: bool = False
    """Keep each image's encoded bytes and tile grid (`TokenizedSample.images`, the "source" tile format)
    instead of cutting its tiles (`TokenizedSample.tiles` is then empty)."""


class RejectError(Exception):
    """A record that cannot become a sample: its `reason` (REJECT_REASONS) and a detail naming what."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def record_rng(opts: PreprocessOptions, record: RawRecord) -> np.random.Generator:
    """Per-record generator keyed by (seed, dataset, line, repeat): independent of which worker runs it."""
    return np.random.default_rng([opts.seed, _stable_hash(record.dataset.name), record.line, record.repeat])


def read_image(source: str | bytes, what: str) -> tuple[Image.Image, bytes, str | None]:
    """(RGB image, encoded bytes, Pillow format) from a path or bytes; RejectError('missing_image' |
    'corrupt_image'). The image is decoded from the same bytes the "source" tile format stores."""
    if isinstance(source, str) and os.path.isdir(source):
        raise RejectError("missing_image", f"{what} is a directory, not an image file: {source}")
    if isinstance(source, str) and not os.path.isfile(source):
        raise RejectError("missing_image", f"{what} not found: {source}")
    try:
        if isinstance(source, str):
            with open(source, "rb") as f:
                source = f.read()
        with Image.open(io.BytesIO(source)) as im:
            im.load()  # decode now so truncated/corrupt files fail here, not later
            return im.convert("RGB"), source, im.format
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError...
        raise RejectError("corrupt_image", f"{what}: {type(e).__name__}: {e}") from e


def image_sources(record: RawRecord) -> list[tuple[str | bytes, str]] | None:
    """(path-or-bytes, description) of each image of the record, None if it has no image field."""
    payload = record.payload
    if "images" in payload and payload["images"] is not None and "image" not in payload:
        images = payload["images"]  # HF datasets: list of bytes or {"bytes", "path"} structs
        if not isinstance(images, list):
            raise RejectError("bad_record", f"'images' is {type(images).__name__}, not a list")
        out = []
        for k, item in enumerate(images):
            if isinstance(item, dict):
                data, rel = item.get("bytes"), item.get("path")
            elif isinstance(item, str):  # a list of paths under an "images" key
                data, rel = None, item
            else:
                data, rel = item, None
            if isinstance(data, (bytes, bytearray)):
                out.append((bytes(data), f"image {k} (bytes)"))
            elif isinstance(rel, str) and rel:
                out.append((media_path(record.dataset, rel, f"image {k}"), f"image {k}"))
            else:
                raise RejectError("bad_record", f"image {k} has neither bytes nor a path")
        return out or None
    image = payload.get("image")
    if image is None or (isinstance(image, (str, list)) and len(image) == 0):
        return None
    paths = image if isinstance(image, list) else [image]
    if not all(isinstance(p, str) and p for p in paths):
        raise RejectError("bad_record", f"'image' must be a path or a list of paths, got {str(image)[:80]}")
    return [(media_path(record.dataset, p, f"image {p!r}"), f"image {p!r}") for p in paths]


def media_path(spec: DatasetSpec, rel: str, what: str) -> str:
    """The one resolution of an image / video / frame path: joined to the dataset's root (the working
    directory when the meta file gives none, as InternVL's os.path.join), and refused as 'outside_root'
    when it resolves, symlinks followed, outside that root ('../', an absolute path, a link out) unless
    the meta file sets "allow_outside_root": true for the dataset. Nothing outside is opened or stat'ed
    beyond the resolution itself."""
    root = spec.root or os.getcwd()
    path = os.path.join(root, rel)
    if spec.allow_outside_root:
        return path
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise RejectError(
            "outside_root",
            f"{what} resolves to {real}, outside the dataset root {real_root} "
            f"(dataset {spec.name!r}: set \"allow_outside_root\": true in the meta file to allow it)",
        )
    return path


def _first_turn_index(conversations: list[dict], roles=PROMPT_ROLES) -> int:
    for i, turn in enumerate(conversations):
        if turn.get("from") in roles:
            return i
    raise RejectError("image_count_mismatch", "images given but there is no user turn to put them in")


def copy_conversations(payload: dict) -> list[dict]:
    if "conversations" in payload:
        convs = payload["conversations"]
    elif "messages" in payload:
        convs = messages_to_conversations(payload["messages"])
    else:
        hint = (
            "; it has 'chosen' and 'rejected': a preference (MMPR) record, preprocess it with --preference"
            if "chosen" in payload and "rejected" in payload
            else ""
        )
        raise RejectError("bad_record", "record has neither 'conversations' nor 'messages'" + hint)
    if not isinstance(convs, list):
        raise RejectError("bad_record", f"'conversations' is {type(convs).__name__}, not a list")
    if not convs:
        raise RejectError("empty_conversation", "'conversations' is empty")
    for i, t in enumerate(convs):  # placeholders are counted / inserted before templating: check shape now
        if not isinstance(t, dict):
            raise RejectError("bad_record", f"turn {i} is not a {{'from', 'value'}} object: {str(t)[:80]}")
    # Copies: the payload is shared between repeats and must stay untouched.
    return [dict(t) for t in convs]


def add_image_placeholders(convs: list[dict], n_images: int, multi: bool) -> None:
    """InternVL prepends '<image>\\n' (x n for a list of images) to the first user turn when the record has
    no placeholder. Differences: InternVL looks only at conversations[0] (so a record starting with a system
    turn gets the placeholder in the system prompt and then fails); we use the first user turn, and only
    when no user turn has a placeholder."""
    if count_image_placeholders(convs) > 0:
        return
    i = _first_turn_index(convs)
    if isinstance(convs[i].get("value"), str):
        convs[i]["value"] = (IMAGE_PLACEHOLDER + "\n") * (n_images if multi else 1) + convs[i]["value"]


def _expand_video(convs: list[dict], n_frames: int) -> None:
    """'<video>' -> 'Frame-1: <image>\\nFrame-2: <image>...' (prepended to the first user turn if absent)."""
    holders = [
        i
        for i, t in enumerate(convs)
        if t.get("from") in PROMPT_ROLES and isinstance(t.get("value"), str) and VIDEO_PLACEHOLDER in t["value"]
    ]
    total = sum(convs[i]["value"].count(VIDEO_PLACEHOLDER) for i in holders)
    if total > 1:
        raise RejectError("image_count_mismatch", f"{total} {VIDEO_PLACEHOLDER} placeholders for one video")
    if not holders:
        i = _first_turn_index(convs)
        if not isinstance(convs[i].get("value"), str):
            return
        convs[i]["value"] = VIDEO_PLACEHOLDER + "\n" + convs[i]["value"]
        holders = [i]
    frames = "\n".join(f"Frame-{k + 1}: {IMAGE_PLACEHOLDER}" for k in range(n_frames))
    value = convs[holders[0]]["value"]
    if VIDEO_PLACEHOLDER + "\n" in value:
        value = value.replace(VIDEO_PLACEHOLDER + "\n", frames + "\n", 1)
    else:
        value = value.replace(VIDEO_PLACEHOLDER, frames, 1)
    convs[holders[0]]["value"] = value


def _truncate(tokens, loss_mask, num_tiles, limit, img_start, img_end):
    """Cut to `limit` tokens without splitting an image block: a cut inside <img>...</img> moves to the
    block's start, and images past the cut are dropped with their tiles."""
    starts = np.flatnonzero(tokens == img_start)
    ends = np.flatnonzero(tokens == img_end)
    cut = limit
    kept = 0
    for s, e in zip(starts, ends):
        if e < cut:
            kept += 1
        else:
            cut = min(cut, int(s))
            break
    return tokens[:cut], loss_mask[:cut], kept


class _Visuals:
    """The images of one sample as they are loaded: tiles (cut now) or stored images (cut at load time)."""

    def __init__(self, opts: PreprocessOptions):
        self.opts = opts
        self.tile_arrays: list[np.ndarray] = []
        self.num_tiles: list[int] = []
        self.images: list[StoredImage] = []

    def add(self, image: Image.Image, tiling: ImageTiling, stored: Callable[[], bytes]) -> None:
        """One image cut by `tiling`; `stored()` gives its bytes for the source format (called lazily)."""
        if self.opts.source_images:
            self.images.append(StoredImage(stored(), tiling))
        else:
            self.tile_arrays.append(cut_tiles(image, tiling, self.opts.image_size))
        self.num_tiles.append(tiling.num_tiles)

    def tiles(self) -> np.ndarray:
        """(T, S, S, 3) uint8; empty when nothing was cut."""
        size = self.opts.image_size
        return np.concatenate(self.tile_arrays) if self.tile_arrays else np.zeros((0, size, size, 3), np.uint8)


def _add_images(record: RawRecord, convs: list[dict], sources: list, visuals: _Visuals) -> None:
    """InternVL's image branch: placeholders, the per-image tile cap of a list, dynamic tiling."""
    spec, opts = record.dataset, visuals.opts
    multi = isinstance(record.payload.get("image"), list) or "images" in record.payload
    add_image_placeholders(convs, len(sources), multi)
    max_num = max(1, spec.max_dynamic_patch // len(sources)) if multi else spec.max_dynamic_patch
    for src, what in sources:
        image, data, fmt = read_image(src, what)
        tiling = plan_tiling(*image.size, spec.min_dynamic_patch, max_num, opts.image_size, opts.use_thumbnail)
        visuals.add(image, tiling, lambda: stored_image_bytes(data, image, fmt))


def _video_frames(record: RawRecord, path: str, visuals: _Visuals) -> None:
    """Sampled frames of a video, one tile each (InternVL's transform: a bicubic resize to the tile size).
    Frames of a folder keep their file bytes; frames of a GIF / video file are stored as their tile."""
    opts, one = visuals.opts, ImageTiling(1, 1, False)
    rng = record_rng(opts, record)
    if path.endswith("/") or os.path.isdir(path):
        for file in sample_frame_files(path, opts.min_num_frames, opts.max_num_frames, rng, opts.frame_sampling):
            what = f"frame {os.path.basename(file)!r}"
            image, data, fmt = read_image(media_path(record.dataset, file, what), what)
            visuals.add(image, one, lambda: stored_image_bytes(data, image, fmt))
        return
    for frame in load_video_frames(path, opts.min_num_frames, opts.max_num_frames, rng, opts.frame_sampling):
        tile = frame_to_tile(frame, opts.image_size)
        visuals.add(tile, one, lambda: lossless_bytes(tile))


def _add_video(record: RawRecord, convs: list[dict], video: str, visuals: _Visuals) -> None:
    path = media_path(record.dataset, video, f"video {video!r}")
    if not os.path.exists(path.rstrip("/") or path):
        raise RejectError("missing_image", f"video not found: {path}")
    try:
        _video_frames(record, path, visuals)
    except RejectError:
        raise
    except VideoDecoderMissing as e:
        raise RejectError("video_decoder_missing", str(e)) from e
    except FileNotFoundError as e:
        raise RejectError("missing_image", str(e)) from e
    except Exception as e:
        raise RejectError("corrupt_image", f"video {path}: {type(e).__name__}: {e}") from e
    _expand_video(convs, len(visuals.num_tiles))


def _check_context_tokens(
    tokens: np.ndarray, tokenizer: Tokenizer, opts: PreprocessOptions, num_tiles: list[int]
) -> None:
    if not num_tiles:
        return
    n_context = int(np.count_nonzero(tokens == tokenizer.token_to_id(IMG_CONTEXT_TOKEN)))
    if n_context != opts.num_image_token * sum(num_tiles):
        raise RejectError(
            "bad_record",
            f"{n_context} {IMG_CONTEXT_TOKEN} tokens for {sum(num_tiles)} tiles: the tokenizer does not "
            f"keep {IMG_CONTEXT_TOKEN} as one token",
        )


def _fit_length(tokens, loss_mask, visuals: _Visuals, tokenizer: Tokenizer, opts: PreprocessOptions):
    """Reject an over-long sample, or (--truncate) cut it and drop the images past the cut."""
    if len(tokens) <= opts.max_seq_length:
        return tokens, loss_mask, visuals.num_tiles, visuals.tiles(), visuals.images
    if not opts.truncate:
        raise RejectError("too_long", f"{len(tokens)} tokens > max_seq_length {opts.max_seq_length}")
    has_images = bool(visuals.num_tiles)
    tokens, loss_mask, kept = _truncate(
        tokens,
        loss_mask,
        visuals.num_tiles,
        opts.max_seq_length,
        tokenizer.token_to_id(IMG_START_TOKEN) if has_images else -1,
        tokenizer.token_to_id(IMG_END_TOKEN) if has_images else -1,
    )
    num_tiles = visuals.num_tiles[:kept]
    if not loss_mask.any():
        raise RejectError("too_long", f"no loss tokens left after truncating to {opts.max_seq_length}")
    return tokens, loss_mask, num_tiles, visuals.tiles()[: sum(num_tiles)], visuals.images[:kept]


def _build(record: RawRecord, tokenizer: Tokenizer, opts: PreprocessOptions) -> TokenizedSample:
    spec = record.dataset
    convs = copy_conversations(record.payload)
    sources = image_sources(record)
    video = record.payload.get("video")
    visuals = _Visuals(opts)
    if sources is not None:
        _add_images(record, convs, sources, visuals)
    elif isinstance(video, str) and video:
        _add_video(record, convs, video, visuals)
    elif video is not None and not isinstance(video, str):
        raise RejectError("bad_record", f"'video' must be a path, got {type(video).__name__}")
    tokens, loss_mask = tokenize_conversation(
        convs,
        tokenizer,
        [opts.num_image_token * t for t in visuals.num_tiles],
        system_prompt=opts.system_prompt,
        template=TEMPLATES[opts.template],
    )
    _check_context_tokens(tokens, tokenizer, opts, visuals.num_tiles)
    tokens, loss_mask, num_tiles, tiles, images = _fit_length(tokens, loss_mask, visuals, tokenizer, opts)
    return TokenizedSample(
        tokens=np.ascontiguousarray(tokens, dtype=np.int32),
        loss_mask=np.ascontiguousarray(loss_mask, dtype=np.uint8),
        tiles=tiles,
        num_tiles=[int(t) for t in num_tiles],
        dataset=spec.name,
        line=record.line,
        source_file=record.source_file,
        data_augment=spec.data_augment,
        images=list(images),
    )


def build_sample(record: RawRecord, tokenizer: Tokenizer, opts: PreprocessOptions) -> TokenizedSample | Reject:
    """Decode, tile, template and tokenize one record. Pure and deterministic; never raises for bad input.

    Kinds (as InternVL's __getitem__): a non-empty `image` (str: single image, list: multi-image) or
    `images` (parquet bytes); else a non-empty `video`; else text. Each image of a list gets at most
    max(1, max_dynamic_patch // n_images) tiles; video frames get one tile each. With
    `opts.source_images` the images are kept encoded with their grid instead of being cut.

    Stricter than InternVL (which trains on such records with literal placeholder text or crashes and
    retries another record): `<image>` placeholders in user turns must match the images exactly
    ('image_count_mismatch', also for text-only records), and truncated/corrupt image files are rejected
    ('corrupt_image') rather than loaded partially.
    """
    try:
        return _build(record, tokenizer, opts)
    except (RejectError, TemplateError) as e:
        return Reject(record.source_file, record.line, e.reason, e.detail)
    except KeyError as e:  # e.g. the tokenizer lacks <img>
        return Reject(record.source_file, record.line, "bad_record", f"KeyError: {e}")
    except Exception as e:  # anything unforeseen costs this record only, and is flagged as our bug
        return Reject(record.source_file, record.line, "internal_error", f"{type(e).__name__}: {e}")
