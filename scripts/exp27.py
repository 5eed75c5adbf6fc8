"""exp27–exp34 (docs/experiments.md): the demo's lora rows over training seeds and settings.

The demo's recipe on one world with lora stages only (single, chain, fthss; fthss-untuned and
the gold-upstream rows come with the evaluation), the stages initialised and the data ordered by
`--train-seed` instead of the world's seed, optionally with one training setting changed. The
demo itself trains with train seed = world seed, so `--train-seed` equal to `--seed` repeats its
lora rows.

usage: python scripts/exp27.py --seed 0 --train-seed 11 --epochs 1 --out runs/exp27/w0-t11
       python scripts/exp27.py --seed 0 --train-seed 0 --epochs 2 --out runs/exp28/w0-e2
       python scripts/exp27.py --seed 0 --train-seed 0 --epochs 2 --base runs/exp30/base-w0-d1 \
           --out runs/exp30/w0-d1-e2
       python scripts/exp27.py --seed 0 --train-seed 0 --epochs 2 --base runs/exp31/base-w0-d2 \
           --tasks memory_reasoning --lora-lr 1e-3 --out runs/exp31/w0-d2-lr1
       python scripts/exp27.py --seed 1 --train-seed 12 --epochs 2 --train-samples 2048 \
           --tasks compress_qa --out runs/exp32/w1-t12-cq-n2048
       python scripts/exp27.py --seed 1 --train-seed 1 --epochs 2 --train-samples 2048 \
           --test-records 1000 --tasks compress_qa active_rag --base runs/exp32/base-w1-d1 \
           --out runs/exp33/w1-d1-t1-n2048
(`--epochs`: the lora kind's epochs, default the demo's `lora_epochs`, 1; `--base`: another
pretraining draw of the world, `fthss base pretrain --seed D`, instead of the committed one;
`--tasks`: some of the four, whose rows are those of the full run; `--train-samples`: the
first N train chains of each task, default the demo's 1,024)
"""
import argparse

from fthss.demo import DemoConfig, run_demo
from fthss.tasks import TASKS

defaults = DemoConfig()
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seed", type=int, default=0, help="the world's seed (committed base)")
parser.add_argument("--train-seed", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--base", default=None, help="a base pretrained on this world")
parser.add_argument("--test-records", type=int, default=defaults.test_records)
parser.add_argument("--train-samples", type=int, default=defaults.train_samples)
parser.add_argument("--epochs", type=float, default=defaults.lora_epochs)
parser.add_argument("--lora-lr", type=float, default=defaults.lora_learning_rate)
parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
args = parser.parse_args()
run_demo(DemoConfig(seed=args.seed, train_seed=args.train_seed, kinds=("lora",),
                    every_method_kind=None, test_records=args.test_records,
                    train_samples=args.train_samples,
                    lora_epochs=args.epochs, base=args.base,
                    lora_learning_rate=args.lora_lr, lora_rank=args.lora_rank,
                    lora_alpha=2.0 * args.lora_rank, tasks=tuple(args.tasks)), args.out)
