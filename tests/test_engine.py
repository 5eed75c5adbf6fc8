"""Engine behaviour: one cache per request in shared mode, one per stage in text mode, generation
limits and stop strings, the between-steps callable, statistics and clear errors. Tests marked
`device` hold on any device and dtype (tests/conftest.py): the compiled step (CUDA graphs on a
GPU), prefill in pieces, the causal text prefill. The three stages are one of each kind."""

import shutil

import pytest
import torch
from conftest import DEVICE, TOLERANCE, assert_same_generations

from fthss.engine.engine import MODES, ChainEngine, RunningBatch
from fthss.layout.chain import ChainSample, Step
from fthss.prompts.stage import Stage, StageConfig
from fthss.verify import text_view


@pytest.fixture
def three_stages(llama):
    """One stage of each kind; C's deltas random (a new lora stage's are zero: no effect)."""
    lora = Stage.create(StageConfig("C", "lora", 2, lora_rank=2), llama, seed=3)
    with torch.no_grad():
        for factor in lora.lora_B.values():
            torch.nn.init.normal_(factor, std=0.1, generator=torch.Generator().manual_seed(3))
    return [Stage.create(StageConfig("A", "prompt", 3), llama, seed=1),
            Stage.create(StageConfig("B", "prefix", 4), llama, seed=2), lora]


def multi_round(rounds=2):
    steps = [Step(s, input="doc" if s == "A" else None, max_new_tokens=3)
             for _ in range(rounds) for s in "ABC"]
    return ChainSample("question?", steps)


def slot_bytes(base):  # K and V of one token in every layer, fp32
    return base.num_layers * 2 * base.num_kv_heads * base.head_dim * 4


def test_shared_mode_holds_one_cache_of_the_request_size(llama, three_stages, monkeypatch):
    from fthss.engine import cache

    # with blocks of 256 slots, a few step markers are not worth a copy: they stay, masked
    kept = ChainEngine(llama, three_stages).run([multi_round()], "shared")[0]
    monkeypatch.setattr(cache, "BLOCK", 1)  # every freed slot gives back memory: none is kept
    result = ChainEngine(llama, three_stages).run([multi_round()], "shared")[0]
    tokens = result.tokens
    prompts = 3 + 4 + 2
    for k, step in enumerate(result.steps):
        # held after step k: prompts, shared content, every earlier output, step k's input and
        # its output but the last token (the next step encodes it). Earlier steps' inputs are
        # private (A's documents, every step marker): no later step can see them, so they are
        # freed.
        own = tokens.steps[k]
        held = (prompts + len(tokens.shared_ids) + sum(len(s.output_ids) for s in tokens.steps[:k])
                + len(own.input_ids) + len(own.output_ids) - 1)
        assert step.stats.kv_tokens == held, k
        assert step.stats.kv_bytes == held * slot_bytes(llama)
        # reserved ahead: room for the step's whole generation (the last token is not in)
        assert step.stats.kv_bytes_allocated >= (held + 1) * slot_bytes(llama)
    assert [s.output_ids for s in kept.steps] == [s.output_ids for s in result.steps]
    content = len(tokens.shared_ids) + sum(len(s.input_ids) + len(s.output_ids)
                                           for s in tokens.steps)
    assert kept.steps[-1].stats.kv_tokens == prompts + content - 1
    assert kept.steps[-1].stats.kv_bytes_allocated == 256 * slot_bytes(llama)  # one block


def test_shared_mode_frees_what_no_later_step_sees(llama, three_stages):
    """Compress -> QA: once stage A is done, its passages leave the cache; B's answer is the
    same as with them kept (they were masked anyway)."""
    passages = " ".join(["lorem ipsum dolor sit amet"] * 20)
    chain = ChainSample("q?", [Step("A", input=passages, max_new_tokens=4),
                               Step("B", max_new_tokens=4)])
    a, b = ChainEngine(llama, three_stages).run([chain], "shared")[0].steps
    passage_tokens = len(llama.tokenizer.encode(passages, add_special_tokens=False))
    assert b.stats.kv_tokens < a.stats.kv_tokens - passage_tokens + len(b.output_ids) + 2
    visible = ChainSample("q?", [Step("A", input=passages, max_new_tokens=4, input_visible=True),
                                 Step("B", max_new_tokens=4)])
    a_kept, b_kept = ChainEngine(llama, three_stages).run([visible], "shared")[0].steps
    assert b_kept.stats.kv_tokens > a_kept.stats.kv_tokens  # visible input: nothing freed
    assert a_kept.output_ids == a.output_ids


