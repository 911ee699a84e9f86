"""User errors: mistakes the user can fix, and how the command lines report them.

A `UserError` says what is wrong and how to fix it. The `factory` and `trainers` commands print it as one
line, `PROG: error: <message>`, and exit with status 2, with no traceback (`--debug` shows it). That holds
wherever it was raised: on the driver before any work (the preflight), inside a Ray task whose exception
Ray wraps with its cause (`RayTaskError`; `find_user_error` unwraps it), or inside a generation actor, which
hands it back in-band (`user_error_state`), since Ray Data keeps only a traceback string of the cause.
Anything else is a bug or a fault, and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the input, the config, the model or the output location; the message says the fix."""


def find_user_error(err: BaseException | None) -> UserError | None:
    """The `UserError` behind `err`: itself, a Ray wrapper's cause, or one in its __cause__ chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the original exception here
        if isinstance(cause, BaseException) and cause is not err:
            found = find_user_error(cause)
            if found is not None:
                return found
        if isinstance(err, UserError) and type(err).__module__.split(".")[0] != "ray":
            return err
        err = err.__cause__ or err.__context__
    return None


def user_error_state(err: UserError) -> dict:
    """What crosses from a Ray actor to the driver: the error's class and message (no pickled object)."""
    return {"type": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)}


def user_error_from_state(state: dict) -> UserError:
    """The driver-side `UserError` of `user_error_state`: the same class where it is a UserError of ours."""
    import importlib

    module, _, name = state["type"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        cls = UserError
    if not (isinstance(cls, type) and issubclass(cls, UserError) and module.split(".")[0] == "factory"):
        cls = UserError
    err = cls.__new__(cls)
    Exception.__init__(err, state["message"])
    return err


def run_command(prog: str, fn: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command's body; report a user error as `PROG: error: ...` (exit 2), re-raise anything else."""
    try:
        return fn() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        found = find_user_error(err)
        if found is None or debug:
            raise
        print(f"{prog}: error: {found}", file=sys.stderr)
        return 2
