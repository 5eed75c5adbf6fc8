"""What a hostile tester broke (issue 26), one section per class of failure: text that is not
Unicode, numbers out of range, nothing to evaluate, names that become paths, configs and stage
files, numerics, file-system faults, two runs in one folder, settings changed on rerun, and
sampling that must not depend on batch neighbours. Each test fails without its handling."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from fthss.cli import main
from fthss.datafiles import SkipReport
from fthss.engine.engine import ChainEngine
from fthss.engine.sampling import SamplingConfig
from fthss.layout.chain import ChainFormatError, ChainSample, Step, load_chains
from fthss.prompts.stage import Stage, StageConfig

DATA = Path(__file__).with_name("data")
CHAINS = DATA / "chains.jsonl"
LLAMA = ["--arch", "tiny-llama"]


@pytest.fixture
def stages(tmp_path):
    for name, kind in (("A", "prompt"), ("B", "prefix")):
        assert main(["stage", "create", *LLAMA, "--name", name, "--kind", kind,
                     "--tokens", "4", "--out", str(tmp_path / name)]) == 0
    return [str(tmp_path / "A"), str(tmp_path / "B")]


def run_command(stages, data, out, *extra):
    return ["run", *LLAMA, "--stage", stages[0], "--stage", stages[1], "--input", str(data),
            "--output", str(out), "--max-new-tokens", "2", *extra]


def errors(capsys) -> list[str]:
    """The lines fthss itself wrote to stderr (not the progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith(("skipped", "fthss", "/"))]


# 1. Text that is not valid Unicode ------------------------------------------------------------

@pytest.mark.parametrize("line, field", [
    ('{"shared": "\\ud800", "steps": [{"stage": "A"}]}', "shared"),
    ('{"shared": "q", "steps": [{"stage": "A", "input": "x\\udfff"}]}', r"steps\[0\].input"),
    ('{"shared": "q", "steps": [{"stage": "A", "stop": ["\\ud800"]}]}', r"steps\[0\].stop\[0\]"),
    ('{"id": "\\udc80", "shared": "q", "steps": [{"stage": "A"}]}', "id"),
    ('{"shared": "q", "steps": [{"stage": "A", "output": "\\ud83d"}]}', r"steps\[0\].output"),
    ('{"shared": "q", "\\ud800": 1, "steps": [{"stage": "A"}]}', "key"),
])
def test_text_that_is_not_unicode_is_a_bad_record_named_by_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"shared": "ok", "steps": [{"stage": "A"}]}\n' + line + "\n")
    with pytest.raises(ChainFormatError, match=r"bad\.jsonl:2: " + field + ".*not valid Unicode"):
        load_chains(path)
    skips = SkipReport()
    assert len(load_chains(path, skips)) == 1 and skips.skipped == 1


@pytest.mark.parametrize("record, field", [({"I_ALL": "\ud800", "O_A": "a"}, "I_ALL"),
                                           ({"I_ALL": "q", "O_A": "a\udfff"}, "O_A")])
def test_text_that_is_not_unicode_in_the_authors_format(tmp_path, record, field):
    path = tmp_path / "bad.json"
    # json.dumps writes lone surrogates as \ud800 escapes, as a hostile file would hold them
    path.write_text(json.dumps([{"I_ALL": "q", "O_A": "a"}, record]))
    with pytest.raises(ChainFormatError, match=rf"bad\.json: record 1: {field}: not valid Unicode"):
        load_chains(path)
    skips = SkipReport()
    assert len(load_chains(path, skips)) == 1 and skips.skipped == 1


def test_text_that_is_not_unicode_in_a_test_record_and_a_corpus(tmp_path):
    from fthss.retrieval.bm25 import BM25Retriever, CorpusFormatError
    from fthss.tasks import get_task

    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"question": "q \ud800", "answer": "A"},
                                {"question": "Is it? Options: A. yes B. no", "answer": "B"}]))
    with pytest.raises(ChainFormatError, match="record 0: question: not valid Unicode"):
        get_task("memory_reasoning").records(test)
    assert len(get_task("memory_reasoning").records(test, SkipReport())) == 1
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "p1", "text": "Oslo is a city"}\n{"id": "p2", "text": "\\ud800"}\n')
    with pytest.raises(CorpusFormatError, match=r"corpus\.jsonl:2: text: not valid Unicode"):
        BM25Retriever.from_file(corpus)
    assert BM25Retriever.from_file(corpus, SkipReport()).ids == ["p1"]


