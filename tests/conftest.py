import os
import sys

# Never contact the Hugging Face hub from tests: a hub look-up without network hangs ~1 min before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toyworld_pipe():
    """The shipped toyworld pipeline (fp32, CPU), loaded once per test session."""
    from factory.method.loading import load_pipeline

    return load_pipeline("toyworld")


@pytest.fixture(scope="session")
def fast_config():
    """A DistillConfig with short schedules, for tests that exercise code paths rather than quality."""
    from factory.method.settings import DistillConfig

    return DistillConfig(num_inference_steps=8, probe_t0=6, inpaint_steps=8)


@pytest.fixture(scope="session")
def short_job():
    """`--set` overrides of a short generate job that keeps every sample: 4 steps, one actor on one CPU, no
    area or edge filter (random or toyworld weights at 4 steps may draw masks a filter rejects; the filters
    have tests of their own), no report samples."""
    return [
        "sampler.steps=4",
        "sampler.probe_t0=3",
        "inpaint.steps=4",
        "resources.actors=1",
        "resources.num_cpus_per_actor=1",
        "filters.min_area=0.0",
        "filters.max_area=1.0",
        "filters.reject_edgeless=false",
        "output.report_samples=0",
    ]


# --- One local Ray for the tests that need one --------------------------------------------------------------
# Starting Ray and its first workers (each imports torch) takes seconds on 2 cores, once per module that asked
# for its own. Where isolation is not the point, tests share this one: 2 CPUs, started on first use, shut down
# at the end of the session. Tests whose point is a Ray of their own (a multi-node cluster, a killed driver)
# shut it down first and start theirs; the next module that asks for `local_ray` starts it again.


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """The shared local Ray (2 CPUs), initialised if it is not."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    return ray


# --- Ending the test process ---------------------------------------------------------------------------
# This one pytest process starts and stops Ray several times (module fixtures, a two-node cluster), loads
# torch, DeepSpeed, pyarrow and gRPC, and then lets the interpreter tear all of that down. Once in CI (after
# "161 passed" had been printed) that teardown crashed with a segmentation fault, so `make test` went red with
# every test green; it did not happen again in 2 full runs and 6 shorter ones here. Native threads outliving
# `ray.shutdown()` are a known cause of such crashes (ray-project/ray#31145). Nothing any test checks runs
# after the session has finished, so the process ends there with pytest's own exit status, skipping the
# interpreter's teardown. Our own processes are not exempt: the `ray job submit` test runs the `factory` CLI
# in a fresh process and requires the job to succeed, i.e. that process's normal exit.
# CF_TEST_FULL_TEARDOWN=1 restores the normal teardown (run with `python -X faulthandler -m pytest` to see
# where a crash there happens).
_session_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    global _session_exit_status
    _session_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _session_exit_status is None or os.environ.get("CF_TEST_FULL_TEARDOWN") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_session_exit_status)