def test_text_mode_holds_one_cache_per_stage(llama, three_stages):
    result = ChainEngine(llama, three_stages).run([multi_round()], "text")[0]
    last_three = result.steps[-3:]  # the latest step of A, B and C
    held = sum(s.stats.prefilled_tokens + s.stats.decoded_tokens - 1
               for s in last_three) + 3 + 4 + 2
    # steps of the last round end one after another; each stage's cache stays held
    assert result.steps[-1].stats.kv_tokens == held
    assert result.steps[-1].stats.kv_bytes == held * slot_bytes(llama)
    shared = ChainEngine(llama, three_stages).run([multi_round()], "shared")[0]
    assert result.steps[-1].stats.kv_bytes > shared.steps[-1].stats.kv_bytes
    # text mode re-encodes what shared mode reads once
    assert sum(s.stats.prefilled_tokens for s in result.steps) > \
           sum(s.stats.prefilled_tokens for s in shared.steps)


@pytest.mark.parametrize("visible", [False, True])
def test_text_cached_mode_encodes_only_what_follows_its_stages_cached_prefix(
        llama, three_stages, visible):
    """Multi-round: a stage's step reuses what its cache holds up to where its text parts from
    it (with hidden inputs, at its own last input; with visible ones, nowhere: it encodes only
    the steps since its last one), with text mode's outputs and logits and the same tokens
    held, one cache per stage."""
    request = multi_round(3)
    for step in request.steps:
        step.input_visible = visible
    text, cached = (ChainEngine(llama, three_stages).run([request], mode, output_scores=True)[0]
                    for mode in ("text", "text-cached"))
    assert_same_generations([cached], [text])
    tokens = cached.tokens
    for k, step in enumerate(cached.steps):
        view = text_view(tokens, k)
        assert text.steps[k].stats.prefilled_tokens == len(view)
        earlier = [j for j in range(k) if tokens.steps[j].stage == tokens.steps[k].stage]
        if not earlier:
            assert step.stats.prefilled_tokens == len(view)
            continue
        held = text_view(tokens, earlier[-1]) + tokens.steps[earlier[-1]].output_ids[:-1]
        same = next(i for i, (a, b) in enumerate(zip(held + [-1], view, strict=False)) if a != b)
        assert (same == len(held)) == visible
        assert step.stats.prefilled_tokens == len(view) - same
        assert step.stats.kv_tokens == text.steps[k].stats.kv_tokens
    assert sum(s.stats.prefilled_tokens for s in cached.steps) < \
        sum(s.stats.prefilled_tokens for s in text.steps) * (0.5 if visible else 0.9)


def test_generation_limits_and_stop_strings(llama, three_stages):
    engine = ChainEngine(llama, three_stages, max_new_tokens=12)
    free = engine.run([ChainSample("x", [Step("A", input="y")])])[0].steps[0]
    assert free.stats.decoded_tokens <= 12
    assert free.output_ids[-1] == llama.tokenizer.eos_token_id or len(free.output_ids) == 12
    assert len(free.output) >= 3, "pick another seed: the test needs a few characters of output"
    stop = free.output[1:3]
    stopped = engine.run([ChainSample("x", [Step("A", input="y", stop=[stop])])])[0].steps[0]
    assert stopped.output.endswith(stop) and stop not in stopped.output[:-len(stop)]
    assert stopped.output_ids == free.output_ids[: len(stopped.output_ids)]
    assert len(stopped.output_ids) < len(free.output_ids)
    short = engine.run([ChainSample("x", [Step("A", input="y", max_new_tokens=2)])])[0].steps[0]
    assert short.output_ids == free.output_ids[:2]


def test_min_new_tokens_holds_back_eos_and_stop_tokens(llama, three_stages):
    engine = ChainEngine(llama, three_stages, max_new_tokens=8)
    first = engine.run([ChainSample("x", [Step("A", input="y")])])[0].steps[0].output_ids[0]
    stop_at_once = Step("A", input="y", stop_token_ids=[first, llama.tokenizer.eos_token_id])
    assert engine.run([ChainSample("x", [stop_at_once])])[0].steps[0].output_ids == [first]
    stop_at_once.min_new_tokens = 4
    held = engine.run([ChainSample("x", [stop_at_once])])[0].steps[0].output_ids
    assert len(held) >= 4 and first not in held[:4]


