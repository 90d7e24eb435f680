"""Rule-based rewards: the built-in verifiers (--reward exact|number|choice|regex) and a user's
function (--reward-fn module:function).

Every verifier is a function `reward(response: str, answer: str, prompt: dict) -> float`:
`response` the decoded model response (without the template's end-of-turn token), `answer` the prompt's
reference answer (the JSONL record's answer field), `prompt` the whole JSONL record as read (the user's
function may look at other fields; do not modify it). The built-ins return 1.0 or 0.0.

The built-ins first take the response's final answer (`final_answer`): the content of the last
`\\boxed{...}` if there is one, else the text after the last "answer:" / "answer is" (any case), else
the whole response; trailing periods, then surrounding whitespace, `$` and `*` are dropped.

- exact:  final answer == reference, ignoring case and runs of whitespace.
- number: the last number in the final answer (`-1,234.5`, `3/4`, `1e-3`, `50%` is 50) equals the
  reference's within a relative 1e-6 (absolute below 1); no number: 0.
- choice: the option letter A-D of the final answer (a leading `(B)`, `B.`, `B:`, `B)` or a lone `B`,
  else the last standalone capital A-D in it: "A cat ... so C" is C) equals the reference's (read the same way, so "(C) 42" works).
- regex:  the reference answer is a Python regular expression that must match the whole final answer
  (re.fullmatch, case-insensitive).

A user's function is named `module:function` and loaded with importlib (the module must be importable:
on PYTHONPATH or installed); it is called as above and must return a finite number (bool and int
count). A module that does not import, a missing or non-callable function, an exception inside it or a
return value that is no finite number stop the run with one line naming --reward-fn.
"""

from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from typing import Callable

from ...errors import ConfigError, UserError

Verifier = Callable[[str, str, dict], float]

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_LEADING_CHOICE = re.compile(r"^(?:\(([A-D])\)|([A-D])(?:[.:)]|$))")
_STANDALONE_CHOICE = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), None without one."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def final_answer(response: str) -> str:
    """The part of a response that states its answer (see the module docstring)."""
    boxed = _last_boxed(response)
    if boxed is not None:
        text = boxed
    else:
        marks = list(_ANSWER_IS.finditer(response))
        text = response[marks[-1].end() :] if marks else response
    return text.strip().rstrip(".").strip().strip("$*").strip()


def _parse_number(text: str) -> float | None:
    """The last number in `text` as a float, None without one."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].replace(",", "").replace(" ", "")
    try:
        return float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _choice(text: str) -> str | None:
    """The option letter A-D a text states, None without one."""
    text = text.strip()
    lead = _LEADING_CHOICE.match(text)
    if lead:
        return lead.group(1) or lead.group(2)
    found = _STANDALONE_CHOICE.findall(text)
    return found[-1] if found else None


def exact(response: str, answer: str, prompt: dict) -> float:
    """1.0 when the final answer equals the reference (case and whitespace runs ignored)."""

    def norm(s: str) -> str:
        return " ".join(s.split()).casefold()

    return float(norm(final_answer(response)) == norm(final_answer(answer)))


def number(response: str, answer: str, prompt: dict) -> float:
    """1.0 when the last number of the final answer equals the reference number (relative 1e-6)."""
    got, want = _parse_number(final_answer(response)), _parse_number(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6))


def choice(response: str, answer: str, prompt: dict) -> float:
    """1.0 when the response's option letter (A-D) is the reference's."""
    got, want = _choice(final_answer(response)), _choice(answer)
    return float(got is not None and got == want)


def regex(response: str, answer: str, prompt: dict) -> float:
    """1.0 when the reference (a regular expression) matches the whole final answer."""
    try:
        pattern = re.compile(answer, re.IGNORECASE)
    except re.error as e:
        raise UserError(f"--reward regex: the answer {answer!r} is no regular expression ({e})") from None
    return float(pattern.fullmatch(final_answer(response)) is not None)


BUILTIN: dict[str, Verifier] = {"exact": exact, "number": number, "choice": choice, "regex": regex}
"""--reward's choices."""


def load_reward_fn(spec: str) -> Verifier:
    """The function `module:function` names, imported now (errors name --reward-fn)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--reward-fn {spec}: expected module:function (e.g. my_rewards:score)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - anything the user's module raises while importing
        raise ConfigError(f"--reward-fn {spec}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"--reward-fn {spec}: module {module_name} has no attribute {attr}")
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: {attr} is not callable")
    return _checked(spec, fn)


def _checked(spec: str, fn: Callable) -> Verifier:
    """`fn`, its exceptions and wrong return values turned into one-line errors naming --reward-fn."""

    def reward(response: str, answer: str, prompt: dict) -> float:
        try:
            value = fn(response, answer, prompt)
        except Exception as e:  # noqa: BLE001 - the user's code: say where it failed, in one line
            raise UserError(f"--reward-fn {spec} raised {type(e).__name__}: {e}") from None
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            return float(value)
        raise UserError(f"--reward-fn {spec} returned {value!r}: a finite number is expected")

    return reward


def make_verifier(reward: str | None, reward_fn: str | None) -> Verifier:
    """The verifier of --reward NAME or --reward-fn module:function (exactly one of them)."""
    if reward_fn:
        return load_reward_fn(reward_fn)
    if reward not in BUILTIN:
        raise ConfigError(f"--reward {reward}: one of {', '.join(BUILTIN)} (or --reward-fn module:function)")
    return BUILTIN[reward]
