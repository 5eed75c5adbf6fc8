"""What users run today: each stage a PEFT prompt-tuning model run with transformers' `generate`,
passing text.

Stage B is handed stage A's output as text: it re-encodes the question and the intermediate
under its own virtual tokens, then generates exactly `new_tokens` tokens. The requests are those
of `fthss.benchmarks.chains.stage_b_latency`, so the rows sit beside the engine's (mode
"hf-peft"). PEFT is an optional dependency: `pip install 'fthss[bench]'`.
"""

from __future__ import annotations

import time
import warnings

import torch
from tqdm.auto import tqdm

from fthss.benchmarks.chains import latency_row, stage_b_request
from fthss.models.base import BaseModel


class _Clock:
    """A `generate` streamer that notes when tokens arrive: its first `put` is the prompt, the
    second the first new token (already copied to the host, so the time is real on a GPU)."""

    def __init__(self):
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass


def stage_b_latency(base: BaseModel, lengths: list[int], new_tokens: int = 16, repeats: int = 3,
                    prompt_tokens: int = 16, progress: bool = False) -> list[dict]:
    """One row per intermediate length: stage B as a PEFT prompt-tuning model with
    `prompt_tokens` virtual tokens, median latency and time to first token over `repeats` runs
    after a warm-up run, batch 1. `prefilled_tokens` counts the virtual tokens too."""
    try:
        from peft import PromptTuningConfig, get_peft_model
    except ImportError:
        raise ModuleNotFoundError("the hf-peft system needs peft: pip install 'fthss[bench]' "
                                  "(peft>=0.17), or leave hf-peft out of --systems") from None
    # Prompt tuning adds an embedding beside the base and changes none of its modules, so the
    # engine can keep using the same base afterwards.
    with warnings.catch_warnings():
        # PEFT asks transformers a deprecated question about gradient checkpointing
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = get_peft_model(base.model, PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=prompt_tokens)).to(base.device).eval()
    rows = []
    for length in tqdm(lengths, desc="stage-B latency (hf-peft)", disable=not progress):
        request = stage_b_request(base, length, new_tokens, prompt_tokens)
        text = f"{request.shared}\n{request.steps[0].output}"
        runs = [_generate(model, base, text, new_tokens) for _ in range(repeats + 1)][1:]
        rows.append(latency_row(length, "hf-peft", new_tokens, [wall for wall, _, _ in runs],
                                [first for _, first, _ in runs], runs[0][2] + prompt_tokens))
    return rows


def _generate(model, base: BaseModel, text: str, new_tokens: int) -> tuple[float, float, int]:
    """Tokenize, generate, decode, as a user's pipeline does: (seconds, seconds to the first
    new token, input tokens)."""
    tokenizer, clock = base.tokenizer, _Clock()
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    started = time.perf_counter()
    inputs = tokenizer(text, return_tensors="pt").to(base.device)
    with torch.no_grad(), warnings.catch_warnings():
        # PEFT warns on every call that prompt tuning ignores position ids: nothing to act on
        warnings.filterwarnings("ignore", message="Position ids are not supported")
        output = model.generate(**inputs, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=pad_id, streamer=clock)
    tokenizer.decode(output[0, inputs.input_ids.shape[1]:])
    if base.device.type == "cuda":
        torch.cuda.synchronize(base.device)
    wall = time.perf_counter() - started
    generated = output.shape[1] - inputs.input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generate wrote {generated} tokens, not the {new_tokens} forced")
    return wall, clock.puts[1] - started, inputs.input_ids.shape[1]
