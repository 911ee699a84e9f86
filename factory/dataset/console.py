"""What a job prints: its own progress bar and summary, not every library's chatter.

By default (quiet) Ray's INFO lines on the driver and Ray Data's execution log lines are off, and so are
diffusers' and transformers' loading bars and INFO/WARNING lines in every actor and worker
(`factory.method.loading.quiet_model_libraries`, called where the models load). Errors, and warnings
from anything else (a worker killed for memory, a node lost), still show. `--verbose` on the `factory` and
`trainers` commands, or CF_VERBOSE=1 in the driver's environment, brings everything back; the driver hands
the choice to its actors and workers as an argument.
"""

from __future__ import annotations

import os

VERBOSE_ENV = "CF_VERBOSE"


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")
