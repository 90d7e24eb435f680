"""tools/generate.py: greedy answers equal transformers' generate() token for token (debug-size
model, images and text, a batch of different prompt lengths), the same tokens at TP2 and PP2, and
one-line user errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.convert.tiny_hf import save_transformers_dir, tiny_transformers_model
from tests.fixtures import write_image
from tests.worldpool import run_in_world

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "generate.py"
NEW_TOKENS = 6
REQUESTS = [
    {
        "image": "wide.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat digit is this?"},
            {"from": "gpt", "value": "a reference answer, ignored"},
        ],
    },
    {"conversations": [{"from": "human", "value": "Say hello"}]},
    {
        "image": ["wide.png", "square.png"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nWhich digit is larger, and why?"},
        ],
    },
    {"image": "square.png", "conversations": [{"from": "human", "value": "Describe it."}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from internvl_mcore.convert.hf import convert_hf_to_checkpoint
    from internvl_mcore.data.synthetic import tiny_corpus, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("generate")
    model = tiny_transformers_model("qwen2", "300m", tie=False, seed=5)
    save_transformers_dir(model, root / "hf")
    train_tiny_tokenizer(tiny_corpus(200, 0), str(root / "tok"), vocab_size=500)
    write_image(str(root / "wide.png"), (120, 60), seed=1)  # 2 x 1 tiles + thumbnail
    write_image(str(root / "square.png"), (50, 50), seed=2)  # one tile
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    convert_hf_to_checkpoint(root / "hf", root / "ckpt")  # a converted checkpoint: the PP2 run loads it
    return {"root": root, "model": model}


def _args(root: Path, out: str, *layout: str, load: str = "hf") -> list[str]:
    return [
        *("--load", str(root / load), "--tokenizer", str(root / "tok"), "--input", str(root / "in.jsonl")),
        *("--output", str(root / out), "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"),
        *("--inference-max-requests", "3", *layout),
    ]


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, list[dict]]:
    """The tool at TP1, TP2 (both from the HF directory) and PP2 (from the converted checkpoint) on
    the same requests (reused gloo worlds)."""
    root, out = setup["root"], {}
    for name, nproc, layout, load in (
        ("tp1", 1, (), "hf"),
        ("tp2", 2, ("--tensor-model-parallel-size", "2"), "hf"),
        ("pp2", 2, ("--pipeline-model-parallel-size", "2"), "ckpt"),
    ):
        log = run_in_world(TOOL, nproc, _args(root, f"{name}.jsonl", *layout, load=load), timeout=300)
        assert "tokens/s decoding" in log, log[-2000:]
        out[name] = [json.loads(x) for x in (root / f"{name}.jsonl").read_text().splitlines()]
    return out


def test_greedy_answers_equal_transformers_generate(setup, runs) -> None:
    from internvl_mcore.convert.source import model_config_from_path
    from internvl_mcore.data.tokenizer import load_tokenizer
    from internvl_mcore.inference.prompts import TilingOptions, load_prompts
    from internvl_mcore.inference.run import end_token_ids

    root, model = setup["root"], setup["model"]
    tok = load_tokenizer(str(root / "tok"))
    prompts = load_prompts(str(root / "in.jsonl"), tok, model_config_from_path(root / "hf"), TilingOptions(str(root)))
    assert len({len(p.tokens) for p in prompts}) == len(prompts)  # every prompt length differs
    assert [p.tiles.shape[0] for p in prompts] == [3, 0, 4, 1]
    ends = end_token_ids(tok)
    got = runs["tp1"]
    assert [r["line"] for r in got] == [1, 2, 3, 4]
    for p, answer in zip(prompts, got):
        ids = torch.tensor([p.tokens])
        kwargs = {"pixel_values": torch.from_numpy(p.tiles)} if p.tiles.shape[0] else {}
        want = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=ends,
            pad_token_id=0,
            **kwargs,
        )[0, ids.shape[1] :].tolist()
        assert answer["tokens"] == want, (p.line, answer, want)
        assert answer["answer"] == tok.decode([t for t in want if t not in ends])


def test_tp2_and_pp2_give_the_tp1_tokens(runs) -> None:
    assert runs["tp2"] == runs["tp1"]
    assert runs["pp2"] == runs["tp1"]


@pytest.mark.parametrize(
    "line, extra, needle",
    [
        ("{not json", (), "in.jsonl:1: not JSON"),
        (
            json.dumps({"image": "../x.png", "conversations": [{"from": "human", "value": "hi"}]}),
            (),
            ":1: outside_root",
        ),
        (json.dumps({"conversations": [{"from": "human", "value": "hi"}]}), ("--top-p", "0"), "--top-p 0"),
    ],
)
def test_user_errors_are_one_line(setup, tmp_path: Path, capsys, line: str, extra: tuple, needle: str) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import generate as tool
    finally:
        sys.path.remove(str(REPO / "tools"))
    from internvl_mcore.cli_errors import run_cli

    (tmp_path / "in.jsonl").write_text(line + "\n")
    args = _args(setup["root"], str(tmp_path / "out.jsonl"), *extra)
    args[args.index("--input") + 1] = str(tmp_path / "in.jsonl")
    assert run_cli(lambda: tool.main(args), "generate.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out.jsonl").exists()


def test_sampling_is_seeded_and_top_p_cuts_the_tail() -> None:
    from internvl_mcore.inference.decode import Sampling, choose_tokens

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).expand(2000, -1)  # probabilities .61 .22 .14 .03

    def draw(sampling: Sampling) -> torch.Tensor:
        return choose_tokens(logits, sampling, torch.Generator().manual_seed(sampling.seed))

    assert torch.equal(draw(Sampling(1.0, 1.0, seed=3)), draw(Sampling(1.0, 1.0, seed=3)))
    assert set(draw(Sampling(1.0, 1.0, seed=3)).tolist()) == {0, 1, 2, 3}
    assert set(draw(Sampling(1.0, 0.7, seed=3)).tolist()) == {0, 1}  # .61 < .7 <= .61 + .22
    assert set(draw(Sampling(1.0, 1e-6, seed=3)).tolist()) == {0}
    assert choose_tokens(logits[:2], Sampling(), None).tolist() == [0, 0]
