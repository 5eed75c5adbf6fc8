"""Training: stages learn toy chains in one pass per batch, gradients reach only the trained
stages, the engine reproduces the training forward, runs resume exactly, and two DDP processes
agree with one process at the same global batch."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fthss.engine.engine import ChainEngine
from fthss.layout.chain import ChainFormatError, ChainSample, Step, load_chains
from fthss.layout.sequence import SegmentCodec, build_layout
from fthss.layout.visibility import Kind
from fthss.models.presets import preset_base
from fthss.prompts.stage import Stage, StageConfig
from fthss.training.checkpoint import CheckpointError
from fthss.training.config import TrainConfig
from fthss.training.forward import one_pass_logits
from fthss.training.methods import training_chains
from fthss.training.run import train_method
from fthss.training.trainer import SequenceTooLongError, StageSet, Trainer

NAMES = ["ada", "bob", "cyd", "dee", "eve", "fay"]
CITIES = ["rome", "oslo", "lima", "kiev", "nice", "bonn"]


@pytest.fixture(scope="module")
def steerable():
    """A tiny base initialised at a larger scale, so a soft prompt can steer it."""
    return preset_base("tiny-llama", init_std=0.2)


def two_stage(n=32, seed=0):
    rnd = random.Random(seed)
    samples = []
    for _ in range(n):
        i = rnd.randrange(len(NAMES))
        samples.append(ChainSample(f"where is {NAMES[i]}?", [
            Step("A", input=f"{NAMES[i]} lives in {CITIES[i]}.", output=f"{NAMES[i]}:{CITIES[i]}"),
            Step("B", output=CITIES[i])]))
    return samples


def multi_round(n=24, seed=1):
    rnd = random.Random(seed)
    samples = []
    for _ in range(n):
        i = rnd.randrange(len(NAMES))
        samples.append(ChainSample(f"q {NAMES[i]}", [
            Step("A", output="recall"), Step("B", output=CITIES[i]),
            Step("A", output=f"so {CITIES[i]}"), Step("B", output="done")]))
    return samples


def new_stages(base, kind, names=("A", "B"), tokens=4):
    return [Stage.create(StageConfig(n, kind, tokens, lora_rank=4), base, seed=i + 1)
            for i, n in enumerate(names)]


def trained_state(stage):
    return {k: v.detach().clone() for k, v in stage.state_dict().items()}


FAST = {"learning_rate": 0.1, "lora_learning_rate": 0.01, "max_steps": 30,
        "micro_batch_size": 8, "grad_accumulation": 1, "warmup_ratio": 0.0}


@pytest.mark.parametrize("kind", ["prompt", "prefix", "lora"])
def test_single_round_fthss_learns_and_the_engine_reproduces_training(steerable, kind, tmp_path):
    stages = new_stages(steerable, kind)
    results = train_method(steerable, two_stage(), "fthss", stages, None, TrainConfig(**FAST),
                           tmp_path, rounds="single", progress=False)
    assert [r.trained for r in results] == [["A"], ["B"]]
    for r in results:
        assert r.final_loss < 0.8 * r.first_loss, r
        assert (r.work_dir / "loss_curve.png").is_file()
        lines = (r.work_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(1, 31))
    # saved stages load and run; shared decoding equals the teacher-forced training forward
    trained = [Stage.from_pretrained(tmp_path / n, steerable) for n in ("A", "B")]
    engine = ChainEngine(steerable, trained, max_new_tokens=8)
    requests = [ChainSample(s.shared, [Step("A", input=s.steps[0].input), Step("B")])
                for s in two_stage(4, seed=9)]
    result = engine.run(requests, output_scores=True)
    layout = build_layout([r.tokens for r in result], {"A": 0, "B": 1}, [4, 4], pad_id=2)
    with torch.no_grad():
        prompts = [s.prompt_cache(steerable, 4) for s in trained]
        logits = one_pass_logits(steerable, prompts, layout,
                                           engine.lora_bank(["A", "B"]))
    for i, r in enumerate(result):
        targets = (layout.meta.kind[i] == Kind.OUTPUT).nonzero().squeeze(1)
        torch.testing.assert_close(torch.cat([s.scores for s in r.steps]),
                                   logits[i, targets - 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["prompt", "lora"])
def test_gradients_reach_only_the_trained_stage(steerable, kind):
    a, b = new_stages(steerable, kind)
    codec = SegmentCodec(steerable.tokenizer)
    chains = [c for s in two_stage(4) for c in training_chains("fthss", codec.encode(s), {"B"})]
    loss, tokens = StageSet(steerable, [b], [a])(chains)
    loss.backward()
    assert b.weight.grad is not None and b.weight.grad.abs().sum() > 0
    if kind == "lora":  # B's factor only: A's gradient passes through B, zero when new
        assert all(p.grad.abs().sum() > 0 for p in b.lora_B.values())
    assert all(p.grad is None for p in a.parameters())
    assert all(p.grad is None for p in steerable.model.parameters())
    assert tokens == sum(len(c.shared_ids) + sum(len(s.input_ids) + len(s.output_ids)
                                                 for s in c.steps) for c in chains)


@pytest.mark.parametrize("kind", ["prefix", "lora"])
def test_multi_round_joint_training(steerable, kind, tmp_path):
    stages = new_stages(steerable, kind)
    [result] = train_method(steerable, multi_round(), "fthss", stages, None,
                            TrainConfig(**FAST), tmp_path, rounds="multi", progress=False)
    assert result.trained == ["A", "B"]
    assert result.final_loss < 0.8 * result.first_loss


def test_reparameterised_prefix_trains_and_folds(steerable, tmp_path):
    stages = new_stages(steerable, "prefix")
    before = stages[1].weight.detach().clone()
    config = TrainConfig(**{**FAST, "reparam_hidden": 16, "learning_rate": 0.01})
    [result] = train_method(steerable, two_stage(), "fthss", stages, ["B"], config, tmp_path,
                            progress=False)
    assert result.final_loss < 0.9 * result.first_loss
    assert stages[1].reparam is None  # folded into the weight that is saved and served
    saved = Stage.from_pretrained(tmp_path / "B", steerable)
    assert torch.equal(saved.weight, stages[1].weight.detach())
    assert not torch.equal(saved.weight, before)


def test_chain_method_trains_each_stage_on_its_text_view():
    codec = SegmentCodec(preset_base("tiny-llama").tokenizer)
    chain = codec.encode(two_stage(1)[0])
    views = training_chains("chain", chain, {"A", "B"})
    assert [v.steps[0].stage for v in views] == ["A", "B"]
    # B reads shared + A's output as its own input text, never A's passages
    assert views[1].steps[0].input_ids == chain.shared_ids + chain.steps[0].output_ids + [0]
    assert views[1].shared_ids == []


class Interrupted(Exception):
    pass


RESUMABLE = TrainConfig(**{**FAST, "max_steps": 8, "save_every": 2, "micro_batch_size": 4,
                           "grad_accumulation": 2, "warmup_ratio": 0.25})


def train_b(base, out, config=RESUMABLE, tokens=4, kind="prompt"):
    """Train stage B of `two_stage()` into `out`, from fresh stages (so that whatever a resumed
    run knows comes from its checkpoint); B's trained parameters."""
    codec = SegmentCodec(base.tokenizer)
    chains = [c for s in two_stage() for c in training_chains("fthss", codec.encode(s), {"B"})]
    stages = new_stages(base, kind, tokens=tokens)
    Trainer(base, stages, ["B"], chains, config, out, progress=False).train()
    return trained_state(stages[1])


