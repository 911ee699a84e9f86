import os

# Never contact the Hugging Face hub from tests: a hub look-up without network hangs ~1 min before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toyworld_pipe():
    """The shipped toyworld pipeline (fp32, CPU), loaded once per test session."""
    from factory.loading import load_pipeline

    return load_pipeline("toyworld")


@pytest.fixture(scope="session")
def fast_config():
    """A DistillConfig with short schedules, for tests that exercise code paths rather than quality."""
    from factory.distiller import DistillConfig

    return DistillConfig(num_inference_steps=8, probe_t0=6, inpaint_steps=8)
