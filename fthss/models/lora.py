"""Per-token LoRA on the frozen base: every token through the deltas of the stage that owns it.

A `lora` stage (docs/design.md, "Stage kind lora") adds low-rank deltas to the base's linear
layers for the tokens it owns only: its step's input and output, and its own soft prompt. Every
other token is computed by the base, or by its own owner, so each K/V of a shared cache is still
written once, by its owner, and read unchanged later. This module is the one implementation of
that routing; the training forward and the engine both go through it (`BaseModel.forward`'s
`route`):

- `LoraWeights`: one stage's deltas: per target module name (`q_proj`, ..., `down_proj`)
  `A` `[layers, r, in]` and `B` `[layers, out, r]`, and the scale alpha / r.
- `LoraBank`: the stages a forward may route to, by stage id, side by side: per layer and
  target one `A` `[R, in]` and one `B` `[out, R]` (R: the ranks summed), and per stage id a row
  of column scales (a stage's scale on its own columns, 0 elsewhere).
- `Route`: a bank and the owner of each token of one forward (`[batch, tokens]` stage ids: the
  `stage` field of `TokenMeta`; -1 for shared content and padding).
- `LoraRouting`: forward hooks on the base's target linear layers. During a routed forward each
  adds `((x @ A.T) * scale[owner]) @ B.T` to its output: two matrix products whatever the
  number of stages, and exactly 0 for a token no lora stage owns (so the base's own value,
  bit for bit). No weights are ever merged: tokens of several owners share a forward.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fthss.errors import ConfigError

# The linear layers a stage may adapt: attention and MLP of the Llama family (Llama, Qwen2,
# Mistral, ...), named as PEFT's `target_modules` name them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?(\w+)$")


class LoraShapeError(ConfigError):
    """LoRA weights that do not fit the base's layers."""


def _targets(model: torch.nn.Module):
    """`(layer, name, path, module)` for every target linear layer of the model."""
    for path, module in model.named_modules():
        match = _LAYER.search(path)
        if match and match.group(2) in LORA_TARGETS and isinstance(module, torch.nn.Linear):
            yield int(match.group(1)), match.group(2), path, module