def assert_resumed_like_straight(base, resumed, out, kind="prompt"):
    straight = train_b(base, out.parent / "straight", kind=kind)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    log = (out / "train-B" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, 9))
    assert not list((out / "train-B" / "checkpoints").glob(".partial-*"))


@pytest.mark.parametrize("kind", ["prompt", "lora"])
def test_interrupted_run_resumes_to_the_same_prompts(steerable, kind, tmp_path, monkeypatch):
    saves = []
    original = Trainer._save_checkpoint

    def save_then_die(self, step):
        original(self, step)
        saves.append(step)
        if step == 4:
            raise Interrupted

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train_b(steerable, tmp_path / "resumed", kind=kind)
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    assert saves == [2, 4]
    with open(tmp_path / "resumed" / "train-B" / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # as if killed while logging step 5
    assert_resumed_like_straight(steerable, train_b(steerable, tmp_path / "resumed", kind=kind),
                                 tmp_path / "resumed", kind)


# (what dies, after how many calls) while the step-4 checkpoint is being written
@pytest.mark.parametrize("owner, name, calls", [
    (torch, "save", 1),  # mid-write: the optimizer state written, the scheduler's not
    (os, "replace", 0),  # every file written, the folder not yet renamed into place
    (os, "replace", 1),  # the folder in place, `latest` still naming step 2
], ids=["mid-write", "before-rename", "before-latest"])
def test_a_run_killed_while_saving_resumes_from_the_checkpoint_before(steerable, tmp_path,
                                                                      monkeypatch, owner, name,
                                                                      calls):
    original, real = Trainer._save_checkpoint, getattr(owner, name)

    def dies_while_saving(self, step):
        if step < 4:
            return original(self, step)
        made = []

        def dying(*args, **kwargs):
            if len(made) == calls:
                raise Interrupted
            made.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, dying)
        original(self, step)

    monkeypatch.setattr(Trainer, "_save_checkpoint", dies_while_saving)
    with pytest.raises(Interrupted):
        train_b(steerable, tmp_path / "resumed")
    monkeypatch.undo()
    checkpoints = tmp_path / "resumed" / "train-B" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000002"
    assert_resumed_like_straight(steerable, train_b(steerable, tmp_path / "resumed"),
                                 tmp_path / "resumed")


