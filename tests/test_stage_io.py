"""Stages on disk: PEFT loads what fthss saves, fthss loads what PEFT saves, text mode gives
PEFT's logits, and bad folders are refused with the file and field named."""

import json
import os
import warnings

import pytest
import torch
from conftest import get_base
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from fthss.atomic import atomic_save_safetensors, atomic_write_bytes, atomic_write_text
from fthss.engine.engine import ChainEngine
from fthss.layout.chain import ChainSample, Step
from fthss.layout.sequence import SegmentCodec
from fthss.models.presets import preset_base
from fthss.prompts.io import PROMPT_FILE, StageLoadError
from fthss.prompts.stage import Stage, StageConfig, load_stage, save_stage
from fthss.verify import text_view

# The logits checks use a larger init scale: at 0.02 the tiny model's logits are nearly uniform
# and a prefix placed one position off moves them by only ~1e-3; at 0.5 by several units.
SHARP = 0.5
FILES = ["adapter_config.json", "adapter_model.safetensors", "fthss_stage.json"]


def _trained_lora(stage, seed=0, std=0.1):
    """`stage` with random B factors, as if trained (new ones are zero: no effect at all)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in stage.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=generator) * std)
    return stage


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("kind,tokens", [("prompt", 5), ("prefix", 5), ("lora", 5), ("lora", 0)])
def test_round_trip(arch, kind, tokens, tmp_path):
    base = get_base(arch)
    lora = {"lora_rank": 3, "lora_alpha": 5.0, "lora_targets": ("q_proj", "v_proj", "up_proj")}
    config = StageConfig("compress", kind, tokens, "text", init_text="summarise",
                         **(lora if kind == "lora" else {}))
    stage = Stage.create(config, base)
    if kind == "lora":
        _trained_lora(stage)
    stage.save_pretrained(tmp_path / "s", base)
    # no temp files left behind; a lora stage's prompt has a file of its own
    assert sorted(os.listdir(tmp_path / "s")) == sorted(FILES + [PROMPT_FILE] * (tokens > 0 and
                                                                                kind == "lora"))
    ours = json.loads((tmp_path / "s" / "fthss_stage.json").read_text())
    assert (ours["format"], ours["version"], ours["base"]) == ("fthss-stage", 1, base.fingerprint)
    loaded = Stage.from_pretrained(tmp_path / "s", base)
    assert torch.equal(loaded.weight, stage.weight)
    assert loaded.weight.dtype == torch.float32
    assert loaded.config == stage.config
    assert loaded.state_dict().keys() == stage.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in stage.state_dict().items())


def test_a_lora_stage_saved_without_a_prompt_drops_the_old_one(tmp_path):
    base = get_base("tiny-llama")
    Stage.create(StageConfig("qa", "lora", 4), base).save_pretrained(tmp_path / "qa", base)
    Stage.create(StageConfig("qa", "lora", 0), base).save_pretrained(tmp_path / "qa", base)
    assert load_stage(tmp_path / "qa", base).num_virtual_tokens == 0


def test_a_reparameterised_stage_is_saved_folded(tmp_path):
    base = get_base("tiny-llama")
    stage = Stage.create(StageConfig("p", "prefix", 3), base)
    stage.reparameterize(hidden=8)
    with torch.no_grad():
        stage.reparam.mlp[2].bias.fill_(0.5)  # the MLP now moves the prefix
    save_stage(stage, tmp_path / "p", base)
    assert torch.equal(load_stage(tmp_path / "p", base).weight, stage.current_weight.detach())


def _peft_weight(peft_model):
    return peft_model.prompt_encoder["default"].embedding.weight.detach()


def _peft_lora(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's LoRA factors by key, as a stage saved by fthss names them."""
    return {k.replace(".default", ""): v.detach() for k, v in peft_model.state_dict().items()
            if ".lora_" in k}


