"""Choosing the next token: greedy, or sampling with temperature / top-k / top-p and a seed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from fthss.errors import ConfigError


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0  # each request samples from its own generator, keyed by (seed, request)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, key: str, seed: int | None = None) -> torch.Generator | None:
        """One generator per request, seeded from the run's seed (or the request's own `seed`,
        as a server's requests bring) and the request's `key` (`request_key`): what a request
        samples depends on neither its batch-mates nor its place in the file, so adding or
        removing another request changes nothing for it."""
        if self.greedy:
            return None
        seed = self.seed if seed is None else seed
        digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "backslashreplace"))
        return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """The next token from one row of logits `[vocab]`."""
        if self.greedy:
            return int(logits.argmax())
        scores = logits.float().cpu() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = torch.sort(scores, descending=True)
            # drop a token once the mass before it already reaches top_p (the first always stays)
            drop = (torch.cumsum(torch.softmax(ordered, -1), -1) - torch.softmax(ordered, -1)
                    >= self.top_p)
            scores[order[drop]] = float("-inf")
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


def request_key(request) -> str:
    """What a request's sampling is keyed by: its id, or its content when it has none (two
    requests without ids and with the same content then sample alike, as one request twice)."""
    if request.id is not None:
        return f"id:{request.id}"
    return "content:" + json.dumps(request.to_json(), sort_keys=True)
