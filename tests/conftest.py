"""Shared fixtures: tiny random-init bases (built once per session) and hypothesis settings."""

import pytest
import torch
from hypothesis import HealthCheck, settings

from fthss.models.presets import ARCHITECTURES, preset_base

# Deterministic examples: CI must not turn red by chance; deadlines mean nothing on a busy CPU.
settings.register_profile("fthss", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fthss")

_BASES = {}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP
    threads contending with another process make tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def get_base(arch: str):
    if arch not in _BASES:
        _BASES[arch] = preset_base(arch)
    return _BASES[arch]


@pytest.fixture(params=ARCHITECTURES)
def any_base(request):
    return get_base(request.param)


@pytest.fixture
def llama():
    return get_base("tiny-llama")
