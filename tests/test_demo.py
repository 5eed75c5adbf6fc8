"""`fthss demo` end to end on a miniature configuration: the world, a (barely) pretrained base,
every method on the four tasks with both stage kinds, the evaluation with its gold-upstream runs
and bootstrap intervals, the latency and memory measurements, and the report; a rerun reuses the
stages."""

import dataclasses
import json
from pathlib import Path

import pytest

from fthss.demo import DemoConfig, run_demo
from fthss.evaluation.evaluate import COMPARISONS, GOLD_UPSTREAM, RUNS

TINY = DemoConfig(test_records=4, train_samples=8, micro_batch_size=8, max_new_tokens=4,
                  latency_lengths=(20,), memory_total_tokens=24, pretrain_steps=2, lora_epochs=2,
                  lora_task_epochs={"rewrite_qa": 3})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(TINY, out, device="cpu")
    return out


@pytest.mark.slow  # the quick demo, a few minutes
def test_the_report_covers_every_task_method_and_measurement(demo):
    report = json.loads((demo / "report.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["compress_qa", "rewrite_qa",
                                                    "memory_reasoning", "active_rag"]
    # lora runs every method; prompt all but distill and adapt (TINY.every_method_kind)
    expected = {("lora", m, False) for m in RUNS} | {("lora", m, True) for m in GOLD_UPSTREAM}
    expected |= {("prompt", m, gold) for _, m, gold in expected if m not in ("distill", "adapt")}
    for task in report["tasks"]:
        assert {(m["kind"], m["method"], m["gold_upstream"]) for m in task["methods"]} == expected
        assert task["records"] == 4
        assert {(c["kind"], c["a"], c["b"]) for c in task["comparisons"]} == {
            (kind, a, b) for kind in ("prompt", "lora") for a, b in COMPARISONS}
        for comparison in task["comparisons"]:
            low, high = comparison["ci95"]
            assert low <= comparison["diff"] <= high
    assert {(r["intermediate_tokens"], r["mode"]) for r in report["latency"]} == {
        (20, "text"), (20, "shared")}
    assert {r["stages"] for r in report["memory"]} == {1, 2, 3}
    markdown = (demo / "report.md").read_text()
    for heading in ("Paired differences", "lora fthss − chain", "prompt chain − single",
                    "prompt fthss − fthss-untuned", "| lora adapt (gold upstream) |",
                    "Stage-B latency", "KV memory", "Wall time"):
        assert heading in markdown
    import matplotlib.image

    for plot in ("accuracy.png", "tuning.png", "latency_memory.png"):
        assert matplotlib.image.imread(demo / plot).shape[0] > 300  # a picture that opens
    for method in ("single", "distill", "chain", "fthss", "adapt"):
        assert (demo / "stages" / "compress_qa" / "lora" / method).is_dir()
    assert not (demo / "stages" / "compress_qa" / "prompt" / "adapt").exists()
    predictions = [json.loads(line) for line in (demo / "predictions.jsonl").open()]
    assert {p["kind"] for p in predictions} == {"prompt", "lora"}


@pytest.mark.slow  # the quick demo, a few minutes
def test_a_rerun_reuses_the_stages_and_refuses_other_settings(demo, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a rerun must not train again")

    monkeypatch.setattr("fthss.training.run.train_method", no_training)
    run_demo(TINY, demo, device="cpu")
    other = DemoConfig(**{**TINY.__dict__, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="learning_rate"):
        run_demo(other, demo, device="cpu")


@pytest.mark.slow  # the quick demo, a few minutes
def test_one_task_alone_gives_its_rows_of_the_full_demo(demo, tmp_path):
    def rows(folder, task):
        report = json.loads((folder / "report.json").read_text())
        [section] = [t for t in report["tasks"] if t["task"] == task]
        predictions = [p for p in map(json.loads, (folder / "predictions.jsonl").open())
                       if p["task"] == task]
        # stage latencies are wall times: everything else must be equal
        return [{k: v for k, v in m.items() if k != "stages"} for m in section["methods"]], \
            predictions

    run_demo(dataclasses.replace(TINY, tasks=("memory_reasoning",)), tmp_path, device="cpu")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["memory_reasoning"]
    assert rows(tmp_path, "memory_reasoning") == rows(demo, "memory_reasoning")
    # the same folder takes another task later
    run_demo(dataclasses.replace(TINY, tasks=("memory_reasoning", "compress_qa")), tmp_path,
             device="cpu")
    assert rows(tmp_path, "compress_qa") == rows(demo, "compress_qa")


def test_a_folder_from_before_a_setting_existed_takes_its_default(tmp_path):
    from fthss.demo import _check_same_config

    settings = tmp_path / "demo_config.json"
    older = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(TINY))).items()
             if k != "lora_task_epochs"}
    settings.write_text(json.dumps(older))
    _check_same_config(dataclasses.replace(TINY, lora_task_epochs={}), settings)
    settings.write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"other settings \(lora_task_epochs\)"):
        _check_same_config(TINY, settings)  # TINY gives rewrite_qa its own


