"""InternVL's `internvl2_5` chat template (used by InternVL2.5, InternVL3 and InternVL3.5 dense) and its loss mask.

The rule reproduced here is InternVL's `preprocess_internvl2_5` (internvl_chat/internvl/train/dataset.py):

- A leading `system` turn replaces the template's default system prompt; otherwise the default is used.
- Every turn is rendered and tokenized on its own (never the whole conversation at once):
      system     "<|im_start|>system\\n{prompt}<|im_end|>\\n"
      human      "<|im_start|>user\\n{value}<|im_end|>\\n"
      gpt        "<|im_start|>assistant\\n{value}<|im_end|>\\n"
  and the token lists are concatenated. With a BOS-adding tokenizer (InternLM) the first turn is
  tokenized as BOS-string + turn, so the sequence starts with one BOS.
- In human turns, the i-th `<image>` becomes `<img>` + num_image_token_list[i] x `<IMG_CONTEXT>` + `</img>`
  (in order across turns) before tokenizing.
- Loss: none on system and human turns; on a gpt turn, everything except its first
  len(tokens("<|im_start|>assistant\\n")) tokens and its last token (the trailing "\\n"), i.e. the answer
  and its `<|im_end|>`. The mask is aligned with the tokens (not shifted): InternVL's
  labels != IGNORE_TOKEN_ID exactly where loss_mask == 1.

InternVL3.5's training code (internvl_chat_gpt_oss/internvl/train: `--conv_style internvl2_5` for every
Qwen3 model, so the same template) adds one data rule, `preprocess_pretrain`: a conversation whose
only turn is from "pretrain" is plain text, not a chat. Its `<image>` placeholders are expanded as
above, the text is tokenized as one piece (BOS-string first with a BOS-adding tokenizer), no template
and no end token are added, and every token carries loss except `<img>`, `<IMG_CONTEXT>` and `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TemplateError
from .sample import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from .tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

# InternVL's conversation.py registers 'internvl2_5' with this default system message.
INTERNVL2_5_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
PRETRAIN_ROLE = "pretrain"
PROMPT_ROLES = HUMAN_ROLES + (PRETRAIN_ROLE,)
"""Turns whose `<image>` placeholders become images (a pretrain turn is the whole sample)."""


@dataclass(frozen=True)
class ChatTemplate:
    """Turn formats of a ChatML-style template; `{}` is the turn's text."""

    name: str
    default_system_prompt: str
    system_turn: str
    user_turn: str
    assistant_turn: str
    assistant_prefix: str  # the part of assistant_turn before the answer; it never carries loss


INTERNVL2_5 = ChatTemplate(
    name="internvl2_5",
    default_system_prompt=INTERNVL2_5_SYSTEM_PROMPT,
    system_turn="<|im_start|>system\n{}<|im_end|>\n",
    user_turn="<|im_start|>user\n{}<|im_end|>\n",
    assistant_turn="<|im_start|>assistant\n{}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
)

TEMPLATES = {INTERNVL2_5.name: INTERNVL2_5}


def image_token_string(num_tokens: int) -> str:
    """What one image becomes in the text: <img> + num_tokens x <IMG_CONTEXT> + </img>."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_tokens + IMG_END_TOKEN


def count_image_placeholders(conversations: list[dict]) -> int:
    """Number of `<image>` placeholders that become images (only human and pretrain turns are expanded, as InternVL)."""
    return sum(
        turn["value"].count(IMAGE_PLACEHOLDER)
        for turn in conversations
        if turn.get("from") in PROMPT_ROLES and isinstance(turn.get("value"), str)
    )


def _expand_images(value: str, num_image_token_list: list[int], start: int) -> tuple[str, int]:
    """The i-th `<image>` (counting from `start`) -> its <img> ... </img> block; returns (text, next index)."""
    while IMAGE_PLACEHOLDER in value:
        value = value.replace(IMAGE_PLACEHOLDER, image_token_string(num_image_token_list[start]), 1)
        start += 1
    return value, start


def render_turns(
    conversations: list[dict],
    num_image_token_list: list[int],
    system_prompt: str | None = None,
    template: ChatTemplate = INTERNVL2_5,
) -> list[tuple[str, str]]:
    """The (role, text) turns to tokenize, roles 'system' | 'human' | 'gpt', with images expanded.

    Raises TemplateError with reason 'bad_record', 'empty_conversation', 'no_assistant_turn' or
    'image_count_mismatch'.
    """
    if not isinstance(conversations, list):
        raise TemplateError("bad_record", f"conversations must be a list, got {type(conversations).__name__}")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TemplateError("bad_record", f"turn {i} is not a {{'from', 'value'}} object: {str(turn)[:80]}")
        if not isinstance(turn["value"], str):
            raise TemplateError("bad_record", f"turn {i} value is {type(turn['value']).__name__}, not a string")
        if not isinstance(turn["from"], str):
            raise TemplateError("bad_record", f"turn {i} 'from' is {type(turn['from']).__name__}, not a role name")

    turns = list(conversations)
    if turns and turns[0]["from"] == "system":
        prompt = turns[0]["value"]  # the data's own system prompt wins over any default
        turns = turns[1:]
    else:
        prompt = template.default_system_prompt if system_prompt is None else system_prompt
    if not turns:
        raise TemplateError("empty_conversation", "no user/assistant turns")
    if not any(t["from"] in GPT_ROLES for t in turns):
        raise TemplateError("no_assistant_turn", f"{len(turns)} turn(s), none from the assistant")

    n_placeholders = count_image_placeholders(turns)
    if n_placeholders != len(num_image_token_list):
        raise TemplateError(
            "image_count_mismatch",
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in user turns for {len(num_image_token_list)} image(s)",
        )

    out: list[tuple[str, str]] = [("system", template.system_turn.format(prompt))]
    image_idx = 0
    for i, turn in enumerate(turns):
        role, value = turn["from"], turn["value"]
        if role in HUMAN_ROLES:
            # Expand placeholders one at a time so image k gets its own token count.
            value, image_idx = _expand_images(value, num_image_token_list, image_idx)
            out.append(("human", template.user_turn.format(value)))
        elif role in GPT_ROLES:
            out.append(("gpt", template.assistant_turn.format(value)))
        else:
            where = {"system": "after the first turn", PRETRAIN_ROLE: "in a chat (it must be the only turn)"}
            raise TemplateError("bad_record", f"turn {i}: role {role!r} {where.get(role, '')}".strip())
    return out


def is_pretrain_sample(conversations: object) -> bool:
    """InternVL3.5's rule: the first turn is from "pretrain" (then it must be the only one)."""
    return (
        isinstance(conversations, list)
        and bool(conversations)
        and isinstance(conversations[0], dict)
        and conversations[0].get("from") == PRETRAIN_ROLE
    )


