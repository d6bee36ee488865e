"""GPU kernels for paged H2O, each beside the plain PyTorch it must equal.

- :mod:`triton_scoring`: per-block attention mass of the scored query rows over a
  paged K cache (from q and the attention's log-sum-exp), and block-table
  compaction into persistent buffers, for vLLM's CUDA path
  (see docs/cuda-integration-plan.md): the PyTorch references, argument checks
  and launchers; callers import from it.
- :mod:`triton_jit`: the ``@triton.jit`` bodies those launchers start, defined
  only where Triton imports.

Nothing is imported here: ``triton_scoring`` imports torch, and Triton only if it
is installed (``triton_jit`` tries; ``triton_scoring.TRITON_AVAILABLE`` says).
"""
