"""Random-init models of real architectures, and a byte-level tokenizer built in code.

The tiny presets let every test, `fthss verify --arch ...` and CI run without downloading any
weights. `small-llama` has the demo base's shape (4 layers of 256) with room for 4096 positions:
CPU benchmarks at an intermediate of 3000 tokens. `llama3-8b` and `qwen2.5-7b` have the real
models' shapes (vocabulary size included) for speed and memory benchmarks on a GPU: speed and
cache size depend on shapes only, so random weights measure what trained ones would.

Every preset uses the byte tokenizer. Its 259 ids are valid rows of any larger vocabulary, which
is all speed work needs. Weights come from a fixed seed, so a preset built on one device type
has the same fingerprint on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fthss.errors import ConfigError
from fthss.models.base import BaseModel

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@dataclass(frozen=True)
class Preset:
    family: str  # "llama", "qwen2" or "mistral"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    vocab: int | None = None  # None: the byte tokenizer's own size
    # None keeps the config class's default (so the tiny presets stay what they always were)
    rope_theta: float | None = None
    rms_norm_eps: float | None = None

    def config(self, tokenizer_size: int, init_std: float):
        from transformers import LlamaConfig, MistralConfig, Qwen2Config

        config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
        extra = {name: value for name, value in (("rope_theta", self.rope_theta),
                                                 ("rms_norm_eps", self.rms_norm_eps))
                 if value is not None}
        if self.family == "mistral":
            extra["sliding_window"] = None  # fthss refuses sequences longer than a window
        return config_cls[self.family](
            vocab_size=self.vocab or tokenizer_size, hidden_size=self.hidden,
            intermediate_size=self.intermediate, initializer_range=init_std,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions,
            bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, **extra)


PRESETS = {
    "tiny-llama": Preset("llama", 64, 2, 4, 2, 128, 4096),
    "tiny-qwen2": Preset("qwen2", 64, 2, 4, 2, 128, 4096),
    "tiny-mistral": Preset("mistral", 64, 2, 4, 2, 128, 4096),
    "small-llama": Preset("llama", 256, 4, 4, 4, 688, 4096),
    # Meta-Llama-3-8B's config.json: 8.03B parameters
    "llama3-8b": Preset("llama", 4096, 32, 32, 8, 14336, 8192, vocab=128256,
                        rope_theta=500000.0, rms_norm_eps=1e-5),
    # Qwen2.5-7B's config.json: 7.62B parameters (q/k/v projections with biases)
    "qwen2.5-7b": Preset("qwen2", 3584, 28, 28, 4, 18944, 131072, vocab=152064,
                         rope_theta=1000000.0, rms_norm_eps=1e-6),
}

# The tiny presets, one per supported family: what tests run every check on.
ARCHITECTURES = ("tiny-llama", "tiny-qwen2", "tiny-mistral")


def preset_base(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", init_std: float = 0.02,
                device: str | torch.device = "cpu") -> BaseModel:
    """A random-init model of preset `arch` with the byte tokenizer, built directly on `device`
    in `dtype` (an 8B model cannot be built on a small machine's CPU first; on "meta" nothing is
    allocated). At the usual init scale (0.02) its outputs are nearly uniform and soft prompts
    barely move them; training tests use a larger `init_std` so that a prompt has something to
    steer."""
    from transformers import AutoModelForCausalLM

    if arch not in PRESETS:
        raise ConfigError(f"unknown preset '{arch}'; known: {', '.join(PRESETS)}")
    tokenizer = byte_tokenizer()
    config = PRESETS[arch].config(len(tokenizer), init_std)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return BaseModel(model, tokenizer)
