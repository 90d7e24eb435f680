"""How the command-line tools end on a user's mistake: one line on stderr, no traceback.

    exit 2    a user error: a missing / wrong / unwritable file or flag; the line names it
    exit 130  Ctrl-C (SIGINT): one line saying what was left as it was
    exit 1    the tool ran and reports a failed outcome (e.g. too many rejected records)

`run_cli(main, prog)` wraps a tool's `main()`: a `UserError` (internvl_mcore/errors.py) is a user
error (its message already names the file, line or flag; we only flatten it to one line). Anything
else, a ValueError / KeyError / OSError included, is a bug and keeps its traceback (exit 1).
INTERNVL_MCORE_TRACEBACK=1 prints the traceback of a user error too (before its one line).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import UserError

USER_ERROR = 2
INTERRUPTED = 130


# Only UserError: readers turn an OSError on a path the user named into one where they open it
# (`user_path`, `read_json`), writers a full disk (`disk_full_names`); a ValueError, KeyError or
# OSError that reaches the boundary is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
TRACEBACK_ENV = "INTERNVL_MCORE_TRACEBACK"


def show_traceback() -> bool:
    """INTERNVL_MCORE_TRACEBACK=1: a user error prints its traceback before its one line."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


@contextmanager
def user_path(error: type[UserError] = UserError) -> Iterator[None]:
    """An OSError naming a file (missing, unreadable, a directory) raised inside becomes `error` with the
    line it always had ('reason: path'). Wrap only the opening of a path the user named: elsewhere
    an OSError is a bug."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or not exc.strerror:
            raise
        raise error(f"{exc.strerror}: {exc.filename}") from exc


def read_json(path: str | os.PathLike, error: type[UserError] = UserError) -> Any:
    """A JSON file's contents; invalid JSON (or text that is not UTF-8), or a file that cannot be read
    (missing, a directory), raises `error` naming the file (and line and column: json's own message
    names neither the file nor what was being read)."""
    with user_path(error), open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); expected a JSON file") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply)") from None


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """OSErrors raised inside name `path`: a write that fails on a full disk (ENOSPC) or a quota says
    only "[Errno 28] No space left on device", without the file it was writing."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from None


@contextmanager
def disk_full_names(flag: str, target: str | os.PathLike) -> Iterator[None]:
    """A full disk (ENOSPC), an exhausted quota (EDQUOT) or a file-size limit (EFBIG) while writing `flag TARGET` as one UserError
    naming the flag, the output and the file being written (what a staged write leaves: nothing)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise UserError(
            f"{flag} {target}: {exc.strerror or os.strerror(exc.errno)} while writing "
            f"{exc.filename or target}; free space (or choose another {flag}) and run again; "
            f"{target} was left as it was"
        ) from None


def one_line(exc: BaseException) -> str:
    """The exception as one line: OSErrors as 'reason: path', others their message, newlines joined."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])  # str(KeyError) adds quotes around the message
    else:
        text = str(exc) or type(exc).__name__
    parts = [part.strip() for part in text.splitlines() if part.strip()]
    # "refusing to start:\n  a\n  b" -> "refusing to start: a; b"
    return "".join(p + ("" if i == len(parts) - 1 else " " if p.endswith(":") else "; ") for i, p in enumerate(parts))


def quiet_optional_gpu_libraries() -> None:
    """megatron-core warns at import that transformer-engine / apex are absent (always so on CPU); they
    are used when importable (tools/gpu_check.py reports them), and the warnings would bury the line."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    # the interpreters a run starts (the data workers' fork server imports megatron-core's datasets,
    # the --async-save writer its checkpointing) begin with their own filters: pass the rule on
    rule = "ignore:Transformer Engine and Apex are not installed"
    current = os.environ.get("PYTHONWARNINGS", "")
    if rule not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{rule}" if current else rule


def fail(prog: str, message: str, code: int = USER_ERROR) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def user_error_line(exc: UserError) -> str:
    """The one line of a user error; with INTERNVL_MCORE_TRACEBACK=1 its traceback is printed first."""
    if show_traceback():
        traceback.print_exception(exc, file=sys.stderr)
    return one_line(exc)


def run_cli(main: Callable[[], int | None], prog: str, interrupted: str = "nothing was written") -> int:
    """Run `main()`; a UserError -> one line + exit 2, Ctrl-C -> one line + exit 130; anything else
    propagates (a traceback, exit 1)."""
    quiet_optional_gpu_libraries()
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); {interrupted}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except UserError as exc:
        return fail(prog, user_error_line(exc))
