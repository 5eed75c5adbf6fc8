"""Draw the visibility rule: the mask of a compress → answer chain, computed by the rule itself
(`fthss.layout.visibility`, the one the engine and training use), as `docs/images/mask.png`.

The chain is the one `tests/test_visibility.py` writes out by hand: stage A has a 2-token prompt,
B a 1-token one; 3 shared tokens, A reads a 4-token document and writes a 3-token compression,
B reads its marker and answers in 2 tokens.

usage: python scripts/draw_mask.py [OUT.png]
"""

import sys

from fthss import plots
from fthss.layout.sequence import TokenChain, TokenStep, build_layout

# (label, width) of each key segment, left to right: prompt slots first, then content
SEGMENTS = [("A's prompt", 2), ("B's prompt", 1), ("shared", 3), ("A: input", 4),
            ("A: output", 3), ("B: input", 1), ("B: output", 2)]


def draw(path: str) -> None:
    chain = TokenChain([0, 5, 6], [TokenStep("A", [0, 10, 11, 12], [20, 21, 1]),
                                   TokenStep("B", [0], [30, 1])])
    layout = build_layout([chain], {"A": 0, "B": 1}, [2, 1], pad_id=2)
    mask = layout.mask[0, 0].float().numpy()
    prompt = layout.prompt.length
    fig, ax = plots.subplots(figsize=(7.2, 5.4))
    ax.imshow(mask, cmap="Greens", vmin=0, vmax=1.25, aspect="equal")
    edges, start = [], 0
    for label, width in SEGMENTS:
        edges.append((start, width, label))
        start += width
    ax.set_xticks([s + (w - 1) / 2 for s, w, _ in edges], [lab for *_, lab in edges],
                  rotation=35, ha="right", fontsize=9)
    rows = [(s - prompt, w, lab) for s, w, lab in edges if s >= prompt]
    ax.set_yticks([s + (w - 1) / 2 for s, w, _ in rows], [lab for *_, lab in rows], fontsize=9)
    for s, _, _ in edges[1:]:
        ax.axvline(s - 0.5, color="#555", lw=0.8)
    for s, _, _ in rows[1:]:
        ax.axhline(s - 0.5, color="#555", lw=0.8)
    ax.set(xlabel="keys: what a token may read (cache slots)", ylabel="queries: content tokens",
           title="The visibility rule: one cache, each stage reads what it may")
    plots.save(fig, path)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else "docs/images/mask.png")
