"""`ChainCache`: one KV cache for a batch of chains, and the forward that appends to it.

The cache starts with the prompt caches of the stages in use (one block per stage, shared by
every row), then grows by chunks of content. Each chunk's mask comes from the visibility rule
over all keys so far, its positions from each row's count of real tokens. The one-pass training
forward is a single `append` of a whole `Layout`; the engine appends shared content, inputs and
decoded tokens one chunk at a time. Same code, so the two agree by construction, up to float.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from fthss.layout.sequence import Layout, positions, prompt_slots
from fthss.layout.visibility import TokenMeta, visibility
from fthss.models.base import BaseModel
from fthss.prompts.stage import LayerKV


class SequenceTooLongError(ValueError):
    """A request needs more positions than the base model supports."""


class PrefixOnlyCache(DynamicCache):
    """A cache that lets each layer attend over its stored K/V plus the chunk's, but stores
    nothing new. The one-pass forward needs no growth, and a layer whose forward reads but
    never writes can be recomputed by gradient checkpointing without doubling its keys."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return (torch.cat([layer.keys, key_states], dim=-2),
                torch.cat([layer.values, value_states], dim=-2))


class ChainCache:
    def __init__(self, base: BaseModel, prompts: list[list[LayerKV]], batch_size: int,
                 grow: bool = True):
        """`prompts[s]` is stage s's prompt cache (stage id = index), all made for the same C.
        With `grow=False` appended chunks are not kept (training's one pass)."""
        self.base = base
        lengths = [layers[0][0].shape[2] for layers in prompts]
        self.keys, self.first_position = prompt_slots(lengths)
        self.keys = self.keys.to(base.device)
        self.cache = DynamicCache() if grow else PrefixOnlyCache()
        for i in range(base.num_layers if prompts else 0):
            k = torch.cat([layers[i][0] for layers in prompts], dim=2)
            v = torch.cat([layers[i][1] for layers in prompts], dim=2)
            # stored as DynamicCache stores, whatever `update` does with later chunks
            DynamicCache.update(self.cache, k.expand(batch_size, -1, -1, -1),
                                v.expand(batch_size, -1, -1, -1), i)
        self.next_position = torch.full((batch_size,), self.first_position, device=base.device)

    @classmethod
    def forward_layout(cls, base: BaseModel, prompts: list[list[LayerKV]], layout: Layout
                       ) -> torch.Tensor:
        """The one-pass forward (training): the whole layout as one chunk, logits
        `[B, T, vocab]`. Differentiable through the prompt caches."""
        if layout.first_position != max((p[0][0].shape[2] for p in prompts), default=0):
            raise ValueError("layout and prompt caches disagree on the first content position")
        cache = cls(base, prompts, layout.input_ids.shape[0], grow=False)
        return cache.append(layout.input_ids, layout.meta)

    def append(self, input_ids: torch.Tensor, meta: TokenMeta, last_only: bool = False
               ) -> torch.Tensor:
        """Run a `[batch, q]` chunk (padding marked in `meta`) and return its logits
        `[batch, q, vocab]`, or with `last_only` those of each row's last real token
        `[batch, vocab]` (computing no others: a long prefill needs only one row of logits)."""
        meta = meta.to(self.base.device)
        pos = positions(meta, self.next_position)
        limit = self.base.position_limit
        if int(pos.max()) >= limit:
            raise SequenceTooLongError(
                f"a request needs position {int(pos.max())} but the base supports positions "
                f"< {limit} (prompt length + content tokens)")
        self.keys = self.keys.cat(meta)
        mask = self.base.attention_mask(visibility(self.keys, meta.length))
        last = None
        if last_only:
            index = torch.arange(meta.length, device=pos.device)
            last = torch.where(meta.is_real, index, 0).max(dim=1).values
            kept, where = torch.unique(last, return_inverse=True)
        logits = self.base.forward(self.cache, pos, input_ids=input_ids.to(self.base.device),
                                   attention_mask=mask, logits_at=None if last is None else kept)
        self.next_position = self.next_position + meta.is_real.sum(dim=1)
        if last is None:
            return logits
        return logits[torch.arange(logits.shape[0], device=logits.device), where]

    def tokens_held(self) -> torch.Tensor:
        """Per row: the slots that hold a real token (prompt slots included, padding not)."""
        return self.keys.is_real.expand(self.next_position.shape[0], -1).sum(dim=1)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if t is not None)
