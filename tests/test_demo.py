"""`fthss demo` end to end on a miniature configuration: the world, a (barely) pretrained base,
every method on the four tasks, the evaluation with its gold-upstream runs and bootstrap
intervals, the latency and memory measurements, and the report; a rerun reuses the stages."""

import json

import pytest

from fthss.demo import DemoConfig, run_demo
from fthss.evaluation.evaluate import GOLD_UPSTREAM, RUNS

TINY = DemoConfig(test_records=4, train_samples=8, micro_batch_size=8, max_new_tokens=4,
                  latency_lengths=(20,), memory_total_tokens=24, pretrain_steps=2,
                  shared_mode_steps=2, pretrain_draws=1)


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
    expected = {(m, False) for m in RUNS} | {(m, True) for m in GOLD_UPSTREAM}
    for task in report["tasks"]:
        assert {(m["method"], m["gold_upstream"]) for m in task["methods"]} == expected
        assert task["records"] == 4
        for comparison in task["comparisons"]:
            low, high = comparison["ci95"]
            assert low <= comparison["diff"] <= high
    assert {(r["intermediate_tokens"], r["mode"]) for r in report["latency"]} == {
        (20, "text"), (20, "shared")}
    assert {r["stages"] for r in report["memory"]} == {1, 2, 3}
    markdown = (demo / "report.md").read_text()
    for heading in ("Paired differences", "fthss − chain", "chain − single",
                    "fthss − fthss-untuned", "Stage-B latency", "KV memory", "Wall time"):
        assert heading in markdown
    for plot in ("accuracy.png", "tuning.png", "latency_memory.png"):
        assert (demo / plot).stat().st_size > 1000
    for method in ("single", "distill", "chain", "fthss", "adapt"):
        assert (demo / "stages" / "compress_qa" / method).is_dir()


@pytest.mark.slow  # the quick demo, a few minutes
def test_a_rerun_reuses_the_stages_and_refuses_other_settings(demo, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a rerun must not train again")

    monkeypatch.setattr("fthss.training.run.train_method", no_training)
    run_demo(TINY, demo, device="cpu")
    other = DemoConfig(**{**TINY.__dict__, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="learning_rate"):
        run_demo(other, demo, device="cpu")


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

    _, base = prepare(TINY, demo, "cpu")
    chain = [load_stage(demo / "stages" / "compress_qa" / "chain" / n, base) for n in "AB"]
    before = [s.weight.detach().clone() for s in chain]
    # adapt: 16, two steps
    samples = load_chains(demo / "world" / "tasks" / "compress_qa" / "train.jsonl")[:64]
    adapted = train_stages(base, get_task("compress_qa"), samples, "adapt", TINY, tmp_path,
                           start_from=chain)
    assert all(torch.equal(b, s.weight) for b, s in zip(before, chain, strict=True))
    assert any(not torch.equal(b, s.weight) for b, s in zip(before, adapted, strict=False))


@pytest.mark.slow  # the quick demo, a few minutes
def test_each_fthss_stage_gets_as_many_updates_as_in_the_chains_joint_phase(demo):
    def updates(task, method, phase):
        return len((demo / "stages" / task / method / f"train-{phase}" / "metrics.jsonl")
                   .read_text().splitlines())

    for task in ("compress_qa", "rewrite_qa"):  # single-round: FTHSS trains A, then B
        chain = updates(task, "chain", "A+B")
        assert chain == 2  # 8 chains, 16 sequences, micro-batch 8
        assert updates(task, "fthss", "A") == updates(task, "fthss", "B") == chain
    # multi-round FTHSS trains its stages jointly, one sequence per chain: the batch stays
    assert updates("memory_reasoning", "fthss", "A+B") == 1
