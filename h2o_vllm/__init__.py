"""h2o-vllm: H2O (Heavy-Hitter Oracle) KV-cache eviction built into vLLM."""

__version__ = "0.1.0"
