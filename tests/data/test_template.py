"""internvl2_5 template: tokens and loss mask against InternVL's preprocess_internvl2_5 rule.

`internvl_reference` re-implements that rule the way InternVL runs it - on transformers' AutoTokenizer
(default add_special_tokens=True, BOS string + first turn, BOS stripped from every turn, labels with -100) -
so our Tokenizer/numpy implementation is checked against an independent path.
"""

import copy

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests import fixtures
from internvl_mcore.data.template import INTERNVL2_5_SYSTEM_PROMPT, image_token_string, tokenize_conversation
from internvl_mcore.errors import TemplateError
from internvl_mcore.data.tokenizer import load_tokenizer

IGNORE = -100


def internvl_reference(conversations, hf, num_image_token_list):
    """InternVL's preprocess_internvl2_5 for one conversation -> (input_ids, labels)."""
    conversations = copy.deepcopy(conversations)
    if conversations[0]["from"] == "system":
        system_prompt = conversations[0]["value"]
        conversations = conversations[1:]
    else:
        system_prompt = INTERNVL2_5_SYSTEM_PROMPT
    k = 0
    for c in conversations:
        if c["from"] == "human":
            for _ in range(c["value"].count("<image>")):
                if k == len(num_image_token_list):
                    break
                c["value"] = c["value"].replace(
                    "<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token_list[k] + "</img>", 1
                )
                k += 1
    assert k == len(num_image_token_list)
    batches = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n"]
    roles = ["system"]
    for c in conversations:
        role = {"human": "user", "gpt": "assistant"}[c["from"]]
        batches.append(f"<|im_start|>{role}\n{c['value']}<|im_end|>\n")
        roles.append(c["from"])
    add_bos = getattr(hf, "add_bos_token", False)
    if add_bos:
        batches[0] = hf.bos_token + batches[0]
    input_ids = [list(hf(b).input_ids) for b in batches]
    if add_bos:
        input_ids = [ids[1:] for ids in input_ids]
    ignore_len = len(hf("<|im_start|>assistant\n").input_ids) - (1 if add_bos else 0)
    ids, labels = [], []
    for role, part in zip(roles, input_ids):
        ids += part
        if role == "gpt":
            lab = list(part)
            lab[:ignore_len] = [IGNORE] * ignore_len
            lab[-1] = IGNORE
            labels += lab
        else:
            labels += [IGNORE] * len(part)
    return np.array(ids), np.array(labels)