def test_a_damaged_settings_file_is_named(tmp_path):
    (tmp_path / "demo_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="demo_config.json: not valid JSON"):
        run_demo(TINY, tmp_path, device="cpu")


@pytest.mark.slow  # the quick demo, a few minutes
def test_adapt_trains_copies_of_the_stages_it_starts_from(demo, tmp_path):
    import torch

    from fthss.demo import prepare, train_stages
    from fthss.layout.chain import load_chains
    from fthss.prompts.stage import load_stage
    from fthss.tasks import get_task

    def weights(stages):
        return [p.detach().clone() for s in stages for p in s.parameters()]

    _, base = prepare(TINY, demo, "cpu")
    chain = [load_stage(demo / "stages" / "compress_qa" / "lora" / "chain" / n, base)
             for n in "AB"]
    before = weights(chain)
    # adapt: 16, two steps
    samples = load_chains(demo / "world" / "tasks" / "compress_qa" / "train.jsonl")[:64]
    adapted = train_stages(base, get_task("compress_qa"), samples, "adapt", "lora", TINY,
                           tmp_path, start_from=chain)
    assert all(torch.equal(b, w) for b, w in zip(before, weights(chain), strict=True))
    assert any(not torch.equal(b, w) for b, w in zip(before, weights(adapted), strict=True))


@pytest.mark.slow  # the quick demo, a few minutes
def test_each_fthss_stage_gets_as_many_updates_as_in_the_chains_joint_phase(demo):
    def updates(task, method, phase, kind="prompt"):
        return len((demo / "stages" / task / kind / method / f"train-{phase}" /
                    "metrics.jsonl").read_text().splitlines())

    for task in ("compress_qa", "rewrite_qa"):  # single-round: FTHSS trains A, then B
        chain = updates(task, "chain", "A+B")
        assert chain == 2  # 8 chains, 16 sequences, micro-batch 8
        assert updates(task, "fthss", "A") == updates(task, "fthss", "B") == chain
        # the lora kind trains for `lora_epochs` (TINY: 2) unless its task has its own
        # (rewrite_qa: 3), the prompt kind for `epochs` (1)
        lora = {"compress_qa": 4, "rewrite_qa": 6}[task]
        assert updates(task, "chain", "A+B", "lora") == updates(task, "fthss", "A", "lora") == lora
    # multi-round FTHSS trains its stages jointly, one sequence per chain: the batch stays
    assert updates("memory_reasoning", "fthss", "A+B") == 1


def test_each_committed_world_has_a_text_only_base_and_a_shared_mode_one():
    from fthss.demo import ASSETS, embedded_base

    worlds = {}
    for recipe_path in sorted(ASSETS.glob("*/recipe.json")):
        recipe = json.loads(recipe_path.read_text())
        worlds.setdefault(recipe["world"]["seed"], recipe["world"])
    assert sorted(worlds) == [0, 1]
    for world in worlds.values():
        text, shared = embedded_base(world), embedded_base(world, shared_mode=True)
        assert text.name == f"base-s{world['seed']}"
        assert shared.name == f"shared-mode-base-s{world['seed']}"
        config = json.loads((text / "recipe.json").read_text())["config"]
        assert config["hole_share"] == config["mask_share"] == 0 and not config["init_from"]
    assert embedded_base({**worlds[0], "seed": 7}) is None


def demo_command_config(argv, out, monkeypatch):
    """The DemoConfig `fthss demo --out OUT ARGV` hands to run_demo (which is not run)."""
    from fthss.cli import main

    seen = []

    def fake_run_demo(config, out, device=None):
        seen.append(config)
        (Path(out) / "report.md").write_text("report")
        return {"wall_s": 0.0}

    monkeypatch.setattr("fthss.demo.run_demo", fake_run_demo)
    assert main(["demo", "--out", str(out), *argv]) == 0
    [config] = seen
    return config


@pytest.mark.parametrize("argv, shared_mode_steps, draws, records, lora_epochs", [
    ([], 0, 1, 500, 1.0),
    (["--test-records", "1000"], 0, 1, 1000, 1.0),
    (["--shared-mode-base"], 667, 3, 500, 1.0),
    (["--quick"], 0, 1, 48, 1.0),
    (["--quick", "--shared-mode-base", "--test-records", "8"], 10, 1, 8, 1.0),
    (["--lora-epochs", "2"], 0, 1, 500, 2.0),
    (["--lora-epochs", "memory_reasoning=8"], 0, 1, 500, 1.0),
    (["--quick", "--train-samples", "16"], 0, 1, 48, 1.0),
])
def test_the_command_picks_the_base_recipe(argv, shared_mode_steps, draws, records, lora_epochs,
                                          tmp_path, monkeypatch):
    config = demo_command_config(argv, tmp_path, monkeypatch)
    assert config.train_samples == (16 if "--train-samples" in argv else
                                    64 if "--quick" in argv else 1024)
    assert (config.shared_mode_steps, config.pretrain_draws, config.test_records,
            config.lora_epochs, config.epochs) == (shared_mode_steps, draws, records,
                                                   lora_epochs, 1.0)
    assert config.kinds == ("prompt", "lora")
    assert config.tasks == ("compress_qa", "rewrite_qa", "memory_reasoning", "active_rag")


def test_lora_epochs_are_given_for_every_task_or_one(tmp_path, monkeypatch, capsys):
    from fthss.cli import main

    argv = ["--lora-epochs", "memory_reasoning=8", "2", "active_rag=0.5"]
    config = demo_command_config(argv, tmp_path, monkeypatch)
    assert (config.lora_epochs, config.lora_task_epochs) == (
        2.0, {"memory_reasoning": 8.0, "active_rag": 0.5})
    assert [config.training_epochs(t, "lora") for t in config.tasks] == [2.0, 2.0, 8.0, 0.5]
    assert {config.training_epochs(t, "prompt") for t in config.tasks} == {config.epochs}
    for bad, message in ((["recall=3"], "'recall' in 'recall=3' is not a task"),
                         (["memory_reasoning=0"], "must be finite and > 0"),
                         (["2", "3"], "one plain number (every task), not 2"),
                         (["active_rag=1", "active_rag=2"], "active_rag given more than once")):
        try:  # argparse exits on an item it cannot read; the command returns 2 on a ConfigError
            status = main(["demo", "--out", str(tmp_path), "--lora-epochs", *bad])
        except SystemExit as stop:
            status = stop.code
        assert status == 2
        assert message in capsys.readouterr().err


def test_the_command_runs_the_tasks_named(tmp_path, monkeypatch, capsys):
    argv = ["--tasks", "active_rag", "memory_reasoning"]
    assert demo_command_config(argv, tmp_path, monkeypatch).tasks == (
        "active_rag", "memory_reasoning")
    with pytest.raises(SystemExit):
        demo_command_config(argv + ["recall"], tmp_path, monkeypatch)
    assert "invalid choice: 'recall'" in capsys.readouterr().err


def test_a_folder_takes_other_tasks_but_not_other_settings(tmp_path):
    from fthss.demo import _check_same_config

    path = tmp_path / "demo_config.json"
    _check_same_config(TINY, path)
    _check_same_config(dataclasses.replace(TINY, tasks=("active_rag",)), path)
    other = dataclasses.replace(TINY, tasks=("active_rag",), learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"other settings \(learning_rate\)"):
        _check_same_config(other, path)


def test_demo_kinds_are_checked():
    with pytest.raises(ValueError, match="prompt, lora"):
        DemoConfig(kinds=("prefix",))
    with pytest.raises(ValueError, match="every_method_kind"):
        DemoConfig(kinds=("prompt",))
    assert DemoConfig(kinds=("prompt",), every_method_kind="prompt").methods("prompt") == (
        "single", "chain", "fthss", "distill", "adapt")
    assert DemoConfig(kinds=("lora",), every_method_kind=None).methods("lora") == (
        "single", "chain", "fthss")
    for tasks in (("recall",), (), ("active_rag", "active_rag")):
        with pytest.raises(ValueError, match="demo tasks must be distinct ones of compress_qa"):
            DemoConfig(tasks=tasks)
    with pytest.raises(ValueError, match="lora_task_epochs: 'recall' is not a task"):
        DemoConfig(lora_task_epochs={"recall": 2})
    with pytest.raises(ValueError, match=r"lora_task_epochs\['active_rag'\]: must be finite"):
        DemoConfig(lora_task_epochs={"active_rag": -1})
    for field, value, message in (("train_samples", -5, "must be >= 1"),
                                  ("test_records", 0, "must be >= 1"),
                                  ("lora_epochs", 0.0, "must be finite and > 0")):
        with pytest.raises(ValueError, match=f"{field}: {message}"):
            DemoConfig(**{field: value})
    # the training seed follows the world's unless set apart
    assert (DemoConfig(seed=3).stage_seed, DemoConfig(seed=3, train_seed=11).stage_seed) == (3, 11)
