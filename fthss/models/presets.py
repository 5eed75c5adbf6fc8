"""Tiny random-init models of real architectures, and a byte-level tokenizer built in code.

They let every test, `fthss verify --arch ...` and CI run without downloading any weights.
Weights come from a fixed seed, so a preset has the same fingerprint on every machine.
"""

from __future__ import annotations

import torch

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


def _tiny(config_cls, **extra):
    def build(vocab_size, init_std):
        return config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                          initializer_range=init_std,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                          pad_token_id=2, tie_word_embeddings=False, **extra)
    return build


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "tiny-llama": _tiny(LlamaConfig),
        "tiny-qwen2": _tiny(Qwen2Config),
        "tiny-mistral": _tiny(MistralConfig, sliding_window=None),
    }


ARCHITECTURES = ("tiny-llama", "tiny-qwen2", "tiny-mistral")


def tiny_base(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
              attn_implementation: str = "sdpa", init_std: float = 0.02) -> BaseModel:
    """A random-init tiny model of `arch` with the byte tokenizer. At the usual init scale
    (0.02) its outputs are nearly uniform and soft prompts barely move them; training tests use
    a larger `init_std` so that a prompt has something to steer."""
    from transformers import AutoModelForCausalLM

    configs = _configs()
    if arch not in configs:
        raise ValueError(f"unknown architecture '{arch}'; known: {', '.join(ARCHITECTURES)}")
    tokenizer = byte_tokenizer()
    config = configs[arch](len(tokenizer), init_std)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return BaseModel(model, tokenizer)