def test_between_steps_callable_supplies_inputs(llama, three_stages):
    seen = []

    def retrieve(request, k, outputs):
        seen.append((request.id, k, list(outputs)))
        return f"passage for step {k}" if k == 1 else None

    request = ChainSample("q", [Step("A", input="a", max_new_tokens=2),
                                Step("B", max_new_tokens=2)], id="r1")
    result = ChainEngine(llama, three_stages).run([request], step_input=retrieve)[0]
    assert seen == [("r1", 0, []), ("r1", 1, [result.steps[0].output])]
    assert result.steps[0].input == "a"
    assert result.steps[1].input == "passage for step 1"
    codec = ChainEngine(llama, three_stages).codec
    assert result.tokens.steps[1].input_ids == codec.input("passage for step 1")


def test_statistics(llama, three_stages):
    request = ChainSample("q", [Step("A", input="abcd", max_new_tokens=3),
                                Step("B", max_new_tokens=2)])
    first, second = ChainEngine(llama, three_stages).run([request])[0].steps
    assert first.stats.prefilled_tokens == 2 + 5  # BOS + "q", then marker + "abcd"
    assert second.stats.prefilled_tokens == 1 + 1  # A's last token, then B's marker
    assert ((first.stats.decoded_tokens, second.stats.decoded_tokens)
            == (len(first.output_ids), len(second.output_ids)))
    for stats in (first.stats, second.stats):
        assert 0 < stats.time_to_first_token_s <= stats.wall_s


def test_clear_errors(llama, three_stages):
    engine = ChainEngine(llama, three_stages)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['Z'\]"):
        engine.run([ChainSample("q", [Step("Z")], id="7")])
    with pytest.raises(ValueError, match="unknown mode"):
        engine.run([multi_round()], mode="fast")
    [failed] = engine.run([ChainSample("x" * 5000, [Step("A")])])
    assert "step 0 (A): needs position" in failed.error and failed.output == ""


def test_identical_requests_in_one_batch_and_stop_token_ids(llama, three_stages):
    engine = ChainEngine(llama, three_stages, max_new_tokens=6)
    request = ChainSample("same", [Step("A", input="x"), Step("B")])
    twins = engine.run([request, request])
    assert [s.output_ids for s in twins[0].steps] == [s.output_ids for s in twins[1].steps]
    first = twins[0].steps[0].output_ids
    stop_at = first[1]
    stopped = engine.run([ChainSample("same", [Step("A", input="x", stop_token_ids=[stop_at])])])
    assert stopped[0].steps[0].output_ids == first[: first.index(stop_at) + 1]


def test_a_given_output_is_encoded_not_generated(llama, three_stages):
    from fthss.verify import output_logits_one_pass

    engine = ChainEngine(llama, three_stages, max_new_tokens=4)
    gold = ChainSample("q", [Step("A", input="passages", output="gold summary"), Step("B")])
    for mode in ("shared", "text"):
        [result] = engine.run([gold], mode, output_scores=True)
        first, second = result.steps
        assert first.output == "gold summary" and first.stats.decoded_tokens == 0
        assert first.stats.time_to_first_token_s is None and first.scores is None
        assert second.stats.decoded_tokens == len(second.output_ids) > 0
    # shared mode: B's logits are those of the one-pass forward over the gold chain (whose
    # reference covers the generated tokens only)
    [result] = engine.run([gold], "shared", output_scores=True)
    [reference] = output_logits_one_pass(engine, [result])
    torch.testing.assert_close(result.steps[1].scores, reference, atol=1e-4, rtol=0)
    # text mode: B re-encodes the given text
    [text] = engine.run([gold], "text")
    assert text.steps[1].stats.prefilled_tokens == len(
        text.tokens.shared_ids + text.tokens.steps[0].output_ids + text.tokens.steps[1].input_ids)


def test_the_between_steps_callable_can_end_a_chain(llama, three_stages):
    from fthss.engine.engine import END

    engine = ChainEngine(llama, three_stages, max_new_tokens=3)
    long = ChainSample("q", [Step(s) for s in "ABCAB"], id="ends")
    other = ChainSample("r", [Step(s) for s in "CBA"], id="runs")

    def stop_at_3(request, k, outputs):
        return END if request.id == "ends" and k == 3 else None

    ended, ran = engine.run([long, other], step_input=stop_at_3)
    assert [s.stage for s in ended.steps] == ["A", "B", "C"]
    assert len(ended.tokens.steps) == 3
    [alone] = engine.run([other])
    assert [s.output_ids for s in ran.steps] == [s.output_ids for s in alone.steps]