def test_cli_run_skips_text_that_is_not_unicode(stages, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(CHAINS.read_text() + '{"shared": "\\ud800", "steps": [{"stage": "A"}]}\n')
    out = tmp_path / "out.jsonl"
    assert main(run_command(stages, data, out)) == 2
    assert f"fthss run: error: {data}:3: shared: not valid Unicode" in "\n".join(errors(capsys))
    assert main(run_command(stages, data, out, "--skip-bad")) == 0
    assert len(out.read_text().splitlines()) == 2


def test_engine_fails_a_request_that_is_not_unicode_alone(llama):
    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    engine = ChainEngine(llama, [stage], max_new_tokens=2)
    good = ChainSample("q", [Step("A", input="x")], id="good")
    results = engine.run([ChainSample("\ud800", [Step("A")], id="bad"), good])
    assert "shared: not valid Unicode" in results[0].error and results[1].error is None
    assert results[1].steps[0].output_ids == engine.run([good])[0].steps[0].output_ids


def test_an_init_text_that_is_not_unicode_is_an_error(tmp_path, capsys):
    # a non-UTF-8 byte on the command line arrives as a lone surrogate (surrogateescape)
    assert main(["stage", "create", *LLAMA, "--name", "A", "--init", "text", "--init-text",
                 "x\udcff", "--out", str(tmp_path / "A")]) == 2
    assert "init_text must be valid Unicode" in capsys.readouterr().err


# 2. Numbers out of range ----------------------------------------------------------------------

@pytest.mark.parametrize("step, field", [
    ({"min_new_tokens": 2**63}, r"min_new_tokens: must be <= 2147483647"),
    ({"max_new_tokens": 2**64}, r"max_new_tokens: must be <= 2147483647"),
    ({"stop_token_ids": [1, 2**63]}, r"stop_token_ids\[1\]: must be <= 2147483647"),
    ({"stop_token_ids": [-5]}, r"stop_token_ids\[0\]: must be >= 0"),
])
def test_numbers_past_any_model_are_named_at_load(tmp_path, step, field):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"shared": "q", "steps": [{"stage": "A", **step}]}) + "\n")
    with pytest.raises(ChainFormatError, match=r"big\.jsonl:1: steps\[0\]\." + field):
        load_chains(path)


def test_a_stop_token_past_the_vocabulary_is_named_and_skippable(stages, tmp_path, capsys, llama):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"id": "bad", "shared": "q", "steps": [
        {"stage": "A", "stop_token_ids": [llama.vocab_size]}]}) + "\n" + CHAINS.read_text())
    out = tmp_path / "out.jsonl"
    assert main(run_command(stages, data, out)) == 2
    assert (f"{data}:1: steps[0].stop_token_ids[0]: {llama.vocab_size} is not a token id of "
            "this model") in "\n".join(errors(capsys))
    assert not out.exists()
    assert main(run_command(stages, data, out, "--skip-bad")) == 0
    assert [json.loads(row)["id"] for row in out.read_text().splitlines()] == [
        "compress-1", "rounds-1"]


def test_engine_fails_a_stop_token_past_the_vocabulary_alone(llama):
    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    engine = ChainEngine(llama, [stage], max_new_tokens=2)
    bad = ChainSample("q", [Step("A", stop_token_ids=[llama.vocab_size + 7])], id="bad")
    good = ChainSample("q", [Step("A", input="x")], id="good")
    results = engine.run([good, bad, good])
    assert results[1].error and "not a token id" in results[1].error
    assert results[0].error is None and results[0].output == results[2].output


