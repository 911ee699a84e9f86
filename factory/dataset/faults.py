"""Fault-injection points, for the test suite's crash tests (tests/test_faults.py); inert unless asked for.

`crash_point(name)` ends the process at once (`os._exit(1)`, no cleanup, as a crash or a kill would) the
first time it is reached with the environment variable `CF_FAULT_<NAME>` naming a marker path that does not
exist yet; it creates the marker first, so the retry that Ray makes runs through. Ray hands the driver's
environment to a local cluster's workers, so a test sets the variable on the command it runs.

Points: `GENERATE` (a generation actor, at the start of a call), `MID_SHARD` (a generation actor, before
it generates a part of a shard when it has already handed on another part of it in this call),
`AFTER_TAR_COMMIT` (an assembly task, between committing a shard's tar and its stats file).

`hold_point(name)` lets a job be stopped at a known place however fast the machine runs it: with
`CF_HOLD_<NAME>` set to `<folder>:<k>`, the first k arrivals (over all processes) pass and every later one
waits until the file `<folder>/release` exists (a test writes it) or the process is killed.
Point: `GENERATE` (a generation actor, at the start of a shard).
"""

from __future__ import annotations

import os
import time


def armed(name: str) -> bool:
    """Whether `crash_point(name)` would crash now (a test asked for it and it has not crashed yet)."""
    marker = os.environ.get(f"CF_FAULT_{name}")
    return bool(marker) and not os.path.exists(marker)


def crash_point(name: str) -> None:
    marker = os.environ.get(f"CF_FAULT_{name}")
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins the crash
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(1)


def hold_point(name: str) -> None:
    spec = os.environ.get(f"CF_HOLD_{name}")
    if not spec:
        return
    folder, k = spec.rsplit(":", 1)
    os.makedirs(folder, exist_ok=True)
    for i in range(int(k)):  # a ticket each: exactly k arrivals win one
        try:
            os.close(os.open(os.path.join(folder, f"ticket-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return
        except FileExistsError:
            continue
    while not os.path.exists(os.path.join(folder, "release")):  # held until released or killed
        time.sleep(0.2)
