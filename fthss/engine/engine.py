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

A batch is a `RunningBatch`: each of its `step()`s runs every member's next step, and members
join and leave at step boundaries (continuous batching at step granularity: a server starts a
new request while others are mid-chain). Members may be at different steps: masks, positions
and stage routing are per row. `ChainEngine.run` joins a batch's requests at once.

text: the chain-of-models baseline. Each step starts a fresh cache holding only its stage's
  prompt and re-encodes, as plain causal text, what it would see in shared mode (shared content,
  earlier outputs, visible inputs: picked by the same visibility rule), then its input. The last
  cache of every stage stays held, as a chain of separate models would keep it.
text-cached: the same chain of models, each with a prefix cache, as a serving stack with prefix
  caching runs it: every stage keeps its own cache for the whole chain, and a step encodes only
  what follows the longest prefix its text shares with what that cache already holds (in a
  multi-round chain, the rounds since the stage's last step). Same outputs as text mode, up to
  float; one cache per stage per request, where shared mode keeps one per request.
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

MODES = ("shared", "text", "text-cached")
# how a server's requests share batches (`fthss.serve`): joining a `RunningBatch` at its step
# boundaries, or waiting for the next batch
BATCHING = ("continuous", "dynamic")


class _End:
    def __repr__(self):
        return "END"


END = _End()  # returned by a StepInput: the request's chain ends before this step

# (request, step index, outputs of the earlier steps) -> the step's input, None to keep the
# request's own, or END.
StepInput = Callable[[ChainSample, int, list[str]], "str | None | _End"]

Meta = tuple[int, int, int, bool]  # (kind, step, stage id, visible), as in TokenMeta
Chunk = list[tuple[int, Meta]]  # tokens to encode, each with its metadata
# per row (id of its _Row): the logits of each generated token (or None), time of the first
DecodeOutputs = dict[int, tuple[torch.Tensor | None, float | None]]


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

    slot: int  # row index in the batch's caches
    index: int  # the request's index in `run`'s list (what a RunListener is told)
    request: ChainSample
    generator: torch.Generator | None
    tokens: TokenChain
    k: int = 0  # the step the row runs next
    pending: Chunk = field(default_factory=list)  # generated, not yet encoded
    results: list[StepResult] = field(default_factory=list)
    ended: bool = False  # the between-steps callable ended this chain, or it failed
    error: str | None = None
    held: dict[str, list[int]] = field(default_factory=dict)  # text-cached: ids per stage cache


@dataclass
class _Decoding:
    """One step's decoding, for the whole batch, as device tensors (`[batch]` unless said): the
    loop runs without waiting for the host, which reads them only at its looks."""

    rows: dict[int, _Row]  # slot -> the row, for the rows that generate (step `row.k`)
    live: torch.Tensor  # bool: the row is still generating
    limit: torch.Tensor  # max_new_tokens
    least: torch.Tensor  # min_new_tokens
    held_back: int  # the largest min_new_tokens: before it, some row may not stop
    stops: torch.Tensor  # [batch, vocab] bool: the tokens that end the row's output
    chosen: torch.Tensor  # [batch, longest]: the tokens generated (those past `counts` unused)
    counts: torch.Tensor  # tokens generated per row
    broken: torch.Tensor  # bool: the row's logits went NaN or +inf
    unchecked: torch.Tensor  # bool: the row may have met a stop string since the last look
    scores: list[torch.Tensor] = field(default_factory=list)  # per token, [batch, vocab] on CPU


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
            mode: "shared" (one cache per request), "text" (the chain-of-models baseline) or
                "text-cached" (that baseline with a prefix cache per stage).
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
        # a request the model cannot run takes no place in a batch
        results = [_refusal(self.base, r, i, mode, self.stages) for i, r in enumerate(requests)]
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
                names = list(dict.fromkeys(s for i in batch for s in requests[i].stages))
                running = RunningBatch(self, mode, sampling, step_input, output_scores,
                                       listener, names)
                for i in batch:
                    running.join(requests[i], i, None if seeds is None else seeds[i],
                                 checked=True)
                while running:
                    for i, result in running.step():
                        results[i] = result
                # the failed requests after this batch, up to the next runnable one, are done too
                after = start + self.batch_size
                hand_over(runnable[after] if after < len(runnable) else len(requests))
        hand_over(len(requests))
        return results

    def _text_step_cache(self, active: list[_Row], batch: int,
                         held: dict[str, ChainCache]) -> tuple[ChainCache, dict[str, int]]:
        """Text mode: a fresh cache for the rows' steps, with the prompts of these steps'
        stages only (as separate models would each start from their own), and the stage ids it
        gives them. `held` keeps each stage's latest cache, for the memory figures."""
        step_names = list(dict.fromkeys(row.request.steps[row.k].stage for row in active))
        cache = ChainCache(self.base, self.prompt_caches(step_names), batch,
                           self.decode_step, self.lora_bank(step_names))
        held.update({name: cache for name in step_names})
        return cache, {name: i for i, name in enumerate(step_names)}

    def _prefill(self, cache: ChainCache, chunks: list[Chunk], prompt: torch.Tensor | None
                 ) -> torch.Tensor:
        """Encode each row's chunk (`chunks[slot]`, empty for a row not in the step); the
        logits of each row's last real token, `[batch, vocab]`. With `prompt` (text mode, one
        prompt or lora stage) on the causal path, else under the visibility mask."""
        ids, meta = self._pad(chunks)
        if prompt is not None:
            return cache.append_causal(prompt, ids, meta)
        return cache.append(ids, meta, last_only=True)

    def _record_step(self, active: list[_Row], chunks: dict[int, Chunk],
                     outputs: DecodeOutputs, caches: list[ChainCache], started: float,
                     listener: RunListener | None) -> None:
        """Each active row's result of its step `row.k` (its text, ids, scores and stats),
        told to `listener` too. `caches`: every cache the batch holds, for the memory
        figures."""
        kv_bytes = sum(c.kv_bytes for c in caches)
        allocated = sum(c.kv_bytes_allocated for c in caches)
        for row in active:
            k = row.k
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

    def _within_limits(self, cache: ChainCache, active: list[_Row], chunks: dict[int, Chunk]
                       ) -> list[_Row]:
        """The rows whose step fits the base's positions and the per-request cache budget,
        counting its whole generation; the others fail alone (their chunks are dropped, their
        results carry the error) and the batch goes on without them."""
        positions = cache.next_position.tolist()
        held = cache.tokens_held().tolist()
        fitting = []
        for row in active:
            k, step = row.k, row.request.steps[row.k]
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

    def _take_input(self, row: _Row, step_input: StepInput | None) -> bool:
        """Record the input of the row's next step (and its given output) in `row.tokens`;
        False if the chain ends."""
        k, step = row.k, row.request.steps[row.k]
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

    def _step_chunk(self, row: _Row, mode: str, cache_ids: dict[str, int]) -> Chunk:
        """What to encode before the first token of the row's step k. Shared mode: the
        previous step's last token (or the shared content, before step 0), the input segment,
        and a given output. Text modes: what the step re-encodes (as its own input, under its
        prompt) and the input segment; nothing for a given output, which no model has to
        produce. In text-cached mode all of it is marked visible: the stage's later steps read
        on from the same cache, as a causal LM reads all of its text."""
        k, step = row.k, row.request.steps[row.k]
        stage = cache_ids[step.stage]
        segment, given = row.tokens.steps[k].rows(k, stage)
        if mode == "shared":
            chunk, row.pending = row.pending + segment + given, []
            return chunk
        if given:
            return []
        chunk = [(t, (Kind.INPUT, k, stage, False)) for t in row.tokens.text_view(k)] + segment
        if mode == "text-cached":
            chunk = [(t, (*meta[:3], True)) for t, meta in chunk]
        return chunk

    def _pad(self, chunks: list[Chunk]) -> tuple[torch.Tensor, TokenMeta]:
        """The chunks as one right-padded batch: token ids `[batch, q]` and their metadata."""
        meta = TokenMeta.from_rows([[m for _, m in c] for c in chunks])
        ids = torch.full((len(chunks), max(meta.length, 1)), self.codec.pad_id, dtype=torch.long)
        if meta.length == 0:  # every row idle: one padding column keeps shapes valid
            meta = TokenMeta.fill(len(chunks), 1, Kind.PAD)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor([t for t, _ in c], dtype=torch.long)
        return ids, meta

    def _decode(self, cache: ChainCache, logits: torch.Tensor, rows: list[_Row],
                active: list[_Row], sampling: SamplingConfig, output_scores: bool,
                cache_ids: dict[str, int], listener: RunListener | None = None
                ) -> DecodeOutputs:
        """Generate the outputs of the active rows' steps (step `row.k` of each) into
        `row.tokens`. The whole batch
        decodes on the device: tokens, per-row limits and stop tokens stay there, and the host
        looks only after the first token and every `check_every` tokens (for stop strings and
        to end the loop); a row found past its stop string takes its extra tokens back. A
        row's last token is not encoded here: the next step does it. Returns per row (scores
        or None, time of its first token). `cache_ids` number the stages as the cache does;
        `listener` is told each row's tokens so far at every look."""
        if not active:
            return {}
        state = self._prepare_decoding(cache, logits, len(rows), active, cache_ids)
        first_token_at = None
        longest = state.chosen.shape[1]
        for t in range(longest):
            logits = self._screen_logits(state, logits, t)
            token = self._choose_tokens(state, logits, rows, sampling)
            self._record_token(state, t, token, logits if output_scores else None)
            # the host looks after the first token (its time is the time to first token),
            # every check_every tokens and at the end; at every token when sampling, which
            # reads the logits on the host anyway
            if t == 0 or not sampling.greedy or (t + 1) % self.check_every == 0 or t + 1 == longest:
                first_token_at = first_token_at or time.perf_counter()
                if not self._look(cache, state, active, listener):
                    break
            logits = cache.decode(token, state.live)
        self._fail_broken(state.broken, active)
        return self._collect_outputs(state, active, cache_ids, first_token_at, output_scores)

    def _prepare_decoding(self, cache: ChainCache, logits: torch.Tensor, batch: int,
                          active: list[_Row], cache_ids: dict[str, int]) -> _Decoding:
        """The decoding state of the active rows' steps, every per-row limit on the device,
        and the cache ready to decode: room reserved for the longest output and each row's
        mask made."""
        device = logits.device
        by_slot = {row.slot: row for row in active}
        steps = {row.slot: row.request.steps[row.k] for row in active}
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
        # what each row's new tokens are to the visibility rule (padding for an idle row)
        query = TokenMeta.fill(batch, 1, Kind.PAD)
        for i, step in steps.items():
            query.kind[i], query.step[i] = Kind.OUTPUT, by_slot[i].k
            query.stage[i] = cache_ids[step.stage]
        longest = int(limit.max())
        cache.reserve(longest)  # before the mask is made: no reallocation while decoding
        cache.start_decoding(query)
        return _Decoding(
            by_slot, live, limit, least, held_back=int(least.max()), stops=stops,
            chosen=torch.zeros(batch, longest, dtype=torch.long, device=device),
            counts=torch.zeros(batch, dtype=torch.long, device=device),
            broken=torch.zeros(batch, dtype=torch.bool, device=device),
            unchecked=live.clone())

    @staticmethod
    def _screen_logits(state: _Decoding, logits: torch.Tensor, t: int) -> torch.Tensor:
        """Note the rows whose logits are broken, and forbid stopping before min_new_tokens."""
        # a stage holding huge values can make a row's logits NaN: it ends here and fails
        # alone (`_fail_broken`); checked on the device, so the loop does not wait for it
        state.broken |= state.live & (logits.isnan() | logits.isposinf()).any(dim=-1)
        if t < state.held_back:  # as transformers' min_new_tokens: no EOS or stop token before it
            logits = logits.masked_fill(state.stops & (state.counts < state.least)[:, None],
                                        float("-inf"))
        return logits

    @staticmethod
    def _choose_tokens(state: _Decoding, logits: torch.Tensor, rows: list[_Row],
                       sampling: SamplingConfig) -> torch.Tensor:
        """Each row's next token `[batch]` (0 for a row that is not live or broken, when
        sampling: its generator must not move)."""
        if sampling.greedy:
            return logits.argmax(dim=-1)
        # each live row draws from its own generator, so batch-mates don't matter
        flags = (state.live & ~state.broken).tolist()
        return torch.tensor([sampling.choose(logits[r.slot], r.generator)
                             if flags[r.slot] else 0 for r in rows], device=logits.device)

    @staticmethod
    def _record_token(state: _Decoding, t: int, token: torch.Tensor,
                      scores: torch.Tensor | None) -> None:
        """Keep token t of every row (and the logits it came from), count it for the live
        rows, and end those it stops: a stop token, the row's limit or broken logits."""
        if scores is not None:
            state.scores.append(scores.float().cpu())
        state.chosen[:, t] = token
        state.counts += state.live.long()
        done = state.live & (state.stops.gather(1, token[:, None])[:, 0]
                             | (state.counts >= state.limit) | state.broken)
        state.live = state.live & ~done

    def _look(self, cache: ChainCache, state: _Decoding, active: list[_Row],
              listener: RunListener | None) -> bool:
        """The host's look at the batch: end the rows past a stop string, tell `listener` the
        tokens so far; False once no row is live (the loop ends)."""
        state.live = self._stop_strings(cache, state.chosen, state.counts, state.live,
                                        state.unchecked, state.rows)
        if listener is not None:  # after the stop strings: what is told stays
            self._tell_tokens(listener, active, state.chosen, state.counts, state.unchecked)
        state.unchecked = state.live.clone()
        return bool(state.live.any())

    @staticmethod
    def _collect_outputs(state: _Decoding, active: list[_Row], cache_ids: dict[str, int],
                         first_token_at: float | None, output_scores: bool) -> DecodeOutputs:
        """Write each row's output ids into its step, and queue its last token for the next
        step to encode; per row (its scores or None, time of the first token)."""
        counts = state.counts.tolist()
        out = {}
        for row in active:
            ids = state.chosen[row.slot, : counts[row.slot]].tolist()
            k = row.k
            row.tokens.steps[k].output_ids[:] = ids
            stage = cache_ids[row.request.steps[k].stage]
            row.pending = [(t, (Kind.OUTPUT, k, stage, False))
                           for t in ids[-1:]]  # none for a row that failed before its first
            kept = (torch.stack([s[row.slot] for s in state.scores[: len(ids)]])
                    if output_scores else None)
            out[id(row)] = (kept, first_token_at)
        return out

    @staticmethod
    def _tell_tokens(listener: RunListener, active: list[_Row], chosen: torch.Tensor,
                     counts: torch.Tensor, unchecked: torch.Tensor) -> None:
        """Tell `listener` the tokens of the rows live at the last look (the others have
        been told all theirs)."""
        flags, lengths, ids = unchecked.tolist(), counts.tolist(), chosen.tolist()
        for row in active:
            if flags[row.slot]:
                listener.tokens(row.index, row.k, ids[row.slot][: lengths[row.slot]])

    @staticmethod
    def _fail_broken(broken: torch.Tensor, active: list[_Row]) -> None:
        """End, with an error, the rows whose logits went NaN or +inf (-inf is only a masked
        token) while decoding their step: their output would be garbage, and sampling from
        them would fail the whole batch."""
        if not bool(broken.any()):
            return
        flags = broken.tolist()
        for row in active:
            if flags[row.slot]:
                row.error = (f"step {row.k} ({row.request.steps[row.k].stage}): the model's "
                             "logits are NaN or inf (does a stage hold huge values?)")
                row.ended = True

    def _stop_strings(self, cache: ChainCache, chosen: torch.Tensor, counts: torch.Tensor,
                      live: torch.Tensor, unchecked: torch.Tensor, rows: dict[int, _Row]
                      ) -> torch.Tensor:
        """End the rows whose text now holds a stop string at the token that completed it
        (rows live at the last look: some may have ended since by a stop token or their
        limit). What they decoded after that token is taken back from the cache."""
        flags, lengths = unchecked.tolist(), counts.tolist()
        for i, row in rows.items():
            step = row.request.steps[row.k]
            if not flags[i] or not step.stop:
                continue
            ids = chosen[i, : lengths[i]].tolist()
            if not any(s in self.codec.decode(ids) for s in step.stop):
                continue  # the usual case: one decode per look, no search for the first hit
            for n in range(max(1, step.min_new_tokens), len(ids) + 1):
                if any(s in self.codec.decode(ids[:n]) for s in step.stop):
                    # token n-1 ends the output. It and the later ones were encoded here, but
                    # the newest: take them back (the next step encodes n-1, as usual)
                    cache.retract(i, row.k, len(ids) - n)
                    counts[i] = n
                    live[i] = False
                    break
        return live

    def _output_text(self, ids: list[int], stop: list[str]) -> str:
        text = self.codec.decode(ids)
        hits = [text.index(s) + len(s) for s in stop if s in text]
        return text[: min(hits)] if hits else text



def _refusal(base: BaseModel, request: ChainSample, index: int, mode: str,
             names) -> ChainResult | None:
    """The failed result of a request the model cannot run (malformed for `base`, or naming a
    stage outside `names`), None for one it can."""
    try:
        unknown = set(request.stages) - set(names)
        if unknown:
            raise ChainFormatError(f"unknown stage(s) {sorted(unknown)}; this batch runs "
                                   f"{sorted(names)}")
        check_request(request, base.vocab_size, request.source or f"request {index}")
    except ChainFormatError as err:
        return ChainResult(request.id, mode, [], TokenChain([], []), str(err))
    return None


class RunningBatch:
    """Requests run together, joining and leaving at step boundaries (continuous batching at
    step granularity). Each `step()` runs every member's next step in one prefill and one
    decode loop (members may be at different steps: masks, positions and stage routing are per
    row), then lets go of the members whose chain is done. `join` adds a request; it starts
    at the next `step()`, its rows appended to the batch's caches. A member's outputs do not
    depend on its batch-mates, nor on when it joined.

    Args:
        engine: the engine whose base, stages and settings run the batch.
        mode: "shared", "text" or "text-cached", for every member.
        sampling: one setting for every member (each brings its own seed to `join`).
        step_input, output_scores, listener: as `ChainEngine.run` takes them.
        names: the stages members may name, in the shared cache's order (default: every stage
            of the engine).
    """

    def __init__(self, engine: ChainEngine, mode: str = "shared",
                 sampling: SamplingConfig | None = None, step_input: StepInput | None = None,
                 output_scores: bool = False, listener: RunListener | None = None,
                 names: list[str] | None = None):
        if mode not in MODES:
            raise ConfigError(f"unknown mode '{mode}'; choose one of {MODES}")
        self.engine, self.mode = engine, mode
        self.sampling = sampling or SamplingConfig()
        self.step_input, self.output_scores, self.listener = step_input, output_scores, listener
        self.names = list(engine.stages) if names is None else list(names)
        self.rows: list[_Row] = []
        self._joining: list[_Row] = []
        self._failed: list[tuple[int, ChainResult]] = []  # refused at `join`, told by `step`
        self._shared: ChainCache | None = None  # shared mode: the batch's one cache
        self._held: dict[str, ChainCache] = {}  # text mode: each stage's latest cache
        self._encoded_last = False  # the last step ran only the encoding members (`_taking`)

    def __len__(self) -> int:
        """Members, those waiting to start included."""
        return len(self.rows) + len(self._joining) + len(self._failed)

    def join(self, request: ChainSample, index: int, seed: int | None = None, *,
             checked: bool = False) -> None:
        """Add `request`, told to the listener and returned by `step` as `index`; with `seed`
        it samples as if run alone with `sampling.seed = seed`. A request the batch cannot run
        (a stage outside `names`, a malformed request) comes back from the next `step` with
        its error; `checked`: the caller has found it runnable already (`ChainEngine.run`)."""
        refused = None if checked else _refusal(self.engine.base, request, index, self.mode,
                                                self.names)
        if refused is not None:
            self._failed.append((index, refused))
            return
        row = _Row(-1, index, request, self.sampling.generator(request_key(request), seed),
                   TokenChain([], []))
        # step 0's chunk starts with the shared content, tokenized and queued here
        row.tokens.shared_ids = self.engine.codec.shared(request.shared)
        row.pending = [(t, (Kind.SHARED, -1, -1, False)) for t in row.tokens.shared_ids]
        self._joining.append(row)

    def step(self) -> list[tuple[int, ChainResult]]:
        """Run every member's next step (the joined ones start theirs); returns `(index,
        result)` for each member whose chain is now done, which leaves the batch."""
        done, self._failed = self._failed, []
        with torch.no_grad():
            self._admit()
            if self.rows:
                self._run_step()
        return done + self._release()

    def _caches(self) -> list[ChainCache]:
        """Every cache the batch holds (for the memory figures and for rows joining/leaving)."""
        return [self._shared] if self._shared is not None else list(
            dict.fromkeys(self._held.values()))

    def _admit(self) -> None:
        """The joined rows take the next slots, in every cache the batch holds."""
        if not self._joining:
            return
        engine, new = self.engine, self._joining
        self._joining = []
        for slot, row in enumerate(new, start=len(self.rows)):
            row.slot = slot
        if self.mode == "shared" and self._shared is None:
            self._shared = ChainCache(engine.base, engine.prompt_caches(self.names), 0,
                                      engine.decode_step, engine.lora_bank(self.names))
        for cache in self._caches():
            cache.add_rows(len(new))
        self.rows += new

    def _run_step(self) -> None:
        """One step of every member: the rows that take part, then their work on the cache
        they write to (in text-cached mode, one stage's rows after another's, each on its
        stage's cache)."""
        engine = self.engine
        started = time.perf_counter()  # a step 0's clock includes encoding the shared content
        active = [row for row in self._taking() if engine._take_input(row, self.step_input)]
        if self.mode == "text-cached":
            by_stage: dict[str, list[_Row]] = {}
            for row in active:
                by_stage.setdefault(row.request.steps[row.k].stage, []).append(row)
            for name, rows in by_stage.items():
                self._run_rows(rows, *self._stage_cache(name), started)
        elif active:
            if self._shared is not None:
                cache, cache_ids = self._shared, {name: i for i, name in enumerate(self.names)}
            else:
                cache, cache_ids = engine._text_step_cache(active, len(self.rows), self._held)
            self._run_rows(active, cache, cache_ids, started)

    def _run_rows(self, active: list[_Row], cache: ChainCache, cache_ids: dict[str, int],
                  started: float) -> None:
        """The step of the rows `active` on `cache` (stage ids `cache_ids`): the chunk each
        encodes (prefill), the outputs they generate (decode), then their results."""
        engine, rows = self.engine, self.rows
        chunks = {id(row): engine._step_chunk(row, self.mode, cache_ids) for row in active}
        if self.mode == "text-cached":
            self._reuse_prefixes(cache, active, chunks)
        active = engine._within_limits(cache, active, chunks)
        prompt = (engine._causal_prompt(list(cache_ids))
                  if self.mode != "shared" and cache.holds_prompts_only else None)
        logits = engine._prefill(cache, [chunks.get(id(row), []) for row in rows], prompt)
        if self._shared is not None:
            # a row that ran has its previous step in: free what its step won't see; a row
            # that waits (`_taking`) or failed keeps what it holds
            ran = {id(row) for row in active}
            cache.free_hidden(torch.tensor([row.k for row in rows], device=cache.base.device),
                              torch.tensor([id(row) not in ran for row in rows],
                                           device=cache.base.device))
        generating = [row for row in active if row.request.steps[row.k].output is None]
        outputs = engine._decode(cache, logits, rows, generating, self.sampling,
                                 self.output_scores, cache_ids, self.listener)
        if self.mode == "text-cached":
            self._note_held(cache, generating)
        engine._record_step(active, chunks, outputs, self._caches(), started, self.listener)
        for row in active:
            row.k += 1

    def _stage_cache(self, name: str) -> tuple[ChainCache, dict[str, int]]:
        """Text-cached mode: stage `name`'s cache (a row per member, its prompt only at first),
        kept for the batch's life, and the stage id it gives the stage."""
        if name not in self._held:
            engine = self.engine
            self._held[name] = ChainCache(engine.base, engine.prompt_caches([name]),
                                          len(self.rows), engine.decode_step,
                                          engine.lora_bank([name]))
        return self._held[name], {name: 0}

    def _reuse_prefixes(self, cache: ChainCache, active: list[_Row],
                        chunks: dict[int, Chunk]) -> None:
        """Text-cached mode: each row keeps, of what its stage's cache holds, the longest
        prefix its step's text shares with it, and encodes the rest only (at least its last
        token, whose logits start the output). The K/V kept are those a fresh encoding would
        compute: the same tokens, at the same positions, under the same causal view."""
        for row in active:
            chunk = chunks[id(row)]
            if not chunk:  # a given output: nothing to encode, the cache keeps what it holds
                continue
            name, ids = row.request.steps[row.k].stage, [t for t, _ in chunk]
            held = row.held.get(name, [])
            same = next((i for i, (a, b) in enumerate(zip(held, ids, strict=False)) if a != b),
                        min(len(held), len(ids)))
            same = min(same, len(ids) - 1)
            cache.keep_content(row.slot, same)
            chunks[id(row)] = chunk[same:]
            row.held[name] = ids
        # what a row stopped reading is padding now: give it back when that frees a block
        cache.free_hidden(torch.tensor([row.k for row in self.rows], device=cache.base.device))

    @staticmethod
    def _note_held(cache: ChainCache, generating: list[_Row]) -> None:
        """Text-cached mode, after decoding: each generating row's cache holds its text, then
        the output tokens decoding wrote (all but the last, which nobody encoded)."""
        held = cache.content_held().tolist()
        for row in generating:
            name = row.request.steps[row.k].stage
            written = held[row.slot] - len(row.held[name])
            row.held[name] = row.held[name] + row.tokens.steps[row.k].output_ids[:written]

    def _taking(self) -> list[_Row]:
        """The rows whose step runs now. When some members' steps only encode (their output
        is given) and others' decode, the two kinds take turns, the encoding ones first: a
        step holding both would make each wait for the other's work (a long prefill, a decode
        loop), step after step, and in text mode would take the masked path where one stage's
        rows take the causal one. Neither kind waits two steps in a row."""
        encoding = [row for row in self.rows if row.request.steps[row.k].output is not None]
        if not encoding or len(encoding) == len(self.rows):
            self._encoded_last = False
            return self.rows
        self._encoded_last = not self._encoded_last
        if self._encoded_last:
            return encoding
        return [row for row in self.rows if row.request.steps[row.k].output is None]

    def _release(self) -> list[tuple[int, ChainResult]]:
        """The members whose chain is done leave: their results, and their rows given back."""
        finished = [row for row in self.rows
                    if row.ended or row.k >= len(row.request.steps)]
        if not finished:
            return []
        self.rows = [row for row in self.rows if row not in finished]
        if not self.rows:  # nobody left: the next member starts from fresh caches
            self._shared, self._held = None, {}
        else:
            kept = torch.tensor([row.slot for row in self.rows])
            for cache in self._caches():
                cache.keep_rows(kept.to(cache.base.device))
            for slot, row in enumerate(self.rows):
                row.slot = slot
        return [(row.index, ChainResult(row.request.id, self.mode, row.results, row.tokens,
                                        row.error)) for row in finished]