@pytest.mark.parametrize("command, option, value", [
    ("train", "--max-grad-norm", "-1"), ("train", "--max-samples", "-1"),
    ("train", "--lr", "nan"), ("train", "--epochs", "inf"), ("train", "--seed", str(2**70)),
    ("train", "--max-steps", "0"), ("train", "--warmup-ratio", "1"),
    ("eval", "--max-records", "-1"), ("eval", "--max-new-tokens", "-3"),
    ("run", "--temperature", "-1"), ("run", "--top-p", "0"), ("run", "--top-k", "-2"),
    ("run", "--max-new-tokens", str(2**63)),
])
def test_every_numeric_option_has_its_range(command, option, value, capsys):
    required = {"train": ["--data", "x.jsonl", "--out", "o"],
                "eval": ["--task", "compress_qa", "--data", "x", "--stages", "fthss=x"],
                "run": ["--stage", "x", "--input", "x", "--output", "y"]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, *LLAMA, *required, option, value])
    # an option with a short spelling is named by both (--learning-rate/--lr)
    assert exit_.value.code == 2 and re.search(rf"argument (\S+/)?{option}: must be",
                                               capsys.readouterr().err)


@pytest.mark.parametrize("option, value", [("--steps", "-1"), ("--learning-rate", "nan"),
                                           ("--hole-share", "2"), ("--warmup-steps", "-5"),
                                           ("--batch-size", "0"), ("--seed", "-1")])
def test_pretraining_options_have_their_ranges(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["base", "pretrain", option, value])
    # an option with a short spelling is named by both (--learning-rate/--lr)
    assert exit_.value.code == 2 and re.search(rf"argument (\S+/)?{option}: must be",
                                               capsys.readouterr().err)


# 3. Nothing to evaluate -----------------------------------------------------------------------

@pytest.fixture
def fthss_stages(tmp_path):
    root = tmp_path / "stages"
    for name in ("A", "B"):
        assert main(["stage", "create", *LLAMA, "--name", name, "--tokens", "2",
                     "--out", str(root / name)]) == 0
    return f"fthss={root}"


@pytest.mark.parametrize("content, extra, why", [
    ([], [], "it holds no record"),
    (None, ["--max-records", "0"], "--max-records 0"),
    ([{"I_ALL": "q", "O_B": "x"}], ["--skip-bad"], "every record was skipped"),
])
def test_nothing_to_evaluate_is_said(tmp_path, capsys, fthss_stages, content, extra, why):
    data = tmp_path / "test.json"
    if content is None:
        data.write_text((DATA / "compress_qa_sample.json").read_text())
    else:
        data.write_text(json.dumps(content))
    assert main(["eval", *LLAMA, "--task", "compress_qa", "--data", str(data), "--stages",
                 fthss_stages, "--out", str(tmp_path / "report"), *extra]) == 2
    assert f"fthss eval: error: {data}: nothing to evaluate ({why})" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [None, 5, "x", []])
def test_a_bad_first_test_record_does_not_change_the_format(tmp_path, bad):
    from fthss.tasks import get_task

    data = tmp_path / "test.json"
    good = {"question": "Is it? Options: A. yes B. no", "answer": "B"}
    data.write_text(json.dumps([bad, good, good]))
    task = get_task("memory_reasoning")
    with pytest.raises(ChainFormatError, match="record 0: test records need"):
        task.records(data)
    skips = SkipReport()
    records = task.records(data, skips)
    assert [r.answer for r in records] == ["B", "B"] and skips.skipped == 1
    assert [r.id for r in records] == ["1", "2"]  # ids are their place in the file


# 4. Names that become paths ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a" * 65, "é" * 33, "A" * 300])
def test_a_stage_name_too_long_for_a_folder_is_refused_everywhere(tmp_path, capsys, name):
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text(json.dumps({"shared": "q", "steps": [{"stage": name, "output": "x"}]}) + "\n")
    with pytest.raises(ChainFormatError, match=r"steps\[0\].stage: .* at most 64 bytes"):
        load_chains(jsonl)
    authors = tmp_path / "long.json"
    authors.write_text(json.dumps([{"I_ALL": "q", f"O_{name}": "x"}]))
    with pytest.raises(ChainFormatError, match="record 0: (unknown )?field 'O_"):
        load_chains(authors)
    assert main(["stage", "create", *LLAMA, "--name", name, "--out", str(tmp_path / "s")]) == 2
    assert "at most 64 bytes" in capsys.readouterr().err


