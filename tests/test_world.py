"""The synthetic world: big enough, varied, seeded, split without leaks, and readable by the
tasks and the tokenizer it ships with."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from fthss.cli import main
from fthss.tasks import get_task
from fthss.world.datasets import BUILDERS
from fthss.world.entities import RELATIONS, build_world
from fthss.world.pretrain import PretrainConfig
from fthss.world.render import TEMPLATES, document


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    assert main(["world", "build", "--out", str(out), "--seed", "3", "--renderings", "2",
                 "--test-size", "100", "--dev-size", "20", "--vocab-size", "600"]) == 0
    return out


def test_world_size_relations_and_phrasings():
    world = build_world(0)
    assert len(world.entities) >= 1000 and len(RELATIONS) >= 8
    assert {e.type for e in world.entities.values()} == {"person", "city", "country", "company",
                                                         "university"}
    assert all(len(set(t)) >= 3 for t in TEMPLATES.values())
    person = world.of_type("person")[0]
    renderings = {document(world, person, random.Random(i)) for i in range(5)}
    assert len(renderings) == 5  # phrasing and order vary
    for relation in person.facts:
        assert world.value(person, relation) in document(world, person)


def test_the_seed_decides_the_world():
    assert build_world(1).entities == build_world(1).entities
    assert build_world(1).entities != build_world(2).entities


def test_compress_qa_distractors_share_names():
    world = build_world(0)
    samples = BUILDERS["compress_qa"](world, random.Random(0))
    person_questions = [s for s in samples if s.id.startswith("person-")]
    sharing = 0
    for sample in person_questions[:200]:
        name = world.entities[sample.id.split(":")[0]].name
        passages = sample.steps[0].input.split("\n")
        assert sum(p.startswith(name) or f" {name} " in p for p in passages) >= 1
        first, last = name.split()
        sharing += any((first in p or last in p) and name not in p for p in passages)
    assert sharing > 150  # most questions come with a passage about a namesake


def test_splits_do_not_leak_and_tasks_read_them(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["entities"] >= 1000
    for task in BUILDERS:
        ids = {}
        for split in ("train", "dev", "test"):
            rows = [json.loads(x) for x in (built / "tasks" / task / f"{split}.jsonl").open()]
            ids[split] = {r["id"] for r in rows}
            assert len(ids[split]) == len(rows) == manifest["tasks"][task][split]
            records = get_task(task).records(built / "tasks" / task / f"{split}.jsonl")
            assert all(r.answer for r in records)
        assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["dev"])
    questions = {json.loads(x)["shared"]
                 for x in (built / "tasks" / "rewrite_qa" / "test.jsonl").open()}
    comparisons = [q for q in questions if " or " in q]
    flipped = {q.split(", ", 1)[0] + ", "
               + " or ".join(reversed(q.split(", ", 1)[1][:-1].split(" or "))) + "?"
               for q in comparisons}
    train = {json.loads(x)["shared"]
             for x in (built / "tasks" / "rewrite_qa" / "train.jsonl").open()}
    assert not (flipped & train)  # a pair asked one way in test is not asked the other in train
    # rewrite_qa and active_rag ask the same questions: split alike, none crosses over
    def ids(task, split):
        return {json.loads(x)["id"] for x in (built / "tasks" / task / f"{split}.jsonl").open()}
    for split in ("train", "dev", "test"):
        assert ids("rewrite_qa", split) == ids("active_rag", split)


@pytest.mark.slow  # pretrains a base
def test_pretraining_instructions_come_from_train_splits_only(built):
    from transformers import AutoTokenizer

    from fthss.world.pretrain import instruction_stream

    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    ids, starts, _ = instruction_stream(tokenizer, built / "tasks")
    text = tokenizer.decode(ids.tolist())
    for task in BUILDERS:
        for split in ("train", "test"):
            questions = [json.loads(x)["shared"] for x in
                         (built / "tasks" / task / f"{split}.jsonl").open()][:30]
            found = sum(q in text for q in questions)
            assert found == (len(questions) if split == "train" else 0), (task, split)
    assert len(starts) > 0 and int(starts[-1]) < len(ids)


def test_the_tokenizer_round_trips_the_corpus(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    tokens = chars = 0
    for line in (built / "corpus.jsonl").read_text().splitlines()[:50]:
        text = json.loads(line)["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == " " + text  # encoded as if it followed a space
        tokens, chars = tokens + len(ids), chars + len(text)
    assert tokens < chars / 2  # merges were learned
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"


@pytest.mark.slow  # pretrains a base
def test_pretraining_a_small_base_lowers_its_loss_and_records_the_recipe(built, tmp_path, capsys):
    from fthss.models.base import BaseModel

    out = tmp_path / "base"
    assert main(["base", "pretrain", "--world", str(built), "--out", str(out), "--steps", "60",
                 "--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--intermediate-size", "64", "--sequence-length", "64", "--batch-size", "8",
                 "--learning-rate", "1e-2", "--device", "cpu"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["config"]["steps"] == 60 and recipe["world"]["seed"] == 3
    assert recipe["final_loss"] < 0.8 * recipe["first_loss"]
    base = BaseModel.load(out)  # a base fthss accepts, with the world's tokenizer
    assert base.tokenizer.bos_token == "<s>" and base.config.vocab_size == len(base.tokenizer)

    # continued pretraining starts where the base ended, and records what it continued from;
    # every row an instruction window, half hole windows, half masked chains (both paths run)
    more = tmp_path / "more"
    assert main(["base", "pretrain", "--world", str(built), "--out", str(more), "--steps", "5",
                 "--init-from", str(out), "--instruction-share", "1", "--hole-share", "0.5",
                 "--mask-share", "0.5", "--sequence-length", "64",
                 "--batch-size", "8", "--learning-rate", "1e-3", "--warmup-steps", "1",
                 "--device", "cpu"]) == 0
    continued = json.loads((more / "recipe.json").read_text())
    assert continued["continued_from"] == recipe
    assert continued["config"]["hidden_size"] == 32 and continued["config"]["layers"] == 1
    assert continued["first_loss"] < 0.9 * recipe["first_loss"]

    # of several draws, `base select` keeps the lowest dev loss and records every candidate's
    chosen = tmp_path / "chosen"
    assert main(["base", "select", str(out), str(more), "--world", str(built), "--out",
                 str(chosen), "--device", "cpu"]) == 0
    selection = json.loads((chosen / "recipe.json").read_text())["selection"]
    losses = {c["base"]: c["held_out_loss"] for c in selection["candidates"]}
    assert list(losses) == [str(out), str(more)] and len(set(losses.values())) == 2
    assert selection["chosen"] == min(losses, key=losses.get)
    assert (chosen / "model.safetensors").read_bytes() == (
        Path(selection["chosen"]) / "model.safetensors").read_bytes()
    assert main(["base", "select", str(out), "--world", str(built), "--out", str(chosen)]) == 2
    assert f"{chosen}: exists and is not empty" in capsys.readouterr().err

    # a base of another world, or a folder no pretraining wrote, is refused, naming the file
    def refused(init_from) -> str:
        assert main(["base", "pretrain", "--world", str(built), "--out", str(tmp_path / "x"),
                     "--steps", "1", "--init-from", str(init_from), "--device", "cpu"]) == 2
        assert not (tmp_path / "x").exists()
        return capsys.readouterr().err
    recipe["world"]["seed"], recipe["world"]["renderings"] = 4, 9
    (out / "recipe.json").write_text(json.dumps(recipe))
    assert (f"{out / 'recipe.json'}: pretrained on another world than {built} (renderings: 9 "
            "there, 2 here, seed: 4 there, 3 here)") in refused(out)
    assert f"{built}: no recipe.json; expected a folder written by" in refused(built)
    assert main(["base", "select", str(more), str(out), "--world", str(built), "--out",
                 str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert f"{out / 'recipe.json'}: pretrained on another world" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match=r"hole_share \(0.6\) and mask_share \(0.5\)"):
        PretrainConfig(hole_share=0.6, mask_share=0.5)


def test_a_stopped_pretraining_resumes_bit_for_bit(built, tmp_path, monkeypatch, capsys):
    """Killed in step 6 with checkpoints every 2 steps, the rerun goes on from step 4 and ends
    with the very weights and losses of a run never stopped; a rerun with another recipe, or
    over a damaged checkpoint, is refused at once, naming the file and the field."""
    from fthss.world.pretrain import PretrainCheckpoint, PretrainData, pretrain

    world = tmp_path / "world"  # the built world with 8 train chains per task: a fast stream
    shutil.copytree(built, world, ignore=shutil.ignore_patterns("dev.jsonl", "test.jsonl"))
    for train in world.glob("tasks/*/train.jsonl"):
        train.write_text("".join(train.read_text().splitlines(keepends=True)[:8]))
    config = PretrainConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32,
                            sequence_length=32, batch_size=4, warmup_steps=2, steps=7)
    data = PretrainData(world)  # built once, for the three runs

    def run(out):
        return pretrain(world, out, config, device="cpu", progress=False, data=data,
                        save_every=2)
    whole = run(tmp_path / "whole")
    assert not (tmp_path / "whole" / PretrainCheckpoint.FILE).exists()

    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def killed_in_step_6(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)
    stopped = tmp_path / "stopped"
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(stopped)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    checkpoint = stopped / PretrainCheckpoint.FILE
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert not (stopped / "recipe.json").exists()

    cli = ["base", "pretrain", "--world", str(world), "--out", str(stopped), "--steps", "7",
           "--hidden-size", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
           "--intermediate-size", "32", "--sequence-length", "32", "--batch-size", "4",
           "--warmup-steps", "2", "--save-every", "2", "--device", "cpu"]
    assert main([*cli, "--seed", "1"]) == 2
    assert (f"{checkpoint}: written by another pretraining run (config.seed: 0 there, 1 here)"
            in capsys.readouterr().err)
    resumed = run(stopped)
    assert not checkpoint.exists()
    assert {k: v for k, v in resumed.items() if k != "wall_s"} == {
        k: v for k, v in whole.items() if k != "wall_s"}
    assert ((stopped / "model.safetensors").read_bytes()
            == (tmp_path / "whole" / "model.safetensors").read_bytes())
    checkpoint.write_bytes(b"not a checkpoint")
    assert main(cli) == 2
    assert f"{checkpoint}: not a readable pretraining checkpoint" in capsys.readouterr().err


def test_instruction_positions_keep_the_shared_mode_holes(built, tmp_path):
    """A compress -> QA reader reads the question, then (in shared mode) jumps over the
    passages only stage A sees, then reads the compression: the stream says so."""
    from transformers import AutoTokenizer

    from fthss.layout.chain import load_chains
    from fthss.layout.sequence import SegmentCodec
    from fthss.world.pretrain import instruction_stream

    line = (built / "tasks" / "compress_qa" / "train.jsonl").open().readline()
    (tmp_path / "compress_qa").mkdir()
    (tmp_path / "compress_qa" / "train.jsonl").write_text(line)
    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    _, starts, steps = instruction_stream(tokenizer, tmp_path)
    chain = SegmentCodec(tokenizer).encode(load_chains(tmp_path / "compress_qa" / "train.jsonl")[0])
    shared, [a, b] = len(chain.shared_ids), chain.steps
    assert starts.tolist() == [0, shared + len(a.input_ids) + len(a.output_ids),
                               starts[1] + shared + len(a.output_ids) + len(b.input_ids)
                               + len(b.output_ids)]
    assert steps[starts].tolist() == [1, 1, 1]
    a_steps, b_steps, single_steps = (steps[: starts[1]], steps[starts[1]: starts[2]],
                                      steps[starts[2]:])
    assert (a_steps == 1).all() and (single_steps == 1).all()  # nothing hidden from them
    jumps = (b_steps > 1).nonzero().flatten().tolist()
    assert jumps == [shared]  # the first compression token, after the hidden passages
    assert b_steps[shared] == len(a.input_ids) + 1
    # B's own tokens come right after A's output, at the positions the one-pass layout gives
    assert int(b_steps.sum()) == (shared + len(a.input_ids) + len(a.output_ids)
                                  + len(b.input_ids) + len(b.output_ids))


def test_chain_windows_are_the_shared_mode_sequence_under_the_visibility_mask(built):
    """A whole compress -> QA chain as one pretraining window: the mask and positions one-pass
    training gives it (without prompts), so the answer reads the compression A wrote while it
    saw the passages, and not the passages themselves."""
    import torch
    from transformers import AutoTokenizer

    from fthss.layout.sequence import build_layout
    from fthss.world.pretrain import shared_mode_chains, shared_mode_window

    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    chain = next(c for c in shared_mode_chains(tokenizer, built / "tasks")
                 if [s.stage for s in c.steps] == ["A", "B"])
    pad = tokenizer.pad_token_id
    layout = build_layout([chain], {"A": 0, "B": 1}, [0, 0], pad)
    n = layout.input_ids.shape[1]
    ids, positions, visible, labels = shared_mode_window(chain, n + 7, pad)
    assert torch.equal(visible[:n, :n], layout.mask[0, 0])  # the one visibility rule
    assert torch.equal(positions[:n], layout.position_ids[0])  # sequence order, holes kept
    assert torch.equal(ids[:n], layout.input_ids[0]) and torch.equal(labels[:n], ids[:n])
    assert (ids[n:] == pad).all() and (labels[n:] == -100).all()
    assert not visible[n:, :n].any() and visible[n:, n:].equal(torch.eye(7, dtype=torch.bool))
    shared, a = len(chain.shared_ids), chain.steps[0]
    passages = slice(shared + 1, shared + len(a.input_ids))  # after A's step marker
    compression = slice(passages.stop, passages.stop + len(a.output_ids))
    answer = n - 1
    assert visible[answer, :shared].all() and visible[answer, compression].all()
    assert not visible[answer, passages].any()
    assert visible[compression.stop - 1, passages].all()  # A wrote it seeing the passages
    cut = shared_mode_window(chain, 10, pad)  # a window shorter than the chain keeps its start
    assert torch.equal(cut[0], layout.input_ids[0, :10])
    assert torch.equal(cut[2], layout.mask[0, 0, :10, :10])


def test_the_committed_bases_were_made_by_the_recipe_the_demo_runs_for_other_seeds():
    """A seed without a committed base pretrains `DemoConfig`'s recipe (text mode only, one
    draw; with --shared-mode-base, draws of both phases); the committed bases must be what that
    recipe made, or the README's figures describe bases the recipe does not rebuild."""
    from dataclasses import asdict

    from fthss.demo import ASSETS, DemoConfig

    text = sorted(ASSETS.glob("base-s*/recipe.json"))
    assert len(text) == 2
    demo = DemoConfig()
    assert demo.pretrain_draws == 1 and demo.shared_mode_steps == 0
    for path in text:
        recipe = json.loads(path.read_text())
        assert recipe["config"] == asdict(PretrainConfig(steps=demo.pretrain_steps, seed=0)), path
    shared = sorted(ASSETS.glob("shared-mode-base-s*/recipe.json"))
    assert len(shared) == 2
    demo = DemoConfig.shared_mode_base()
    for path in shared:
        recipe = json.loads(path.read_text())
        seed = recipe["config"]["seed"]
        second = asdict(PretrainConfig.shared_mode_after("", demo.shared_mode_steps, seed=seed))
        assert {**recipe["config"], "init_from": ""} == second, path
        # the oldest first phase predates the share fields; those it records must match
        first = asdict(PretrainConfig(steps=demo.pretrain_steps, seed=seed))
        assert {**first, **recipe["continued_from"]["config"]} == first, path
        scored = recipe["selection"]["candidates"]
        assert [c["seed"] for c in scored] == list(range(demo.pretrain_draws)), path
        best = min(scored, key=lambda c: c["held_out_loss"])
        assert recipe["selection"]["chosen"] == best["base"] and best["seed"] == seed, path