def test_outputs_do_not_depend_on_how_often_the_host_looks(llama, three_stages):
    """The batch decodes on the device and the host checks stop strings every `check_every`
    tokens; a row found past its stop string takes the extra tokens back, so outputs, logits
    and what the cache holds are those of checking after every token."""
    free = ChainEngine(llama, three_stages, max_new_tokens=10).run(
        [ChainSample("x", [Step("A", input="y")])])[0].steps[0]
    stop = free.output[1:3]
    requests = [ChainSample("x", [Step("A", input="y", stop=[stop]), Step("B"),
                                  Step("C", stop=[stop])]),
                ChainSample("zz", [Step("A", input="w"), Step("B", stop=[stop], max_new_tokens=6)]),
                multi_round()]
    runs = [ChainEngine(llama, three_stages, max_new_tokens=10, batch_size=3, check_every=n)
            .run(requests, "shared", output_scores=True) for n in (1, 4, 64)]
    for run in runs[1:]:
        assert_same_generations(run, runs[0])
        for result, reference in zip(run, runs[0], strict=True):
            if [s.output_ids for s in result.steps] == [s.output_ids for s in reference.steps]:
                assert [s.stats.kv_tokens for s in result.steps] == \
                       [s.stats.kv_tokens for s in reference.steps]
    assert runs[0][0].steps[0].output.endswith(stop)


@pytest.mark.device
@pytest.mark.parametrize("mode", MODES)
def test_compiled_decode_step_has_no_graph_break_and_same_outputs(llama, three_stages, mode):
    """The decode step compiles as one graph (fullgraph: a graph break or a host sync inside
    it raises), and gives the eager outputs, in every mode (text-cached decodes on each
    stage's own cache). The eager backend checks tracing on a CPU; a GPU runs the same step
    through inductor with CUDA graphs."""
    from fthss.engine.cache import compiled_decode_step

    requests = [multi_round(), ChainSample("q", [Step("A", input="d", max_new_tokens=5),
                                                 Step("C", max_new_tokens=4)])]
    eager = ChainEngine(llama, three_stages, batch_size=2).run(requests, mode,
                                                               output_scores=True)
    engine = ChainEngine(llama, three_stages, batch_size=2)
    engine.decode_step = compiled_decode_step(llama, backend="eager", fullgraph=True)
    assert_same_generations(engine.run(requests, mode, output_scores=True), eager)


@pytest.mark.device
@pytest.mark.skipif(DEVICE.type == "cpu" and shutil.which("g++") is None
                    and shutil.which("cc") is None, reason="inductor on a CPU needs a C++ compiler")
