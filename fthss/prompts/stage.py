"""Stages: named soft prompts (and LoRA deltas) on the frozen base.

Three kinds (docs/design.md, "Vocabulary" and "Stage kind lora"):
- `prompt`: N input-level embeddings (PEFT's PROMPT_TUNING). Its prompt cache is the base's K/V
  for those embeddings, placed at positions C-N ... C-1.
- `prefix`: a learned K/V per layer (P-Tuning v2, PEFT's PREFIX_TUNING without projection). Its
  keys are used as stored, with no rotation, when content starts at C = N (as in PEFT). When a
  chain's C is larger (a longer prompt in the chain), the keys are rotated by C - N, so that the
  prefix keeps the same offset to the content whatever chain it runs in: without this, a prefix
  stage would answer differently alone and beside a stage with a longer prompt.
- `lora`: low-rank deltas on the base's linear layers (attention and MLP by default), applied
  only to the tokens the stage owns (`fthss.models.lora`), and optionally N input-level
  embeddings as a `prompt` stage has (N may be 0), computed under the deltas.
The prompt or prefix is one weight tensor in PEFT's layout: `[N, hidden]` for a prompt (a lora
stage's too), `[N, layers * 2 * kv_heads * head_dim]` for a prefix. A lora stage's deltas are
`lora_A[name]` `[layers, r, in]` and `lora_B[name]` `[layers, out, r]` per target name.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import DynamicCache

from fthss.errors import ConfigError
from fthss.models.base import BaseModel
from fthss.models.lora import LoraBank, LoraWeights, Route, target_layers

# StageConfig, KINDS and INITS live in fthss.prompts.config (io.py needs them without this
# module); importing them from here keeps working.
from fthss.prompts.config import INITS as INITS
from fthss.prompts.config import KINDS as KINDS
from fthss.prompts.config import StageConfig, prefix_width
from fthss.prompts.io import StageParts, read_stage, write_stage

# One layer's (keys, values), each [batch, kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


def side_by_side(prompts: list[list[LayerKV]]) -> list[LayerKV]:
    """Per layer, the prompt caches of several stages concatenated (one block per stage, in
    stage-id order): the prompt slots of a chain's cache."""
    layers = len(prompts[0]) if prompts else 0
    return [(torch.cat([p[i][0] for p in prompts], dim=2),
             torch.cat([p[i][1] for p in prompts], dim=2)) for i in range(layers)]


