import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests build models and (for the compile tests) compile them: no deadlines, and
# a moderate number of examples so the suite fits CI (LOOPKIT_HYPOTHESIS=thorough: more).
common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("default", max_examples=50, **common)
settings.register_profile("thorough", max_examples=200, **common)
settings.load_profile(os.environ.get("LOOPKIT_HYPOTHESIS", "default"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty compile caches, so compile counts are its own."""
    torch._dynamo.reset()
    yield