def test_many_long_stage_names_train_into_folders_that_fit(tmp_path):
    names = [f"{c}" * 64 for c in "ABCDEF"]  # the longest names allowed, six of them
    data = tmp_path / "train.jsonl"
    steps = [{"stage": n, "output": f"out {i}"} for i, n in enumerate(names)]
    data.write_text(json.dumps({"shared": "q", "steps": steps}) + "\n")
    out = tmp_path / "out"
    assert main(["train", *LLAMA, "--data", str(data), "--out", str(out), "--tokens", "1",
                 "--max-steps", "1", "--grad-accumulation", "1"]) == 0
    work = [p.name for p in out.iterdir() if p.name.startswith("train-")]
    assert len(work) == 1 and len(work[0].encode()) < 100 and "~" in work[0]
    assert all((out / n / "adapter_model.safetensors").is_file() for n in names)


def test_authors_keys_are_matched_whole(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"I_ALL": "q", "O_A\n": "x"}]))
    with pytest.raises(ChainFormatError, match="unknown field 'O_A\\n'"):
        load_chains(path)


# The authors' format is read one way only, and JSON keys once -------------------------------

@pytest.mark.parametrize("record, message", [
    ({"I_ALL": "q", "O_1A": "a", "O_1B": "b", "O_3A": "c"}, r"no field for round 2 of stage A"),
    ({"I_ALL": "q", "O_1A": "a", "O_1B": "b", "O_2A": "c", "O_3A": "d"},
     r"no field for round 2 of stage B \(O_2B\)"),
    ({"I_ALL": "q", "O_1A": "a", "O_01A": "b"}, r"fields 'O_1A' and 'O_01A' are both round 1"),
    ({"I_ALL": "q", "O_A": "a", "O_1A": "b"}, r"field 'O_A' has no round"),
    ({"I_ALL": "q", "O_0A": "a"}, r"field 'O_0A': rounds count from 1"),
    ({"I_ALL": "q", "O_1B": "a"}, None),  # one stage, one round: nothing missing
    ({"I_ALL": "q", "O_1A": "a", "O_1B": "b", "O_2A": "c"}, None),  # ends after A
])
def test_multi_round_keys_are_complete_and_unambiguous(tmp_path, record, message):
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps([record]))
    if message is None:
        assert len(load_chains(path)) == 1
        return
    with pytest.raises(ChainFormatError, match=r"record 0: " + message):
        load_chains(path)


@pytest.mark.parametrize("suffix, text, message", [
    (".json", '[{"I_ALL": "q", "O_A": "a", "O_A": "b"}]', r"record 0: key 'O_A' is given more"),
    (".jsonl", '{"shared": "q", "shared": "r", "steps": [{"stage": "A"}]}',
     r":1: key 'shared' is given more"),
    (".jsonl", '{"shared": "q", "steps": [{"stage": "A", "stage": "B"}]}',
     r":1: steps\[0\]: key 'stage' is given more"),
])
def test_a_key_given_twice_is_refused(tmp_path, suffix, text, message):
    path = tmp_path / f"twice{suffix}"
    path.write_text(text + "\n")
    with pytest.raises(ChainFormatError, match=message):
        load_chains(path)
    assert load_chains(path, SkipReport()) == []


# 6. Numerics ---------------------------------------------------------------------------------

def _train(base, stages, out, **config):
    from fthss.training.config import TrainConfig
    from fthss.training.run import train_method

    samples = [ChainSample(f"q{i}", [Step("A", input="x", output=f"answer {i}")])
               for i in range(4)]
    settings = {"learning_rate": 0.01, "max_steps": 4, "micro_batch_size": 2,
                "grad_accumulation": 1, "warmup_ratio": 0.0, "save_every": 1, **config}
    return train_method(base, samples, "fthss", stages, None, TrainConfig(**settings), out,
                        progress=False)


