"""Shared fixtures: tiny random-init bases (built once per session), the device and dtype the
tests run in, and hypothesis settings.

Tests marked `device` hold on any device and dtype: `FTHSS_TEST_DEVICE` (default cpu) and
`FTHSS_TEST_DTYPE` (default float32) choose them, so a GPU runs the exactness and engine checks
in fp32 and bf16 (`scripts/bench-gpu.sh`:
`FTHSS_TEST_DEVICE=cuda FTHSS_TEST_DTYPE=bfloat16 pytest -m device`). The other tests assume the
CPU in fp32.
"""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from fthss.models.presets import ARCHITECTURES, preset_base

# Deterministic examples: CI must not turn red by chance; deadlines mean nothing on a busy CPU.
settings.register_profile("fthss", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fthss")

DEVICE = torch.device(os.environ.get("FTHSS_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("FTHSS_TEST_DTYPE", "float32"))
# The largest logit difference two exact computations of one chain may show: fp32 on a CPU
# differs by ~3e-7; bf16 keeps 8 bits of mantissa, so logits of a few units differ by ~1e-2.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[DTYPE]

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
        _BASES[arch] = preset_base(arch, dtype=DTYPE, device=DEVICE)
    return _BASES[arch]


@pytest.fixture(params=ARCHITECTURES)
def any_base(request):
    return get_base(request.param)


@pytest.fixture
def llama():
    return get_base("tiny-llama")


def assert_same_generations(results, reference, scores: bool = True) -> None:
    """Two runs of the same requests generated the same tokens, their logits within TOLERANCE
    (`scores`: both ran with `output_scores`). In fp32 the tokens must be identical. In a
    low-precision dtype two exact computations may round a near tie either way: a request may
    then part from the reference only at a token whose reference logit is within TOLERANCE of
    the logit of the token it chose, and is not compared after it."""
    exact = DTYPE == torch.float32 or not scores
    for result, ref in zip(results, reference, strict=True):
        assert len(result.steps) == len(ref.steps)
        for step, ref_step in zip(result.steps, ref.steps, strict=True):
            ours, theirs = step.output_ids, ref_step.output_ids
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                        min(len(ours), len(theirs)))
            assert (step.scores is None) == (ref_step.scores is None)  # None: a given output
            if scores and step.scores is not None:
                torch.testing.assert_close(step.scores[:same], ref_step.scores[:same],
                                           atol=TOLERANCE, rtol=0)
            if ours == theirs:
                continue
            assert not exact and same < min(len(ours), len(theirs)), (ours, theirs)
            logits = ref_step.scores[same]
            assert float(logits[theirs[same]] - logits[ours[same]]) <= TOLERANCE, (ours, theirs)
            break  # the rest of this request follows another path


@pytest.fixture
def figures(monkeypatch):
    """What every figure saved through `fthss.plots.save` shows, by file name: per axes its
    title, axis labels, tick labels, legend entries and the number of bars and lines drawn (a
    file's size says nothing of whether its plot is the right one)."""
    import matplotlib.image

    import fthss.plots

    seen, save = {}, fthss.plots.save

    def recording(fig, path):
        legend = [ax.get_legend() for ax in fig.axes]
        seen[Path(path).name] = [
            {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
             "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
             "legend": [t.get_text() for t in box.get_texts()] if box else [],
             "bars": len(ax.patches), "lines": len(ax.lines)}
            for ax, box in zip(fig.axes, legend, strict=True)]
        save(fig, path)
        assert matplotlib.image.imread(path).ndim == 3  # a PNG that opens

    monkeypatch.setattr(fthss.plots, "save", recording)
    return seen
