"""What users run today: each stage a PEFT prompt-tuning model run with transformers' `generate`,
passing text.

Stage B is handed stage A's output as text: it re-encodes the question and the intermediate
under its own virtual tokens, then generates exactly the tokens the request asks for. It is one
of the systems of `fthss.benchmarks.chains.stage_b_latency`, run on the same requests, so its
rows sit beside the engine's (system "hf-peft"). PEFT is an optional dependency:
`pip install 'fthss[bench]'`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from fthss.errors import MissingDependencyError
from fthss.layout.chain import ChainSample
from fthss.layout.sequence import pad_id
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


def peft_system(base: BaseModel, prompt_tokens: int
                ) -> Callable[[ChainSample], tuple[float, float, int]]:
    """Stage B as a PEFT prompt-tuning model with `prompt_tokens` virtual tokens: a function of
    a `fthss.benchmarks.chains.stage_b_request` returning (seconds, seconds to the first new
    token, tokens prefilled, the virtual tokens included)."""
    try:
        from peft import PromptTuningConfig, get_peft_model
    except ImportError:
        raise MissingDependencyError("the hf-peft system needs peft: pip install 'fthss[bench]' "
                                     "(peft>=0.17), or leave hf-peft out of --systems") from None
    # Prompt tuning adds an embedding beside the base and changes none of its modules, so the
    # engine can keep using the same base, even between two runs of this one.
    with warnings.catch_warnings():
        # PEFT asks transformers a deprecated question about gradient checkpointing
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = get_peft_model(base.model, PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=prompt_tokens)).to(base.device).eval()

    def run(request: ChainSample) -> tuple[float, float, int]:
        text = f"{request.shared}\n{request.steps[0].output}"
        wall, first, inputs = _generate(model, base, text, request.steps[1].max_new_tokens)
        return wall, first, inputs + prompt_tokens
    return run


def _generate(model, base: BaseModel, text: str, new_tokens: int) -> tuple[float, float, int]:
    """Tokenize, generate, decode, as a user's pipeline does: (seconds, seconds to the first
    new token, input tokens)."""
    tokenizer, clock = base.tokenizer, _Clock()
    started = time.perf_counter()
    inputs = tokenizer(text, return_tensors="pt").to(base.device)
    with torch.no_grad(), warnings.catch_warnings():
        # PEFT warns on every call that prompt tuning ignores position ids: nothing to act on
        warnings.filterwarnings("ignore", message="Position ids are not supported")
        output = model.generate(**inputs, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=pad_id(tokenizer), streamer=clock)
    tokenizer.decode(output[0, inputs.input_ids.shape[1]:])
    if base.device.type == "cuda":
        torch.cuda.synchronize(base.device)
    wall = time.perf_counter() - started
    generated = output.shape[1] - inputs.input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generate wrote {generated} tokens, not the {new_tokens} forced")
    return wall, clock.puts[1] - started, inputs.input_ids.shape[1]
