"""Where do a report's points come from? Reads `predictions.jsonl` from an `fthss eval` or
`fthss demo` report folder and prints, per task and method (with its stage kind in a demo
report; generated upstream), the main metric overall, by question kind (the last `:` field of a
record's id: the relation for compress_qa, the hop pattern for rewrite_qa and active_rag), and
split by whether the first
step's output equals the gold one (taken from the method's gold-upstream run).

    python examples/breakdown.py runs/demo [--task compress_qa]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def percent(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.1f} (n={len(values)})" if values else "–"


def label(row: dict) -> str:
    """A method run's name: its stage kind first when the report compares kinds (the demo)."""
    return f"{row['kind']} {row['method']}" if row.get("kind") else row["method"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a report folder holding predictions.jsonl")
    parser.add_argument("--task", default=None, help="only this task")
    args = parser.parse_args()
    path = args.report / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (reports written before predictions were kept "
                         "have none: rerun the evaluation)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}:{number}: not a JSON row ({error})") from None
    # the gold first-step output of every request, from any gold-upstream run
    gold_first = {(r["task"], r["id"]): r["steps"][0]["output"]
                  for r in rows if r["gold_upstream"] and len(r["steps"]) > 1}
    for task in dict.fromkeys(r["task"] for r in rows):
        if args.task and task != args.task:
            continue
        mine = [r for r in rows if r["task"] == task and not r["gold_upstream"]]
        metric = next(iter(mine[0]["scores"]))
        kinds = sorted({r["id"].rsplit(":", 1)[-1] for r in mine})
        print(f"\n## {task} ({metric.upper()} %)\n")
        print("| method | all | first step exact | first step wrong | "
              + " | ".join(kinds) + " |")
        print("|---" * (4 + len(kinds)) + "|")
        for method in dict.fromkeys(map(label, mine)):
            by = defaultdict(list)
            for r in (r for r in mine if label(r) == method):
                score = r["scores"][metric]
                by["all"].append(score)
                by[r["id"].rsplit(":", 1)[-1]].append(score)
                gold = gold_first.get((task, r["id"]))
                if gold is not None and len(r["steps"]) > 1:
                    by["exact" if r["steps"][0]["output"].strip() == gold.strip()
                       else "wrong"].append(score)
            cells = [percent(by[k]) for k in ("all", "exact", "wrong", *kinds)]
            print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
