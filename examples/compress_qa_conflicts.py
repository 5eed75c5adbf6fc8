"""Probe: when the compression names the wrong entity, does the QA stage copy it or answer from
what the base learned in pretraining? For each compress_qa test question, stage A's output is
given as a distractor's sentence for the same relation (taken from A's passages), then stage B
answers. Run for text-mode and shared-mode stages, with A's input the full passages (`long`
hole), the distractor's passage alone (`short`), or nothing but "." (`none`): in shared mode the
hole between the question and the answer shrinks while B's reading task stays the same.

    python examples/compress_qa_conflicts.py --base fthss/assets/base-s0 \
        --data runs/demo/world/tasks/compress_qa/test.jsonl \
        chain:text:runs/demo/stages/compress_qa/lora/chain \
        fthss:shared:runs/demo/stages/compress_qa/lora/fthss
"""

from __future__ import annotations

import argparse
import re

from fthss.engine.engine import ChainEngine
from fthss.layout.chain import ChainSample, Step
from fthss.models.base import BaseModel
from fthss.prompts.stage import load_stage
from fthss.tasks import get_task


def subject(sentence: str) -> str:
    return " ".join(sentence.split()[:2])  # the world's names are two words


def conflicts(records):
    """(record, distractor's passage, distractor's sentence, distractor's value) per question
    whose passages hold another entity's sentence for the same relation."""
    cases = []
    for record in records:
        a = record.sample.steps[0]
        gold = a.output.strip()
        rest = gold[len(subject(gold)):]
        if record.answer not in rest:
            continue
        phrase = rest[: rest.rfind(record.answer)]  # " was born in "
        found = next(((p, s.strip()) for p in a.input.split("\n") for s in re.findall(r"[^.]*\.", p)
                      if subject(s) not in (subject(gold), "") and record.answer not in s
                      and s.strip()[len(subject(s)):].startswith(phrase)), None)
        if found:
            passage, sentence = found
            value = sentence[len(subject(sentence)) + len(phrase):].rstrip(".")
            cases.append((record, passage, sentence, value))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True, help="compress_qa test records")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("runs", nargs="+", metavar="NAME:MODE:DIR",
                        help="stages A and B in DIR, run in MODE (text or shared)")
    args = parser.parse_args()
    for run in args.runs:
        if len(run.split(":")) != 3 or run.split(":")[1] not in ("text", "shared"):
            parser.error(f"'{run}': expected NAME:MODE:DIR with MODE text or shared")
    base = BaseModel.load(args.base)
    task = get_task("compress_qa")
    cases = conflicts(task.records(args.data)[: args.records])
    if not cases:
        raise SystemExit(f"{args.data}: no question whose passages hold another entity's "
                         "sentence for the asked relation (the probe needs the world's data)")
    print(f"{len(cases)} questions with a distractor sentence for the same relation\n")
    print("| stages | mode | hole | true answer % | copied the distractor % |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        name, mode, folder = run.split(":")
        engine = ChainEngine(base, [load_stage(f"{folder}/{s}", base) for s in "AB"],
                             batch_size=128)
        for hole in ("long", "short", "none"):
            requests = [ChainSample(r.sample.shared, [
                Step("A", input={"long": r.sample.steps[0].input, "short": passage,
                                 "none": "."}[hole], output=sentence, max_new_tokens=64),
                Step("B", max_new_tokens=24, stop=["\n"])], r.id)
                for r, passage, sentence, _ in cases]
            predictions = [task.prediction(x) for x in engine.run(requests, mode)]
            true = sum(task.score(p, c[0])["em"] > 0
                       for p, c in zip(predictions, cases, strict=True))
            copied = sum(p.strip().lower() == c[3].lower()
                         for p, c in zip(predictions, cases, strict=True))
            print(f"| {name} | {mode} | {hole} | {100 * true / len(cases):.1f} | "
                  f"{100 * copied / len(cases):.1f} |")


if __name__ == "__main__":
    main()