def test_inductor_decode_step_compiles_a_few_times_for_any_capacity_and_batch(
        llama, three_stages, monkeypatch):
    """The real compiled path (`compile=True`: inductor; CUDA graphs on a GPU) gives the eager
    outputs while the cache grows through many capacities and the batch size changes, and it
    compiles at most three times: once static, then with the capacity and the batch dynamic.
    One graph per capacity would compile for minutes per shape on an 8B model, and past the
    recompile limit fall back to eager without saying so; here that limit raises. On a GPU the
    step's CUDA graphs are replayed, none skipped."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fthss.engine import cache

    replays = []
    if DEVICE.type == "cuda":  # cudagraph trees replay through this method
        replay = torch.cuda.CUDAGraph.replay
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                            lambda graph: replays.append(1) or replay(graph))
    counters.clear()

    monkeypatch.setattr(cache, "BLOCK", 8)  # a new capacity every few tokens
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 3)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    requests = [multi_round(), ChainSample("q", [Step("A", input="d", max_new_tokens=9),
                                                 Step("C", max_new_tokens=12)])]
    try:
        for batch_size in (2, 1):
            eager = ChainEngine(llama, three_stages, batch_size=batch_size).run(
                requests, "shared", output_scores=True)
            compiled = ChainEngine(llama, three_stages, batch_size=batch_size,
                                   compile=True).run(requests, "shared", output_scores=True)
            assert_same_generations(compiled, eager)
        assert counters["inductor"]["cudagraph_skips"] == 0
        if DEVICE.type == "cuda":
            assert replays, "no CUDA graph was replayed"
    finally:  # no compiled code of this test's small BLOCK left for the next ones
        torch._dynamo.reset()


@pytest.mark.device
def test_a_long_prefill_in_pieces_gives_the_same_logits(llama, three_stages, monkeypatch):
    from fthss.engine import cache

    requests = [ChainSample("a longer question " * 6,
                            [Step("A", input="doc " * 30, max_new_tokens=3),
                             Step("B", max_new_tokens=3)]),
                ChainSample("q", [Step("A", input="d", max_new_tokens=4),
                                  Step("C", max_new_tokens=2)])]
    whole = ChainEngine(llama, three_stages, batch_size=2).run(requests, "shared",
                                                               output_scores=True)
    monkeypatch.setattr(cache, "PREFILL_TOKENS", 14)  # pieces of 7 columns for a batch of 2
    pieces = ChainEngine(llama, three_stages, batch_size=2).run(requests, "shared",
                                                                output_scores=True)
    assert_same_generations(pieces, whole)


def test_row_groups_take_the_least_padding_plus_overhead():
    """Against every split of a few rows into contiguous groups, with and without a price on
    the columns a group's tokens attend over (its rows' latest start, plus its width)."""
    import itertools
    import random

    from fthss.engine.cache import row_groups

    def cost(groups, widths, overhead, starts, column_cost):
        return sum((g.stop - g.start) * max(widths[g])
                   * (1 + column_cost * (max(starts[g]) + max(widths[g])))
                   + (overhead if max(widths[g]) else 0) for g, _ in groups)
    rnd = random.Random(0)
    for _ in range(300):
        n = rnd.randint(1, 7)
        widths = [rnd.choice([0, 1, 3, 20, 21, 300]) for _ in range(n)]
        overhead = rnd.choice([0, 10, 512])
        starts, column_cost = rnd.choice([(None, 0.0), ([rnd.choice([0, 40, 900, 2000])
                                                          for _ in range(n)], 0.01)])
        groups = row_groups(widths, overhead, starts, column_cost)
        assert [i for g, _ in groups for i in range(g.start, g.stop)] == list(range(n))
        assert all(width == max(widths[g]) for g, width in groups)
        splits = [[slice(a, b) for a, b in zip((0, *cuts), (*cuts, n), strict=True)]
                  for r in range(n) for cuts in itertools.combinations(range(1, n), r)]
        starts = starts or [0] * n
        assert cost(groups, widths, overhead, starts, column_cost) == pytest.approx(min(
            cost([(g, 0) for g in split], widths, overhead, starts, column_cost)
            for split in splits))
    assert row_groups([20] * 5 + [1000] * 2) == [(slice(0, 5), 20), (slice(5, 7), 1000)]
    assert row_groups([300, 310, 290]) == [(slice(0, 3), 310)]  # alike: one forward
    # like chunks, unlike histories (members of a running batch at rounds 1 and 3)
    assert row_groups([1000] * 2, starts=[1000, 3000], column_cost=6.5e-4) == [
        (slice(0, 1), 1000), (slice(1, 2), 1000)]
    assert row_groups([1000] * 2, starts=[1000, 3000]) == [(slice(0, 2), 1000)]


def test_column_cost_is_a_columns_attention_work_over_a_layers_weights(llama, monkeypatch):
    """2 multiply-adds per head dimension per attended column, over a decoder layer's
    parameters; a model whose decoder has no `layers` list uses its parameters per layer."""
    from fthss.engine.cache import ChainCache

    config = llama.model.config
    layer = sum(p.numel() for p in llama.model.get_decoder().layers[0].parameters())
    work = 2 * config.num_attention_heads * llama.head_dim
    assert ChainCache(llama, [], 1).column_cost == pytest.approx(work / layer)
    monkeypatch.setattr(llama.model, "get_decoder", lambda: object())
    total = sum(p.numel() for p in llama.model.parameters())
    assert ChainCache(llama, [], 1).column_cost == pytest.approx(
        work * config.num_hidden_layers / total)


@pytest.mark.parametrize("mode", MODES)
def test_prefill_groups_rows_out_of_slot_order(llama, three_stages, mode, monkeypatch):
    """Rows whose chunks alternate short and long, or whose histories alternate short and
    long, prefill in groups of like rows taken out of slot order (copies of their cache rows,
    written back): each answers, scores included, as it does alone."""
    from fthss.engine import cache

    indexed, as_rows = [], cache._as_rows

    def spied(rows, device):
        indexed.append(isinstance(as_rows(rows, device), torch.Tensor))
        return as_rows(rows, device)
    monkeypatch.setattr(cache, "_as_rows", spied)
    monkeypatch.setattr(cache, "GROUP_OVERHEAD", 4)
    monkeypatch.setattr(cache.ChainCache, "column_cost", 0.05)

    def request(i, words):
        return ChainSample(f"q{i} " + "context " * words, [
            Step("A", input="d " * (1 + 30 * (i % 2)), max_new_tokens=3),
            Step("C", max_new_tokens=2), Step("B", input="e", max_new_tokens=2)])
    # step 0: shared content short / long / short / long; step 1: like inputs, histories alike
    # in pairs (0, 2) and (1, 3) after step 0's long inputs
    requests = [request(i, 40 * (i % 2)) for i in range(4)]
    engine = ChainEngine(llama, three_stages, batch_size=4)
    together = engine.run(requests, mode, output_scores=True)
    assert sum(indexed) >= 2  # steps ran groups out of order
    alone = [ChainEngine(llama, three_stages, batch_size=1).run([r], mode,
                                                                 output_scores=True)[0]
             for r in requests]
    assert_same_generations(together, alone)


def test_rows_are_packed_before_a_long_chunk_would_attend_over_their_padding(
        llama, three_stages, monkeypatch):
    """A member that decoded beside one with a longer history wrote its tokens after the
    other's last column; before its next long chunk the rows are packed (each row's slots
    to the left), so the chunk is written right after the row's own slots and attends over no
    gap. Both answer as they do alone."""
    from fthss.engine import cache

    monkeypatch.setattr(cache, "GROUP_OVERHEAD", 4)
    writes, append_rows = [], cache.ChainCache._append_rows

    def spied(self, rows, first, input_ids, *rest):
        writes.append((first, int(self.tokens_held()[rows].max()), input_ids.shape[1]))
        return append_rows(self, rows, first, input_ids, *rest)
    monkeypatch.setattr(cache.ChainCache, "_append_rows", spied)
    requests = [ChainSample("long " + "context " * 120, [Step("A", max_new_tokens=3),
                                                         Step("C", input="e", max_new_tokens=2)]),
                ChainSample("short", [Step("A", max_new_tokens=3),
                                      Step("C", input="d " * 60, max_new_tokens=2)])]
    together = ChainEngine(llama, three_stages, batch_size=2).run(requests, "shared",
                                                                   output_scores=True)
    long_chunks = [(first, held) for first, held, width in writes[2:] if width > 50]
    assert long_chunks and all(first == held for first, held in long_chunks)
    alone = [ChainEngine(llama, three_stages, batch_size=1).run([r], "shared",
                                                                 output_scores=True)[0]
             for r in requests]
    assert_same_generations(together, alone)


@pytest.mark.parametrize("mode", ["shared", "text"])
def test_a_long_joiner_does_not_pad_its_batch_mates_prefill(llama, three_stages, mode,
                                                             monkeypatch):
    """A request joining a running batch with long shared content prefills in a group of its
    own, written after its own slots (its prompt), not after its batch-mates' columns: no
    forward runs their short steps at its length, the cache grows by less than its chunk, and
    every member answers as it does alone."""
    from fthss.engine import cache

    # members holding a few hundred columns whose next step is short
    short = [ChainSample(f"q{i} " + "context " * 30, [Step("A", input="d", max_new_tokens=2),
                                                     Step("C", max_new_tokens=2)])
             for i in range(3)]
    long = ChainSample("word " * 200, [Step("A", max_new_tokens=2)])
    engine = ChainEngine(llama, three_stages)
    batch, results, forwards = RunningBatch(engine, mode), {}, []
    logits = cache.ChainCache._logits

    def recorded(self, store, pos, at, **inputs):
        forwards.append(pos.shape)
        return logits(self, store, pos, at, **inputs)
    monkeypatch.setattr(cache.ChainCache, "_logits", recorded)
    for i, request in enumerate(short):
        batch.join(request, i)
    results.update(batch.step())
    batch.join(long, 3)
    forwards.clear()
    grown, append = [], cache.ChainCache.append

    def measured(self, input_ids, meta, last_only=False):
        before = self.length
        logits = append(self, input_ids, meta, last_only)
        grown.append((self.length - before, meta.length))  # columns added, chunk's columns
        return logits
    monkeypatch.setattr(cache.ChainCache, "append", measured)
    results.update(batch.step())  # the short ones' step 1, the long one's step 0
    if mode == "shared":  # its chunk fills its row's padding: the cache grows by less
        [(added, chunk)] = grown
        assert chunk > 200 and added < chunk - 100
    prefill = [shape for shape in forwards if shape[1] > 1]
    assert all(width < 500 for rows, width in prefill if rows > 1)  # the short steps
    assert any(rows == 1 and width > 200 for rows, width in prefill)  # the joiner
    while batch:
        results.update(batch.step())
    alone = engine.run([*short, long], mode)
    assert [[s.output_ids for s in results[i].steps] for i in range(4)] == \
        [[s.output_ids for s in r.steps] for r in alone]


@pytest.mark.parametrize("mode", ["shared", "text"])
def test_the_eager_decode_step_leaves_out_the_rows_at_the_edges_that_do_not_decode(
        llama, three_stages, mode, monkeypatch):
    """Members whose step only encodes (a given output) and members that decode take turns,
    the encoding ones first, neither kind waiting two engine steps in a row. A row that does
    not decode idles while its batch-mates do: the eager step runs only the rows from the
    first to the last that decode. Every row's tokens and scores are those it has alone."""
    from fthss.engine import cache

    def given():
        return Step("A", output="a given answer")
    requests = [ChainSample("q0", [given(), given(), Step("C", max_new_tokens=4)]),
                ChainSample("q1 longer", [Step("C", input="doc", max_new_tokens=5),
                                          Step("B", max_new_tokens=3)]),
                ChainSample("q2", [Step("B", max_new_tokens=3), Step("C", max_new_tokens=2)]),
                ChainSample("q3", [given(), given(), Step("A", max_new_tokens=2)])]
    spans, start_decoding = [], cache.ChainCache.start_decoding
    taken, taking = [], RunningBatch._taking

    def recorded(self, query):
        start_decoding(self, query)
        spans.append((self._decode_rows, self.batch_size))

    def recorded_taking(self):
        rows = taking(self)
        taken.append([(row.index, row.k) for row in rows])
        return rows
    monkeypatch.setattr(cache.ChainCache, "start_decoding", recorded)
    monkeypatch.setattr(RunningBatch, "_taking", recorded_taking)
    batched = ChainEngine(llama, three_stages, batch_size=4).run(requests, mode,
                                                                 output_scores=True)
    assert taken == [[(0, 0), (3, 0)],  # the given outputs first; rows 1 and 2 wait
                     [(1, 0), (2, 0)],  # then the decoding ones, rows 0 and 3 waiting
                     [(0, 1), (3, 1)],
                     [(0, 2), (1, 1), (2, 1), (3, 2)]]  # every row decodes: all at once
    # step 2: rows 1 and 2 decode, 0 and 3 idle; step 4: every row decodes
    assert spans == [(slice(1, 3), 4), (slice(None), 4)]
    alone = ChainEngine(llama, three_stages, batch_size=1).run(requests, mode,
                                                               output_scores=True)
    for result, reference in zip(batched, alone, strict=True):
        assert [s.output_ids for s in result.steps] == [s.output_ids for s in reference.steps]
        for step, ref in zip(result.steps, reference.steps, strict=True):
            assert (step.scores is None) == (ref.scores is None)
            if step.scores is not None:
                torch.testing.assert_close(step.scores, ref.scores, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_request_over_a_limit_fails_alone(llama, three_stages, mode):
    """Past the base's positions (at step 0, or only at its second step) or over the cache
    budget: that request fails with an error naming the step; its batch-mates give the outputs
    they give without it."""
    fine = [multi_round(), ChainSample("q", [Step("A", input="d", max_new_tokens=5), Step("C")])]
    too_long = ChainSample("x " * 3000, [Step("A")], id="long")
    long_later = ChainSample("q", [Step("A", max_new_tokens=2), Step("B", input="y " * 3000)],
                             id="later")
    engine = ChainEngine(llama, three_stages, max_new_tokens=6, batch_size=4)
    alone = engine.run(fine, mode)
    mixed = engine.run([fine[0], too_long, long_later, fine[1]], mode)
    assert [[s.output_ids for s in r.steps] for r in (mixed[0], mixed[3])] == \
           [[s.output_ids for s in r.steps] for r in alone]
    assert mixed[0].error is None and mixed[3].error is None
    assert "step 0 (A): needs position" in mixed[1].error and not mixed[1].steps
    assert "step 1 (B): needs position" in mixed[2].error and len(mixed[2].steps) == 1
    big = ChainSample("q " * 40, [Step("A")])
    budget = ChainEngine(llama, three_stages, max_new_tokens=6, batch_size=4,
                         max_request_tokens=36).run([big, fine[1]], mode)
    assert "step 0 (A): would hold" in budget[0].error and "budget of 36" in budget[0].error
    assert budget[1].error is None
    assert [s.output_ids for s in budget[1].steps] == [s.output_ids for s in alone[1].steps]


@pytest.mark.device
def test_text_mode_prefills_on_the_causal_path_with_the_masked_paths_logits(
        llama, three_stages, monkeypatch):
    """A text-mode step whose rows all run one prompt-kind stage re-encodes the prompt with its
    text, unmasked (SDPA's causal kernel); the logits are those of the masked path, for padded
    rows and for rows split into groups. Prefix stages and mixed steps keep the masked path."""
    from fthss.engine import cache

    requests = [ChainSample("a longer question " * 4,
                            [Step("A", input="doc " * 12, max_new_tokens=3),
                             Step("C", max_new_tokens=3)]),
                ChainSample("q", [Step("A", input="d", max_new_tokens=4),
                                  Step("C", max_new_tokens=2)]),
                ChainSample("q", [Step("A", max_new_tokens=2), Step("B", max_new_tokens=2)])]
    causal_calls, kernels = [], []  # per append_causal, whether each attention ran causal
    append_causal = cache.ChainCache.append_causal

    def counted(self, *args):
        kernels.clear()
        logits = append_causal(self, *args)
        causal_calls.append(all(kernels) and len(kernels) > 0)
        return logits
    monkeypatch.setattr(cache.ChainCache, "append_causal", counted)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):  # SDPA's causal kernel taken?
        kernels.append(attn_mask is None and is_causal)
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    runs = {}
    for name, prefill in [("causal", 16384), ("row groups", 40), ("masked", None)]:
        if prefill is None:
            monkeypatch.setattr(ChainEngine, "_causal_prompt", lambda self, names: None)
        else:
            monkeypatch.setattr(cache, "PREFILL_TOKENS", prefill)
        causal_calls.clear()
        runs[name] = ChainEngine(llama, three_stages, batch_size=3).run(requests, "text",
                                                                        output_scores=True)
        # step 0 (A alone) is causal, every attention without a mask; step 1 mixes C with the
        # prefix stage B: masked
        assert causal_calls == ([] if prefill is None else [True])
    for name in ("causal", "row groups"):
        assert_same_generations(runs[name], runs["masked"])


