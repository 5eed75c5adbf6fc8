"""The exactness invariant (docs/design.md) on every architecture we claim, over random chains:
shared incremental decoding == one-pass masked forward; text mode == a plain HF forward of the
re-encoded text; a request decodes the same alone and inside a padded batch. On any device and
dtype (`device` marker, tests/conftest.py), within the dtype's tolerance."""

import random
from contextlib import ExitStack, contextmanager
from unittest.mock import patch

import pytest
import torch
from conftest import DTYPE, TOLERANCE, assert_same_generations, get_base
from hypothesis import given, settings
from hypothesis import strategies as st

from fthss.engine import cache
from fthss.engine.engine import MODES, ChainEngine, RunningBatch
from fthss.engine.sampling import SamplingConfig
from fthss.models.presets import ARCHITECTURES
from fthss.verify import (
    generated_scores,
    output_logits_one_pass,
    plain_forward,
    random_chains,
    random_stages,
    text_view,
)

pytestmark = pytest.mark.device


@st.composite
def setups(draw):
    rnd = draw(st.randoms(use_true_random=False))
    base = get_base(draw(st.sampled_from(ARCHITECTURES)))
    stages = random_stages(base, rnd, max_stages=3, max_tokens=5)
    requests = random_chains(stages, rnd, count=draw(st.integers(1, 5)), max_steps=4,
                             max_new_tokens=4)
    return base, stages, requests, draw(st.integers(1, 5))


# a prefill's row groups as the engine picks them, every cut that saves a padded column, or
# rows apart whenever their histories end at different columns (groups of rows out of order)
GROUPINGS = st.sampled_from([(cache.GROUP_OVERHEAD, None), (0, None), (4, 0.0)])


@contextmanager
def grouping(block: int, groups: tuple[int, float | None]):
    """The cache's block size and its prefills' row grouping (`cache.row_groups`) patched."""
    overhead, column_cost = groups
    with ExitStack() as patches:
        patches.enter_context(patch.object(cache, "BLOCK", block))
        patches.enter_context(patch.object(cache, "GROUP_OVERHEAD", overhead))
        if column_cost is not None:
            patches.enter_context(patch.object(cache.ChainCache, "column_cost", column_cost))
        yield


@settings(max_examples=150)
@given(setups(), st.sampled_from([cache.BLOCK, 1]), GROUPINGS)
def test_shared_incremental_equals_one_pass(setup, block, groups):
    """Also with 1-column blocks: then `free_hidden` compacts the cache whenever a slot dies,
    where 256-column blocks rarely give one back in chains this short; and with prefills split
    into as many row groups as save padding."""
    base, stages, requests, batch_size = setup
    engine = ChainEngine(base, stages, batch_size=batch_size)
    with grouping(block, groups):
        results = engine.run(requests, "shared", output_scores=True)
    for result, reference in zip(results, output_logits_one_pass(engine, results), strict=True):
        scores = generated_scores(result, base.vocab_size)
        assert scores.shape == reference.shape
        torch.testing.assert_close(scores, reference, atol=TOLERANCE, rtol=0)


def plain_logits(engine, result, k: int) -> torch.Tensor:
    """A plain HF forward of text-mode step k's view and output under its stage: the logits
    each of its output tokens was chosen from."""
    step = result.tokens.steps[k]
    view = text_view(result.tokens, k)
    logits = plain_forward(engine.base, engine.stages[step.stage], view + step.output_ids[:-1])
    return logits[len(view) - 1:]


def run_joining(engine, requests, mode, joins):
    """Run `requests` in one `RunningBatch`, request i joining before step round `joins[i]`
    (others mid-chain by then); results in request order."""
    batch, results, rounds = RunningBatch(engine, mode, output_scores=True), {}, 0
    while len(results) < len(requests):
        for i, request in enumerate(requests):
            if joins[i] == rounds:
                batch.join(request, i)
        results.update(batch.step())
        rounds += 1
    return [results[i] for i in range(len(requests))]


@settings(max_examples=100)
@given(setups(), st.sampled_from([cache.BLOCK, 1]), st.sampled_from(MODES),
       st.randoms(use_true_random=False), GROUPINGS)
def test_requests_joining_a_running_batch_are_exact(setup, block, mode, rnd, groups):
    """Continuous batching: requests join while others are mid-chain (rows at different steps
    in one prefill and one decode loop, rows leaving as their chains end, the cache compacted
    under them); each still equals the one-pass forward (shared) or the plain forward of its
    text (text mode)."""
    base, stages, requests, _ = setup
    engine = ChainEngine(base, stages)
    joins = [rnd.randrange(4) for _ in requests]
    with grouping(block, groups):
        results = run_joining(engine, requests, mode, joins)
    if mode == "shared":
        references = output_logits_one_pass(engine, results)
    else:
        references = [torch.cat([plain_logits(engine, r, k) for k in range(len(r.steps))
                                 if r.steps[k].scores is not None] or [
                                     torch.zeros(0, base.vocab_size)]) for r in results]
    for result, reference in zip(results, references, strict=True):
        assert result.error is None
        torch.testing.assert_close(generated_scores(result, base.vocab_size), reference,
                                   atol=TOLERANCE, rtol=0)


