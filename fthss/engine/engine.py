"""`ChainEngine`: run chains of stages for a batch of requests, in shared or text mode.

shared: one `ChainCache` per batch (one cache per request row). Shared content is encoded once;
  each step appends its input and decodes its output under its visibility row. A step's last
  generated token is encoded at the start of the next step (nothing is encoded twice, and a
  chain's very last token, which nobody reads, is never encoded).
A step whose request carries an `output` is not generated: its text is used as given (teacher
forcing at inference: the gold-intermediate ablation feeds a downstream stage the gold upstream
output this way). The between-steps callable may return `END` to end a request's chain early
(a multi-round chain that has reached its answer). A `RunListener` is told of each step's tokens
and of finished steps while the batch runs (`fthss serve` streams them).

text: the chain-of-models baseline. Each step starts a fresh cache holding only its stage's
  prompt and re-encodes, as plain causal text, what it would see in shared mode (shared content,
  earlier outputs, visible inputs: picked by the same visibility rule), then its input. The last
  cache of every stage stays held, as a chain of separate models would keep it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
from tqdm.auto import tqdm

from fthss.engine.cache import ChainCache, compiled_decode_step
from fthss.engine.sampling import SamplingConfig, request_key
from fthss.errors import ConfigError, NonFiniteError
from fthss.layout.chain import ChainFormatError, ChainSample, check_request
from fthss.layout.sequence import SegmentCodec, TokenChain, TokenStep
from fthss.layout.visibility import Kind, TokenMeta
from fthss.models.base import BaseModel
from fthss.models.lora import LoraBank
from fthss.prompts.stage import LayerKV, Stage

MODES = ("shared", "text")


class _End:
    def __repr__(self):
        return "END"


END = _End()  # returned by a StepInput: the request's chain ends before this step

# (request, step index, outputs of the earlier steps) -> the step's input, None to keep the
# request's own, or END.
StepInput = Callable[[ChainSample, int, list[str]], "str | None | _End"]

Meta = tuple[int, int, int, bool]  # (kind, step, stage id, visible), as in TokenMeta


@dataclass
class StepStats:
    prefilled_tokens: int  # tokens encoded before the first new token (re-encoded ones too)
    decoded_tokens: int  # tokens generated (0 for a step whose output was given)
    time_to_first_token_s: float | None  # None when nothing was generated
    wall_s: float
    kv_bytes: int  # bytes of K/V the batch holds at the end of the step, all caches counted
    kv_bytes_allocated: int  # the same, counting the columns reserved ahead (preallocation)
    kv_tokens: int  # slots this request holds at the end of the step (prompt slots included)


@dataclass
class StepResult:
    stage: str
    input: str | None
    output: str
    output_ids: list[int]
    stats: StepStats
    scores: torch.Tensor | None = None  # [decoded, vocab] logits each token was chosen from


@dataclass
class ChainResult:
    id: str | None
    mode: str
    steps: list[StepResult]
    tokens: TokenChain  # every token the chain ran on, as the one-pass layout takes it
    error: str | None = None  # why the request stopped early (its batch-mates went on)

    @property
    def output(self) -> str:
        return self.steps[-1].output if self.steps and self.error is None else ""

    def to_json(self) -> dict:
        return {"id": self.id, "mode": self.mode, "output": self.output, "error": self.error,
                "steps": [{"stage": s.stage, "input": s.input, "output": s.output,
                           "stats": vars(s.stats)} for s in self.steps]}


class RunListener(Protocol):
    """Told of a run's progress while it happens (a server streams it to its clients).
    `request` is the request's index in the list given to `ChainEngine.run`."""

    def tokens(self, request: int, step: int, ids: list[int]) -> None:
        """Step `step` of `request` has generated `ids` so far: always a prefix of the step's
        final `output_ids` (told at each of the host's looks: after the first token, then every
        `check_every` tokens, and at the end)."""

    def step_done(self, request: int, step: int, result: StepResult) -> None:
        """Step `step` of `request` is complete; `result` is what `run` will return for it."""


