"""`ChainEngine`: run chains of stages for a batch of requests, in shared or text mode.

shared: one `ChainCache` per batch (one cache per request row). Shared content is encoded once;
  each step appends its input and decodes its output under its visibility row. A step's last
  generated token is encoded at the start of the next step (nothing is encoded twice, and a
  chain's very last token, which nobody reads, is never encoded).
text: the chain-of-models baseline. Each step starts a fresh cache holding only its stage's
  prompt and re-encodes, as plain causal text, what it would see in shared mode (shared content,
  earlier outputs, visible inputs: picked by the same visibility rule), then its input. The last
  cache of every stage stays held, as a chain of separate models would keep it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fthss.engine.cache import ChainCache
from fthss.engine.sampling import SamplingConfig
from fthss.layout.chain import ChainSample
from fthss.layout.sequence import SegmentCodec, TokenChain, TokenStep
from fthss.layout.visibility import Kind, TokenMeta, visibility
from fthss.models.base import BaseModel
from fthss.prompts.stage import LayerKV, Stage

MODES = ("shared", "text")

# (request, step index, outputs of the earlier steps) -> the step's input, or None to keep it.
StepInput = Callable[[ChainSample, int, list[str]], "str | None"]

Meta = tuple[int, int, int, bool]  # (kind, step, stage id, visible), as in TokenMeta


@dataclass
class StepStats:
    prefilled_tokens: int  # tokens encoded before the first new token (re-encoded ones too)
    decoded_tokens: int  # tokens generated
    time_to_first_token_s: float
    wall_s: float
    kv_bytes: int  # bytes of K/V the batch holds at the end of the step, all caches counted
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

    @property
    def output(self) -> str:
        return self.steps[-1].output

    def to_json(self) -> dict:
        return {"id": self.id, "mode": self.mode, "output": self.output,
                "steps": [{"stage": s.stage, "input": s.input, "output": s.output,
                           "stats": vars(s.stats)} for s in self.steps]}


@dataclass(eq=False)  # rows compare by identity: two identical requests are two rows
class _Row:
    """One request's state during a batch."""

    slot: int  # row index in the batch's cache
    request: ChainSample
    generator: torch.Generator | None
    tokens: TokenChain
    history: list[tuple[int, Meta]] = field(default_factory=list)  # content in sequence order
    pending: list[tuple[int, Meta]] = field(default_factory=list)  # generated, not yet encoded
    results: list[StepResult] = field(default_factory=list)


