"""Stages on disk: PEFT loads what fthss saves, fthss loads what PEFT saves, text mode gives
PEFT's logits, and bad folders are refused with the file and field named."""

import json
import warnings

import pytest
import torch
from peft import (PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model)

from fthss.engine.engine import ChainEngine
from fthss.layout.chain import ChainSample, Step
from fthss.models.presets import tiny_base
from fthss.prompts.io import StageLoadError, load_stage, save_stage
from fthss.prompts.stage import Stage, StageConfig
from fthss.verify import text_view

from conftest import get_base


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_round_trip(arch, kind, tmp_path):
    base = get_base(arch)
    stage = Stage.create(StageConfig("compress", kind, 5, "text", init_text="summarise"), base)
    stage.save_pretrained(tmp_path / "s", base)
    loaded = Stage.from_pretrained(tmp_path / "s", base)
    assert torch.equal(loaded.weight, stage.weight)
    assert loaded.config == stage.config


def _peft_weight(peft_model):
    return peft_model.prompt_encoder["default"].embedding.weight.detach()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_loads_a_stage_and_computes_what_text_mode_computes(kind, tmp_path):
    base = tiny_base("tiny-llama")  # PEFT wraps the model: keep it away from other tests
    stage = Stage.create(StageConfig("qa", kind, 4), base, seed=7)
    save_stage(stage, tmp_path / "qa", base)
    peft_model = PeftModel.from_pretrained(tiny_base("tiny-llama").model, tmp_path / "qa")
    assert torch.equal(_peft_weight(peft_model), stage.weight.detach())
    [result] = ChainEngine(base, [stage], max_new_tokens=5).run(
        [ChainSample("who?", [Step("qa", input="hello world")])], mode="text", output_scores=True)
    view, output = text_view(result.tokens, 0), result.tokens.steps[0].output_ids
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([view + output[:-1]])).logits[0]
    if kind == "prompt":  # PEFT returns the prompt positions' logits too
        logits = logits[stage.num_virtual_tokens:]
    torch.testing.assert_close(result.steps[0].scores, logits[len(view) - 1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_an_adapter_trained_with_peft_loads_as_a_stage(kind, tmp_path):
    base = tiny_base("tiny-llama")
    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6) if kind == "prompt"
              else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    peft_model = get_peft_model(base.model, config)
    with torch.no_grad():
        _peft_weight(peft_model).normal_()
    peft_model.save_pretrained(tmp_path / "peft_A")
    with pytest.warns(UserWarning, match="only its shapes"):
        stage = load_stage(tmp_path / "peft_A", get_base("tiny-llama"))
    assert (stage.name, stage.config.kind, stage.num_virtual_tokens) == ("peft_A", kind, 6)
    assert torch.equal(stage.weight.detach(), _peft_weight(peft_model).float())
    ChainEngine(get_base("tiny-llama"), [stage], max_new_tokens=2).run(
        [ChainSample("q", [Step("peft_A")])])


@pytest.fixture
def saved(tmp_path):
    base = get_base("tiny-llama")
    save_stage(Stage.create(StageConfig("A", "prompt", 3), base), tmp_path / "A", base)
    return tmp_path / "A"


def test_stage_made_for_another_base_is_refused(saved):
    other = tiny_base("tiny-llama", seed=1)  # same shapes, other weights
    with pytest.raises(StageLoadError, match=r"fthss_stage.json.*another base.*embedding_sha256"):
        load_stage(saved, other)
    wider = tiny_base("tiny-qwen2")
    wider.model.config.hidden_size = 96  # stands for a base with another hidden size
    with pytest.raises(StageLoadError, match=r"adapter_model.safetensors: width 64 does not fit"):
        load_stage(saved, wider)


def _rewrite(path, **changes):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


def test_bad_folders_are_refused_naming_file_and_field(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(StageLoadError, match="no such stage folder"):
        load_stage(tmp_path / "nothing")
    weights = saved / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(StageLoadError, match=r"adapter_model.safetensors: unreadable or truncated"):
        load_stage(saved)
    weights.write_bytes(good)
    tensor = load_file(weights)["prompt_embeddings"]
    save_file({"prompt_embeddings": tensor.clone().fill_(float("nan"))}, weights)
    with pytest.raises(StageLoadError, match="NaN or inf"):
        load_stage(saved)
    save_file({"embeddings": tensor}, weights)
    with pytest.raises(StageLoadError, match="no 'prompt_embeddings' tensor"):
        load_stage(saved)
    save_file({"prompt_embeddings": tensor}, weights)
    _rewrite(saved / "adapter_config.json", num_virtual_tokens=5)
    with pytest.raises(StageLoadError, match=r"shape \(3, 64\).*num_virtual_tokens=5"):
        load_stage(saved)
    _rewrite(saved / "adapter_config.json", num_virtual_tokens=3, peft_type="LORA")
    with pytest.raises(StageLoadError, match=r"adapter_config.json: peft_type 'LORA'"):
        load_stage(saved)
    _rewrite(saved / "adapter_config.json", peft_type="PREFIX_TUNING", prefix_projection=True)
    with pytest.raises(StageLoadError, match="prefix_projection is true"):
        load_stage(saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(StageLoadError, match=r"adapter_config.json: malformed JSON at line 1"):
        load_stage(saved)
    weights.rename(saved / "adapter_model.bin")
    (saved / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}))
    with pytest.raises(StageLoadError, match="pickle files are not loaded"):
        load_stage(saved)


def test_a_stage_loads_without_warnings_when_it_carries_a_fingerprint(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_stage(saved, get_base("tiny-llama"))
