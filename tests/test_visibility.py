"""The visibility rule, checked against its statement in docs/design.md by hand-written masks
and by perturbation: what a token may not see must not change its logits."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fthss.engine.cache import ChainCache
from fthss.layout.sequence import TokenChain, TokenStep, build_layout, positions
from fthss.layout.visibility import Kind, TokenMeta
from fthss.prompts.stage import Stage, StageConfig
from fthss.training.forward import one_pass_logits

STAGES = {"A": 0, "B": 1}


def compress_qa(doc=(10, 11, 12), compression=(20, 21), visible=False):
    return TokenChain([0, 5, 6], [TokenStep("A", [0, *doc], [*compression, 1], visible),
                                  TokenStep("B", [0], [30, 1])])


def test_compress_qa_mask_by_hand():
    layout = build_layout([compress_qa()], STAGES, [2, 1], pad_id=2)
    mask = layout.mask[0, 0].int()
    # key slots: A's prompt (2), B's prompt (1), then content:
    # shared 0-2 | A input 3-6 | A output 7-9 | B input 10 | B output 11-12
    expected = {
        0: "000" + "100" + "0000" + "000" + "0" + "00",  # shared sees shared causally, no prompt
        2: "000" + "111" + "0000" + "000" + "0" + "00",
        3: "110" + "111" + "1000" + "000" + "0" + "00",  # A's marker: A's prompt, shared, itself
        9: "110" + "111" + "1111" + "111" + "0" + "00",  # A's last output
        10: "001" + "111" + "0000" + "111" + "1" + "00",  # B's marker: B's prompt, shared, O_A
        12: "001" + "111" + "0000" + "111" + "1" + "11",  # never A's documents
    }
    for row, bits in expected.items():
        assert "".join(map(str, mask[row].tolist())) == bits, row


def test_visible_input_is_seen_downstream():
    layout = build_layout([compress_qa(visible=True)], STAGES, [2, 1], pad_id=2)
    assert layout.mask[0, 0, 10, 3 + 3:3 + 7].all()  # B's marker sees A's input


def test_positions_count_content_from_the_longest_prompt():
    layout = build_layout([compress_qa(), TokenChain([0], [TokenStep("B", [0], [1])])], STAGES,
                          [2, 1], pad_id=2)
    assert layout.first_position == 2
    assert layout.position_ids[0].tolist() == list(range(2, 2 + 13))
    assert layout.position_ids[1, :3].tolist() == [2, 3, 4]
    # padding takes no position: the next real token continues the count
    chunk = TokenMeta.from_rows([[(Kind.PAD, -1, -1, False), (Kind.OUTPUT, 0, 0, False)]])
    assert positions(chunk, torch.tensor([7])).tolist() == [[7, 7]]


def _one_pass(base, stages, chains):
    names = [s.name for s in stages]
    layout = build_layout(chains, {n: i for i, n in enumerate(names)},
                          [s.num_virtual_tokens for s in stages], pad_id=2)
    first = layout.first_position
    with torch.no_grad():
        prompts = [s.prompt_cache(base, first) for s in stages]
        return one_pass_logits(base, prompts, layout), layout


def _with_noise(base, stages, chain, split, noisy_slots):
    """Logits of content tokens from `split` on, when the K/V of `noisy_slots` (cache slots:
    prompts first) are replaced by noise after the first `split` content tokens are encoded."""
    names = [s.name for s in stages]
    layout = build_layout([chain], {n: i for i, n in enumerate(names)},
                          [s.num_virtual_tokens for s in stages], pad_id=2)
    with torch.no_grad():
        prompts = [s.prompt_cache(base, layout.first_position) for s in stages]
        cache = ChainCache(base, prompts, 1)
        if split:
            cache.append(layout.input_ids[:, :split], _cut(layout.meta, 0, split))
        for t in cache.store.keys + cache.store.values:
            t[:, :, noisy_slots] = torch.randn_like(t[:, :, noisy_slots]) * 3
        return cache.append(layout.input_ids[:, split:], _cut(layout.meta, split, None))[0]


def _cut(meta, start, stop):
    return TokenMeta(*(t[:, start:stop] for t in (meta.kind, meta.step, meta.stage, meta.visible)))


def test_what_a_step_may_not_see_does_not_change_its_logits(llama):
    torch.manual_seed(0)
    stages = [Stage.create(StageConfig("A", "prompt", 2), llama, seed=1),
              Stage.create(StageConfig("B", "prefix", 1), llama, seed=2)]
    # slots: A's prompt 0-1, B's prompt 2; content from 3: shared 3-5 | A input 6-9 |
    # A output 10-12 | B input 13 | B output 14-15. B's step starts at content index 10.
    clean = _with_noise(llama, stages, compress_qa(), 10, [])
    for hidden in ([0, 1], [6, 7, 8, 9]):  # A's prompt, A's private documents
        torch.testing.assert_close(_with_noise(llama, stages, compress_qa(), 10, hidden), clean)
    for seen in ([2], [3], [10, 11, 12]):  # B's prompt, shared, A's output
        assert not torch.allclose(_with_noise(llama, stages, compress_qa(), 10, seen), clean)
    # documents marked visible downstream are read by B
    visible = compress_qa(visible=True)
    assert not torch.allclose(_with_noise(llama, stages, visible, 10, [6, 7, 8, 9]),
                              _with_noise(llama, stages, visible, 10, []))


def test_shared_tokens_do_not_depend_on_any_prompt(llama):
    stages = [Stage.create(StageConfig("A", "prompt", 2), llama, seed=1),
              Stage.create(StageConfig("B", "prefix", 1), llama, seed=2)]
    clean = _with_noise(llama, stages, compress_qa(), 0, [])
    noisy = _with_noise(llama, stages, compress_qa(), 0, [0, 1, 2])
    torch.testing.assert_close(noisy[:3], clean[:3])
    assert not torch.allclose(noisy[3:], clean[3:])


def _random_chain(draw, num_stages):
    tokens = st.lists(st.integers(3, 258), max_size=5)
    steps = draw(st.lists(st.tuples(st.integers(0, num_stages - 1), tokens, tokens, st.booleans()),
                          min_size=1, max_size=5))
    return TokenChain(draw(tokens), [TokenStep(f"S{s}", [0, *inp], [*out, 1], vis)
                                     for s, inp, out, vis in steps])


@st.composite
def layouts(draw):
    num_stages = draw(st.integers(1, 4))
    chains = [_random_chain(draw, num_stages) for _ in range(draw(st.integers(1, 4)))]
    lengths = draw(st.lists(st.integers(1, 8), min_size=num_stages, max_size=num_stages))
    return build_layout(chains, {f"S{i}": i for i in range(num_stages)}, lengths, pad_id=2)


@settings(max_examples=400)
@given(layouts())
def test_no_visibility_row_is_empty_and_the_rule_is_causal(layout):
    mask = layout.mask[:, 0]
    assert mask.any(dim=-1).all()
    prompt = layout.prompt.length
    content = mask[:, :, prompt:]
    assert not content.triu(diagonal=1).any()  # nothing sees a later token
    kinds = layout.meta.kind
    # real tokens never see padding; shared tokens never see a prompt or a step
    assert not (content & (kinds == Kind.PAD)[:, None, :] & (kinds != Kind.PAD)[:, :, None]).any()
    shared_rows = kinds == Kind.SHARED
    assert not mask[:, :, :prompt][shared_rows].any()
    assert not (content & (kinds >= Kind.INPUT)[:, None, :])[shared_rows].any()
    # a step token sees exactly one prompt block: its own stage's
    step_rows = kinds >= Kind.INPUT
    seen_stage = layout.prompt.stage[0][None, None, :].expand_as(mask[:, :, :prompt])
    own = seen_stage == layout.meta.stage[:, :, None]
    assert (mask[:, :, :prompt] == own)[step_rows].all()


def test_every_decode_mask_row_is_the_rules_row_for_the_new_token(llama, monkeypatch):
    """The decode step updates its mask in place, from what the rule said at the step's start;
    each row still decoding (and each idle row: one whose given output waits its turn) must see
    exactly what the rule says its newest token sees. A row that has stopped is not checked:
    its logits are not used."""
    from fthss.engine.engine import ChainEngine
    from fthss.layout.chain import ChainSample, Step
    from fthss.layout.visibility import visibility

    checked = []
    decode = ChainCache.decode

    def checking(self, tokens, live):
        logits = decode(self, tokens, live)
        written = TokenMeta(*(t[:, : self.length] for t in (self.slots.kind, self.slots.step,
                                                             self.slots.stage, self.slots.visible)))
        rule = visibility(written, 1)[:, 0, 0]
        for row in range(self.batch_size):
            if live[row] or self._decode_query.kind[row, 0] == Kind.PAD:
                assert torch.equal(self.decode_mask[row, 0, 0, : self.length], rule[row]), row
                checked.append(bool(live[row]))
        return logits

    monkeypatch.setattr(ChainCache, "decode", checking)
    stages = [Stage.create(StageConfig(n, "prompt", 2 + i), llama, seed=i) for i, n in
              enumerate("AB")]
    requests = [ChainSample("q", [Step("A", input="doc", max_new_tokens=5, input_visible=True),
                                  Step("B", max_new_tokens=3)]),
                # steps 1 and 2 have given outputs: the row runs step 1 alone (an encoding
                # turn), then idles while the others decode (their turn), then runs step 2
                ChainSample("another q", [Step("A", input="d", max_new_tokens=2),
                                          Step("B", output="a given answer"),
                                          Step("A", output="another")]),
                ChainSample("q3", [Step("B", max_new_tokens=4), Step("A", max_new_tokens=6)])]
    ChainEngine(llama, stages, batch_size=3).run(requests)
    assert True in checked and False in checked  # live rows and idle ones


def test_the_readme_picture_is_drawn_from_the_rule(tmp_path):
    import runpy
    from pathlib import Path

    import matplotlib.image

    script = Path(__file__).parents[1] / "scripts" / "draw_mask.py"
    runpy.run_path(str(script))["draw"](str(tmp_path / "mask.png"))
    image = matplotlib.image.imread(tmp_path / "mask.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
