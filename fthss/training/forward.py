"""The one-pass forward of training: every chain of a micro-batch as one sequence.

A `Layout` holds the chains' content tokens, their metadata and the prompt slots; the forward
runs all of it at once over the stages' prompt caches, with the layout's own mask (the
visibility rule, `Layout.mask`) and positions (`Layout.position_ids`). No cache state is kept:
the prompt caches are read, never grown (`PrefixOnlyCache`). The engine's incremental chunks
are checked against exactly this forward (`fthss.verify`), so training and inference agree by
construction, up to float.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from fthss.layout.sequence import Layout
from fthss.models.base import BaseModel
from fthss.models.lora import LoraBank, Route
from fthss.prompts.stage import LayerKV, side_by_side


class PrefixOnlyCache(DynamicCache):
    """A cache that lets each layer attend over its stored K/V plus the chunk's, but stores
    nothing new. The one-pass forward needs no growth, and a layer whose forward reads but
    never writes can be recomputed by gradient checkpointing without doubling its keys."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return (torch.cat([layer.keys, key_states], dim=-2),
                torch.cat([layer.values, value_states], dim=-2))


def one_pass_logits(base: BaseModel, prompts: list[list[LayerKV]], layout: Layout,
                    bank: LoraBank | None = None) -> torch.Tensor:
    """Logits `[B, T, vocab]` of every content token of `layout`.

    Args:
        base: the frozen base model.
        prompts: `prompts[s]`, stage s's prompt cache (batch 1), all made for the layout's C.
        layout: the micro-batch (`fthss.layout.sequence.build_layout`).
        bank: the lora stages' deltas by the layout's stage ids (None: no lora stage).

    Differentiable through the prompt caches and the bank: training's gradients flow there.
    """
    if layout.first_position != max((p[0][0].shape[2] for p in prompts), default=0):
        raise ValueError("layout and prompt caches disagree on the first content position")
    batch = layout.input_ids.shape[0]
    cache = PrefixOnlyCache()
    for i, (k, v) in enumerate(side_by_side(prompts)):
        DynamicCache.update(cache, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
    positions = layout.position_ids.to(base.device)
    base.check_positions(positions)
    stages = layout.meta.stage.to(base.device)
    return base.forward(cache, positions, input_ids=layout.input_ids.to(base.device),
                        attention_mask=base.attention_mask(layout.mask.to(base.device)),
                        route=None if bank is None else Route(bank, stages))