TWO_STEPS = TrainConfig(**{**FAST, "max_steps": 2, "save_every": 1, "micro_batch_size": 4})


@pytest.fixture
def checkpoints(steerable, tmp_path):
    """The checkpoints of a finished 2-step run of stage B (TWO_STEPS)."""
    train_b(steerable, tmp_path, TWO_STEPS)
    return tmp_path / "train-B" / "checkpoints"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this writes a file
        return (Path.write_text, (self.marker, "ran"))


STEP = "step-000002"  # the checkpoint `checkpoints` ends on


def _unhashed(folder: Path) -> None:
    """As a checkpoint written before state.json kept the files' sha256: only the checks of
    each file's contents can refuse what is wrong with it."""
    state = json.loads((folder / STEP / "state.json").read_text())
    del state["sha256"]
    (folder / STEP / "state.json").write_text(json.dumps(state))


def _cut(path: Path, keep: int) -> None:
    _unhashed(path.parents[1])
    path.write_bytes(path.read_bytes()[:keep])


def _edit_tensors(folder: Path, edit) -> None:
    _unhashed(folder)
    path = folder / STEP / "stages.safetensors"
    save_file(edit(load_file(path)), path)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _edit_state(folder: Path, **changes) -> None:
    path = folder / STEP / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# how to spoil the checkpoints folder, and what resuming from it must say
