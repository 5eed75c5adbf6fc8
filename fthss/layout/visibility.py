"""The cascade visibility rule: which key every query token may attend to.

This is the only place where the rule (docs/design.md, "One visibility rule") lives. Training builds
its one-pass mask with it, the engine builds each incremental chunk's mask with it, and text mode
picks the tokens a step re-encodes with it. Every token carries a little metadata (`TokenMeta`): its
kind, the step it belongs to, the stage that runs that step and, for inputs, whether later steps may
see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class Kind(IntEnum):
    PAD = 0  # batch padding: sees only itself, seen by nobody
    PROMPT = 1  # a stage's soft prompt (a prompt-cache slot)
    SHARED = 2  # content every stage reads (question, instructions)
    INPUT = 3  # a step's own input, starting with its step marker
    OUTPUT = 4  # what a step generates


@dataclass
class TokenMeta:
    """Per-token metadata for a batch, each field a `[batch, length]` tensor."""

    kind: torch.Tensor  # Kind values
    step: torch.Tensor  # index of the step the token belongs to, -1 outside steps
    stage: torch.Tensor  # id of the stage running that step (or owning the prompt), -1 if none
    visible: torch.Tensor  # bool: an input that later steps may read

    @classmethod
    def fill(cls, batch: int, length: int, kind: Kind, step: int = -1, stage: int = -1,
             visible: bool = False) -> TokenMeta:
        def full(value, dtype=torch.long):
            return torch.full((batch, length), value, dtype=dtype)

        return cls(full(int(kind)), full(step), full(stage), full(visible, torch.bool))

    @classmethod
    def from_rows(cls, rows: list[list[tuple[int, int, int, bool]]]) -> TokenMeta:
        """Rows of `(kind, step, stage, visible)` tuples, right-padded with PAD to one length."""
        length = max((len(r) for r in rows), default=0)
        meta = cls.fill(len(rows), length, Kind.PAD)
        for i, row in enumerate(rows):
            if row:
                kind, step, stage, visible = (torch.tensor(col) for col in zip(*row, strict=True))
                meta.kind[i, : len(row)] = kind
                meta.step[i, : len(row)] = step
                meta.stage[i, : len(row)] = stage
                meta.visible[i, : len(row)] = visible
        return meta

    @property
    def length(self) -> int:
        return self.kind.shape[1]

    @property
    def is_real(self) -> torch.Tensor:
        return self.kind != Kind.PAD

    def cat(self, other: TokenMeta) -> TokenMeta:
        """Append `other` along the sequence; a batch of 1 broadcasts (shared prompt slots)."""
        batch = max(self.kind.shape[0], other.kind.shape[0])

        def join(a, b):
            return torch.cat([a.expand(batch, -1), b.expand(batch, -1)], dim=1)

        return TokenMeta(join(self.kind, other.kind), join(self.step, other.step),
                         join(self.stage, other.stage), join(self.visible, other.visible))

    def to(self, device) -> TokenMeta:
        return TokenMeta(self.kind.to(device), self.step.to(device), self.stage.to(device),
                         self.visible.to(device))


def visibility(keys: TokenMeta, num_queries: int) -> torch.Tensor:
    """Boolean mask `[batch, 1, num_queries, keys.length]`, True where a query may attend.

    The queries are the last `num_queries` tokens of `keys` (a chunk is appended before it
    attends). A token of step k run by stage S sees: the prompt of S, every shared token, the
    tokens of step k causally, the outputs of earlier steps and the inputs of earlier steps
    marked visible. Shared tokens see shared tokens causally. Padding sees only itself. So no
    row is ever empty: every real token sees at least itself.
    """
    total = keys.length
    slots = torch.arange(total, device=keys.kind.device)
    query_slots = slots[total - num_queries:]
    causal = slots[None, None, :] <= query_slots[None, :, None]  # [1, q, k]

    def query(t):
        return t[:, total - num_queries:, None]  # [b, q, 1]

    def key(t):
        return t[:, None, :]  # [b, 1, k]

    q_kind, k_kind = query(keys.kind), key(keys.kind)
    q_step, k_step = query(keys.step), key(keys.step)
    q_in_step = (q_kind == Kind.INPUT) | (q_kind == Kind.OUTPUT)
    k_in_step = (k_kind == Kind.INPUT) | (k_kind == Kind.OUTPUT)

    own_prompt = (k_kind == Kind.PROMPT) & (key(keys.stage) == query(keys.stage))
    shared = (k_kind == Kind.SHARED) & causal
    own_step = k_in_step & (k_step == q_step) & causal
    upstream = (k_step < q_step) & causal & (
        (k_kind == Kind.OUTPUT) | ((k_kind == Kind.INPUT) & key(keys.visible)))

    step_view = q_in_step & (own_prompt | shared | own_step | upstream)
    shared_view = (q_kind == Kind.SHARED) & shared
    pad_self = (q_kind == Kind.PAD) & (slots[None, None, :] == query_slots[None, :, None])
    return (step_view | shared_view | pad_self)[:, None]
