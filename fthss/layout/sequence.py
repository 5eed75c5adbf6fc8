"""From a chain sample to tokens, positions and the one-pass visibility mask.

Content is laid out in sequence order: `[shared | in_1 | out_1 | in_2 | out_2 | ...]`. Each step's
input segment starts with a step marker, so the first output token is predicted from a token of
the step itself. Outputs end with EOS. Prompt-cache slots come first (one block per stage) and are
right-aligned to end just before the first content position C (the longest prompt's length);
content takes C, C+1, ... in sequence order, whatever the mask hides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fthss.errors import ConfigError
from fthss.layout.chain import ChainSample
from fthss.layout.visibility import Kind, TokenMeta, visibility


@dataclass
class TokenStep:
    stage: str
    input_ids: list[int]  # step marker, then the input's tokens
    output_ids: list[int]
    input_visible: bool = False
    input_text: str | None = None  # the text the input ids came from, when known

    def rows(self, k: int, stage: int) -> tuple[list, list]:
        """The step's input and output tokens as `(token, (kind, step, stage, visible))` rows,
        this step being step `k` run by stage id `stage`: the one labelling of a step's tokens,
        for the training layout and the engine's chunks alike."""
        return ([(t, (Kind.INPUT, k, stage, self.input_visible)) for t in self.input_ids],
                [(t, (Kind.OUTPUT, k, stage, False)) for t in self.output_ids])


@dataclass
class TokenChain:
    shared_ids: list[int]
    steps: list[TokenStep]

    def rows(self, stage_ids: dict[str, int]) -> list[tuple[int, tuple[int, int, int, bool]]]:
        """Every content token in sequence order as `(token, (kind, step, stage, visible))`."""
        rows = [(t, (Kind.SHARED, -1, -1, False)) for t in self.shared_ids]
        for k, step in enumerate(self.steps):
            inputs, outputs = step.rows(k, stage_ids[step.stage])
            rows += inputs + outputs
        return rows

    def text_view(self, k: int) -> list[int]:
        """What step k re-encodes as text when stages pass text: the content its first output
        token would see in shared mode (by the visibility rule) before step k itself: shared
        content, earlier outputs, earlier inputs marked visible."""
        rows = self.rows({step.stage: 0 for step in self.steps})
        return [rows[i][0] for i in self.text_view_slots(k)]

    def text_view_slots(self, k: int) -> list[int]:
        """Where `text_view(k)`'s tokens sit among the content (0 = the first content token):
        in shared mode step k reads them at these positions, with holes where hidden segments
        lie."""
        before = TokenChain(self.shared_ids, self.steps[:k])
        rows = before.rows({step.stage: 0 for step in self.steps})
        if not rows:
            return []
        query = (Kind.OUTPUT, k, 0, False)
        seen = visibility(TokenMeta.from_rows([[m for _, m in rows] + [query]]), 1)[0, 0, 0, :-1]
        return [i for i, keep in enumerate(seen.tolist()) if keep]


def pad_id(tokenizer) -> int:
    """The id padding takes: the tokenizer's pad token, else EOS. Padding is masked, so any id
    would do; one choice everywhere keeps training, inference and benchmarks alike."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class SegmentCodec:
    """How each kind of segment becomes tokens, for one tokenizer.

    shared: BOS (if the tokenizer has one) + text; step input: a step marker (BOS, else EOS, or
    the id given) + text; output: text + EOS.
    """

    def __init__(self, tokenizer, step_marker_id: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token: outputs could never end")
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos_id = tokenizer.eos_token_id
        self.step_marker_id = (step_marker_id if step_marker_id is not None
                               else (self.bos or [self.eos_id])[0])
        self.pad_id = pad_id(tokenizer)
        # tokenizers that encode every text as if it followed a space (SentencePiece's Llama,
        # byte-level BPE with add_prefix_space) decode it back with that space: drop it
        self.prefix_space = self.tokenizer.decode(self.text("a")) == " a"

    def text(self, text: str | None) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def shared(self, text: str) -> list[int]:
        return self.bos + self.text(text)

    def input(self, text: str | None) -> list[int]:
        return [self.step_marker_id] + self.text(text)

    def output(self, text: str) -> list[int]:
        return self.text(text) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text[1:] if self.prefix_space and text.startswith(" ") else text

    def encode(self, sample: ChainSample) -> TokenChain:
        """A chain with gold outputs (training, teacher forcing)."""
        for k, step in enumerate(sample.steps):
            if step.output is None:
                raise ValueError(f"chain {sample.id or ''} step {k} ({step.stage}): no output")
        return TokenChain(self.shared(sample.shared), [
            TokenStep(s.stage, self.input(s.input), self.output(s.output), s.input_visible)
            for s in sample.steps])


def prompt_slots(prompt_lengths: list[int]) -> tuple[TokenMeta, int]:
    """Metadata of the prompt-cache block (stage id = index) and C, the first content position."""
    rows = [(Kind.PROMPT, -1, stage, False)
            for stage, n in enumerate(prompt_lengths) for _ in range(n)]
    return TokenMeta.from_rows([rows]), max(prompt_lengths, default=0)


def positions(chunk: TokenMeta, next_position: torch.Tensor) -> torch.Tensor:
    """Positions of a chunk: real tokens count up from each row's `next_position`; padding
    repeats the row's current position (it is never seen, any valid value will do)."""
    real = chunk.is_real.long()
    return next_position[:, None] + torch.cumsum(real, dim=1) - real


@dataclass
class Layout:
    """One padded batch of chains laid out for the one-pass forward."""

    input_ids: torch.Tensor  # [B, T] content tokens (prompt slots are not tokens)
    meta: TokenMeta  # [B, T] content metadata
    prompt: TokenMeta  # [1, P] prompt-slot metadata
    first_position: int  # C

    @property
    def keys(self) -> TokenMeta:
        return self.prompt.cat(self.meta)

    @property
    def mask(self) -> torch.Tensor:
        """Boolean `[B, 1, T, P + T]`: content queries over prompt slots and content keys."""
        return visibility(self.keys, self.meta.length)

    @property
    def position_ids(self) -> torch.Tensor:
        batch = self.input_ids.shape[0]
        return positions(self.meta, torch.full((batch,), self.first_position))

    def labels(self, stages: set[int] | None = None) -> torch.Tensor:
        """Output tokens (of `stages` only, if given) as targets, -100 elsewhere (HF convention:
        the model shifts them, so each output token is predicted from the token before it)."""
        target = self.meta.kind == Kind.OUTPUT
        if stages is not None:
            target &= torch.isin(self.meta.stage, torch.tensor(sorted(stages), dtype=torch.long))
        return self.input_ids.masked_fill(~target, -100)


def build_layout(chains: list[TokenChain], stage_ids: dict[str, int], prompt_lengths: list[int],
                 pad_id: int) -> Layout:
    """Lay out a batch: `stage_ids` maps stage names to ids, `prompt_lengths[id]` is N."""
    rows = [chain.rows(stage_ids) for chain in chains]
    meta = TokenMeta.from_rows([[m for _, m in row] for row in rows])
    input_ids = torch.full((len(rows), meta.length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor([t for t, _ in row], dtype=torch.long)
    prompt, first = prompt_slots(prompt_lengths)
    return Layout(input_ids, meta, prompt, first)
