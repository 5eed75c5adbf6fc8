"""Base models: what fthss refuses and why, loading from a folder, the fingerprint."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Qwen2Config

from fthss.errors import ModelLoadError
from fthss.models.base import BaseModel, UnsupportedModelError
from fthss.models.presets import ARCHITECTURES, byte_tokenizer, preset_base
from fthss.verify import verify


def test_a_model_without_rotary_positions_is_refused():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                        vocab_size=259))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel has no rotary position"):
        BaseModel(model, byte_tokenizer())


def test_attention_that_cannot_take_a_4d_mask_is_refused():
    model = preset_base("tiny-llama").model
    # flash-attn is not installed here, so transformers refuses to build a model with
    # attn_implementation="flash_attention_2" (ImportError). What fthss checks is the
    # implementation the config names, so build with sdpa and then name flash-attention in the
    # config (its setter does not validate), as a model loaded with flash-attn would have it.
    model.config._attn_implementation = "flash_attention_2"
    assert model.config._attn_implementation == "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attention 'flash_attention_2'"):
        BaseModel(model, byte_tokenizer())


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_eager_attention_is_exact_too(arch):
    base = preset_base(arch, attn_implementation="eager")
    assert base.config._attn_implementation == "eager"
    assert base.attention_mask(torch.tensor([[True, False]])).dtype == base.dtype  # additive bias
    report = verify(base, chains=4, seed=2)
    assert max(report.shared_vs_one_pass, report.text_vs_plain, report.batch_vs_alone) < 1e-4
    assert report.greedy_outputs_match


def test_load_from_a_folder(tmp_path):
    base = preset_base("tiny-mistral")
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    loaded = BaseModel.load(tmp_path)
    assert loaded.fingerprint == base.fingerprint
    assert loaded.config._attn_implementation == "sdpa" and loaded.dtype == torch.float32
    ids = torch.tensor([base.tokenizer.encode("same weights, same logits")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, base.model(ids).logits)
    in_bf16 = BaseModel.load(tmp_path, dtype=torch.bfloat16)
    assert in_bf16.dtype == torch.bfloat16 and in_bf16.fingerprint == base.fingerprint
    assert loaded.tokenizer.encode("héllo") == base.tokenizer.encode("héllo")
    with pytest.raises(ModelLoadError, match="no config.json"):
        BaseModel.load(tmp_path / "missing")


def test_a_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    """`--base org/name` resolves through the Hugging Face cache, offline; one not there is
    named with the way to get it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    base = preset_base("tiny-llama")
    base.model.save_pretrained(repo / "snapshots" / "abc123")
    base.tokenizer.save_pretrained(repo / "snapshots" / "abc123")
    assert BaseModel.load("acme/tiny").fingerprint == base.fingerprint
    with pytest.raises(ModelLoadError, match=r"acme/other: neither a local folder nor a model "
                       r"in the Hugging Face cache .*huggingface-cli download acme/other"):
        BaseModel.load("acme/other")


@pytest.fixture
def saved_llama(tmp_path):
    base = preset_base("tiny-llama")
    base.model.save_pretrained(tmp_path / "model")
    base.tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_models_own_code_runs_only_with_the_flag(saved_llama, monkeypatch, capsys):
    """A folder naming its own modelling code (config.json's auto_map) is refused unless
    the user passes --trust-remote-code; the code is never imported."""
    import json

    from fthss.cli import main

    config = json.loads((saved_llama / "config.json").read_text())
    config.update(model_type="llama-with-code", auto_map={
        "AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (saved_llama / "config.json").write_text(json.dumps(config))
    marker = saved_llama.parent / "ran.txt"
    (saved_llama / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        BaseModel.load(saved_llama)
    assert main(["verify", "--base", str(saved_llama), "--chains", "1"]) == 2
    assert "contains custom code" in capsys.readouterr().err
    assert not marker.exists()
    passed = {}

    def load(path, **options):  # the flag reaches the loader (and the code is still not run)
        passed.update(options)
        raise ModelLoadError("stopped before loading")

    monkeypatch.setattr(BaseModel, "load", load)
    assert main(["verify", "--base", str(saved_llama), "--trust-remote-code"]) == 2
    assert passed["trust_remote_code"] is True


def test_pickled_weights_are_not_loaded(saved_llama):
    weights = load_file(saved_llama / "model.safetensors")
    torch.save(weights, saved_llama / "pytorch_model.bin")
    (saved_llama / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match=r"model: no safetensors weights; "
                       r"pytorch_model.bin are pickle files, which are not loaded"):
        BaseModel.load(saved_llama)


def test_fingerprint_ignores_dtype_but_not_weights():
    fp32 = preset_base("tiny-llama").fingerprint
    assert preset_base("tiny-llama", dtype=torch.bfloat16).fingerprint == fp32
    assert (preset_base("tiny-llama", seed=1).fingerprint["embedding_sha256"]
            != fp32["embedding_sha256"])
    assert preset_base("tiny-qwen2").fingerprint["architecture"] == "Qwen2ForCausalLM"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_position_limits(arch):
    base = preset_base(arch)
    assert base.attention_window is None
    assert base.position_limit == base.config.max_position_embeddings == 4096


def test_a_sliding_window_limits_positions():
    config = MistralConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           sliding_window=16)
    config._attn_implementation = "sdpa"
    base = BaseModel(AutoModelForCausalLM.from_config(config), byte_tokenizer())
    assert base.position_limit == 16


def test_a_window_the_config_turns_off_does_not_limit_positions():
    config = Qwen2Config(vocab_size=259, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, sliding_window=16, use_sliding_window=True,
                         max_window_layers=0)
    config._attn_implementation = "sdpa"
    base = BaseModel(AutoModelForCausalLM.from_config(config), byte_tokenizer())
    assert base.attention_window == 16 and base.position_limit == 16
    config.layer_types = ["full_attention"] * 2
    assert base.attention_window is None and base.position_limit == 64
    # A config without per-layer types that keeps the window's size but switches it off (as
    # Qwen2 configs did before transformers added layer_types; today's Qwen2Config nulls the
    # size itself, so set the fields by hand): no limit. Switched on: the window limits.
    config.layer_types = None
    config.sliding_window, config.use_sliding_window = 16, False
    assert base.attention_window is None and base.position_limit == 64
    config.use_sliding_window = True
    assert base.attention_window == 16 and base.position_limit == 16
