"""The project's error type, and how every command-line script reports it.

A UserError is a mistake the user can fix (a setting, a file, the machine): a script prints each
of its problems as one line `error: ...` and exits with status 2. Ctrl-C exits with 130, SIGTERM with 143
(each after the script's temporary files are removed, as for an error), and a reader
of stdout that has gone (`| head`) with 141, as for any program a pipe stops. Every other exception is
a bug, ours or in a learner's edit of model.py, and keeps its full traceback.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable


class UserError(Exception):
    """One or more problems the user can fix, one line each; each says what to do."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(UserError):
    """A problem with the user's data, text or tokenizer; the message says how to fix it."""


class HelpRequested(Exception):
    """--help was given; the exception's text is the help to print."""


class Terminated(BaseException):
    """SIGTERM (what `kill`, `timeout` and job schedulers send), raised where the script is, so that its
    temporary files go as they do for an error; like Ctrl-C, not an Exception that code may catch."""


def raise_terminated(signum: int, frame) -> None:
    raise Terminated


def interrupted_while_starting(kind: type, value: BaseException, tb) -> None:
    """sys.excepthook: a Ctrl-C before a script's entry point runs (while torch loads, say) ends in one
    line, like one after; any other uncaught exception is printed as usual, with its traceback."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


sys.excepthook = interrupted_while_starting


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a script's entry point: returns its exit status instead of raising for user errors."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        main_thread = threading.current_thread() is threading.main_thread()  # signals reach that one only
        previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
        try:
            status = reported(main, *args, **kwargs)
            if sys.stdout is not None:
                sys.stdout.flush()  # here, not at exit: a reader that has gone is then found below
            return status
        except BrokenPipeError:
            if not stdout_closed():
                raise  # another pipe (a socket, a child process): a bug, with its traceback
            to_devnull(sys.stdout.fileno())  # stdout's reader has gone (`| head`): end quietly, as a pipe's
            return 141  # writer does, with the shell's status for SIGPIPE
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return run


def one_line(problem: str) -> str:
    """A problem as one printable line: a newline (in a path, say) and bytes that are not UTF-8 (in a file
    name) are shown escaped, as Python writes them in a string."""
    text = problem.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone: polling it reports an error (POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here (Windows), or no stdout
        return False


def to_devnull(fd: int) -> None:
    """Point a file descriptor at /dev/null, so that what is written to it from now on goes nowhere."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def reported(main: Callable[..., int | None], *args, **kwargs) -> int:
    """main's exit status, with what went wrong said: a user error in one line per problem."""
    try:
        return main(*args, **kwargs) or 0
    except HelpRequested as e:
        print(e)
        return 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process has it: say it once
            for problem in e.problems:
                print(f"error: {one_line(problem)}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun's failure summary shows it, not a hint
            text = "error: " + "; ".join(map(one_line, e.problems))
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": text, "extraInfo": {"py_callstack": text,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as e:
        if not out_of_memory(e):
            raise
        print("error: out of memory: use smaller batches or a smaller model (train.py: a smaller "
              "training.batch_size, with a larger training.grad_accum_steps to keep the effective batch, or "
              "training.precision = bf16; eval.py: a smaller --batch-size)", file=sys.stderr)
        return 2


def out_of_memory(e: Exception) -> bool:
    """A GPU's OutOfMemoryError, or a CPU allocation that failed (torch reports that as a RuntimeError)."""
    torch = sys.modules.get("torch")  # looked up, not imported: plot.py runs without torch
    return isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)) or \
        (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
