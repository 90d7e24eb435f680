"""The built-in verifiers and --reward-fn (internvl_mcore/training/rl/verifiers.py) on hand-made cases."""

from __future__ import annotations

import pytest

from internvl_mcore.errors import ConfigError, UserError
from internvl_mcore.training.rl.verifiers import BUILTIN, final_answer, make_verifier

P = {"answer": "unused"}

CASES = {
    "exact": [
        ("Paris", "Paris", 1.0),
        ("  the capital is paris.", "Paris", 0.0),  # the whole response is the answer without a marker
        ("The answer is: Paris.", "paris", 1.0),
        ("Final answer: New   York", "new york", 1.0),
        ("\\boxed{Paris}", "Paris", 1.0),
        ("\\boxed{Rome} ... no wait \\boxed{Paris}", "Paris", 1.0),  # the last boxed answer counts
        ("Paris, France", "Paris", 0.0),
        ("", "Paris", 0.0),
    ],
    "number": [
        ("There are 12 apples.", "12", 1.0),
        ("The answer is 1,234.", "1234", 1.0),
        ("answer: -3.50", "-3.5", 1.0),
        ("\\boxed{3/4}", "0.75", 1.0),
        ("first 7 then 8", "7", 0.0),  # the last number counts
        ("about 1e-3", "0.001", 1.0),
        ("50%", "50", 1.0),
        ("12.0000001", "12", 1.0),  # relative 1e-6
        ("12.1", "12", 0.0),
        ("no idea", "12", 0.0),
        ("1/0", "1", 0.0),
    ],
    "choice": [
        ("B", "B", 1.0),
        ("(C) because the area doubles", "C", 1.0),
        ("D. 42", "(D) 42", 1.0),
        ("I think the answer is (A).", "A", 1.0),
        ("Answer: B", "C", 0.0),
        ("A cat has four legs, so C", "C", 1.0),  # the article is not the answer: the last letter is
        ("E", "E", 0.0),  # only A-D are options
        ("nothing", "A", 0.0),
        ("\\boxed{b}", "B", 0.0),  # capital letters only
    ],
    "regex": [
        ("Answer: 12 apples", r"\d+ apples", 1.0),
        ("Answer: 12 apples and pears", r"\d+ apples", 0.0),  # the whole final answer must match
        ("The answer is YES", r"yes|true", 1.0),
        ("\\boxed{x = 4}", r"x\s*=\s*4", 1.0),
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_verifiers(name):
    verifier = make_verifier(name, None)
    assert verifier is BUILTIN[name]
    for response, answer, want in CASES[name]:
        assert verifier(response, answer, P) == want, (name, response, answer)


def test_final_answer():
    assert final_answer("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"  # nested braces
    assert final_answer("The ANSWER IS  $42$.") == "42"
    assert final_answer("just text.") == "just text"


def test_regex_answer_that_is_no_pattern():
    with pytest.raises(UserError, match=r"^--reward regex: the answer '\(' is no regular expression"):
        BUILTIN["regex"]("x", "(", P)


def test_reward_fn(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(response, answer, prompt):\n"
        "    return len(response) if prompt.get('by_length') else response == answer\n"
        "def boom(response, answer, prompt):\n"
        "    raise ZeroDivisionError('bad')\n"
        "def text(response, answer, prompt):\n"
        "    return 'yes'\n"
        "def nan(response, answer, prompt):\n"
        "    return float('nan')\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = make_verifier("exact", "my_rewards:score")  # --reward-fn wins over --reward
    assert fn("a", "a", {}) == 1.0 and fn("a", "b", {}) == 0.0 and fn("abc", "", {"by_length": 1}) == 3.0
    with pytest.raises(UserError, match=r"^--reward-fn my_rewards:boom raised ZeroDivisionError: bad$"):
        make_verifier(None, "my_rewards:boom")("a", "a", {})
    for bad in ("text", "nan"):
        with pytest.raises(
            UserError, match=rf"^--reward-fn my_rewards:{bad} returned .*: a finite number is expected$"
        ):
            make_verifier(None, f"my_rewards:{bad}")("a", "a", {})
    errors = {
        "my_rewards": "expected module:function",
        "my_rewards:": "expected module:function",
        "no_such_module_xyz:f": "cannot import no_such_module_xyz: ModuleNotFoundError",
        "broken_rewards:f": "cannot import broken_rewards: ModuleNotFoundError",
        "my_rewards:missing": "module my_rewards has no attribute missing",
        "my_rewards:NOT_CALLABLE": "NOT_CALLABLE is not callable",
    }
    for spec, message in errors.items():
        with pytest.raises(ConfigError) as e:
            make_verifier(None, spec)
        assert str(e.value).startswith(f"--reward-fn {spec}: ") and message in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--reward nope: one of exact, number, choice, regex"):
        make_verifier("nope", None)