def turns(*values, system=None):
    out = [{"from": "system", "value": system}] if system is not None else []
    return out + [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


N_TOK = 6  # IMG_CONTEXT per tile in these tests

CASES = {
    "text": (turns("What is a cat?", "A small animal."), []),
    "text_multi_turn": (turns("Hi", "Hello!", "Count to three.", "1, 2, 3.", "Thanks", "You're welcome."), []),
    "system_override": (turns("Hi", "Hello.", system="You are terse."), []),
    "empty_system": (turns("Hi", "Hello.", system=""), []),
    "ends_on_user": (turns("Q1", "A1", "Q2"), []),
    "empty_answer": (turns("Say nothing", ""), []),
    "answer_starts_with_newline": (turns("Q", "\n\nindented answer\n"), []),
    "cjk_emoji": (turns("这是什么？😺", "一只猫。🐱"), []),
    "single_image": (turns("<image>\nWhat digit?", "Seven."), [N_TOK * 13]),
    "single_image_mid_text": (turns("Look at <image> please", "Done."), [N_TOK * 5]),
    "multi_image": (
        turns("<image>\n<image>\nCompare.", "Same.", "And <image>?", "Different."),
        [N_TOK * 3, N_TOK * 1, N_TOK * 2],
    ),
    "video_frames": (
        turns("Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?", "Motion."),
        [N_TOK] * 3,
    ),
    "image_with_system": (turns("<image>\nDescribe.", "A digit.", system="Be precise."), [N_TOK * 2]),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    qwen = fixtures.make_tokenizer_dir(str(tmp_path_factory.mktemp("qwen")))
    sp = fixtures.make_sentencepiece_dir(str(tmp_path_factory.mktemp("sp")))
    return {
        "qwen2": (load_tokenizer(qwen), AutoTokenizer.from_pretrained(qwen)),
        "internlm_sp": (load_tokenizer(sp), AutoTokenizer.from_pretrained(sp)),
    }


@pytest.mark.parametrize("tok_name", ["qwen2", "internlm_sp"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_internvl_rule(tokenizers, tok_name, case):
    tok, hf = tokenizers[tok_name]
    convs, n_img = CASES[case]
    tokens, mask = tokenize_conversation(copy.deepcopy(convs), tok, n_img)
    ref_ids, ref_labels = internvl_reference(convs, hf, n_img)
    assert tokens.dtype == np.int32 and mask.dtype == np.uint8
    np.testing.assert_array_equal(tokens, ref_ids)
    np.testing.assert_array_equal(mask, (ref_labels != IGNORE).astype(np.uint8))
    # Loss positions carry the token itself as label (aligned, not shifted).
    np.testing.assert_array_equal(ref_labels[mask == 1], tokens[mask == 1])


@pytest.mark.parametrize("tok_name", ["qwen2", "internlm_sp"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_structure(tokenizers, tok_name, case):
    """Loss only on assistant answers + their <|im_end|>; image blocks have the requested sizes."""
    tok, _ = tokenizers[tok_name]
    convs, n_img = CASES[case]
    tokens, mask = tokenize_conversation(copy.deepcopy(convs), tok, n_img)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    header_len = len(tok.encode("<|im_start|>assistant\n"))
    assistant = tok.encode("<|im_start|>assistant")
    starts = list(np.flatnonzero(tokens == im_start))
    allowed = np.zeros(len(tokens), dtype=bool)
    n_gpt = 0
    for s in starts:
        e = s + int(np.flatnonzero(tokens[s:] == im_end)[0])  # this turn's <|im_end|>
        if list(tokens[s : s + len(assistant)]) == assistant:
            allowed[s + header_len : e + 1] = True
            n_gpt += 1
            assert mask[s : s + header_len].sum() == 0  # never on "<|im_start|>assistant\n"
            assert mask[e] == 1  # always on the answer's <|im_end|>
            assert e + 1 < len(tokens) and mask[e + 1] == 0  # never on the trailing "\n"
    assert n_gpt == sum(c["from"] == "gpt" for c in convs)
    assert not (mask.astype(bool) & ~allowed).any()
    # one system turn first, then one block per turn
    assert len(starts) == 1 + sum(c["from"] != "system" for c in convs)
    if tok.add_bos_token:
        assert tokens[0] == tok.bos_token_id and (tokens == tok.bos_token_id).sum() == 1
    # image blocks: <img> + n x <IMG_CONTEXT> + </img>, in order
    ctx, img_s, img_e = (tok.token_to_id(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
    blocks = [int(e - s - 1) for s, e in zip(np.flatnonzero(tokens == img_s), np.flatnonzero(tokens == img_e))]
    assert blocks == n_img
    assert (tokens == ctx).sum() == sum(n_img)
    assert mask[tokens == ctx].sum() == 0


def test_system_prompt_rules(tokenizers):
    tok, _ = tokenizers["qwen2"]
    convs = turns("Hi", "Hello.")
    default = tok.decode(tokenize_conversation(convs, tok, [])[0])
    assert default.startswith(f"<|im_start|>system\n{INTERNVL2_5_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi")
    custom = tok.decode(tokenize_conversation(convs, tok, [], system_prompt="Custom.")[0])
    assert custom.startswith("<|im_start|>system\nCustom.<|im_end|>\n")
    # A system turn in the data wins over both.
    own = tok.decode(tokenize_conversation(turns("Hi", "Hello.", system="Own."), tok, [], system_prompt="Custom.")[0])
    assert own.startswith("<|im_start|>system\nOwn.<|im_end|>\n<|im_start|>user\nHi")
    assert own.count("<|im_start|>system") == 1


def test_image_expansion_text(tokenizers):
    tok, _ = tokenizers["qwen2"]
    tokens, _ = tokenize_conversation(turns("A <image> B <image>", "ok"), tok, [2, 3])
    text = tok.decode(tokens)
    assert f"A {image_token_string(2)} B {image_token_string(3)}<|im_end|>" in text
    assert "<image>" not in text


def test_roles_aliases_and_conversation_not_mutated(tokenizers):
    tok, _ = tokenizers["qwen2"]
    convs = [{"from": "user", "value": "<image>x"}, {"from": "assistant", "value": "y"}]
    before = copy.deepcopy(convs)
    a = tokenize_conversation(convs, tok, [4])
    b = tokenize_conversation([{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}], tok, [4])
    assert convs == before
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "convs,n_img,reason",
    [
        ([], [], "empty_conversation"),
        (turns(system="only a system prompt"), [], "empty_conversation"),
        (turns("question only"), [], "no_assistant_turn"),
        (turns("<image> <image>", "a"), [4], "image_count_mismatch"),
        (turns("no placeholder", "a"), [4], "image_count_mismatch"),
        (turns("q", "<image> in the answer is text"), [4], "image_count_mismatch"),
        (
            [{"from": "human", "value": "q"}, {"from": "system", "value": "late"}, {"from": "gpt", "value": "a"}],
            [],
            "bad_record",
        ),
        ([{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}], [], "bad_record"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], [], "bad_record"),
        ([{"from": "human"}, {"from": "gpt", "value": "a"}], [], "bad_record"),
        ("not a list", [], "bad_record"),
    ],
)
def test_errors_have_reasons(tokenizers, convs, n_img, reason):
    tok, _ = tokenizers["qwen2"]
    with pytest.raises(TemplateError) as e:
        tokenize_conversation(convs, tok, n_img)
    assert e.value.reason == reason


# --- InternVL3.5's "pretrain" samples (internvl_chat_gpt_oss/internvl/train/dataset.py) -----------


def internvl_pretrain_reference(conversations, hf, num_image_token_list):
    """InternVL3.5's preprocess_pretrain for one sample -> (input_ids, labels), on transformers' tokenizer."""
    assert len(conversations) == 1 and conversations[0]["from"] == "pretrain"
    value = conversations[0]["value"]
    for n in num_image_token_list:
        value = value.replace("<image>", "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
    add_bos = getattr(hf, "add_bos_token", False)
    text = hf.bos_token + value if add_bos else value
    ids = list(hf(text).input_ids)
    if add_bos:
        ids = ids[1:]
    ids = np.array(ids)
    image_ids = hf.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    labels = np.where(np.isin(ids, image_ids), IGNORE, ids)
    return ids, labels


PRETRAIN_CASES = {
    "text": ([{"from": "pretrain", "value": "A digit is a symbol. 这是数字 7。"}], []),
    "interleaved": ([{"from": "pretrain", "value": "<image>\nA seven. Then <image> a two."}], [N_TOK * 2, N_TOK]),
}


@pytest.mark.parametrize("tok_name", ["qwen2", "internlm_sp"])
@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_pretrain_samples_match_internvl3_5_rule(tokenizers, tok_name, case):
    tok, hf = tokenizers[tok_name]
    convs, n_img = PRETRAIN_CASES[case]
    tokens, mask = tokenize_conversation(copy.deepcopy(convs), tok, n_img)
    ref_ids, ref_labels = internvl_pretrain_reference(convs, hf, n_img)
    np.testing.assert_array_equal(tokens, ref_ids)
    np.testing.assert_array_equal(mask, (ref_labels != IGNORE).astype(np.uint8))
    assert "<|im_start|>" not in hf.decode(tokens.tolist())  # no chat template around plain text
    assert mask.sum() == len(tokens) - sum(n + 2 for n in n_img)  # only image blocks carry no loss


@pytest.mark.parametrize(
    "convs,n_img,reason",
    [
        ([{"from": "pretrain", "value": "a"}, {"from": "gpt", "value": "b"}], [], "bad_record"),
        (
            [{"from": "human", "value": "a"}, {"from": "pretrain", "value": "b"}, {"from": "gpt", "value": "c"}],
            [],
            "bad_record",
        ),
        ([{"from": "pretrain", "value": "no image here"}], [N_TOK], "image_count_mismatch"),
    ],
)
def test_pretrain_samples_are_single_turn(tokenizers, convs, n_img, reason):
    tok, _ = tokenizers["qwen2"]
    with pytest.raises(TemplateError) as err:
        tokenize_conversation(convs, tok, n_img)
    assert err.value.reason == reason
