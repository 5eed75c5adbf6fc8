"""fthss: chains of prompt-tuned stages on one frozen decoder LLM that share one KV cache."""

__version__ = "0.1.0"