def test_a_listener_is_told_prefixes_of_the_outputs_and_the_finished_steps(llama, three_stages):
    class Recorder:
        def __init__(self):
            self.told, self.steps = [], {}

        def tokens(self, request, step, ids):
            self.told.append((request, step, ids))

        def step_done(self, request, step, result):
            self.steps[request, step] = result

    requests = [multi_round(1), ChainSample("other?", [Step("A", max_new_tokens=9, stop=["a"]),
                                                      Step("C", max_new_tokens=5)])]
    recorder = Recorder()
    results = ChainEngine(llama, three_stages, check_every=2).run(requests, listener=recorder)
    for i, result in enumerate(results):
        for k, step in enumerate(result.steps):
            assert recorder.steps[i, k] is step
            told = [ids for r, s, ids in recorder.told if (r, s) == (i, k)]
            assert told and told[-1] == step.output_ids  # the last tells the whole output
            assert all(step.output_ids[: len(ids)] == ids for ids in told)


def test_requests_with_their_own_seeds_sample_as_alone(llama, three_stages):
    from fthss.engine.sampling import SamplingConfig

    engine = ChainEngine(llama, three_stages)
    requests = [multi_round(1), ChainSample("other?", [Step("A", max_new_tokens=6)])]
    batched = engine.run(requests, sampling=SamplingConfig(temperature=1.0), seeds=[5, 7])
    for request, seed, result in zip(requests, (5, 7), batched, strict=True):
        [alone] = engine.run([request], sampling=SamplingConfig(temperature=1.0, seed=seed))
        assert [s.output_ids for s in result.steps] == [s.output_ids for s in alone.steps]


def test_a_running_batch_refuses_a_request_it_cannot_run_alone(llama):
    """A request naming a stage outside the batch's, or with a stop token past the vocabulary,
    comes back from the next step with its error; the member beside it runs as alone."""
    stages = [Stage.create(StageConfig(n, "prompt", 2), llama, seed=i)
              for i, n in enumerate("AB")]
    engine = ChainEngine(llama, stages)
    good = ChainSample("q", [Step("A", input="doc", max_new_tokens=3)], id="good")
    batch = RunningBatch(engine, names=["A"])
    batch.join(good, 0)
    batch.join(ChainSample("q", [Step("B", max_new_tokens=2)], id="other"), 1)
    batch.join(ChainSample("q", [Step("A", max_new_tokens=2, stop_token_ids=[10**6])]), 2)
    results = dict(batch.step())
    assert not batch
    assert "unknown stage(s) ['B']" in results[1].error and not results[1].steps
    assert "stop_token_ids[0]" in results[2].error and "request 2" in results[2].error
    [alone] = engine.run([good])
    assert results[0].error is None
    assert [s.output_ids for s in results[0].steps] == [s.output_ids for s in alone.steps]