def _assert_text_mode_matches_peft(base, stage, peft_model, shared="", text="hello"):
    """Text mode over one step against PEFT's forward of the same ids: equal logits for every
    generated token, and the prompt really changes them (so the check can fail)."""
    [result] = ChainEngine(base, [stage]).run(
        [ChainSample(shared, [Step(stage.name, input=text, max_new_tokens=4)])],
        mode="text", output_scores=True)
    view, output = text_view(result.tokens, 0), result.tokens.steps[0].output_ids
    ids = torch.tensor([view + output[:-1]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[0]
        bare = base.model(input_ids=ids).logits[0, len(view) - 1:]
    if stage.config.kind == "prompt":  # PEFT returns the virtual tokens' logits too
        logits = logits[stage.num_virtual_tokens:]
    expected = logits[len(view) - 1:]
    assert result.steps[0].scores.shape == expected.shape
    torch.testing.assert_close(result.steps[0].scores, expected, atol=1e-4, rtol=0)
    assert float((bare - expected).abs().max()) > 0.1


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix", "lora"])
def test_peft_loads_a_stage_and_computes_what_text_mode_computes(arch, kind, tmp_path):
    """In text mode a lora stage is a plain PEFT LoRA model over all of its view (a lora
    stage without a soft prompt: PEFT's LORA cannot hold one)."""
    base = preset_base(arch, init_std=SHARP)  # PEFT wraps its model: a fresh one per test
    stage = Stage.create(StageConfig("qa", kind, 0 if kind == "lora" else 4, lora_rank=2), base,
                         seed=7)
    if kind == "lora":
        _trained_lora(stage, std=0.05)
    save_stage(stage, tmp_path / "qa", base)
    peft_model = PeftModel.from_pretrained(preset_base(arch, init_std=SHARP).model, tmp_path / "qa")
    if kind == "lora":
        saved = load_file(tmp_path / "qa" / "adapter_model.safetensors")
        assert _peft_lora(peft_model).keys() == saved.keys()
        assert all(torch.equal(v, saved[k]) for k, v in _peft_lora(peft_model).items())
    else:
        assert torch.equal(_peft_weight(peft_model), stage.weight.detach())
    _assert_text_mode_matches_peft(base, stage, peft_model)
    _assert_text_mode_matches_peft(base, stage, peft_model, shared="who?", text="hello world")


PEFT_CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    # P-Tuning v2: PEFT saves the MLP's output, so the folder holds a plain prefix.
    "prefix-projection": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                    prefix_projection=True,
                                                    encoder_hidden_size=16),
}


LORA_CONFIGS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "gate_proj"]),
    # a regex for target_modules, or one layer left alone: the keys say what is adapted
    "lora-regex": lambda: LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=3,
                                     target_modules=r".*\.(o_proj|down_proj)"),
    "lora-some-layers": lambda: LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=3,
                                           target_modules=["k_proj", "up_proj"],
                                           layers_to_transform=[1]),
}


def _peft_trained(config, tmp_path):
    """A tiny-llama adapter made and saved by PEFT, its weights random as if trained."""
    base = preset_base("tiny-llama", init_std=SHARP)
    assert (base.config.num_attention_heads, base.num_kv_heads) == (4, 2)  # GQA
    peft_model = get_peft_model(base.model, config)
    with torch.no_grad():  # as if trained
        generator = torch.Generator().manual_seed(3)
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                std = 0.05 if ".lora_B" in name else 1.0
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft_A")
    assert not (tmp_path / "peft_A" / "fthss_stage.json").exists()
    return peft_model


@pytest.mark.parametrize("which", list(PEFT_CONFIGS) + list(LORA_CONFIGS))
def test_an_adapter_trained_with_peft_loads_as_a_stage(which, tmp_path):
    peft_model = _peft_trained({**PEFT_CONFIGS, **LORA_CONFIGS}[which](), tmp_path)
    reference = preset_base("tiny-llama", init_std=SHARP)
    with pytest.warns(UserWarning, match="only its shapes"):
        stage = load_stage(tmp_path / "peft_A", reference)
    kind = "lora" if which in LORA_CONFIGS else "prompt" if which == "prompt" else "prefix"
    tokens = 0 if kind == "lora" else 6
    assert (stage.name, stage.config.kind, stage.num_virtual_tokens) == ("peft_A", kind, tokens)
    saved = load_file(tmp_path / "peft_A" / "adapter_model.safetensors")
    if kind == "lora":
        assert stage.config.lora_rank == peft_model.peft_config["default"].r
        assert set(stage.config.lora_targets) == {k.split(".")[-3] for k in saved}
        for key, factor in _peft_lora(peft_model).items():
            layer, name, which_factor = int(key.split(".")[4]), key.split(".")[-3], key[-8]
            held = (stage.lora_A if which_factor == "A" else stage.lora_B)[name][layer]
            assert torch.equal(held, factor)
    else:
        assert torch.equal(stage.weight.detach(), saved["prompt_embeddings"])
    if which in ("prompt", "prefix"):
        # with projection, the live weight is the MLP's input
        assert torch.equal(stage.weight.detach(), _peft_weight(peft_model))
    _assert_text_mode_matches_peft(reference, stage, peft_model)


