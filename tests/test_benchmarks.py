"""Benchmarks: the right rows, exact generation lengths, cache bytes that match the per-token
formula (one cache in shared mode, one per stage in text mode), and every `fthss bench` command
writing the JSON it documents. Nothing here asserts a speed-up: timings depend on the machine."""

import json

import pytest
import torch

from fthss.benchmarks.chains import (
    QUESTION,
    bytes_per_token,
    filler_text,
    latency_ratios,
    routing_cost,
    stage_b_latency,
    stage_b_request,
)
from fthss.cli import main
from fthss.models.presets import preset_base

RECORD_KEYS = {"benchmark", "command", "date", "device", "device_name", "torch_threads", "torch",
               "transformers", "peft", "dtype", "parameters", "settings"}
PROMPT = 4


def test_filler_text_has_about_the_asked_length(llama):
    ids = llama.tokenizer.encode(filler_text(llama, 200), add_special_tokens=False)
    assert 150 <= len(ids) <= 250


def test_stage_b_latency_rows(llama):
    rows = stage_b_latency(llama, [20, 80], new_tokens=5, repeats=2, prompt_tokens=3)
    assert [(r["intermediate_tokens"], r["mode"]) for r in rows] == [
        (20, "text"), (20, "shared"), (80, "text"), (80, "shared")]
    assert all(0 < r["ttft_s"] <= r["latency_s"] for r in rows)
    text = {r["intermediate_tokens"]: r["prefilled_tokens"] for r in rows if r["mode"] == "text"}
    shared = {r["intermediate_tokens"]: r["prefilled_tokens"]
              for r in rows if r["mode"] == "shared"}
    assert text[80] > text[20] + 40  # text mode re-encodes the intermediate
    assert shared[80] == shared[20] <= 2  # shared mode: the step marker (and A's last token)


def test_latency_ratios_name_the_strongest_baseline():
    """Against shared mode, each other system's ratio, and the fastest of them, per figure:
    here text mode has the lower latency and PEFT the earlier first token."""
    def row(mode, length, latency, ttft):
        return {"mode": mode, "kind": "prompt", "intermediate_tokens": length,
                "latency_s": latency, "ttft_s": ttft}

    rows = [row("shared", 100, 0.1, 0.01), row("text", 100, 0.3, 0.2),
            row("hf-peft", 100, 0.4, 0.1), row("text", 200, 0.5, 0.4)]  # no shared row at 200
    [ratio] = latency_ratios(rows)
    assert ratio["latency_ratio"] == pytest.approx({"text": 3.0, "hf-peft": 4.0})
    assert ratio["ttft_ratio"] == pytest.approx({"text": 20.0, "hf-peft": 10.0})
    assert ratio["strongest_baseline"]["latency"] == {"system": "text", "ratio": pytest.approx(3.0)}
    assert ratio["strongest_baseline"]["ttft"] == {"system": "hf-peft",
                                                   "ratio": pytest.approx(10.0)}


def test_routing_cost_is_lora_over_prompt_per_system_and_length():
    def row(mode, kind, length, latency):
        return {"mode": mode, "kind": kind, "intermediate_tokens": length, "latency_s": latency}

    rows = [row("shared", "prompt", 100, 0.1), row("shared", "lora", 100, 0.15),
            row("text", "prompt", 100, 0.3), row("text", "lora", 100, 0.6),
            row("hf-peft", "prompt", 100, 0.4)]  # no lora counterpart: no ratio
    assert routing_cost(rows, "intermediate_tokens", ("latency_s",)) == [
        {"intermediate_tokens": 100, "mode": "shared", "latency_s_ratio": pytest.approx(1.5)},
        {"intermediate_tokens": 100, "mode": "text", "latency_s_ratio": pytest.approx(2.0)}]
    assert routing_cost(rows[:1], "intermediate_tokens", ("latency_s",)) == []


PLOT_TITLES = {"latency": ["Stage-B latency", "Slower than shared mode by"],
               "throughput": ["Throughput", "Shared mode's gain"],
               "memory": ["KV memory", "compress → QA"]}


