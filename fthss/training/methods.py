"""Training methods: how chain samples become training sequences, and which stages learn.

fthss    The method. The chain is one sequence under the cascade mask; upstream outputs are
         teacher-forced but encoded under their producer's prompt, so a stage learns to read the
         K/V it will meet at inference. `rounds="single"`: the stages are trained one at a time
         in chain order, each with its upstream stages frozen; `rounds="multi"`: all jointly,
         loss on every output.
chain    The text-passing baseline: every step is its own sequence, the text it would be given
         (shared content, earlier outputs, visible inputs: `TokenChain.text_view`) re-encoded
         under its own prompt, as the engine's text mode runs it.
distill  One prompt (stage "distill") produces every output of the chain, seeing every input.
single   One prompt (stage "single") goes from the shared content and all inputs straight to the
         final output.
adapt    FTHSS tuning (as `fthss`) started from stages trained as `chain` or imported PEFT
         adapters, on a subset of the data (the paper's section 4.4).
"""

from __future__ import annotations

from fthss.layout.chain import ChainFormatError, ChainSample, Step
from fthss.layout.sequence import TokenChain, TokenStep

METHODS = ("fthss", "chain", "distill", "single", "adapt")
DISTILL, SINGLE = "distill", "single"


def as_distill(sample: ChainSample) -> ChainSample:
    """The chain run by one stage that sees every input: a plain causal sequence."""
    return ChainSample(sample.shared, [
        Step(DISTILL, s.input, s.output, True, s.max_new_tokens, s.stop, s.stop_token_ids)
        for s in sample.steps], sample.id, sample.source)


def as_single(sample: ChainSample) -> ChainSample:
    """One step: all inputs in, the final output out."""
    inputs = "\n".join(s.input for s in sample.steps if s.input)
    last = sample.steps[-1]
    return ChainSample(sample.shared, [Step(SINGLE, inputs or None, last.output, False,
                                            last.max_new_tokens, last.stop, last.stop_token_ids)],
                       sample.id, sample.source)


def check_gold_outputs(method: str, sample: ChainSample, where: str) -> None:
    """Training learns (or teacher-forces) the output of every step, except `single`, which
    learns the last one only: refuse a sample without them."""
    steps = list(enumerate(sample.steps))
    for k, step in steps[-1:] if method == SINGLE else steps:
        if step.output is None:
            raise ChainFormatError(f"{where}: steps[{k}].output: missing; training with "
                                   f"{method} needs it")


def method_view(method: str, sample: ChainSample) -> ChainSample:
    """The chain a method trains on and runs at inference (text level)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
    return {"distill": as_distill, "single": as_single}.get(method, lambda s: s)(sample)


def training_chains(method: str, chain: TokenChain, trained: set[str]) -> list[TokenChain]:
    """The sequences one sample contributes when training `trained` stages with `method`."""
    if method == "chain":
        return [TokenChain([], [TokenStep(step.stage, chain.text_view(k) + step.input_ids,
                                          step.output_ids)])
                for k, step in enumerate(chain.steps) if step.stage in trained]
    last = max((k for k, s in enumerate(chain.steps) if s.stage in trained), default=-1)
    # later steps cannot change the trained outputs (causal), so they are not computed
    return [TokenChain(chain.shared_ids, chain.steps[: last + 1])] if last >= 0 else []