class Stage(torch.nn.Module):
    """A stage: `weight` (the prompt or prefix, `[N, width]`, fp32 whatever the base) and, for
    the lora kind, `lora` = {target name: (A `[layers, r, in]`, B `[layers, out, r]`)}."""

    def __init__(self, config: StageConfig, weight: torch.Tensor,
                 lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != config.num_virtual_tokens:
            raise ValueError(f"stage {config.name}: weight of shape {tuple(weight.shape)} does "
                             f"not hold {config.num_virtual_tokens} virtual tokens")
        if (config.kind == "lora") != (lora is not None):
            raise ValueError(f"stage {config.name}: LoRA weights go with the lora kind only")
        self.config = config
        self.weight = torch.nn.Parameter(weight.float())  # trained in fp32 whatever the base
        self.reparam: PrefixMLP | None = None
        self.lora_A, self.lora_B = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for name, (a, b) in (lora or {}).items():
            if a.ndim != 3 or b.ndim != 3 or a.shape[1] != config.lora_rank or \
                    b.shape[2] != config.lora_rank or a.shape[0] != b.shape[0]:
                raise ValueError(f"stage {config.name}: {name} deltas of shapes A "
                                 f"{tuple(a.shape)}, B {tuple(b.shape)} are not [layers, r, in] "
                                 f"and [layers, out, r] with r = {config.lora_rank}")
            self.lora_A[name] = torch.nn.Parameter(a.float())
            self.lora_B[name] = torch.nn.Parameter(b.float())

    @property
    def lora_weights(self) -> LoraWeights | None:
        """The deltas as the routing takes them (None for prompt and prefix stages)."""
        if self.config.kind != "lora":
            return None
        return LoraWeights(dict(self.lora_A), dict(self.lora_B),
                           self.config.lora_alpha / self.config.lora_rank)

    @property
    def current_weight(self) -> torch.Tensor:
        """The weight in PEFT's layout, through the reparameterisation while training with one."""
        return self.weight if self.reparam is None else self.weight + self.reparam()

    def reparameterize(self, hidden: int, seed: int = 0) -> None:
        """Train through P-Tuning v2's MLP: weight = w0 + MLP(embedding), w0 frozen. The MLP's
        last layer starts at zero, so training starts from the current weight."""
        self.reparam = PrefixMLP(self.num_virtual_tokens, self.weight.shape[1], hidden, seed)
        self.weight.requires_grad_(False)

    def fold(self) -> None:
        """Write the reparameterised weight back and drop the MLP (what is saved and served)."""
        if self.reparam is not None:
            with torch.no_grad():
                self.weight.copy_(self.current_weight)
            self.reparam = None
            self.weight.requires_grad_(True)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @classmethod
    def create(cls, config: StageConfig, base: BaseModel, seed: int = 0) -> Stage:
        """A new stage initialised as `config.init` says. A prefix starts as the prompt cache
        of the prompt-kind stage with the same initialisation. LoRA deltas start as PEFT's do
        (A Kaiming-uniform, B zero): a new lora stage computes what the base computes."""
        if config.num_virtual_tokens >= base.position_limit:  # no room left for any content
            raise ConfigError(f"stage {config.name}: {config.num_virtual_tokens} virtual tokens, "
                              f"but the base has {base.position_limit} positions in all")
        generator = torch.Generator().manual_seed(seed)
        embeddings = _initial_embeddings(config, base, generator)
        if config.kind == "lora":
            return cls(config, embeddings, _initial_lora(config, base, generator))
        prompt = cls(StageConfig(config.name, "prompt", config.num_virtual_tokens), embeddings)
        if config.kind == "prompt":
            return cls(config, embeddings)
        with torch.no_grad():
            layers = prompt.prompt_cache(base, config.num_virtual_tokens)
        return cls(config, _pack_prefix(layers))

    def save_pretrained(self, directory: str | Path, base: BaseModel) -> Path:
        """Write the stage to `directory` in PEFT's adapter format (`fthss.prompts.io`);
        returns the folder."""
        self.check_fits(base)
        return write_stage(self.parts(), directory, base)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base: BaseModel | None = None,
                        name: str | None = None) -> Stage:
        """The stage in `directory` (saved by fthss, or a PEFT adapter), checked against `base`
        when given, named `name` when given (else its saved name, else the folder's)."""
        return cls.from_parts(read_stage(directory, base, name))

    @classmethod
    def from_parts(cls, parts: StageParts) -> Stage:
        return cls(parts.config, parts.weight, parts.lora)

    def parts(self) -> StageParts:
        """What is saved: the config, the current weight (through the reparameterisation, if
        any) and the lora deltas, detached."""
        lora = None
        if self.config.kind == "lora":
            lora = {name: (self.lora_A[name].detach(), self.lora_B[name].detach())
                    for name in self.lora_A}
        return StageParts(self.config, self.current_weight.detach(), lora)

    def check_fits(self, base: BaseModel) -> None:
        """Raises ConfigError unless the stage's shapes are the base's."""
        prefix = self.config.kind == "prefix"
        expected = prefix_width(base) if prefix else base.hidden_size
        if self.weight.shape[1] != expected:
            what = "layers*2*kv_heads*head_dim" if prefix else "hidden size"
            raise ConfigError(f"stage {self.name} ({self.config.kind}) has width "
                              f"{self.weight.shape[1]} but the base's {what} is {expected}")
        if self.lora_weights is not None:
            self.lora_weights.check_fits(base.model, f"stage {self.name}")

    def prompt_cache(self, base: BaseModel, first_position: int) -> list[LayerKV]:
        """Per-layer K/V of this stage's prompt, batch 1, in the base's dtype. Differentiable:
        training backpropagates through it. `first_position` is C (prompts end at C-1)."""
        self.check_fits(base)
        n = self.num_virtual_tokens
        weight = self.current_weight.to(base.device, base.dtype)
        if self.config.kind == "prefix":
            # PEFT's layout: [N, L*2, H, D] -> [L*2, H, N, D]; layer i is rows 2i (K), 2i+1 (V).
            kv = weight.view(n, base.num_layers * 2, base.num_kv_heads, base.head_dim)
            kv = kv.permute(1, 2, 0, 3).unsqueeze(1)
            shift = first_position - n
            return [(base.rotate_keys(kv[2 * i], shift) if shift else kv[2 * i], kv[2 * i + 1])
                    for i in range(base.num_layers)]
        if first_position < n:
            raise ConfigError(f"stage {self.name}: first content position {first_position} < N={n}")
        if n == 0:  # a lora stage without a prompt
            empty = weight.new_zeros(1, base.num_kv_heads, 0, base.head_dim)
            return [(empty, empty)] * base.num_layers
        cache = DynamicCache()
        positions = torch.arange(first_position - n, first_position, device=base.device)
        base.forward(cache, positions[None], inputs_embeds=weight[None], logits=False,
                     route=self.own_route(base, n))
        return [(layer.keys, layer.values) for layer in cache.layers]

    def own_route(self, base: BaseModel, tokens: int) -> Route | None:
        """`tokens` tokens of one row, all owned by this stage (its deltas; None without)."""
        bank = LoraBank.of([self.lora_weights], base.dtype, base.device)
        owners = torch.zeros(1, tokens, dtype=torch.long, device=base.device)
        return None if bank is None else Route(bank, owners)


