"""Latency and memory measurements: the right rows, exact generation lengths, and cache bytes
that match the per-token formula (one cache in shared mode, one per stage in text mode)."""

from fthss.benchmarks.chains import (
    bytes_per_token,
    filler_text,
    kv_memory,
    stage_b_latency,
)


def test_filler_text_has_about_the_asked_length(llama):
    ids = llama.tokenizer.encode(filler_text(llama, 200), add_special_tokens=False)
    assert 150 <= len(ids) <= 250


def test_stage_b_latency_rows(llama):
    rows = stage_b_latency(llama, [20, 80], new_tokens=5, repeats=2, prompt_tokens=3)
    assert [(r["intermediate_tokens"], r["mode"]) for r in rows] == [
        (20, "text"), (20, "shared"), (80, "text"), (80, "shared")]
    assert all(0 < r["ttft_s"] <= r["latency_s"] for r in rows)
    text = {r["intermediate_tokens"]: r["prefilled_tokens"] for r in rows if r["mode"] == "text"}
    shared = {r["intermediate_tokens"]: r["prefilled_tokens"] for r in rows if r["mode"] == "shared"}
    assert text[80] > text[20] + 40  # text mode re-encodes the intermediate
    assert shared[80] == shared[20] <= 2  # shared mode: the step marker (and A's last token)


def test_kv_memory_one_cache_shared_one_per_stage_text(llama):
    rows = {(r["stages"], r["mode"]): r for r in kv_memory(llama, [1, 2, 3], 48, prompt_tokens=2)}
    per_token = bytes_per_token(llama)
    for count in (1, 2, 3):
        shared, text = rows[count, "shared"], rows[count, "text"]
        # shared: the prompts and the whole chain but its last token, in one cache
        assert shared["kv_tokens"] == 2 * count + shared["chain_tokens"] - 1
        assert shared["kv_bytes"] == shared["kv_tokens"] * per_token
        if count == 1:
            assert text["kv_bytes"] <= shared["kv_bytes"]
        else:  # every stage keeps its own copy of the context it re-encoded
            assert text["kv_bytes"] > shared["kv_bytes"]
    assert rows[3, "text"]["kv_bytes"] > rows[2, "text"]["kv_bytes"]