class ChainEngine:
    def __init__(self, base: BaseModel, stages: list[Stage], max_new_tokens: int = 64,
                 batch_size: int = 8, step_marker_id: int | None = None):
        self.base = base
        self.stages = {stage.name: stage for stage in stages}
        for stage in stages:
            stage.check_fits(base)
        self.codec = SegmentCodec(base.tokenizer, step_marker_id)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._prompt_caches: dict[tuple[str, int], list[LayerKV]] = {}

    def prompt_caches(self, names: list[str]) -> list[list[LayerKV]]:
        """Prompt caches of `names` (stage id = index) for C = their longest prompt; each is
        computed once per stage and C, then reused by every batch."""
        first = max(self.stages[n].num_virtual_tokens for n in names)
        for name in names:
            if (name, first) not in self._prompt_caches:
                with torch.no_grad():
                    self._prompt_caches[name, first] = self.stages[name].prompt_cache(self.base, first)
        return [self._prompt_caches[name, first] for name in names]

    def run(self, requests: list[ChainSample], mode: str = "shared",
            sampling: SamplingConfig | None = None, step_input: StepInput | None = None,
            output_scores: bool = False, progress: bool = False) -> list[ChainResult]:
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}'; choose one of {MODES}")
        for i, request in enumerate(requests):
            unknown = set(request.stages) - set(self.stages)
            if unknown:
                raise ValueError(f"request {request.id or i}: unknown stage(s) {sorted(unknown)}; "
                                 f"loaded: {sorted(self.stages)}")
        sampling = sampling or SamplingConfig()
        results = []
        with torch.no_grad():
            starts = range(0, len(requests), self.batch_size)
            for start in tqdm(starts, desc=f"{mode} chains", unit="batch", disable=not progress):
                rows = [_Row(i, r, sampling.generator(start + i), TokenChain([], []))
                        for i, r in enumerate(requests[start:start + self.batch_size])]
                self._run_batch(rows, mode, sampling, step_input, output_scores)
                results += [ChainResult(r.request.id, mode, r.results, r.tokens) for r in rows]
        return results

    def _run_batch(self, rows, mode, sampling, step_input, output_scores):
        names = list(dict.fromkeys(s for row in rows for s in row.request.stages))
        stage_ids = {name: i for i, name in enumerate(names)}
        shared_cache = ChainCache(self.base, self.prompt_caches(names), len(rows))
        held: dict[str, ChainCache] = {}  # text mode: each stage's latest cache
        started = time.perf_counter()
        for row in rows:
            row.tokens.shared_ids = self.codec.shared(row.request.shared)
            row.pending = [(t, (Kind.SHARED, -1, -1, False)) for t in row.tokens.shared_ids]
            row.history = list(row.pending)
        for k in range(max(len(row.request.steps) for row in rows)):
            started = started if k == 0 else time.perf_counter()
            active = [row for row in rows if k < len(row.request.steps)]
            if mode == "shared":
                cache, cache_ids = shared_cache, stage_ids
            else:  # a fresh cache with the prompts of this step's stages only
                step_names = list(dict.fromkeys(row.request.steps[k].stage for row in active))
                cache = ChainCache(self.base, self.prompt_caches(step_names), len(rows))
                cache_ids = {name: i for i, name in enumerate(step_names)}
                held.update({name: cache for name in step_names})
            chunks, inputs = {}, {}
            for row in active:
                step = row.request.steps[k]
                inputs[id(row)] = step.input
                if step_input is not None:
                    given = step_input(row.request, k, [r.output for r in row.results])
                    inputs[id(row)] = step.input if given is None else given
                row.tokens.steps.append(TokenStep(step.stage, self.codec.input(inputs[id(row)]), [],
                                                  step.input_visible))
                stage = cache_ids[step.stage]
                segment = [(t, (Kind.INPUT, k, stage, step.input_visible))
                           for t in row.tokens.steps[k].input_ids]
                if mode == "shared":
                    chunks[id(row)] = row.pending + segment
                else:
                    chunks[id(row)] = self._text_view(row, (stage, k)) + segment
                row.pending = []
                row.history += [(t, (m[0], m[1], stage_ids[step.stage], m[3])) for t, m in segment]
            ids, meta = self._pad([chunks.get(id(row), []) for row in rows])
            logits = cache.append(ids, meta, last_only=True)
            outputs = self._decode(cache, logits, rows, active, k, sampling, output_scores,
                                   cache_ids, stage_ids)
            caches = [shared_cache] if mode == "shared" else list({id(c): c for c in held.values()}.values())
            kv_bytes = sum(c.kv_bytes for c in caches)
            for i, row in enumerate(rows):
                if row not in active:
                    continue
                out_ids, scores, first_token_at = outputs[id(row)]
                row.tokens.steps[k].output_ids = out_ids
                step = row.request.steps[k]
                stats = StepStats(
                    prefilled_tokens=len(chunks[id(row)]), decoded_tokens=len(out_ids),
                    time_to_first_token_s=first_token_at - started,
                    wall_s=time.perf_counter() - started, kv_bytes=kv_bytes,
                    kv_tokens=sum(int(c.tokens_held()[i]) for c in caches))
                row.results.append(StepResult(step.stage, inputs[id(row)],
                                              self._output_text(out_ids, step.stop), out_ids,
                                              stats, scores))

    def _text_view(self, row: _Row, own: tuple[int, int]) -> list[tuple[int, Meta]]:
        """What the step would see in shared mode (by the visibility rule), relabelled as its own
        input: text mode re-encodes it under its own prompt as plain causal text."""
        if not row.history:
            return []
        stage, k = own
        query = [(Kind.OUTPUT, k, stage, False)]
        keys = TokenMeta.from_rows([[m for _, m in row.history] + query])
        seen = visibility(keys, 1)[0, 0, 0, :-1]
        return [(t, (Kind.INPUT, k, stage, False))
                for (t, _), keep in zip(row.history, seen.tolist()) if keep]

    def _pad(self, chunks: list[list[tuple[int, Meta]]]):
        meta = TokenMeta.from_rows([[m for _, m in c] for c in chunks])
        ids = torch.full((len(chunks), max(meta.length, 1)), self.codec.pad_id, dtype=torch.long)
        if meta.length == 0:  # every row idle: one padding column keeps shapes valid
            meta = TokenMeta.fill(len(chunks), 1, Kind.PAD)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor([t for t, _ in c], dtype=torch.long)
        return ids, meta

    def _decode(self, cache, logits, rows, active, k, sampling, output_scores, cache_ids,
                stage_ids):
        """Generate step k's outputs for the active rows; finished rows pad until all are done.
        `cache_ids` number the stages as the cache does, `stage_ids` as the history does."""
        out = {id(row): ([], [] if output_scores else None, 0.0) for row in active}
        live = list(active)
        meta_of = {id(row): (Kind.OUTPUT, k, cache_ids[row.request.steps[k].stage], False)
                   for row in active}
        while live:
            still = []
            for row in live:
                i = row.slot
                step = row.request.steps[k]
                token = sampling.choose(logits[i], row.generator)
                ids, scores, first = out[id(row)]
                ids.append(token)
                if scores is not None:
                    scores.append(logits[i].float().cpu())
                if len(ids) == 1:
                    out[id(row)] = (ids, scores, time.perf_counter())
                meta = meta_of[id(row)]
                row.history.append((token, (Kind.OUTPUT, k, stage_ids[step.stage], False)))
                if self._finished(ids, step):
                    row.pending = [(token, meta)]
                else:
                    still.append(row)
            live = still
            if live:
                chunk = [[(row.history[-1][0], meta_of[id(row)])] if row in live else []
                         for row in rows]
                ids, meta = self._pad(chunk)
                logits = cache.append(ids, meta, last_only=True)
        return {key: (ids, torch.stack(s) if s is not None else None, first)
                for key, (ids, s, first) in out.items()}

    def _finished(self, ids: list[int], step) -> bool:
        if ids[-1] == self.codec.eos_id or ids[-1] in step.stop_token_ids:
            return True
        if len(ids) >= (step.max_new_tokens or self.max_new_tokens):
            return True
        return bool(step.stop) and any(s in self.codec.decode(ids) for s in step.stop)

    def _output_text(self, ids: list[int], stop: list[str]) -> str:
        text = self.codec.decode(ids)
        hits = [text.index(s) + len(s) for s in stop if s in text]
        return text[: min(hits)] if hits else text