def target_layers(model: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """Per target name, the base's linear layer of that name in each decoder layer, in order."""
    found: dict[str, dict[int, torch.nn.Linear]] = {}
    for layer, name, _, module in _targets(model):
        found.setdefault(name, {})[layer] = module
    return {name: [layers[i] for i in sorted(layers)] for name, layers in found.items()}


def module_paths(model: torch.nn.Module) -> dict[tuple[int, str], str]:
    """`(layer, target name)` -> the module's path in the model (PEFT's keys are built on it)."""
    return {(layer, name): path for layer, name, path, _ in _targets(model)}


@dataclass
class LoraWeights:
    """One stage's deltas: `A[name]` `[layers, r, in]`, `B[name]` `[layers, out, r]`."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scale: float  # alpha / r

    def detach(self) -> LoraWeights:
        return LoraWeights({n: a.detach() for n, a in self.A.items()},
                           {n: b.detach() for n, b in self.B.items()}, self.scale)

    def delta(self, name: str, layer: int) -> torch.Tensor:
        """The layer's weight delta `[out, in]` (scale * B @ A), as merging would add it."""
        return self.scale * self.B[name][layer] @ self.A[name][layer]

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[1]

    def check_fits(self, model: torch.nn.Module, what: str) -> None:
        """Every target is a layer of the base, with its number of layers and its shapes."""
        layers = target_layers(model)
        for name, a in self.A.items():
            if name not in layers:
                raise LoraShapeError(f"{what}: the base has no '{name}' layers (it has "
                                     f"{sorted(layers)})")
            linear, b = layers[name][0], self.B[name]
            expected = ((len(layers[name]), a.shape[1], linear.in_features),
                        (len(layers[name]), linear.out_features, a.shape[1]))
            if (tuple(a.shape), tuple(b.shape)) != expected:
                raise LoraShapeError(
                    f"{what}: {name} deltas of shapes A {tuple(a.shape)}, B {tuple(b.shape)}, "
                    f"the base needs A {expected[0]}, B {expected[1]} (layers, rank, in / out)")


@dataclass
class LoraBank:
    """The deltas of the stages one forward may route to, side by side (see the module doc)."""

    A: dict[tuple[int, str], torch.Tensor]  # (layer, name) -> [R, in]
    B: dict[tuple[int, str], torch.Tensor]  # (layer, name) -> [out, R]
    scales: torch.Tensor  # [stages + 1, R]: row 0 for owner -1 (no stage), row s+1 for stage s

    @classmethod
    def of(cls, stages: list[LoraWeights | None], dtype: torch.dtype,
           device: torch.device) -> LoraBank | None:
        """The bank of `stages` (stage id = index; None: a stage without deltas), in the base's
        dtype; None when no stage has deltas. Differentiable: training builds it from the
        stages' parameters for every forward."""
        lora = [(s, w) for s, w in enumerate(stages) if w is not None]
        if not lora:
            return None
        total = sum(w.rank for _, w in lora)
        scales = torch.zeros(len(stages) + 1, total, dtype=dtype, device=device)
        offset = 0
        for s, weights in lora:
            scales[s + 1, offset:offset + weights.rank] = weights.scale
            offset += weights.rank
        A, B = {}, {}
        for name in dict.fromkeys(n for _, w in lora for n in w.A):
            layers, inputs = next(w.A[name].shape for _, w in lora if name in w.A)[::2]
            outputs = next(w.B[name].shape[1] for _, w in lora if name in w.B)
            # a stage that leaves this module alone takes zero columns here
            a = torch.cat([w.A[name].to(device, dtype) if name in w.A else
                           torch.zeros(layers, w.rank, inputs, dtype=dtype, device=device)
                           for _, w in lora], dim=1)
            b = torch.cat([w.B[name].to(device, dtype) if name in w.B else
                           torch.zeros(layers, outputs, w.rank, dtype=dtype, device=device)
                           for _, w in lora], dim=2)
            for i in range(layers):
                A[i, name], B[i, name] = a[i], b[i]
        return cls(A, B, scales)

    def renumbered(self, ids: list[int]) -> LoraBank:
        """The same deltas, stage i of the new bank being stage `ids[i]` of this one. The scale
        table keeps its size (rows past the ids route to no stage), so that a compiled step
        sees one shape whichever stages a run uses."""
        index = torch.zeros(self.scales.shape[0], dtype=torch.long, device=self.scales.device)
        index[1:len(ids) + 1] = torch.tensor(ids, dtype=torch.long, device=index.device) + 1
        return LoraBank(self.A, self.B, self.scales[index])


@dataclass
class Route:
    """A bank and, for each token of one forward, the id of the stage that owns it."""

    bank: LoraBank
    owners: torch.Tensor  # [batch, tokens], -1: no stage

    @property
    def column_scales(self) -> torch.Tensor:
        """`[batch, tokens, R]`: each token's owner's scale on the owner's columns, else 0."""
        return self.bank.scales[self.owners + 1]


class LoraRouting:
    """Forward hooks on a model's target linear layers that apply the current route's deltas.
    Hooks are installed at the first routed forward and do nothing when no route is set."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.route: Route | None = None
        self._columns: torch.Tensor | None = None
        self._installed = False

    def _install(self) -> None:
        for name, layers in target_layers(self.model).items():
            for i, linear in enumerate(layers):
                linear.register_forward_hook(self._hook(i, name))
        self._installed = True

    def _hook(self, layer: int, name: str):
        key = (layer, name)

        def add_delta(module, inputs, output):
            route = self.route
            if route is None or key not in route.bank.A:
                return None
            delta = ((inputs[0] @ route.bank.A[key].T) * self._columns) @ route.bank.B[key].T
            return output + delta
        return add_delta

    def run(self, route: Route | None, forward: Callable, *args, **kwargs):
        """`forward(*args, **kwargs)` with `route` in effect (None: the base alone)."""
        if route is None and self.route is None:  # nothing to route: no state to swap
            return forward(*args, **kwargs)
        if route is not None and not self._installed:
            self._install()
        saved = self.route, self._columns
        self.route = route
        self._columns = route.column_scales if route is not None else None
        try:
            return forward(*args, **kwargs)
        finally:
            self.route, self._columns = saved

    def bound(self, forward: Callable) -> Callable:
        """`forward` bound to the route in effect now: gradient checkpointing recomputes a layer
        during the backward pass, after the routed forward has returned."""
        route = self.route
        return lambda *args, **kwargs: self.run(route, forward, *args, **kwargs)