@pytest.mark.slow  # pretrains a base
def test_the_demo_pretrains_draws_of_both_phases_for_a_world_without_a_committed_base(
        built, tmp_path):
    """No committed base matches this world: the demo pretrains draws of the committed bases'
    recipe (a base, then continued in shared mode, hole windows and masked chains), one per
    seed, keeps the one with the lowest dev loss, and a rerun reuses them."""
    import shutil

    from fthss.demo import DemoConfig, prepare

    shutil.copytree(built, tmp_path / "world")
    config = DemoConfig(seed=3, pretrain_steps=1, shared_mode_steps=2, pretrain_draws=2)
    prepare(config, tmp_path, device="cpu")
    draws = tmp_path / "base-draws"
    for seed in (0, 1):
        first = json.loads((draws / f"seed-{seed}-first" / "recipe.json").read_text())
        second = json.loads((draws / f"seed-{seed}" / "recipe.json").read_text())
        assert first["config"]["steps"] == 1 and first["config"]["hole_share"] == 0.0
        assert first["config"]["seed"] == second["config"]["seed"] == seed
        assert second["continued_from"] == first and second["config"]["steps"] == 2
        assert second["config"]["hole_share"] == second["config"]["mask_share"] == 0.375
    chosen = json.loads((tmp_path / "base" / "recipe.json").read_text())
    scored = chosen["selection"]["candidates"]
    assert [c["base"] for c in scored] == [str(draws / "seed-0"), str(draws / "seed-1")]
    best = min(scored, key=lambda c: c["held_out_loss"])
    assert (chosen["selection"]["chosen"] == best["base"]
            and chosen["config"]["seed"] == best["seed"])
    weights = (tmp_path / "base" / "model.safetensors").read_bytes()
    assert weights == (Path(best["base"]) / "model.safetensors").read_bytes()
    # a rerun pretrains nothing: the draws and the chosen base are reused as they are
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    prepare(config, tmp_path, device="cpu")
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}


