"""exp27 (docs/experiments.md): the spread of the demo's lora figures over training seeds.

The demo's recipe on one world with lora stages only (single, chain, fthss; fthss-untuned and
the gold-upstream rows come with the evaluation), the stages initialised and the data ordered by
`--train-seed` instead of the world's seed. The demo itself trains with train seed = world seed,
so `--train-seed` equal to `--seed` repeats its lora rows.

usage: python scripts/exp27.py --seed 0 --train-seed 11 --out runs/exp27/w0-t11
"""
import argparse

from fthss.demo import DemoConfig, run_demo

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seed", type=int, default=0, help="the world's seed (committed base)")
parser.add_argument("--train-seed", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--test-records", type=int, default=500)
args = parser.parse_args()
run_demo(DemoConfig(seed=args.seed, train_seed=args.train_seed, kinds=("lora",),
                    every_method_kind=None, test_records=args.test_records), args.out)