def test_a_stage_of_huge_values_stops_at_the_first_nan_loss(llama, tmp_path):
    from fthss.errors import NonFiniteError

    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    with torch.no_grad():
        stage.weight.fill_(3e38)  # finite, as a hostile stage file can hold it
    with pytest.raises(NonFiniteError, match="step 1: the loss is NaN or inf.*no checkpoint"):
        _train(llama, [stage], tmp_path)
    assert not (tmp_path / "A").exists() and not (tmp_path / "train-A" / "checkpoints").exists()


@pytest.mark.parametrize("spoil, what", [("loss", "the loss"), ("gradient", "a gradient")])
def test_a_non_finite_step_keeps_the_last_good_checkpoint(llama, tmp_path, monkeypatch, spoil,
                                                          what):
    from fthss.errors import NonFiniteError
    from fthss.training.trainer import StageSet

    forward, calls = StageSet.forward, []

    def nan_on_the_third_step(self, chains):
        loss, tokens = forward(self, chains)
        calls.append(1)
        if len(calls) == 3:
            if spoil == "loss":
                loss = loss * float("nan")
            else:
                self.trained["A"].weight.register_hook(lambda g: g * float("inf"))
        return loss, tokens

    monkeypatch.setattr(StageSet, "forward", nan_on_the_third_step)
    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    with pytest.raises(NonFiniteError, match=f"step 3: {what} is NaN or inf.*step-000002, is kept"):
        _train(llama, [stage], tmp_path)
    work = tmp_path / "train-A"
    assert (work / "checkpoints" / "latest").read_text() == "step-000002"
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert torch.isfinite(stage.weight).all()  # the optimizer never stepped on it


def test_metrics_count_on_after_a_resume(llama, tmp_path, monkeypatch):
    from fthss.training.trainer import Trainer

    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    _train(llama, [stage], tmp_path / "straight")
    save = Trainer._save_checkpoint

    def stop_after_two(self, step):
        save(self, step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        _train(llama, [Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)], tmp_path / "r")
    monkeypatch.undo()
    _train(llama, [Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)], tmp_path / "r")

    def rows(out):
        return [json.loads(line)
                for line in (out / "train-A" / "metrics.jsonl").read_text().splitlines()]
    resumed, straight = rows(tmp_path / "r"), rows(tmp_path / "straight")
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in straight]
    assert resumed[2]["wall_s"] >= resumed[1]["wall_s"]


def test_a_stage_whose_keys_overflow_is_refused_by_the_engine(llama):
    from fthss.errors import NonFiniteError

    huge = Stage.create(StageConfig("H", "prefix", 2), llama, seed=1)
    with torch.no_grad():
        huge.weight.fill_(3e38)  # finite, but moving these keys overflows them
    with pytest.raises(NonFiniteError, match="stage H: its prompt's keys or values reach .* past"):
        ChainEngine(llama, [huge], max_new_tokens=3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_request_whose_logits_turn_nan_fails_alone(llama, monkeypatch, temperature):
    from fthss.engine.cache import ChainCache

    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    engine = ChainEngine(llama, [stage], max_new_tokens=4, batch_size=2)
    sampling = SamplingConfig(temperature=temperature)
    good = ChainSample("q", [Step("A", input="x")], id="good")
    alone = engine.run([good], sampling=sampling)[0]
    decode = ChainCache.decode

    def nan_in_row_0(self, *args, **kwargs):
        logits = decode(self, *args, **kwargs)
        return torch.cat([torch.full_like(logits[:1], float("nan")), logits[1:]])

    monkeypatch.setattr(ChainCache, "decode", nan_in_row_0)
    bad = ChainSample("other", [Step("A")], id="bad")
    results = engine.run([bad, good], sampling=sampling)
    assert "logits are NaN or inf" in results[0].error and results[1].error is None
    assert results[1].steps[0].output_ids == alone.steps[0].output_ids


def test_a_damaged_metrics_log_keeps_its_whole_lines(llama, tmp_path):
    _train(llama, [Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)], tmp_path)
    log = tmp_path / "train-A" / "metrics.jsonl"
    with log.open("ab") as f:  # lines no run writes: not UTF-8, not an object, bad values
        f.write(b'\xff\xfe\n[1, 2]\n{"step": "x"}\n{"step": 3, "tokens": "many"}\n')
    _train(llama, [Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)], tmp_path)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_stages_that_cannot_be_used_are_refused(llama, tmp_path):
    from safetensors.torch import save_file

    from fthss.errors import ConfigError
    from fthss.prompts.io import StageLoadError
    from fthss.prompts.stage import load_stage

    with pytest.raises(ConfigError, match="virtual tokens, but the base has"):
        Stage.create(StageConfig("A", "prompt", llama.position_limit), llama)
    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    stage.save_pretrained(tmp_path / "A", llama)
    save_file({"prompt_embeddings": torch.ones(2, llama.hidden_size, dtype=torch.int64)},
              tmp_path / "A" / "adapter_model.safetensors")
    (tmp_path / "A" / "fthss_stage.json").unlink()  # a PEFT adapter: no hash to tell
    with pytest.raises(StageLoadError, match="prompt_embeddings holds torch.int64, not floats"):
        load_stage(tmp_path / "A", llama)