@pytest.mark.slow  # pretrains a base
def test_the_demo_pretrains_text_mode_draws_only_by_default(built, tmp_path):
    """The default recipe (`shared_mode_steps` == 0): each draw is the text-mode phase alone,
    no shared-mode windows, no second phase, and the chosen base starts from nothing."""
    import shutil

    from fthss.demo import DemoConfig, prepare

    shutil.copytree(built, tmp_path / "world")
    config = DemoConfig(seed=3, pretrain_steps=1, pretrain_draws=1)
    assert config.shared_mode_steps == 0
    prepare(config, tmp_path, device="cpu")
    draws = tmp_path / "base-draws"
    assert sorted(p.name for p in draws.iterdir()) == ["seed-0-first"]
    chosen = json.loads((tmp_path / "base" / "recipe.json").read_text())
    assert chosen["config"]["hole_share"] == chosen["config"]["mask_share"] == 0.0
    assert chosen["config"]["init_from"] == "" and chosen["config"]["steps"] == 1
    assert chosen["selection"]["chosen"] == str(draws / "seed-0-first")
    assert ((tmp_path / "base" / "model.safetensors").read_bytes()
            == (draws / "seed-0-first" / "model.safetensors").read_bytes())


def test_held_out_loss_scores_the_outputs_of_the_dev_steps_whatever_the_batch(built, tmp_path):
    """The selection criterion: per output token, inputs only as context, padding invisible."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fthss.world.pretrain import step_sequences
    from fthss.world.select import held_out_loss

    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    tasks = tmp_path / "tasks"
    for task in ("compress_qa", "memory_reasoning"):  # a single- and a multi-round task
        (tasks / task).mkdir(parents=True)
        lines = (built / "tasks" / task / "dev.jsonl").read_text().splitlines()[:3]
        (tasks / task / "dev.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)).eval()
    total, count = 0.0, 0
    for input_ids, output_ids, _ in step_sequences(tokenizer, tasks, "dev"):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([input_ids + output_ids])).logits[0]
        scored = logits[len(input_ids) - 1:-1]  # the predictions of the output tokens
        total += torch.nn.functional.cross_entropy(
            scored, torch.tensor(output_ids), reduction="sum").item()
        count += len(output_ids)
    for batch_size in (1, 5, 64):
        assert held_out_loss(model, tokenizer, tasks, batch_size=batch_size) == pytest.approx(
            total / count, rel=1e-5)
    with pytest.raises(ValueError, match="no \\*/test.jsonl with chains"):
        held_out_loss(model, tokenizer, tasks, split="test")