@settings(max_examples=80)
@given(setups(), st.sampled_from([cache.BLOCK, 1]), st.sampled_from(["text", "text-cached"]),
       GROUPINGS)
def test_text_modes_equal_plain_forward_of_the_text(setup, block, mode, groups):
    """Text mode re-encodes each step's whole view; text-cached mode only what follows the
    prefix its stage's cache shares with it (with 1-column blocks the cache is compacted
    under the kept prefixes), and computes the same logits."""
    base, stages, requests, batch_size = setup
    engine = ChainEngine(base, stages, batch_size=batch_size)
    with grouping(block, groups):
        results = engine.run(requests, mode, output_scores=True)
    for result in results:
        for k, step in enumerate(result.steps):
            if step.scores is None:  # a given output: nothing to re-encode or generate
                assert step.stats.prefilled_tokens == 0
                continue
            torch.testing.assert_close(step.scores, plain_logits(engine, result, k),
                                       atol=TOLERANCE, rtol=0)
            whole = len(text_view(result.tokens, k))
            if mode == "text":
                assert step.stats.prefilled_tokens == whole
            else:
                assert 1 <= step.stats.prefilled_tokens <= whole


@settings(max_examples=80)
@given(setups(), st.sampled_from(MODES))
def test_greedy_outputs_do_not_depend_on_the_batch(setup, mode):
    base, stages, requests, batch_size = setup
    scores = DTYPE != torch.float32  # what a near tie in low precision is judged by
    batched = ChainEngine(base, stages, batch_size=batch_size).run(requests, mode,
                                                                   output_scores=scores)
    alone = ChainEngine(base, stages, batch_size=1).run(requests, mode, output_scores=scores)
    assert_same_generations(batched, alone, scores)


def test_sampling_is_seeded_per_request_whatever_the_batch(llama):
    rnd = random.Random(5)
    stages = random_stages(llama, rnd)
    requests = random_chains(stages, rnd, count=4, max_new_tokens=6)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, seed=11)
    runs = [ChainEngine(llama, stages, batch_size=b).run(requests, "shared", sampling)
            for b in (1, 4)]
    outputs = [[[s.output_ids for s in r.steps] for r in run] for run in runs]
    assert outputs[0] == outputs[1]
    other_seed = ChainEngine(llama, stages).run(requests, "shared",
                                                SamplingConfig(temperature=1.0, seed=12))
    assert [[s.output_ids for s in r.steps] for r in other_seed] != outputs[0]


def test_compaction_drops_dead_slots_and_keeps_the_one_pass_logits(llama, monkeypatch):
    """A compressor's private passages die once its step is done: with 1-column blocks the
    cache gives their columns back (rows of different lengths, kept slots moved left in order),
    and every later logit is still the one-pass forward's."""
    from fthss.layout.chain import ChainSample, Step
    from fthss.prompts.stage import Stage, StageConfig

    monkeypatch.setattr(cache, "BLOCK", 1)
    compactions = []
    original = cache.ChainCache.free_hidden

    def counted(self, next_step, kept=None):
        before = self.capacity
        original(self, next_step, kept)
        compactions.append(before - self.capacity)
    monkeypatch.setattr(cache.ChainCache, "free_hidden", counted)
    stages = [Stage.create(StageConfig("A", "prompt", 3), llama, seed=1),
              Stage.create(StageConfig("B", "prefix", 2), llama, seed=2)]
    requests = [ChainSample("who?", [Step("A", input="a long private passage " * n,
                                          max_new_tokens=3), Step("B", max_new_tokens=4)])
                for n in (1, 4)]
    engine = ChainEngine(llama, stages, batch_size=2)
    results = engine.run(requests, "shared", output_scores=True)
    assert max(compactions) > 0
    for result, reference in zip(results, output_logits_one_pass(engine, results), strict=True):
        torch.testing.assert_close(generated_scores(result, llama.vocab_size), reference,
                                   atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_stage_answers_the_same_beside_a_longer_prompt(llama, kind):
    """C (the first content position) grows with the longest prompt in a chain; a stage must
    not notice (prefix keys are moved with it)."""
    from fthss.layout.chain import ChainSample, Step
    from fthss.prompts.stage import Stage, StageConfig

    short = Stage.create(StageConfig("S", kind, 2), llama, seed=3)
    long = Stage.create(StageConfig("L", "prompt", 9), llama, seed=4)
    request = ChainSample("q", [Step("S", input="abc", max_new_tokens=4)])
    alone = ChainEngine(llama, [short]).run([request], output_scores=True)[0]
    beside = ChainEngine(llama, [short, long]).run(
        [request, ChainSample("", [Step("L", max_new_tokens=2)])], output_scores=True)[0]
    torch.testing.assert_close(alone.steps[0].scores, beside.steps[0].scores, atol=TOLERANCE,
                               rtol=0)
