"""Every default of a configuration, in one home: three named profiles.

- :data:`PAPER`: the H2O paper's (Zhang et al., 2023): token-level eviction, 4 sink
  tokens, 20% of the sequence, every prompt query row scoring, heads and layers summed,
  the prompt compressed once it is whole. The defaults of :class:`PolicyConfig` itself,
  and the base of the transformers caches and of names parsed without another base.
- :data:`ENGINE`: the in-process vLLM engine's (``vllm.LLM(..., **engine_kwargs())``): the
  paper's on 32-token blocks (the finest block vLLM's CPU attention takes), whose first
  block is the sink.
- :data:`SERVER`: what ``h2o-vllm serve`` applies where the user sets nothing, chosen by
  measurement on both models (results/defaults/compare.md): a budget that never touches
  short requests (long ones keep 1024 tokens of KV), the prompt scored by its last 8 rows
  (whatever they ask about) and each query's block mass the max over heads and layers.
  Against the paper's scoring it finds pass keys at 20% that the paper's misses, and
  gives up some fidelity of long free generation at 50%.

Settings (:mod:`h2o_vllm.settings`), names (:mod:`h2o_vllm.names`), aliases, ``serve``
and the engine all start from one of these.
"""

from __future__ import annotations

from h2o_vllm.policy import Budget, PolicyConfig

# The one block size the CPU engine runs with: CPU attention needs a multiple of 32,
# and the policy's unit (a block) should be as fine as the kernel allows.
ENGINE_BLOCK_SIZE = 32
# Query rows that score a prompt where a window is asked for by name without a size
# (and the server's window): the needle's question ("What is the pass key? The pass key is").
OBSERVATION_WINDOW = 8

PAPER = PolicyConfig()
ENGINE = PAPER.replace(n_sink=ENGINE_BLOCK_SIZE, block_size=ENGINE_BLOCK_SIZE)
SERVER = ENGINE.replace(budget=Budget(tokens=1024), prompt_window=OBSERVATION_WINDOW, score_reduce="max")

PROFILES = {"paper": PAPER, "engine": ENGINE, "server": SERVER}
