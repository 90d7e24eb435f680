"""Every numeric flag of pretrain_internvl.py and tools/plan.py has a declared domain, checked at parse
time (internvl_mcore/config/domains.py; docs/errors.md).

The flags are read from the real parsers, not listed here: a new numeric flag without a domain fails
`test_every_numeric_flag_has_a_domain`. Each flag is probed in-process with nan / inf / -1 / 0 and a
plain value; a few probes go through the real CLIs to check the line the user sees.
"""

from __future__ import annotations

import sys

import pytest

from tests.reliability.cli_helpers import REPO, assert_user_error, run_light

pytestmark = pytest.mark.timeout(300)


def _parsers():
    """(name, parser, the flags it needs besides the probed one)."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tools"))
    import plan as plan_cli
    import pretrain_internvl

    return [
        ("pretrain_internvl.py", pretrain_internvl.build_parser(), ["--mock-data"]),
        ("plan.py", plan_cli.build_parser(), ["--model", "debug", "--gpus", "1"]),
    ]


def _numeric(parser):
    from internvl_mcore.config.domains import numeric_actions

    return numeric_actions(parser)


def test_every_numeric_flag_has_a_domain():
    from internvl_mcore.config.domains import Domain

    for name, parser, _ in _parsers():
        missing = [a.option_strings[0] for a in _numeric(parser) if not isinstance(a.type, Domain)]
        assert not missing, f"{name}: numeric flags without a domain in config/domains.py DOMAINS: {missing}"
        assert len(_numeric(parser)) >= 10, name  # the walk found the flags


def _probe(parser, argv, capsys) -> tuple[int, str]:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code), capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_nan_inf_negative_and_zero_per_domain(capsys):
    """nan, inf, -inf and -1 are refused by every numeric flag (no domain holds them); 0 is refused
    exactly where the domain starts above it; a plain value is taken. Each refusal is one line
    naming the flag and the value."""
    checked = 0
    for name, parser, base in _parsers():
        for action in _numeric(parser):
            flag, domain = action.option_strings[0], action.type
            # an int domain may start above 1 (--rollouts-per-prompt: a group needs 2 responses)
            plain = str(max(1, int(domain.low or 0))) if domain.kind is int else "0.5"
            assert _probe(parser, [*base, flag, plain], capsys)[0] == 0, (name, flag, plain)
            zero_ok = domain.low == 0 and not domain.low_open
            for value, accepted in (("nan", False), ("inf", False), ("-inf", False), ("-1", False), ("0", zero_ok)):
                # --flag=-inf: argparse would take a bare -inf for a flag of its own
                code, err = _probe(parser, [*base, f"{flag}={value}"], capsys)
                if accepted:
                    assert code == 0, (name, flag, value, err)
                    continue
                lines = err.strip().splitlines()
                assert code == 2 and len(lines) == 1, (name, flag, value, err)
                assert f"{flag} {value}: must be {domain.describe()}" in lines[0], lines[0]
                checked += 1
    assert checked > 200


def test_domains_of_values_once_accepted_or_crashing():
    """Values that were once accepted or crashed (a ValueError traceback) are refused by name."""
    from internvl_mcore.config.domains import DOMAINS

    assert not DOMAINS["train_iters"].contains(0) and not DOMAINS["seq_length"].contains(0)
    assert DOMAINS["clip_grad"].contains(0)  # 0 disables clipping
    assert DOMAINS["eval_interval"].contains(0) and DOMAINS["lr"].contains(0)
    assert not DOMAINS["compute_efficiency"].contains(1.5) and DOMAINS["compute_efficiency"].contains(1.0)


@pytest.mark.parametrize(
    "tool, args, says",
    [
        ("pretrain", ["--lr", "nan"], "--lr nan: must be a finite number >= 0"),
        ("pretrain", ["--lr", "-1"], "--lr -1: must be a finite number >= 0"),
        ("pretrain", ["--seq-length", "0"], "--seq-length 0: must be an integer >= 1"),
        ("pretrain", ["--train-iters", "0"], "--train-iters 0: must be an integer >= 1"),
        ("pretrain", ["--clip-grad", "nan"], "--clip-grad nan"),
        # past the parser: config/problems.py's checks of a preset run, still without torch
        ("pretrain", ["--train-iters", "2", "--lr-warmup-iters", "5"], "--lr-warmup-iters 5 exceeds --train-iters 2"),
        (
            "plan",
            ["--model", "debug", "--gpus", "8", "--gpu-memory", "nan"],
            "--gpu-memory nan: must be a finite number > 0",
        ),
    ],
)
def test_through_the_cli(tool, args, says):
    """The line the user sees, from a tool that never imported torch (cli_helpers.run_light)."""
    extra = ["--mock-data"] if tool == "pretrain" else []
    assert_user_error(run_light(tool, *extra, *args), says)


def test_parser_errors_are_one_line():
    """Any argparse error (a missing value, an unknown flag) is one line too, not the usage block,
    and costs no torch import."""
    assert_user_error(run_light("pretrain", "--mock-data", "--no-such-flag"), "--no-such-flag")
    assert_user_error(run_light("plan", "--model", "debug"), "--gpus")


def test_flags_that_do_nothing_alone_are_refused(capsys):
    """Each flag of config/needs.py NEEDS, given without its partner, is refused naming both (parse
    level, through pretrain_internvl.py's parse_run_config; the --eval-interval case also runs as a
    CLI in test_validation.py)."""
    import pretrain_internvl

    from internvl_mcore.config.domains import Domain
    from internvl_mcore.config.needs import NEEDS

    parser = pretrain_internvl.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for dest, (_, partner) in NEEDS.items():
        action = actions[dest]
        if action.nargs == 0:
            value = []
        elif action.choices:
            value = [str(action.choices[-1])]
        elif isinstance(action.type, Domain):
            value = ["2" if action.type.kind is int else "0.5"]
        else:
            value = [str(action.default[0])] if isinstance(action.default, list) else ["x"]
        with pytest.raises(SystemExit) as exc:
            # (shards are only opened after parsing: a made-up prefix parses)
            pretrain_internvl.parse_run_config(["--data-path", "P", action.option_strings[0], *value])
        line = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "\n" not in line, (dest, line)
        assert f"{action.option_strings[0]} does nothing without {partner}" in line, line
    # given with its partner, or as the default, nothing is said
    pretrain_internvl.parse_run_config(["--mock-data", "--eval-iters", "0", "--lora-rank", "2", "--lora-alpha", "4"])
