"""The command line, run in-process: verify, stage create, run, and its errors."""

import json
from pathlib import Path

import pytest

from fthss.cli import main
from fthss.verify import VerifyReport

CHAINS = Path(__file__).with_name("data") / "chains.jsonl"


def test_verify_passes_on_a_tiny_model(capsys):
    assert main(["verify", "--arch", "tiny-llama", "--chains", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and json.loads(out.strip().splitlines()[-1])["pass"] is True


def test_verify_fails_above_tolerance(capsys, monkeypatch):
    import fthss.verify

    monkeypatch.setattr(fthss.verify, "verify", lambda *a, **k: VerifyReport(0.5, 0.0, 0.0, True, 1))
    assert main(["verify", "--arch", "tiny-qwen2"]) == 1
    assert "FAIL: largest difference 0.5" in capsys.readouterr().out


@pytest.fixture
def stages(tmp_path):
    for name, kind in (("A", "prompt"), ("B", "prefix")):
        assert main(["stage", "create", "--arch", "tiny-llama", "--name", name, "--kind", kind,
                     "--tokens", "4", "--out", str(tmp_path / name)]) == 0
    return [str(tmp_path / "A"), str(tmp_path / "B")]


@pytest.mark.parametrize("mode", ["shared", "text"])
def test_run_writes_results_with_statistics(stages, tmp_path, mode):
    out = tmp_path / "out.jsonl"
    assert main(["run", "--arch", "tiny-llama", "--stage", stages[0], "--stage", stages[1],
                 "--input", str(CHAINS), "--output", str(out), "--mode", mode,
                 "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["compress-1", "rounds-1"]
    assert [len(r["steps"]) for r in rows] == [2, 3]
    stats = rows[1]["steps"][2]["stats"]
    assert set(stats) == {"prefilled_tokens", "decoded_tokens", "time_to_first_token_s",
                          "wall_s", "kv_bytes", "kv_tokens"}
    assert rows[0]["mode"] == mode and rows[0]["output"] == rows[0]["steps"][-1]["output"]


def test_run_errors_exit_2(stages, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    assert main(["run", "--arch", "tiny-llama", "--stage", stages[0], "--input", str(CHAINS),
                 "--output", out]) == 2
    assert "unknown stage(s) ['B']" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"shared": "q", "steps": [{"stage": "A"}]}\n{oops\n')
    assert main(["run", "--arch", "tiny-llama", "--stage", stages[0], "--input", str(bad),
                 "--output", out]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing half-written