SPOILT = {
    "truncated stages": (lambda f: _cut(f / STEP / "stages.safetensors", -40),
                         r"stages.safetensors: unreadable or truncated safetensors file"),
    "corrupted stages": (lambda f: (_unhashed(f), (f / STEP / "stages.safetensors").write_bytes(
        b"\xff" * 64)), r"stages.safetensors: unreadable or truncated safetensors file"),
    "a byte flipped in the stages": (lambda f: _flip_a_byte(f / STEP / "stages.safetensors"),
                                     r"stages.safetensors: its sha256 is not the one state.json"),
    "a byte flipped in the optimizer": (lambda f: _flip_a_byte(f / STEP / "optimizer.pt"),
                                        r"optimizer.pt: its sha256 is not the one state.json"),
    "state nested deep": (lambda f: (f / STEP / "state.json").write_text('{"a": ' * 100_000),
                          r"state.json:1: malformed JSON: nested too deeply"),
    "state not utf-8": (lambda f: (f / STEP / "state.json").write_bytes(b'{"step": "\xff"}'),
                        r"state.json:1: not UTF-8"),
    "latest is a folder": (lambda f: _folder_instead(f / "latest"),
                           r"latest: cannot read: Is a directory"),
    "digests not a map": (lambda f: _edit_state(f, sha256=[1]),
                          r"state.json: sha256 must map each of"),
    "nan": (lambda f: _edit_tensors(f, lambda t: {k: v.fill_(float("nan")) for k, v in t.items()}),
            r"stages.safetensors: trained.B.weight holds NaN or inf values"),
    "other stages": (lambda f: _edit_tensors(f, lambda t: {"trained.C.weight": t.popitem()[1]}),
                     (r"stages.safetensors: trained parameters differ from this run's \(missing "
                      r"\['trained.B.weight'\], unexpected \['trained.C.weight'\]\)")),
    "truncated optimizer": (lambda f: _cut(f / STEP / "optimizer.pt", 100),
                            r"optimizer.pt: unreadable, truncated"),
    "code in a pickle": (lambda f: (_unhashed(f), torch.save(Evil(f / "ran.txt"),
                                                             f / STEP / "rng.pt")),
                         r"rng.pt: unreadable, truncated or not plain data"),
    "latest leads out": (lambda f: (f / "latest").write_text("../../../elsewhere"),
                         r"latest: names '../../../elsewhere', not a checkpoint folder"),
    "step differs": (lambda f: _edit_state(f, step=7), r"state.json: says step 7, its folder 2"),
}


@pytest.mark.parametrize("case", SPOILT)
def test_a_spoilt_checkpoint_is_refused_saying_what_is_wrong(steerable, checkpoints, case):
    spoil, message = SPOILT[case]
    spoil(checkpoints)
    with pytest.raises(CheckpointError, match=message) as err:
        train_b(steerable, checkpoints.parents[1], TWO_STEPS)
    assert str(checkpoints) in str(err.value)
    assert not (checkpoints / "ran.txt").exists()  # the pickle's code never ran


def test_a_checkpoint_is_refused_by_another_base_or_other_stage_shapes(steerable, checkpoints):
    out = checkpoints.parents[1]
    with pytest.raises(CheckpointError, match=r"state.json: made on another base model "
                       r"\(embedding_sha256: checkpoint made for '[0-9a-f]+', base has") as err:
        train_b(preset_base("tiny-llama", seed=1, init_std=0.2), out, TWO_STEPS)
    assert "hidden_size" not in str(err.value)  # only what differs
    with pytest.raises(CheckpointError, match=r"trained.B.weight has shape \(4, 64\), this "
                       r"run's \(5, 64\) \(another number of virtual tokens"):
        train_b(steerable, out, TWO_STEPS, tokens=5)


def test_a_training_sample_over_the_base_positions_is_named_before_any_training(tmp_path):
    base = preset_base("tiny-llama", init_std=0.2)
    base.config.max_position_embeddings = 80  # below max_length's default, 1224
    data = tmp_path / "train.jsonl"
    long = ChainSample("q" * 100, [Step("A", output="a"), Step("B", output="b")])
    data.write_text("".join(json.dumps(s.to_json()) + "\n" for s in [*two_stage(2), long]))
    samples = load_chains(data)
    config = TrainConfig(**{**FAST, "max_steps": 1})
    with pytest.raises(SequenceTooLongError, match=re.escape(
            f"{data}:3: needs 111 positions (prompt 4 + content 107), over the limit of 80 "
            "(--max-length, or the base's position limit if smaller): raise --max-length if the "
            "base allows it, or leave such records out with --skip-bad")):
        train_method(base, samples, "fthss", new_stages(base, "prompt"), None, config,
                     tmp_path / "out", rounds="single", progress=False)
    assert not (tmp_path / "out").exists()  # refused before the first phase started
    skipped = []
    results = train_method(base, samples, "fthss", new_stages(base, "prompt"), None, config,
                           tmp_path / "out", rounds="single", progress=False,
                           on_bad=skipped.append)
    assert [r.trained for r in results] == [["A"], ["B"]]
    assert [str(e).split(": ")[0] for e in skipped] == [f"{data}:3"]