@dataclass(eq=False)  # rows compare by identity: two identical requests are two rows
class _Row:
    """One request's state during a batch."""

    slot: int  # row index in the batch's cache
    index: int  # the request's index in `run`'s list (what a RunListener is told)
    request: ChainSample
    generator: torch.Generator | None
    tokens: TokenChain
    pending: list[tuple[int, Meta]] = field(default_factory=list)  # generated, not yet encoded
    results: list[StepResult] = field(default_factory=list)
    ended: bool = False  # the between-steps callable ended this chain, or it failed
    error: str | None = None


class ChainEngine:
    """Runs chains of stages on one frozen base, in batches: in shared mode each request keeps
    one KV cache that every step appends to and reads (FTHSS), in text mode each step
    re-encodes its view as text (the chain-of-models baseline).

    Args:
        base: the frozen base model.
        stages: the stages requests may name (names unique).
        max_new_tokens: a step's generation limit unless the request sets its own.
        batch_size: requests run together.
        step_marker_id: the token that opens each step (default: BOS, else EOS).
        check_every, compile, max_request_tokens: see `__init__`.

    Use `run` (results in request order); `prompt_caches` and `lora_bank` are what a run
    builds its caches from, exposed for the exactness checks (`fthss.verify`).
    """

    def __init__(self, base: BaseModel, stages: list[Stage], max_new_tokens: int = 64,
                 batch_size: int = 8, step_marker_id: int | None = None, check_every: int = 8,
                 compile: bool = False, max_request_tokens: int | None = None):
        """`check_every`: decoded tokens between the host's looks at a batch (for stop strings
        and the end of the step); outputs do not depend on it. `compile`: compile the decode
        step (with CUDA graphs on a GPU), see `compiled_decode_step`. `max_request_tokens`:
        the most K/V slots one request may hold (prompt slots included); a request that would
        need more fails alone, as one past the base's positions does."""
        self.base = base
        self.stages = {stage.name: stage for stage in stages}
        if len(self.stages) != len(stages):
            names = [s.name for s in stages]
            raise ConfigError("two stages share a name: "
                              f"{sorted({n for n in names if names.count(n) > 1})}")
        for stage in stages:
            stage.check_fits(base)
        self.codec = SegmentCodec(base.tokenizer, step_marker_id)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        if check_every < 1:
            raise ConfigError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.max_request_tokens = max_request_tokens
        self.decode_step = compiled_decode_step(base) if compile else None
        self._prompt_caches: dict[tuple[str, int], list[LayerKV]] = {}
        self._lora_banks: dict[tuple[str, ...], LoraBank | None] = {}
        for stage in stages:  # a stage too large for attention is refused now, before any work
            self.prompt_caches([stage.name])

    def prompt_caches(self, names: list[str]) -> list[list[LayerKV]]:
        """Prompt caches of `names` (stage id = index) for C = their longest prompt; each is
        computed once per stage and C, then reused by every batch."""
        first = max(self.stages[n].num_virtual_tokens for n in names)
        for name in names:
            if (name, first) not in self._prompt_caches:
                with torch.no_grad():
                    layers = self.stages[name].prompt_cache(self.base, first)
                self._check_magnitude(name, layers)
                self._prompt_caches[name, first] = layers
        return [self._prompt_caches[name, first] for name in names]

    def lora_bank(self, names: list[str]) -> LoraBank | None:
        """The LoRA deltas of `names` by stage id (= index). One bank holds every lora stage of
        the engine, renumbered per list of names: a compiled step then sees the same shapes
        whichever stages a run uses (a stage outside `names` costs a few columns, no more)."""
        key, every = tuple(names), self._every_lora
        if key not in self._lora_banks:
            order = list(self.stages)
            self._lora_banks[key] = (None if every is None else
                                     every.renumbered([order.index(n) for n in names]))
        return self._lora_banks[key]

    @cached_property
    def _every_lora(self) -> LoraBank | None:
        """The deltas of every lora stage, by the engine's order of stages (None: none)."""
        with torch.no_grad():
            return LoraBank.of([s.lora_weights for s in self.stages.values()], self.base.dtype,
                               self.base.device)

    def _check_magnitude(self, name: str, layers: list[LayerKV]) -> None:
        """Refuse a stage whose prompt K/V could overflow attention: a query times a key past
        the square root of the dtype's largest value can be inf, and the attention mask,
        added as a bias, turns an inf into NaN for every request of the batch, not only those
        reading the stage (finite but huge stage weights, 3e38, do this)."""
        limit = torch.finfo(self.base.dtype).max ** 0.5
        largest = max((float(x.detach().abs().max())
                       for layer in layers for x in layer if x.numel()),
                      default=0.0)  # a lora stage may have no prompt
        if not largest <= limit:  # NaN compares false
            raise NonFiniteError(f"stage {name}: its prompt's keys or values reach {largest:.3g}, "
                                 f"past what attention in {str(self.base.dtype)[6:]} can take "
                                 f"({limit:.3g}): the stage holds values too large")

    def run(self, requests: list[ChainSample], mode: str = "shared",
            sampling: SamplingConfig | None = None, step_input: StepInput | None = None,
            output_scores: bool = False, progress: bool = False,
            listener: RunListener | None = None, seeds: list[int] | None = None,
            on_results: Callable[[list[ChainResult]], None] | None = None) -> list[ChainResult]:
        """Run `requests` in batches of `batch_size`; one result per request, in order.

        Args:
            requests: the chains; every stage they name must be loaded.
            mode: "shared" (one cache per request) or "text" (the chain-of-models baseline).
            sampling: greedy when None.
            step_input: between-steps callable (retrieval, tools), see `StepInput`.
            output_scores: keep the logits each generated token was chosen from.
            progress: a progress bar over batches.
            listener: told of tokens and finished steps as they come (streaming).
            seeds: request i samples as if run alone with `sampling.seed = seeds[i]` (a
                server's requests each bring their own seed).
            on_results: receives the results as they are done, in request order, batch by
                batch (`fthss run` writes them as they come, so a failure later loses none).

        Returns:
            One `ChainResult` per request. A request the model cannot run (text that is not
            valid Unicode, a stop token id past the vocabulary, over the positions or the cache
            budget) fails alone: its result carries the error and its batch-mates run as
            without it.
        """
        if mode not in MODES:
            raise ConfigError(f"unknown mode '{mode}'; choose one of {MODES}")
        for i, request in enumerate(requests):
            unknown = set(request.stages) - set(self.stages)
            if unknown:
                raise ConfigError(f"request {request.id or i}: unknown stage(s) {sorted(unknown)}; "
                                  f"loaded: {sorted(self.stages)}")
        sampling = sampling or SamplingConfig()
        if seeds is not None and len(seeds) != len(requests):
            raise ConfigError(f"{len(seeds)} seeds for {len(requests)} requests")
        results: list[ChainResult | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                check_request(request, self.base.vocab_size, request.source or f"request {i}")
            except ChainFormatError as err:
                results[i] = ChainResult(request.id, mode, [], TokenChain([], []), str(err))
        runnable = [i for i, result in enumerate(results) if result is None]
        done = 0  # results[:done] were handed to on_results

        def hand_over(upto: int) -> None:
            nonlocal done
            if on_results is not None and upto > done:
                on_results(results[done:upto])
            done = max(done, upto)

        with torch.no_grad():
            starts = range(0, len(runnable), self.batch_size)
            for start in tqdm(starts, desc=f"{mode} chains", unit="batch", disable=not progress):
                batch = runnable[start:start + self.batch_size]
                rows = [_Row(slot, i, requests[i], sampling.generator(
                             request_key(requests[i]), None if seeds is None else seeds[i]),
                             TokenChain([], [])) for slot, i in enumerate(batch)]
                self._run_batch(rows, mode, sampling, step_input, output_scores, listener)
                for i, row in zip(batch, rows, strict=True):
                    results[i] = ChainResult(row.request.id, mode, row.results, row.tokens,
                                             row.error)
                # the failed requests after this batch, up to the next runnable one, are done too
                after = start + self.batch_size
                hand_over(runnable[after] if after < len(runnable) else len(requests))
        hand_over(len(requests))
        return results

    def _run_batch(self, rows, mode, sampling, step_input, output_scores, listener):
        names = list(dict.fromkeys(s for row in rows for s in row.request.stages))
        shared_cache = None
        if mode == "shared":
            shared_cache = ChainCache(self.base, self.prompt_caches(names), len(rows),
                                      self.decode_step, self.lora_bank(names))
        held: dict[str, ChainCache] = {}  # text mode: each stage's latest cache
        started = time.perf_counter()  # step 0's clock includes encoding the shared content
        for row in rows:
            row.tokens.shared_ids = self.codec.shared(row.request.shared)
            row.pending = [(t, (Kind.SHARED, -1, -1, False)) for t in row.tokens.shared_ids]
        for k in range(max(len(row.request.steps) for row in rows)):
            started = started if k == 0 else time.perf_counter()
            active = [row for row in rows if k < len(row.request.steps) and not row.ended
                      and self._take_input(row, k, step_input)]
            if not active:
                break
            if mode == "shared":
                cache, cache_ids = shared_cache, {name: i for i, name in enumerate(names)}
            else:  # a fresh cache with the prompts of this step's stages only
                step_names = list(dict.fromkeys(row.request.steps[k].stage for row in active))
                cache = ChainCache(self.base, self.prompt_caches(step_names), len(rows),
                                   self.decode_step, self.lora_bank(step_names))
                cache_ids = {name: i for i, name in enumerate(step_names)}
                held.update({name: cache for name in step_names})
            chunks = {id(row): self._step_chunk(row, k, mode, cache_ids) for row in active}
            active = self._within_limits(cache, active, chunks, k)
            ids, meta = self._pad([chunks.get(id(row), []) for row in rows])
            prompt = self._causal_prompt(step_names) if mode == "text" else None
            if prompt is not None:
                logits = cache.append_causal(prompt, ids, meta)
            else:
                logits = cache.append(ids, meta, last_only=True)
            if mode == "shared":  # the last token of step k-1 is in: free what no step from k sees
                cache.free_hidden(k)
            generating = [row for row in active if row.request.steps[k].output is None]
            if not active:
                continue
            outputs = self._decode(cache, logits, rows, generating, k, sampling, output_scores,
                                   cache_ids, listener)
            caches = [shared_cache] if mode == "shared" else list(dict.fromkeys(held.values()))
            kv_bytes = sum(c.kv_bytes for c in caches)
            allocated = sum(c.kv_bytes_allocated for c in caches)
            for row in active:
                scores, first_token_at = outputs.get(id(row), (None, None))
                step, out_ids = row.request.steps[k], row.tokens.steps[k].output_ids
                stats = StepStats(
                    prefilled_tokens=len(chunks[id(row)]),
                    decoded_tokens=len(out_ids) if step.output is None else 0,
                    time_to_first_token_s=(None if first_token_at is None
                                           else first_token_at - started),
                    wall_s=time.perf_counter() - started, kv_bytes=kv_bytes,
                    kv_bytes_allocated=allocated,
                    kv_tokens=sum(int(c.tokens_held()[row.slot]) for c in caches))
                row.results.append(StepResult(step.stage, row.tokens.steps[k].input_text,
                                              self._output_text(out_ids, step.stop), out_ids,
                                              stats, scores))
                if listener is not None:
                    listener.step_done(row.index, k, row.results[-1])

    def _causal_prompt(self, names: list[str]) -> torch.Tensor | None:
        """Text mode: the prompt embeddings to re-encode with the step's text on the causal
        path (`ChainCache.append_causal`), when every row runs the same prompt or lora stage. A
        prefix stage's prompt is K/V, not embeddings, and rows of different stages each see
        their own prompt only: those take the masked path (same logits, more work)."""
        if len(names) != 1 or self.stages[names[0]].config.kind == "prefix":
            return None
        return self.stages[names[0]].weight.detach()

    def _within_limits(self, cache, active, chunks, k) -> list:
        """The rows whose step k fits the base's positions and the per-request cache budget,
        counting its whole generation; the others fail alone (their chunks are dropped, their
        results carry the error) and the batch goes on without them."""
        positions = cache.next_position.tolist()
        held = cache.tokens_held().tolist()
        fitting = []
        for row in active:
            step = row.request.steps[k]
            new = len(chunks[id(row)]) + (0 if step.output is not None
                                          else step.max_new_tokens or self.max_new_tokens)
            last = positions[row.slot] + new - 1
            where = f"step {k} ({step.stage})"
            if last >= self.base.position_limit:
                row.error = (f"{where}: needs position {last} (prefill + up to {new} tokens) but "
                             f"the base supports positions < {self.base.position_limit}")
            elif self.max_request_tokens and held[row.slot] + new > self.max_request_tokens:
                row.error = (f"{where}: would hold {held[row.slot] + new} K/V slots, over the "
                             f"cache budget of {self.max_request_tokens} per request")
            if row.error:
                row.ended = True
                chunks[id(row)] = []
            else:
                fitting.append(row)
        return fitting

    def _take_input(self, row, k, step_input) -> bool:
        """Record step k's input (and given output) in `row.tokens`; False if the chain ends."""
        step = row.request.steps[k]
        text = step.input
        if step_input is not None:
            given = step_input(row.request, k, [r.output for r in row.results])
            if given is END:
                row.ended = True
                return False
            text = text if given is None else given
        output = [] if step.output is None else self.codec.output(step.output)
        row.tokens.steps.append(TokenStep(step.stage, self.codec.input(text), output,
                                          step.input_visible, input_text=text))
        return True

    def _step_chunk(self, row, k, mode, cache_ids) -> list[tuple[int, Meta]]:
        """What to encode before step k's first token. Shared mode: the previous step's last
        token, the input segment, and a given output. Text mode: what the step re-encodes (as
        its own input, under its prompt) and the input segment; nothing for a given output,
        which no model has to produce."""
        step = row.request.steps[k]
        stage = cache_ids[step.stage]
        segment, given = row.tokens.steps[k].rows(k, stage)
        if mode == "shared":
            chunk, row.pending = row.pending + segment + given, []
            return chunk
        if given:
            return []
        return [(t, (Kind.INPUT, k, stage, False)) for t in row.tokens.text_view(k)] + segment

    def _pad(self, chunks: list[list[tuple[int, Meta]]]):
        meta = TokenMeta.from_rows([[m for _, m in c] for c in chunks])
        ids = torch.full((len(chunks), max(meta.length, 1)), self.codec.pad_id, dtype=torch.long)
        if meta.length == 0:  # every row idle: one padding column keeps shapes valid
            meta = TokenMeta.fill(len(chunks), 1, Kind.PAD)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor([t for t, _ in c], dtype=torch.long)
        return ids, meta

    def _decode(self, cache, logits, rows, active, k, sampling, output_scores, cache_ids,
                listener=None):
        """Generate step k's outputs for the active rows into `row.tokens`. The whole batch
        decodes on the device: tokens, per-row limits and stop tokens stay there, and the host
        looks only after the first token and every `check_every` tokens (for stop strings and
        to end the loop); a row found past its stop string takes its extra tokens back. A
        row's last token is not encoded here: the next step does it. Returns per row (scores
        or None, time of its first token). `cache_ids` number the stages as the cache does;
        `listener` is told each row's tokens so far at every look."""
        if not active:
            return {}
        device, batch = logits.device, len(rows)
        steps = {row.slot: row.request.steps[k] for row in active}
        live = torch.zeros(batch, dtype=torch.bool, device=device)
        live[list(steps)] = True
        def per_row(value):
            return torch.tensor([value(steps[i]) if i in steps else 0 for i in range(batch)],
                                device=device)
        limit = per_row(lambda s: s.max_new_tokens or self.max_new_tokens)
        least = per_row(lambda s: s.min_new_tokens)
        stops = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
        for i, step in steps.items():
            stops[i, [self.codec.eos_id, *step.stop_token_ids]] = True
        query = TokenMeta.fill(batch, 1, Kind.PAD)
        for i, step in steps.items():
            query.kind[i], query.step[i], query.stage[i] = Kind.OUTPUT, k, cache_ids[step.stage]
        longest = int(limit.max())
        cache.reserve(longest)  # before the mask is made: no reallocation while decoding
        cache.start_decoding(query)
        chosen = torch.zeros(batch, longest, dtype=torch.long, device=device)
        counts = torch.zeros(batch, dtype=torch.long, device=device)
        scores, first_token_at = [], None
        unchecked = live.clone()  # rows that may have met a stop string since the last look
        held_back = int(least.max())  # tokens before which some row may not stop
        broken = torch.zeros(batch, dtype=torch.bool, device=device)  # NaN or +inf logits
        for t in range(longest):
            # a stage holding huge values can make a row's logits NaN: it ends here and fails
            # alone (`_fail_broken`); checked on the device, so the loop does not wait for it
            broken |= live & (logits.isnan() | logits.isposinf()).any(dim=-1)
            if t < held_back:  # as transformers' min_new_tokens: no EOS or stop token before it
                logits = logits.masked_fill(stops & (counts < least)[:, None], float("-inf"))
            if sampling.greedy:
                token = logits.argmax(dim=-1)
            else:  # each live row draws from its own generator, so batch-mates don't matter
                flags = (live & ~broken).tolist()
                token = torch.tensor([sampling.choose(logits[r.slot], r.generator)
                                      if flags[r.slot] else 0 for r in rows], device=device)
            if output_scores:
                scores.append(logits.float().cpu())
            chosen[:, t] = token
            counts += live.long()
            done = live & (stops.gather(1, token[:, None])[:, 0] | (counts >= limit) | broken)
            live = live & ~done
            if t == 0 or not sampling.greedy or (t + 1) % self.check_every == 0 or t + 1 == longest:
                first_token_at = first_token_at or time.perf_counter()
                live = self._stop_strings(cache, chosen, counts, live, unchecked, steps, k)
                if listener is not None:  # after the stop strings: what is told stays
                    self._tell_tokens(listener, active, chosen, counts, unchecked, k)
                unchecked = live.clone()
                if not bool(live.any()):
                    break
            logits = cache.decode(token, live)
        self._fail_broken(broken, active, k)
        counts = counts.tolist()
        out = {}
        for row in active:
            ids = chosen[row.slot, : counts[row.slot]].tolist()
            row.tokens.steps[k].output_ids[:] = ids
            row.pending = [(t, (Kind.OUTPUT, k, cache_ids[steps[row.slot].stage], False))
                           for t in ids[-1:]]  # none for a row that failed before its first
            kept = torch.stack([s[row.slot] for s in scores[: len(ids)]]) if output_scores else None
            out[id(row)] = (kept, first_token_at)
        return out

    @staticmethod
    def _tell_tokens(listener, active, chosen, counts, unchecked, k) -> None:
        """Tell `listener` the tokens of the rows live at the last look (the others have
        been told all theirs)."""
        flags, lengths, ids = unchecked.tolist(), counts.tolist(), chosen.tolist()
        for row in active:
            if flags[row.slot]:
                listener.tokens(row.index, k, ids[row.slot][: lengths[row.slot]])

    @staticmethod
    def _fail_broken(broken, active, k) -> None:
        """End, with an error, the rows whose logits went NaN or +inf (-inf is only a masked
        token) while decoding step k: their output would be garbage, and sampling from them
        would fail the whole batch."""
        if not bool(broken.any()):
            return
        flags = broken.tolist()
        for row in active:
            if flags[row.slot]:
                row.error = (f"step {k} ({row.request.steps[k].stage}): the model's logits are "
                             "NaN or inf (does a stage hold huge values?)")
                row.ended = True

    def _stop_strings(self, cache, chosen, counts, live, unchecked, steps, k) -> torch.Tensor:
        """End the rows whose text now holds a stop string at the token that completed it
        (rows live at the last look: some may have ended since by a stop token or their
        limit). What they decoded after that token is taken back from the cache."""
        flags, lengths = unchecked.tolist(), counts.tolist()
        for i, step in steps.items():
            if not flags[i] or not step.stop:
                continue
            ids = chosen[i, : lengths[i]].tolist()
            if not any(s in self.codec.decode(ids) for s in step.stop):
                continue  # the usual case: one decode per look, no search for the first hit
            for n in range(max(1, step.min_new_tokens), len(ids) + 1):
                if any(s in self.codec.decode(ids[:n]) for s in step.stop):
                    # token n-1 ends the output. It and the later ones were encoded here, but
                    # the newest: take them back (the next step encodes n-1, as usual)
                    cache.retract(i, k, len(ids) - n)
                    counts[i] = n
                    live[i] = False
                    break
        return live

    def _output_text(self, ids: list[int], stop: list[str]) -> str:
        text = self.codec.decode(ids)
        hits = [text.index(s) + len(s) for s in stop if s in text]
        return text[: min(hits)] if hits else text

