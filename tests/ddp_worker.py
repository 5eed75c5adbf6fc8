"""Run by tests/test_training.py, under `accelerate launch` (2 processes, micro-batch 1) or
plainly (1 process, micro-batch 2): the same global batch, so the same stages must result.
A prefix stage and a lora stage (with a soft prompt) train jointly. Writes each rank's trained
parameters, flattened into one tensor, to OUT/rank{r}.pt."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from fthss.layout.chain import ChainSample, Step
from fthss.models.presets import preset_base
from fthss.prompts.stage import Stage, StageConfig
from fthss.training.config import TrainConfig
from fthss.training.run import train_method

out, micro = Path(sys.argv[1]), int(sys.argv[2])
accelerator = Accelerator(cpu=True)
base = preset_base("tiny-llama", init_std=0.2)
samples = [ChainSample(f"q{i}", [Step("A", input=f"doc {i}", output=f"c{i % 3}"),
                                 Step("B", output=f"a{i % 3}")]) for i in range(12)]
stages = [Stage.create(StageConfig("A", "prefix", 3), base, seed=1),
          Stage.create(StageConfig("B", "lora", 3, lora_rank=2), base, seed=2)]


def flat() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for s in stages for p in s.parameters()])


out.mkdir(parents=True, exist_ok=True)
torch.save(flat(), out / "start.pt")
config = TrainConfig(learning_rate=0.05, lora_learning_rate=0.01, max_steps=4,
                     micro_batch_size=micro, grad_accumulation=2, warmup_ratio=0.0)
train_method(base, samples, "fthss", stages, ["A", "B"], config, out / "run", rounds="multi",
             progress=False)
torch.save(flat(), out / f"rank{accelerator.process_index}.pt")