# 7. File-system faults ------------------------------------------------------------------------

@pytest.mark.parametrize("output, message", [
    ("", "--output: empty"), ("{tmp}", "is a folder"), (str(CHAINS), "is the input")])
def test_run_refuses_an_output_it_cannot_write_before_any_work(stages, tmp_path, capsys, output,
                                                               message, monkeypatch):
    monkeypatch.setattr(ChainEngine, "run", lambda *a, **k: pytest.fail("ran"))
    assert main(run_command(stages, CHAINS, output.format(tmp=tmp_path))) == 2
    assert message in capsys.readouterr().err


def test_run_keeps_finished_results_when_the_final_write_fails(stages, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "out.jsonl"
    replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst) == str(out):
            raise OSError(28, "No space left on device", str(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    assert main(run_command(stages, CHAINS, out, "--batch-size", "1")) == 1
    err = "\n".join(errors(capsys))
    assert f"fthss run: error: {out}: No space left on device" in err
    assert f"the results finished so far are in {out}.partial" in err
    rows = [json.loads(line) for line in Path(f"{out}.partial").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["compress-1", "rounds-1"] and not out.exists()


def test_a_full_disk_is_named_with_the_file_it_stopped(stages, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    fsync, calls = os.fsync, []

    def full_after_one(fd):
        calls.append(fd)
        if len(calls) > 1:  # the first batch is on disk, the second does not fit
            raise OSError(28, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_one)
    assert main(run_command(stages, CHAINS, out, "--batch-size", "1")) == 1
    err = "\n".join(errors(capsys))
    assert f"fthss run: error: {out}.partial: No space left on device" in err
    assert len(Path(f"{out}.partial").read_text().splitlines()) >= 1


def test_a_read_only_output_folder_fails_before_any_work(stages, tmp_path, capsys,
                                                          monkeypatch):
    import builtins

    out = tmp_path / "out.jsonl"
    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):  # as a folder without write permission
        if str(file).startswith(str(tmp_path)) and "w" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    monkeypatch.setattr(ChainEngine, "run", lambda *a, **k: pytest.fail("ran"))
    assert main(run_command(stages, CHAINS, out)) == 1
    assert f"fthss run: error: {out}.partial: Permission denied" in capsys.readouterr().err


def test_run_writes_each_batch_as_it_is_done(stages, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    seen = []
    run = ChainEngine.run

    def watched(self, requests, *args, on_results=None, **kwargs):
        def record(done):
            on_results(done)
            seen.append(Path(f"{out}.partial").read_text().count("\n"))
        return run(self, requests, *args, on_results=record, **kwargs)

    monkeypatch.setattr(ChainEngine, "run", watched)
    assert main(run_command(stages, CHAINS, out, "--batch-size", "1")) == 0
    assert seen == [1, 2] and not Path(f"{out}.partial").exists()


def test_file_system_faults_are_one_line_not_a_traceback(stages, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(run_command(stages, CHAINS, a_file / "out.jsonl")) == 1
    assert f"fthss run: error: {a_file}" in capsys.readouterr().err
    assert main(["stage", "create", *LLAMA, "--name", "A", "--out", str(a_file / "A")]) == 1
    assert f"fthss stage: error: {a_file}" in capsys.readouterr().err
    assert main(["eval", *LLAMA, "--task", "compress_qa", "--data",
                 str(DATA / "compress_qa_sample.json"), "--stages", f"fthss={a_file}",
                 "--out", str(tmp_path / "r")]) == 2
    assert f"{a_file} is not a folder" in capsys.readouterr().err
    assert main(["train", *LLAMA, "--data", str(CHAINS), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("spoil", ["config", "weights", "config-not-utf8"])
def test_a_broken_base_folder_is_named(tmp_path, capsys, spoil, llama):
    folder = tmp_path / "base"
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    if spoil == "config":
        (folder / "config.json").write_text('{"model_type": "llama", ')
    elif spoil == "config-not-utf8":
        (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["verify", "--base", str(folder), "--chains", "1"]) == 2
    assert f"fthss verify: error: {folder}: cannot load the model" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import fthss.cli

    def broken(args):
        raise ValueError("a bug, not a user's error")

    monkeypatch.setattr(fthss.cli, "cmd_stage_create", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["stage", "create", *LLAMA, "--name", "A", "--out", "x"])


# 8. Two runs into one folder ------------------------------------------------------------------

def train_data(path, city="Paris") -> Path:
    rows = [{"shared": f"where is {name}?", "steps": [
        {"stage": "A", "input": f"{name} is in {city}.", "output": f"{name}: {city}"},
        {"stage": "B", "output": city}]} for name in ("ada", "bob", "cyd", "dee")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_command(data, out, *extra):
    return ["train", *LLAMA, "--data", str(data), "--out", str(out), "--tokens", "2",
            "--grad-accumulation", "1", "--micro-batch-size", "2", "--save-every", "1", *extra]


def test_a_second_run_into_one_folder_is_refused_naming_the_first(tmp_path, capsys):
    import subprocess
    import sys

    out, data = tmp_path / "out", train_data(tmp_path / "train.jsonl")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fthss.training.lock import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(train_command(data, out, "--max-steps", "1")) == 2
        assert (f"fthss train: error: {out}: another training run (pid {holder.pid}) is "
                "writing into this folder") in capsys.readouterr().err
        assert not (out / "train-A+B").exists()
    finally:
        holder.kill()  # killed, not ended: the kernel still drops its lock
        holder.wait()
    assert main(train_command(data, out, "--max-steps", "1")) == 0


# 9. Settings changed on rerun -----------------------------------------------------------------

def _logged(out) -> list[dict]:
    return [json.loads(line) for line in
            (out / "train-A+B" / "metrics.jsonl").read_text().splitlines()]


def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    out, data = tmp_path / "out", train_data(tmp_path / "train.jsonl")
    other = train_data(tmp_path / "other.jsonl", city="Rome")
    assert main(train_command(data, out, "--max-steps", "2")) == 0
    for extra, named in [(["--max-steps", "1"], "max_steps: 2 there, 1 here"),
                         (["--max-steps", "2", "--seed", "1"], "seed: 0 there, 1 here"),
                         (["--max-steps", "2", "--lr", "0.1"], "learning_rate: 0.0002 there"),
                         (["--max-steps", "3"], "pass --extend"),
                         (["--max-steps", "1", "--extend"], "not more than the 2")]:
        assert main(train_command(data, out, *extra)) == 2
        assert named in capsys.readouterr().err
    assert main(train_command(other, out, "--max-steps", "2")) == 2
    assert "data_sha256" in capsys.readouterr().err
    assert [r["step"] for r in _logged(out)] == [1, 2]  # nothing was trained
    assert main(train_command(data, out, "--max-steps", "2")) == 0  # the same: resumes


def test_extend_continues_to_more_steps_on_the_longer_schedule(tmp_path):
    out, straight = tmp_path / "out", tmp_path / "straight"
    data = train_data(tmp_path / "train.jsonl")
    assert main(train_command(data, out, "--max-steps", "2")) == 0
    assert main(train_command(data, out, "--max-steps", "4", "--extend")) == 0
    assert main(train_command(data, straight, "--max-steps", "4")) == 0
    extended, reference = _logged(out), _logged(straight)
    assert [r["step"] for r in extended] == [1, 2, 3, 4]
    assert (out / "train-A+B" / "checkpoints" / "latest").read_text() == "step-000004"
    # from the resumed step on, the learning rate is the 4-step schedule's
    assert [r["lr"] for r in extended[2:]] == [r["lr"] for r in reference[2:]]


# Outputs are not silently overwritten ---------------------------------------------------------

def test_stage_create_refuses_an_existing_stage_unless_told(tmp_path, capsys):
    command = ["stage", "create", *LLAMA, "--name", "A", "--tokens", "2", "--out",
               str(tmp_path / "A")]
    assert main(command) == 0
    before = (tmp_path / "A" / "adapter_model.safetensors").read_bytes()
    assert main(command[:-2] + ["--seed", "1"] + command[-2:]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "A" / "adapter_model.safetensors").read_bytes() == before
    assert main(command + ["--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "A" / "adapter_model.safetensors").read_bytes() != before


def test_eval_never_mixes_an_older_report_with_a_new_one(tmp_path, capsys, fthss_stages):
    out = tmp_path / "report"
    out.mkdir()
    (out / "latency_memory.png").write_bytes(b"an older report's plot")
    command = ["eval", *LLAMA, "--task", "compress_qa", "--data",
               str(DATA / "compress_qa_sample.json"), "--stages", fthss_stages, "--out", str(out),
               "--max-records", "1", "--max-new-tokens", "1", "--no-gold-upstream"]
    assert main(command) == 2
    assert "holds an older report (latency_memory.png); pass --overwrite" in capsys.readouterr().err
    assert main(command + ["--overwrite"]) == 0
    assert not (out / "latency_memory.png").exists() and (out / "report.md").is_file()


# 10. Sampling does not depend on batch neighbours ---------------------------------------------

def test_sampling_depends_on_the_request_not_its_place(llama):
    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    engine = ChainEngine(llama, [stage], max_new_tokens=6, batch_size=2)
    sampling = SamplingConfig(temperature=1.0, seed=3)
    requests = [ChainSample(f"question {i}", [Step("A", input="x")], id=f"r{i}")
                for i in range(3)] + [ChainSample("no id", [Step("A")])]
    alone = [engine.run([r], sampling=sampling)[0].steps[0].output_ids for r in requests]
    neighbour = ChainSample("\ud800", [Step("A")], id="bad")  # fails, but takes a place
    extra = ChainSample("another", [Step("A")], id="x")
    mixed = engine.run([neighbour, extra, *requests], sampling=sampling)
    assert [r.steps[0].output_ids for r in mixed[2:]] == alone
    assert len({tuple(ids) for ids in alone}) > 1  # requests do draw different samples
    reseeded = engine.run(requests, sampling=SamplingConfig(temperature=1.0, seed=4))
    assert [r.steps[0].output_ids for r in reseeded] != alone


def test_results_reach_on_results_in_order(llama):
    stage = Stage.create(StageConfig("A", "prompt", 2), llama, seed=0)
    engine = ChainEngine(llama, [stage], max_new_tokens=2, batch_size=2)
    good = [ChainSample(f"q{i}", [Step("A")], id=str(i)) for i in range(4)]
    bad = ChainSample("q", [Step("A", stop_token_ids=[10**6])], id="bad")
    handed = []
    results = engine.run([bad, good[0], good[1], bad, good[2], good[3], bad],
                         on_results=lambda done: handed.append([r.id for r in done]))
    assert handed == [["bad", "0", "1", "bad"], ["2", "3", "bad"]]
    assert [r.id for r in results] == ["bad", "0", "1", "bad", "2", "3", "bad"]
    assert torch.tensor([r.error is not None for r in results]).sum() == 3
