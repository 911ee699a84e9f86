"""Starting Ray for a job's driver, or joining the cluster it runs on, with a quiet console.

    init_ray(verbose=None)   # under `ray job submit`: the job's cluster (RAY_ADDRESS); else a local Ray

Every driver of the project (`factory generate` / `label`, `trainers finetune`, `trainers students`) starts
Ray here. Quiet unless verbose (`factory.dataset.console`): Ray's INFO lines and Ray Data's execution lines
are off, and so are the notices below, which point at no problem.
"""

from __future__ import annotations

import logging

from factory.dataset.console import verbose_from_env


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
