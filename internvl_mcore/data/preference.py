"""Preference (MPO) data: MMPR records -> chosen/rejected sample pairs, and reading pairs back.

An MMPR line (InternVL's MPO meta files, annotation .jsonl) is

    {"image": str | [str], "question": str, "chosen": str, "rejected": str, "system_prompt"?: str}

(or "video"; no image key = text-only). Each record becomes two conversations that share the prompt,
[user: question, assistant: chosen] and [user: question, assistant: rejected], templated, tokenized and
tiled exactly as SFT samples (loss mask on the assistant response and its <|im_end|>, V2PE positions).

On disk a pair is two consecutive sub-samples of one pack, chosen first. The image tiles are stored once,
with the chosen sample (the rejected one records no images); `expand_pair_tiles` repeats them for the
rejected sequence at load time, as InternVL repeats `pixel_values` for the concatenated batch. A pack
holds whole pairs only, so a pair never straddles packs, and data-parallel ranks read whole packs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .sample import Reject

RESPONSE_KEYS = ("chosen", "rejected")


def split_preference_record(record: Any) -> tuple[Any, Any] | Reject:
    """An MMPR `RawRecord` -> (chosen record, rejected record) in InternVL chat format, or a Reject
    ('missing_response', 'identical_pair', 'bad_record') naming the file and line."""
    p = record.payload

    def reject(reason: str, detail: str) -> Reject:
        return Reject(record.source_file, record.line, reason, detail)

    question = p.get("question")
    if not isinstance(question, str) or not question:
        return reject("bad_record", "'question' must be a non-empty string")
    for key in RESPONSE_KEYS:
        if not isinstance(p.get(key), str) or not p[key].strip():
            return reject("missing_response", f"'{key}' is missing or empty")
    if p["chosen"] == p["rejected"]:
        return reject("identical_pair", "'chosen' and 'rejected' are the same text")
    out = []
    for key in RESPONSE_KEYS:
        payload = {k: v for k, v in p.items() if k not in ("question", "chosen", "rejected", "system_prompt")}
        convs = [{"from": "human", "value": question}, {"from": "gpt", "value": p[key]}]
        if isinstance(p.get("system_prompt"), str) and p["system_prompt"]:
            convs.insert(0, {"from": "system", "value": p["system_prompt"]})
        payload["conversations"] = convs
        out.append(dataclasses.replace(record, payload=payload))
    return out[0], out[1]


def prompt_length(loss_mask: np.ndarray) -> int:
    """Tokens before the first loss token (the prompt of a single-turn sample)."""
    hits = np.flatnonzero(np.asarray(loss_mask) > 0)
    return int(hits[0]) if hits.size else int(len(loss_mask))


def check_same_prompt(
    chosen_tokens: np.ndarray, chosen_mask: np.ndarray, rejected_tokens: np.ndarray, rejected_mask: np.ndarray
) -> str | None:
    """None when both samples have the same prompt tokens, else why not (InternVL asserts this)."""
    n_c, n_r = prompt_length(chosen_mask), prompt_length(rejected_mask)
    if n_c != n_r or not np.array_equal(chosen_tokens[:n_c], rejected_tokens[:n_r]):
        return f"prompt tokens differ: {n_c} before the chosen response, {n_r} before the rejected one"
    if not np.asarray(chosen_mask).any() or not np.asarray(rejected_mask).any():
        return "a response has no loss tokens"
    return None


def expand_pair_tiles(
    tiles: np.ndarray, num_tiles: np.ndarray, images_per_sample: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each pair's stored tiles for its rejected sequence.

    tiles (T, ...) and num_tiles (n_images,) as stored (chosen samples own the images, rejected ones
    none); images_per_sample (2P,). Returns tiles (T', ...) and num_tiles in token order: c0, r0, c1, ..."""
    if images_per_sample.shape[0] % 2:
        raise ValueError(f"preference pack with {images_per_sample.shape[0]} sub-samples (pairs need an even count)")
    out_tiles, out_num = [], []
    tile_off = img_off = 0
    for k in range(0, images_per_sample.shape[0], 2):
        if int(images_per_sample[k + 1]):
            raise ValueError("preference pack: a rejected sub-sample carries its own images")
        m = int(images_per_sample[k])
        nt = num_tiles[img_off : img_off + m]
        t = int(nt.sum())
        out_tiles += [tiles[tile_off : tile_off + t]] * 2
        out_num += [nt, nt]
        tile_off, img_off = tile_off + t, img_off + m
    if not out_tiles:
        return tiles, num_tiles
    return np.concatenate(out_tiles), np.concatenate(out_num).astype(np.int32)


def pair_segments(segments_per_row: list[int], pairs_per_row: list[int]) -> np.ndarray:
    """(P, 2) int64 [chosen, rejected] indices into the batch's segments (rows' sub-samples, then each
    row's padding segment), for rows whose first 2 * pairs sub-samples are pairs."""
    out, offset = [], 0
    for segs, pairs in zip(segments_per_row, pairs_per_row):
        out += [[offset + 2 * i, offset + 2 * i + 1] for i in range(pairs)]
        offset += segs
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)