class PrefixMLP(torch.nn.Module):
    """P-Tuning v2's reparameterisation: an embedding per virtual token through a 2-layer MLP."""

    def __init__(self, num_tokens: int, width: int, hidden: int, seed: int):
        super().__init__()
        with torch.random.fork_rng():  # the same seed gives the same MLP on every process
            torch.manual_seed(seed)
            self.embedding = torch.nn.Parameter(torch.randn(num_tokens, hidden))
            self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, width))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)


def _initial_lora(config: StageConfig, base: BaseModel, generator: torch.Generator
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's initialisation: A as nn.Linear's default (Kaiming-uniform, a = sqrt(5)), B zero."""
    layers = target_layers(base.model)
    missing = [name for name in config.lora_targets if name not in layers]
    if missing:
        raise ConfigError(f"stage {config.name}: the base has no {missing} layers")
    lora = {}
    for name in config.lora_targets:
        linear = layers[name][0]
        a = torch.empty(len(layers[name]), config.lora_rank, linear.in_features)
        for layer in a:
            torch.nn.init.kaiming_uniform_(layer, a=math.sqrt(5), generator=generator)
        lora[name] = (a, torch.zeros(len(layers[name]), linear.out_features, config.lora_rank))
    return lora


def _initial_embeddings(config: StageConfig, base: BaseModel, generator: torch.Generator):
    table = base.model.get_input_embeddings().weight.detach().float().cpu()
    n = config.num_virtual_tokens
    if n == 0:
        return table.new_zeros(0, table.shape[1])
    if config.init == "random":
        return torch.randn(n, table.shape[1], generator=generator) * table.std()
    if config.init == "vocab":
        return table[torch.randint(0, table.shape[0], (n,), generator=generator)].clone()
    ids = base.tokenizer.encode(config.init_text, add_special_tokens=False)
    if not ids:
        raise ConfigError(f"stage {config.name}: init_text encodes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # as PEFT's TEXT init: repeat, then cut
    return table[torch.tensor(ids)].clone()


def _pack_prefix(layers: list[LayerKV]) -> torch.Tensor:
    """Inverse of the prefix view in `prompt_cache`: per-layer K/V to PEFT's [N, L*2*H*D]."""
    kv = torch.stack([t[0] for layer in layers for t in layer])  # [L*2, H, N, D]
    return kv.permute(2, 0, 1, 3).reshape(kv.shape[2], -1).detach().float().cpu()


def load_stage(directory: str | Path, base: BaseModel | None = None,
               name: str | None = None) -> Stage:
    """The stage saved in `directory` (by fthss or by PEFT); `Stage.from_pretrained`. With
    `base`, also check that it was made for that base: its shapes always, its fingerprint when
    fthss_stage.json is there."""
    return Stage.from_parts(read_stage(directory, base, name))


def save_stage(stage: Stage, directory: str | Path, base: BaseModel) -> Path:
    """Write `stage` (made for `base`) to `directory`, creating it, each file atomically;
    `stage.save_pretrained`."""
    stage.check_fits(base)
    return write_stage(stage.parts(), directory, base)