def tokenize_pretrain(
    conversations: list[dict], tokenizer: Tokenizer, num_image_token_list: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (S,) int32 and loss mask (S,) uint8 of a plain-text ("pretrain") sample (module docstring)."""
    if len(conversations) != 1 or not isinstance(conversations[0].get("value"), str):
        raise TemplateError(
            "bad_record",
            f"a {PRETRAIN_ROLE!r} sample is exactly one turn with a string value, got {len(conversations)} turn(s)",
        )
    n_placeholders = count_image_placeholders(conversations)
    if n_placeholders != len(num_image_token_list):
        raise TemplateError(
            "image_count_mismatch",
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the "
            f"pretrain text for {len(num_image_token_list)} image(s)",
        )
    text, _ = _expand_images(conversations[0]["value"], num_image_token_list, 0)
    bos = tokenizer.bos_token if tokenizer.add_bos_token else None
    tokens = np.asarray(tokenizer.encode(bos + text if bos else text), dtype=np.int64)
    image_ids = [
        i
        for i in (tokenizer.token_to_id(t) for t in (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN))
        if i is not None
    ]
    mask = (~np.isin(tokens, image_ids)).astype(np.uint8)
    return tokens.astype(np.int32), mask


def tokenize_conversation(
    conversations: list[dict],
    tokenizer: Tokenizer,
    num_image_token_list: list[int],
    system_prompt: str | None = None,
    template: ChatTemplate = INTERNVL2_5,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (S,) int32 and loss mask (S,) uint8 of an InternVL-format conversation (a "pretrain"
    sample goes through `tokenize_pretrain`).

    `conversations` is `[{"from": "system"|"human"|"gpt", "value": str}, ...]`; `num_image_token_list[i]` is
    the number of `<IMG_CONTEXT>` tokens of the i-th `<image>` (num_image_token * n_tiles). `system_prompt`
    replaces the template default unless the conversation starts with its own system turn.
    """
    if is_pretrain_sample(conversations):
        return tokenize_pretrain(conversations, tokenizer, num_image_token_list)
    turns = render_turns(conversations, num_image_token_list, system_prompt, template)
    prefix_len = len(tokenizer.encode(template.assistant_prefix))
    bos = tokenizer.bos_token if tokenizer.add_bos_token else None

    token_parts: list[list[int]] = []
    mask_parts: list[np.ndarray] = []
    for k, (role, text) in enumerate(turns):
        # InternVL prepends the BOS *string* to the first turn and tokenizes it with the turn.
        ids = tokenizer.encode(bos + text if (k == 0 and bos) else text)
        mask = np.zeros(len(ids), dtype=np.uint8)
        if role == "gpt":
            mask[prefix_len : len(ids) - 1] = 1  # not "<|im_start|>assistant\n", not the final "\n"
        token_parts.append(ids)
        mask_parts.append(mask)

    tokens = np.fromiter((i for part in token_parts for i in part), dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
        raise TemplateError("bad_record", "token id out of int32 range")
    return tokens.astype(np.int32), np.concatenate(mask_parts)