def bench(tmp_path, capsys, figures, *options) -> dict:
    """Run `fthss bench ...` on tiny-llama; the JSON file and stdout's last line must agree,
    and the plot beside it shows the benchmark's panels."""
    out = tmp_path / "bench.json"
    argv = ["bench", *options, "--arch", "tiny-llama", "--prompt-tokens", str(PROMPT),
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"-> {out}" and "{" not in printed  # tables
    if options[0] in PLOT_TITLES:  # a plot beside the record, each panel with its data
        panels = figures.pop("bench.png")
        assert [p["title"] for p in panels] == PLOT_TITLES[options[0]]
        assert all((p["xlabel"] or any(p["xticklabels"])) and p["ylabel"]
                   and p["lines"] + p["bars"] > 0 for p in panels)
    assert main(argv + ["--json"]) == 0  # the record alone, for a pipe
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert RECORD_KEYS <= set(result)
    assert result["benchmark"] == options[0] and result["command"] == "fthss " + " ".join(argv)
    assert result["settings"]["arch"] == "tiny-llama" and result["dtype"] == "float32"
    return result


def test_bench_latency_three_systems_side_by_side(tmp_path, capsys, figures, llama):
    result = bench(tmp_path, capsys, figures, "latency", "--lengths", "32", "64",
                   "--new-tokens", "2", "--repeats", "1")
    rows = {(r["mode"], r["intermediate_tokens"]): r for r in result["rows"]}
    assert set(rows) == {(m, n) for m in ("shared", "text", "hf-peft") for n in (32, 64)}
    assert all(r["new_tokens"] == 2 and 0 < r["ttft_s"] <= r["latency_s"] for r in rows.values())
    for length in (32, 64):  # PEFT re-encodes question and intermediate under its prompt
        text = f"{QUESTION}\n{filler_text(llama, length)}"
        input_tokens = len(llama.tokenizer(text).input_ids)
        assert rows["hf-peft", length]["prefilled_tokens"] == input_tokens + PROMPT
    assert [r["intermediate_tokens"] for r in result["ratios"]] == [32, 64]
    assert set(result["ratios"][0]["latency_ratio"]) == {"text", "hf-peft"}
    for ratio in result["ratios"]:
        for what in ("latency", "ttft"):
            strongest = ratio["strongest_baseline"][what]
            assert strongest["ratio"] == min(ratio[f"{what}_ratio"].values())
            assert ratio[f"{what}_ratio"][strongest["system"]] == strongest["ratio"]


def test_bench_latency_and_decode_measure_the_routing_of_lora_stages(tmp_path, capsys, figures):
    latency = bench(tmp_path, capsys, figures, "latency", "--lengths", "16", "--new-tokens", "2",
                    "--repeats", "1", "--kinds", "prompt", "lora")
    # PEFT + generate runs prompt stages only; with lora stages text mode is the LoRA chain
    assert sorted((r["mode"], r["kind"]) for r in latency["rows"]) == sorted(
        [("shared", "prompt"), ("text", "prompt"), ("hf-peft", "prompt"), ("shared", "lora"),
         ("text", "lora")])
    assert {(r["kind"], r["strongest_baseline"]["latency"]["system"] in ("text", "hf-peft"))
            for r in latency["ratios"]} == {("prompt", True), ("lora", True)}
    assert [(r["mode"], r["intermediate_tokens"]) for r in latency["routing_cost"]] == [
        ("shared", 16), ("text", 16)]
    assert all(r["latency_s_ratio"] > 0 for r in latency["routing_cost"])
    decode = bench(tmp_path, capsys, figures, "decode", "--contexts", "16", "--new-tokens", "3",
                   "--repeats", "1", "--kinds", "prompt", "lora")
    assert [r["kind"] for r in decode["rows"]] == ["prompt", "lora"]
    [cost] = decode["routing_cost"]
    assert cost["ms_per_token_ratio"] == pytest.approx(
        decode["rows"][1]["ms_per_token"] / decode["rows"][0]["ms_per_token"])


def test_bench_latency_refuses_a_length_past_the_positions(tmp_path, capsys):
    argv = ["bench", "latency", "--arch", "tiny-llama", "--lengths", "5000", "--systems", "shared",
            "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    assert "intermediate length 5000" in capsys.readouterr().err


def test_bench_latency_names_the_missing_peft(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # import peft now fails
    argv = ["bench", "latency", "--arch", "tiny-llama", "--lengths", "8", "--new-tokens", "2",
            "--repeats", "1", "--systems", "hf-peft", "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    assert "fthss[bench]" in capsys.readouterr().err


def test_bench_memory_one_copy_shared_one_per_stage_text(tmp_path, capsys, figures, llama,
                                                         monkeypatch):
    from fthss.engine import cache

    monkeypatch.setattr(cache, "BLOCK", 16)  # so that 40 passage tokens are worth freeing
    result = bench(tmp_path, capsys, figures, "memory", "--total-tokens", "48",
                   "--passage-tokens", "40", "--compression-tokens", "6", "--answer-tokens", "2")
    rows = {(r["stages"], r["mode"]): r for r in result["multi_round"]}
    per_token = bytes_per_token(llama)
    shared = [rows[count, "shared"] for count in (1, 2, 3)]
    for count, row in enumerate(shared, 1):
        assert row["kv_bytes"] == row["kv_tokens"] * per_token
        assert row["kv_tokens"] <= PROMPT * count + row["chain_tokens"]
    # shared: the chain once whatever the number of stages; what differs is each stage's
    # prompt and the steps' markers (2 rounds × stages of them)
    spread = max(r["kv_tokens"] for r in shared) - min(r["kv_tokens"] for r in shared)
    assert spread <= 3 * PROMPT + 2 * 3
    # text: every stage keeps its own copy of the context it re-encoded
    text = [rows[count, "text"]["kv_bytes"] for count in (1, 2, 3)]
    assert text[0] < text[1] < text[2] and text[2] > 2 * shared[2]["kv_bytes"]
    compress = {r["mode"]: r for r in result["compress_qa"]}
    assert set(compress) == {"text", "shared"}
    for row in compress.values():
        assert row["passage_tokens"] == 40
        assert row["kv_bytes_during_b"] == row["kv_tokens_during_b"] * per_token
        assert 0 <= row["passage_tokens_held_during_b"] <= row["passage_tokens"]
    # text mode keeps stage A's cache, passages and all, beside stage B's; shared mode frees
    # the passages once no later step can see them
    assert compress["text"]["passage_tokens_held_during_b"] == 40
    assert compress["shared"]["passage_tokens_held_during_b"] == 0
    assert compress["shared"]["kv_bytes_during_b"] < compress["text"]["kv_bytes_during_b"]


def test_bench_throughput_rows_and_ratio(tmp_path, capsys, figures):
    result = bench(tmp_path, capsys, figures, "throughput", "--batch-sizes", "1", "3",
                   "--intermediate-tokens", "24", "--new-tokens", "2", "--repeats", "1")
    rows = {(r["batch"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(b, m) for b in (1, 3) for m in ("text", "shared")}
    for (batch, _), row in rows.items():
        assert row["requests_per_s"] == pytest.approx(batch / row["stage_b_s"])
        assert row["tokens_per_s"] == pytest.approx(2 * batch / row["stage_b_s"])
    assert [r["batch"] for r in result["ratios"]] == [1, 3]


def test_bench_decode_floor_only_with_a_known_bandwidth(tmp_path, capsys, figures):
    unknown = bench(tmp_path, capsys, figures, "decode", "--contexts", "16", "--new-tokens", "3",
                    "--repeats", "1")
    row = unknown["rows"][0]
    assert row["ms_per_token"] > 0 and row["floor_ms_per_token"] is None
    assert "--bandwidth-gbs" in unknown["note"]
    known = bench(tmp_path, capsys, figures, "decode", "--contexts", "16", "--new-tokens", "3",
                  "--repeats", "1", "--bandwidth-gbs", "20")
    row = known["rows"][0]
    assert known["note"] is None
    assert row["floor_ms_per_token"] == pytest.approx(
        1000 * (row["weight_bytes"] + row["kv_bytes"]) / 20e9)
    assert row["share_of_floor"] == pytest.approx(row["floor_ms_per_token"] / row["ms_per_token"])


@pytest.mark.parametrize("preset, parameters", [("llama3-8b", 8_030_261_248),
                                                ("qwen2.5-7b", 7_615_616_512)])
def test_large_presets_have_the_real_shapes_and_build_on_meta(preset, parameters):
    base = preset_base(preset, dtype=torch.bfloat16, device="meta")
    weights = list(base.model.parameters())
    assert all(p.is_meta for p in weights)  # nothing allocated
    assert sum(p.numel() for p in weights) == parameters
    assert base.dtype == torch.bfloat16 and base.position_limit >= 8192


def test_bench_serve_rows_against_the_offline_ceiling(tmp_path, capsys, figures):
    result = bench(tmp_path, capsys, figures, "serve", "--concurrency", "1", "3", "--rounds", "2",
                   "--intermediate-tokens", "16", "--new-tokens", "2", "--max-wait-ms", "50",
                   "--batching", "continuous", "dynamic", "--chain-rounds", "1", "2")
    rows = {(r["batching"], r["mode"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(b, m, c) for b in ("continuous", "dynamic")
                         for m in ("text", "text-cached", "shared") for c in (1, 3)}
    for (_, _, concurrency), row in rows.items():
        assert row["requests"] == 2 * concurrency and row["chain_rounds"] == [1, 2]
        assert row["requests_per_s"] == pytest.approx(row["requests"] / row["seconds"])
        assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"] <= row["latency_p99_s"]
        assert 1 <= row["mean_batch"] <= concurrency
        assert row["share_of_offline"] == pytest.approx(
            row["requests_per_s"] / row["offline_requests_per_s"])
    assert rows["dynamic", "shared", 3]["mean_batch"] > 1  # three clients at once share batches
    assert [(r["batching"], r["concurrency"]) for r in result["ratios"]] == [
        ("continuous", 1), ("continuous", 3), ("dynamic", 1), ("dynamic", 3)]
    for ratio in result["ratios"]:  # against the faster baseline of the same point
        at = {m: rows[ratio["batching"], m, ratio["concurrency"]] for m in ("text", "text-cached")}
        assert ratio["baseline"] == max(at, key=lambda m: at[m]["requests_per_s"])
        assert ratio["requests_ratio"] == pytest.approx(
            rows[ratio["batching"], "shared", ratio["concurrency"]]["requests_per_s"]
            / at[ratio["baseline"]]["requests_per_s"])


def test_the_load_generator_cycles_through_the_request_mix(monkeypatch):
    import asyncio

    from fthss.benchmarks import serve

    posted = []

    async def fake_post(client, body):
        posted.append(body["id"])
        await asyncio.sleep(0)
        return 0.02, 0.01, {"steps": [{"stats": {"wall_s": 0.01}}]}

    monkeypatch.setattr(serve, "_one", fake_post)
    figures = asyncio.run(serve.drive("http://127.0.0.1:9", [{"id": "a"}, {"id": "b"}], 2, 5))
    assert sorted(posted) == ["a", "a", "a", "b", "b"] and figures["requests"] == 5


def test_a_multi_round_bench_chain_alternates_its_stages_over_new_filler():
    base = preset_base("tiny-llama")
    request = stage_b_request(base, 12, 3, 4, rounds=3)
    assert [s.stage for s in request.steps] == ["A", "B"] * 3
    outputs = [s.output for s in request.steps[::2]]
    assert len(set(outputs)) == 3 and all(s.output is None for s in request.steps[1::2])
    assert stage_b_request(base, 12, 3, 4).steps == request.steps[:2]
    with pytest.raises(ValueError, match="over 3 round"):
        stage_b_request(base, base.position_limit // 3, 3, 4, rounds=3)