def test_training_needs_the_gold_outputs_it_learns(steerable, tmp_path):
    gap = ChainSample("q", [Step("A", input="x"), Step("B", output="b")], source="data:7")
    config = TrainConfig(**{**FAST, "max_steps": 1})
    with pytest.raises(ChainFormatError, match=r"^data:7: steps\[0\].output: missing; training "
                       "with fthss needs it"):
        train_method(steerable, [gap], "fthss", new_stages(steerable, "prompt"), None, config,
                     tmp_path, progress=False)
    single = Stage.create(StageConfig("single", "prompt", 4), steerable)
    [result] = train_method(steerable, [gap], "single", [single], None, config, tmp_path,
                            progress=False)  # `single` learns the last output only
    assert result.steps == 1


def test_cli_train_skips_bad_samples_when_asked(tmp_path, capsys):
    from fthss.cli import main

    data = tmp_path / "train.jsonl"
    gap = ChainSample("q", [Step("A", input="x"), Step("B", output="b")])
    data.write_text("".join(json.dumps(s.to_json()) + "\n" for s in two_stage(4))
                    + "{oops\n" + json.dumps(gap.to_json()) + "\n")
    command = ["train", "--arch", "tiny-llama", "--data", str(data), "--out",
               str(tmp_path / "out"), "--tokens", "2", "--max-steps", "1",
               "--grad-accumulation", "1"]
    assert main(command) == 2
    assert f"{data}:5: malformed JSON" in capsys.readouterr().err
    assert main(command + ["--skip-bad"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines()
            if line.startswith(("skipped", "fthss train"))] == [
        f"skipped {data}:5: malformed JSON: Expecting property name enclosed in double quotes",
        f"skipped {data}:6: steps[0].output: missing; training with fthss needs it",
        "fthss train: skipped 2 bad record(s), listed above"]
    assert (tmp_path / "out" / "B" / "adapter_model.safetensors").is_file()


DDP_WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow  # two processes under accelerate launch
def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # --multi_gpu picks accelerate's torchrun launcher, which on a machine without GPUs starts
    # CPU processes over gloo (its --cpu flag starts a single process unless MPI is set up)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29517", str(DDP_WORKER), str(tmp_path / "ddp"), "1"]
    done = subprocess.run(launch, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, str(DDP_WORKER), str(tmp_path / "one"), "2"],
                            check=False, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert torch.equal(rank0, rank1)
    start = torch.load(tmp_path / "one" / "start.pt", weights_only=True)
    assert not torch.equal(one, start)
    torch.testing.assert_close(rank0, one, atol=1e-5, rtol=1e-4)


def test_accelerate_launch_without_multi_gpu_is_warned(steerable, tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2` without --multi_gpu: one process, MASTER_ADDR set."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="add --multi_gpu"):
        train_b(steerable, tmp_path, TrainConfig(**{**FAST, "max_steps": 1}))


@pytest.mark.parametrize("kind", ["prefix", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind):
    base = preset_base("tiny-llama", init_std=0.2)
    codec = SegmentCodec(base.tokenizer)
    chains = [c for s in two_stage(4)
              for c in training_chains("fthss", codec.encode(s), {"A", "B"})]
    grads, attention_calls, calls = [], [], []
    attention = base.model.base_model.layers[0].self_attn
    attention.register_forward_hook(lambda *_: attention_calls.append(1))
    for recompute in (False, True):
        stages = new_stages(base, kind)
        if kind == "lora":  # B factors that are not zero, so that A's gradients are not
            for stage in stages:
                for factor in stage.lora_B.values():
                    torch.nn.init.normal_(factor, std=0.1,
                                          generator=torch.Generator().manual_seed(1))
        if recompute:
            from fthss.training.checkpoint import enable_layer_recompute
            enable_layer_recompute(base)
        attention_calls.clear()
        loss, _ = StageSet(base, stages, [])(chains)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for s in stages for p in s.parameters()]))
        calls.append(len(attention_calls))
    assert calls[1] == 2 * calls[0]  # every forward (a lora stage's prompt's too) recomputed
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads[1][1])


@pytest.mark.parametrize("method", ["distill", "single"])
@pytest.mark.parametrize("kind", ["prompt", "lora"])
def test_one_prompt_baselines_train_and_run(steerable, method, kind, tmp_path):
    from fthss.training.methods import method_view

    stage = Stage.create(StageConfig(method, kind, 4, lora_rank=4), steerable, seed=3)
    [result] = train_method(steerable, two_stage(), method, [stage], None, TrainConfig(**FAST),
                            tmp_path, progress=False)
    assert result.trained == [method] and result.final_loss < 0.8 * result.first_loss
    request = method_view(method, two_stage(1, seed=5)[0])
    assert {s.stage for s in request.steps} == {method}
    [run] = ChainEngine(steerable, [stage], max_new_tokens=6).run([request])
    assert len(run.steps) == (2 if method == "distill" else 1)


def test_cli_train_then_run(tmp_path):
    from fthss.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(s.to_json()) + "\n" for s in two_stage(8)))
    out = tmp_path / "stages"
    assert main(["train", "--arch", "tiny-llama", "--data", str(data), "--out", str(out),
                 "--tokens", "3", "--max-steps", "3", "--grad-accumulation", "1",
                 "--micro-batch-size", "4", "--rounds", "single", "--save-every", "1"]) == 0
    for name in ("A", "B"):
        assert (out / name / "adapter_model.safetensors").is_file()
        assert (out / f"train-{name}" / "checkpoints" / "latest").read_text() == "step-000003"
    results = tmp_path / "results.jsonl"
    assert main(["run", "--arch", "tiny-llama", "--stage", str(out / "A"), "--stage",
                 str(out / "B"), "--input", str(data), "--output", str(results),
                 "--max-new-tokens", "3"]) == 0
    assert len(results.read_text().splitlines()) == 8
    # adapt starts from given stages only
    assert main(["train", "--arch", "tiny-llama", "--method", "adapt", "--data", str(data),
                 "--out", str(tmp_path / "adapt"), "--max-steps", "1"]) == 2


def test_cli_trains_lora_stages_with_every_method(tmp_path, capsys):
    from fthss.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(s.to_json()) + "\n" for s in two_stage(4)))
    common = ["--arch", "tiny-llama", "--data", str(data), "--max-steps", "1",
              "--grad-accumulation", "1", "--micro-batch-size", "2"]
    lora = ["--kind", "lora", "--lora-rank", "2", "--lora-targets", "q_proj", "down_proj"]
    for method, rounds in [("fthss", "single"), ("fthss", "multi"), ("chain", "multi"),
                           ("distill", "multi"), ("single", "multi")]:
        out = tmp_path / f"{method}-{rounds}"
        assert main(["train", *common, *lora, "--method", method, "--rounds", rounds,
                     "--out", str(out)]) == 0, capsys.readouterr().err
        for folder in out.glob("*/adapter_config.json"):
            stage = Stage.from_pretrained(folder.parent)
            assert (stage.config.kind, stage.num_virtual_tokens, stage.config.lora_rank,
                    stage.config.lora_targets) == ("lora", 0, 2, ("q_proj", "down_proj"))
    fthss = tmp_path / "fthss-single"
    assert main(["train", *common, "--method", "adapt", "--stage", str(fthss / "A"),
                 "--stage", str(fthss / "B"), "--out", str(tmp_path / "adapt")]) == 0
    assert Stage.from_pretrained(tmp_path / "adapt" / "B").config.kind == "lora"
    results = tmp_path / "results.jsonl"
    assert main(["run", "--arch", "tiny-llama", "--stage", str(tmp_path / "adapt" / "A"),
                 "--stage", str(tmp_path / "adapt" / "B"), "--input", str(data), "--output",
                 str(results), "--max-new-tokens", "2"]) == 0
    assert len(results.read_text().splitlines()) == 4


def test_a_bf16_base_trains_fp32_prompts(tmp_path):
    base = preset_base("tiny-qwen2", init_std=0.2, dtype=torch.bfloat16)
    stages = new_stages(base, "prompt")
    [result] = train_method(base, two_stage(), "fthss", stages, ["B"], TrainConfig(**FAST),
                            tmp_path, progress=False)
    assert stages[1].weight.dtype == torch.float32
    assert result.final_loss < 0.8 * result.first_loss
