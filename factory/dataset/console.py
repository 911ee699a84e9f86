"""What a job prints: its own progress bar and summary, not every library's chatter.

By default (quiet) Ray's INFO lines on the driver and Ray Data's execution log lines are off, and so are
diffusers' and transformers' loading bars and INFO/WARNING lines in every actor and worker
(`factory.method.loading.quiet_model_libraries`, called where the models load). Errors, and warnings
from anything else (a worker killed for memory, a node lost), still show. `--verbose` on the `factory` and
`trainers` commands, or CF_VERBOSE=1 in the driver's environment, brings everything back; the driver hands
the choice to its actors and workers as an argument.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "CF_VERBOSE"


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def init_ray(verbose: bool | None = None) -> None:
    """`ray.init()` for a job's driver: join the cluster under `ray job submit` (RAY_ADDRESS), else start a
    local Ray, quietly unless verbose. Actors' and workers' output still reaches the driver (log_to_driver),
    so a warning from a worker shows; the model libraries that would fill it are quieted in the workers."""
    import ray

    verbose = verbose if verbose is not None else verbose_from_env()
    quiet_ray_data(verbose)
    if not ray.is_initialized():
        ray.init(log_to_driver=True, logging_level=logging.INFO if verbose else logging.WARNING)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`: notices, not problems."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Notices that every quiet run would print and that point at no problem. Ray's warning that token
# authentication is *off* comes from the same logger and still shows.
_NOTICES = {
    "ray._private.authentication.authentication_token_setup": _DropMessages(
        "Token authentication is enabled"
    ),
    "ray.data._internal.progress": _DropMessages("Progress bars disabled"),  # we turn them off on purpose
}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's per-dataset execution lines ('Starting execution of Dataset ...') and the notices above off,
    unless verbose."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger, which is then turned down)

    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    for name, notice in _NOTICES.items():
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(notice)
        elif notice not in logger.filters:
            logger.addFilter(notice)
