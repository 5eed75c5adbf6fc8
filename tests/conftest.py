"""Shared fixtures: tiny random-init bases (built once per session) and hypothesis settings."""

import pytest
from hypothesis import HealthCheck, settings

from fthss.models.presets import ARCHITECTURES, tiny_base

# Deterministic examples: CI must not turn red by chance; deadlines mean nothing on a busy CPU.
settings.register_profile("fthss", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fthss")

_BASES = {}


def get_base(arch: str):
    if arch not in _BASES:
        _BASES[arch] = tiny_base(arch)
    return _BASES[arch]


@pytest.fixture(params=ARCHITECTURES)
def any_base(request):
    return get_base(request.param)


@pytest.fixture
def llama():
    return get_base("tiny-llama")
