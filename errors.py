"""The project's error type, and how every command-line script reports it.

A UserError is a mistake the user can fix (a setting, a file, the machine): a script prints each
of its problems as one line `error: ...` and exits with status 2. Every other exception is a bug,
ours or in a learner's edit of model.py, and keeps its full traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """One or more problems the user can fix, one line each; each says what to do."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class HelpRequested(Exception):
    """--help was given; the exception's text is the help to print."""


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a script's entry point: returns its exit status instead of raising for user errors."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except HelpRequested as e:
            print(e)
            return 0
        except UserError as e:
            for problem in e.problems:
                print(f"error: {problem}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except Exception as e:
            # torch is looked up, not imported: plot.py runs without it.
            torch = sys.modules.get("torch")
            if torch is None or not isinstance(e, torch.OutOfMemoryError):
                raise
            print("error: out of memory: use a smaller training.batch_size (a larger "
                  "training.grad_accum_steps keeps the effective batch), a shorter model.block_size, "
                  "or training.precision = bf16", file=sys.stderr)
            return 2

    return run