def test_shared_mode_computes_what_an_activated_lora_computes(tmp_path):
    """PEFT's aLoRA applies its deltas from its invocation tokens on, so the K/V of the context
    before them are the base's: a lora stage in shared mode computes exactly that when the
    invocation is its step's input, step marker included (the context is shared, the step's
    tokens its own)."""
    invocation = "please answer the question"
    base = preset_base("tiny-llama", init_std=SHARP)
    tokens = SegmentCodec(base.tokenizer).input(invocation)
    _peft_trained(LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                             alora_invocation_tokens=tokens,
                             target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
                  tmp_path)
    peft_model = PeftModel.from_pretrained(preset_base("tiny-llama", init_std=SHARP).model,
                                           tmp_path / "peft_A")
    with pytest.warns(UserWarning, match="only its shapes"):
        stage = load_stage(tmp_path / "peft_A", base)
    engine = ChainEngine(base, [stage])
    request = ChainSample("the river of the city", [Step("peft_A", input=invocation,
                                                         max_new_tokens=5)])
    [shared] = engine.run([request], "shared", output_scores=True)
    [text] = engine.run([request], "text", output_scores=True)
    view, output = text_view(shared.tokens, 0), shared.tokens.steps[0].output_ids
    assert view[-len(tokens):] == tokens
    ids = torch.tensor([view + output[:-1]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[0, len(view) - 1:]
    torch.testing.assert_close(shared.steps[0].scores, expected, atol=1e-4, rtol=0)
    # a plain LoRA model (text mode) adapts the context too, and computes something else
    assert float((text.steps[0].scores - expected).abs().max()) > 0.1


def test_a_peft_adapter_takes_the_name_given(tmp_path):
    base = preset_base("tiny-llama")
    get_peft_model(base.model, PEFT_CONFIGS["prompt"]()).save_pretrained(tmp_path / "not.a.name")
    with pytest.raises(StageLoadError, match=r"not\.a\.name.*folder name"):
        load_stage(tmp_path / "not.a.name")
    assert load_stage(tmp_path / "not.a.name", name="reader").name == "reader"


@pytest.fixture
def saved(tmp_path):
    base = get_base("tiny-llama")
    save_stage(Stage.create(StageConfig("A", "prompt", 3), base), tmp_path / "A", base)
    return tmp_path / "A"


def test_a_stage_loads_without_warnings_when_it_carries_a_fingerprint(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_stage(saved, get_base("tiny-llama"))


def test_stage_made_for_another_base_lists_each_differing_field(saved):
    with pytest.raises(StageLoadError) as err:
        load_stage(saved, get_base("tiny-qwen2"))  # same shapes, another architecture
    message = str(err.value)
    assert "fthss_stage.json" in message
    assert "architecture: stage made for 'LlamaForCausalLM', base has 'Qwen2ForCausalLM'" in message
    assert "embedding_sha256" in message
    assert "hidden_size" not in message  # only what differs
    with pytest.raises(StageLoadError, match=r"fthss_stage.json.*another base.*embedding_sha256"):
        load_stage(saved, preset_base("tiny-llama", seed=1))  # same architecture, other weights


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _weights(folder):
    return load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]


def _unhashed(folder, key="weights_sha256"):
    """As a PEFT adapter or a stage saved before weights_sha256 was kept: only the checks of the
    tensor itself can refuse what is wrong with it."""
    ours = json.loads((folder / "fthss_stage.json").read_text())
    del ours[key]
    (folder / "fthss_stage.json").write_text(json.dumps(ours))


def _replace_weights(tensors):
    def replace(folder):
        save_file(tensors(folder), folder / "adapter_model.safetensors")
        _unhashed(folder)
    return replace


def _flip_a_byte(folder):  # inside the tensor: the file still parses, its values differ
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _folder_instead(name):
    def replace(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
    return replace


def _narrow(folder):  # a prompt 32 wide, consistent in itself, on a 64-wide base
    _unhashed(folder)
    save_file({"prompt_embeddings": _weights(folder)[:, :32].contiguous()},
              folder / "adapter_model.safetensors")
    _edit_json(folder / "adapter_config.json", token_dim=32)


def _truncate(folder):
    _unhashed(folder)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def _pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _unprojected(folder):  # projection on, but the raw embedding stored: needs the MLP
    _edit_json(folder / "adapter_config.json", peft_type="PREFIX_TUNING", prefix_projection=True,
               token_dim=64, num_layers=2)


# (how to break a saved prompt stage, what the error must say)
BROKEN = {
    "no adapter_config.json": (lambda f: (f / "adapter_config.json").unlink(),
                               r"adapter_config.json: missing"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(),
                   r"adapter_model.safetensors: missing$"),
    "pickle only": (_pickle_only, (r"adapter_model.safetensors: missing; adapter_model.bin "
                                   r"exists but pickle files are not loaded")),
    "malformed json": (lambda f: (f / "adapter_config.json").write_text("{not json"),
                       r"adapter_config.json:1: malformed JSON"),
    "malformed fthss json": (lambda f: (f / "fthss_stage.json").write_text("[1, 2"),
                             r"fthss_stage.json:1: malformed JSON"),
    "truncated": (_truncate, r"adapter_model.safetensors: unreadable or truncated"),
    "corrupted": (lambda f: (_unhashed(f), (f / "adapter_model.safetensors").write_bytes(
        b"\x10" + b"\xff" * 40)), r"adapter_model.safetensors: unreadable or truncated"),
    "nan": (_replace_weights(lambda f: {"prompt_embeddings": _weights(f).fill_(float("nan"))}),
            r"adapter_model.safetensors: prompt_embeddings holds NaN or inf"),
    "inf": (_replace_weights(lambda f: {"prompt_embeddings": _weights(f).index_fill_(
        0, torch.tensor([1]), float("inf"))}),
            r"adapter_model.safetensors: prompt_embeddings holds NaN or inf"),
    "no prompt_embeddings": (_replace_weights(lambda f: {"embeddings": _weights(f)}),
                             r"adapter_model.safetensors: no 'prompt_embeddings' tensor"),
    "a byte flipped": (_flip_a_byte, (r"adapter_model.safetensors: its sha256 is not the one "
                                      r"fthss_stage.json holds")),
    "other weights": (lambda f: save_file({"prompt_embeddings": _weights(f) * 2},
                                          f / "adapter_model.safetensors"),
                      r"adapter_model.safetensors: its sha256 is not the one"),
    "config is a folder": (_folder_instead("adapter_config.json"),
                           r"adapter_config.json: cannot read: Is a directory"),
    "fthss json is a folder": (_folder_instead("fthss_stage.json"),
                               r"fthss_stage.json: cannot read: Is a directory"),
    "weights are a folder": (_folder_instead("adapter_model.safetensors"),
                             r"adapter_model.safetensors: missing"),
    "nested deep": (lambda f: (f / "adapter_config.json").write_text("[" * 100_000),
                    r"adapter_config.json:1: malformed JSON: nested too deeply"),
    "config not utf-8": (lambda f: (f / "adapter_config.json").write_bytes(b'{"a": "\xff"}'),
                         r"adapter_config.json:1: not UTF-8 text"),
    "name a number": (lambda f: _edit_json(f / "fthss_stage.json", name=5),
                      r"fthss_stage.json: field 'name' has the wrong type int"),
    "init_text a list": (lambda f: _edit_json(f / "fthss_stage.json", init_text=["x"]),
                         r"fthss_stage.json: field 'init_text' has the wrong type list"),
    "hash a number": (lambda f: _edit_json(f / "fthss_stage.json", weights_sha256=1),
                      r"fthss_stage.json: field 'weights_sha256' has the wrong type int"),
    "peft_type a list": (lambda f: _edit_json(f / "adapter_config.json", peft_type=["LORA"]),
                         r"adapter_config.json: field 'peft_type' has the wrong type list"),
    "token_dim a string": (lambda f: _edit_json(f / "adapter_config.json", token_dim="64"),
                           r"adapter_config.json: field 'token_dim' has the wrong type str"),
    "num_layers a float": (lambda f: _edit_json(f / "adapter_config.json", num_layers=2.5),
                           r"adapter_config.json: field 'num_layers' has the wrong type float"),
    "too few tokens": (lambda f: _edit_json(f / "adapter_config.json", num_virtual_tokens=5),
                       (r"adapter_model.safetensors: prompt_embeddings has shape \(3, 64\), "
                        r"but adapter_config.json says num_virtual_tokens=5")),
    "width vs config": (lambda f: _edit_json(f / "adapter_config.json", token_dim=32),
                        (r"adapter_model.safetensors: prompt_embeddings has width 64, but "
                         r"adapter_config.json says token_dim=32")),
    "width vs base": (_narrow, (r"adapter_model.safetensors: width 32 does not fit this base "
                                r"\(a prompt stage needs its hidden_size = 64\)")),
    "lora": (lambda f: _edit_json(f / "adapter_config.json", peft_type="LORA"),
             r"adapter_config.json: r must be a positive integer and lora_alpha a positive "
             r"number, not None and None"),
    "ia3": (lambda f: _edit_json(f / "adapter_config.json", peft_type="IA3"),
            r"adapter_config.json: peft_type 'IA3' is not a stage"),
    "projection": (_unprojected, (r"adapter_model.safetensors: adapter_config.json has "
                                  r"prefix_projection true and prompt_embeddings has width 64")),
    "seq2seq": (lambda f: _edit_json(f / "adapter_config.json", num_transformer_submodules=2),
                r"adapter_config.json: num_transformer_submodules is 2"),
    "format": (lambda f: _edit_json(f / "fthss_stage.json", format="other"),
               r"fthss_stage.json: format is 'other'"),
    "version": (lambda f: _edit_json(f / "fthss_stage.json", version=2),
                r"fthss_stage.json: version 2; this fthss reads version 1"),
    "kind differs": (lambda f: _edit_json(f / "fthss_stage.json", kind="prefix"),
                     r"fthss_stage.json: says kind prefix with 3 tokens"),
    "name leads out": (lambda f: _edit_json(f / "fthss_stage.json", name="../A"),
                       r"stage name '../A': use letters.* \(from fthss_stage.json\)"),
    "bad init": (lambda f: _edit_json(f / "fthss_stage.json", init="zeros"),
                 r"init must be one of .* \(from fthss_stage.json\)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_folder_is_refused_naming_file_and_field(case, saved):
    breaks, message = BROKEN[case]
    breaks(saved)
    with pytest.raises(StageLoadError, match=message) as err:
        load_stage(saved, get_base("tiny-llama"))
    assert str(saved) in str(err.value)


@pytest.fixture
def saved_lora(tmp_path):
    base = get_base("tiny-llama")
    stage = Stage.create(StageConfig("A", "lora", 3, lora_rank=2, lora_targets=("q_proj",)), base)
    save_stage(_trained_lora(stage), tmp_path / "A", base)
    return tmp_path / "A"


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _edit_factors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    _unhashed(folder)


def _replace_prompt(tensors):
    def replace(folder):
        save_file(tensors, folder / "fthss_prompt.safetensors")
        _unhashed(folder, "prompt_sha256")
    return replace


def _flip_a_byte_of(name):
    def flip(folder):
        path = folder / name
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF  # the last tensor's last values: the file still parses
        path.write_bytes(bytes(data))
    return flip


# (how to break a saved lora stage, what the error must say)
BROKEN_LORA = {
    "dora": (lambda f: _edit_json(f / "adapter_config.json", use_dora=True),
             r"adapter_config.json: use_dora is True; a stage holds plain LoRA deltas only"),
    "rslora": (lambda f: _edit_json(f / "adapter_config.json", use_rslora=True),
               r"adapter_config.json: use_rslora is True"),
    "bias": (lambda f: _edit_json(f / "adapter_config.json", bias="all"),
             r"adapter_config.json: bias is 'all'"),
    "rank pattern": (lambda f: _edit_json(f / "adapter_config.json", rank_pattern={"q_proj": 4}),
                     r"adapter_config.json: rank_pattern is \{'q_proj': 4\}"),
    "rank zero": (lambda f: _edit_json(f / "adapter_config.json", r=0),
                  r"adapter_config.json: r must be a positive integer"),
    "alpha a string": (lambda f: _edit_json(f / "adapter_config.json", lora_alpha="8"),
                       r"lora_alpha a positive number, not 2 and '8'"),
    "rank vs factors": (lambda f: _edit_json(f / "adapter_config.json", r=3),
                        r"adapter_model.safetensors: layer 0's q_proj factors are lora_A "
                        r"\(2, 64\), lora_B \(64, 2\); expected lora_A \(3, 64\)"),
    "lm_head": (lambda f: _edit_factors(f, lambda t: t.update(
                    {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)})),
                r"tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA factor"),
    "B missing": (lambda f: _edit_factors(f, lambda t: t.pop(f"{Q0}.lora_B.weight")),
                  r"adapter_model.safetensors: layer 0's q_proj has lora_A only"),
    "nan": (lambda f: _edit_factors(f, lambda t: t[f"{Q0}.lora_A.weight"].fill_(float("nan"))),
            r"adapter_model.safetensors: layer 0's q_proj holds NaN or inf"),
    "layer beyond": (lambda f: _edit_factors(f, lambda t: t.update(
                         {k.replace("layers.0.", "layers.7."): v.clone() for k, v in t.items()})),
                     r"adapter_model.safetensors: q_proj of layer 7, but the base has 2 layers"),
    "factors vs base": (lambda f: _edit_factors(f, lambda t: t.update(
                            {k: v[:, :32].contiguous() if "lora_A" in k else v[:32]
                             for k, v in t.items()})),
                        r"adapter_model.safetensors: LoRA factors: q_proj deltas of shapes A "
                        r"\(2, 2, 32\), B \(2, 32, 2\), the base needs A \(2, 2, 64\)"),
    "prompt width": (_replace_prompt({"prompt_embeddings": torch.zeros(3, 32)}),
                     r"fthss_prompt.safetensors: width 32 does not fit this base"),
    "factors changed": (_flip_a_byte_of("adapter_model.safetensors"),
                        r"adapter_model.safetensors: its sha256 is not the one fthss_stage.json"),
    "prompt changed": (_flip_a_byte_of("fthss_prompt.safetensors"),
                       r"fthss_prompt.safetensors: its sha256 is not the one fthss_stage.json"),
    "prompt missing": (lambda f: (f / "fthss_prompt.safetensors").unlink(),
                       r"fthss_stage.json: says kind lora with 3 tokens, but adapter_config.json "
                       r"and fthss_prompt.safetensors \(or its absence\) hold a lora stage of 0"),
    "prompt without embeddings": (_replace_prompt({"embeddings": torch.zeros(3, 64)}),
                                  r"fthss_prompt.safetensors: no 'prompt_embeddings' tensor"),
}


@pytest.mark.parametrize("case", list(BROKEN_LORA))
def test_a_broken_lora_folder_is_refused_naming_file_and_field(case, saved_lora):
    breaks, message = BROKEN_LORA[case]
    breaks(saved_lora)
    with pytest.raises(StageLoadError, match=message) as err:
        load_stage(saved_lora, get_base("tiny-llama"))
    assert str(saved_lora) in str(err.value)


def test_no_folder(tmp_path):
    with pytest.raises(StageLoadError, match=r"nothing: no such stage folder"):
        load_stage(tmp_path / "nothing")


def test_atomic_writes_replace_whole_files_or_nothing(tmp_path):
    path = tmp_path / "deep" / "file.txt"
    atomic_write_text(path, "old")
    atomic_write_bytes(path, b"new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails mid-write
    assert path.read_text() == "new"
    atomic_save_safetensors({"x": torch.arange(6.0).view(2, 3).t()}, tmp_path / "t.safetensors",
                            {"note": "kept"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["x"], torch.arange(6.0).view(2, 3).t())
    assert sorted(os.listdir(tmp_path)) == ["deep", "t.safetensors"]
    assert os.listdir(tmp_path / "deep") == ["file.txt"]


def test_io_does_not_import_the_stage_model():
    """stage.py imports io.py (its save/load module), never the reverse: io.py imported first,
    in a fresh interpreter, loads without the stage model, and stage.py then loads on top."""
    import subprocess
    import sys

    code = ("import sys, fthss.prompts.io as io\n"
            "assert 'fthss.prompts.stage' not in sys.modules\n"
            "import fthss.prompts.stage as stage\n"
            "assert stage.StageConfig is io.StageConfig\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_stage_round_trips_through_its_parts(tmp_path):
    base = get_base("tiny-llama")
    stage = _trained_lora(Stage.create(StageConfig("A", "lora", 2), base))
    stage.save_pretrained(tmp_path / "A", base)
    loaded = Stage.from_pretrained(tmp_path / "A", base)
    assert loaded.config == stage.config and torch.equal(loaded.weight, stage.weight)
    for name in stage.lora_A:
        assert torch.equal(loaded.lora_A[name], stage.lora_A[name])
        assert torch.equal(loaded.lora_B[name], stage.lora_B[name])
