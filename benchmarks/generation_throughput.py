"""Generation throughput at a fixed KV memory: the largest batch and its output tok/s, full cache against H2O.

In the spirit of the H2O paper's throughput table: the same memory for the KV cache
in every run; the full cache fits so many sequences of prompt + new tokens, H2O 20%
and StreamingLLM 20% (budgets of 20% of prompt + new tokens, in the fixed buffers of
``FastH2OCache``) fit more, and a larger batch decodes more tokens per second. Every
row of a batch generates exactly ``--new-tokens`` tokens with ``model.generate``
(greedy, end of sequence ignored), on random prompts of ``--prompt-tokens`` tokens.

CUDA: random-weight models of Llama-2-7B and Pythia-2.8B shapes in float16, built from
their configurations (throughput does not depend on the weights; nothing comes from a
hub). CPU: the default model, or ``--model``. Nothing here imports vLLM.

    python benchmarks/generation_throughput.py               # CUDA: both shapes (sized for ~4 min on an H200)
    python benchmarks/generation_throughput.py --device cpu  # CPU: the default model
    python benchmarks/generation_throughput.py --device cpu --shapes tiny --kv-memory 0.004 \\
        --prompt-tokens 64 --new-tokens 16 --out /tmp/throughput   # smoke test of the CUDA path's code

The batch of a policy is the most sequences whose KV fits ``--kv-memory`` GiB, worked
out from what one sequence needs (layers x KV heads x head size x 2 x dtype bytes per
token): the full cache (transformers' ``DynamicCache``) holds prompt + new tokens in
every layer; an evicting cache holds its budget plus ``--margin`` tokens in every
layer, and while the prompt is prefilled one layer's whole prompt as well (decisions
per layer, as the paper's code makes them; with ``--decisions shared`` every layer
holds the whole prompt until the last layer decides). Running the batch verifies it:
the KV held at the end and the peak memory are reported beside the throughput.

Results: OUT/throughput.json and OUT/throughput.md (default OUT: results/gpu on CUDA,
results/hf-throughput on CPU).
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import Run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # h2o_vllm from this checkout, installed or not

GIB = 1 << 30


@dataclass(frozen=True)
class Shape:
    """A model architecture to build with random weights."""

    name: str
    family: str  # "llama" or "gpt_neox"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int

    def build(self, device, dtype):
        from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

        if self.family == "llama":
            config = LlamaConfig(
                hidden_size=self.hidden,
                num_hidden_layers=self.layers,
                num_attention_heads=self.heads,
                num_key_value_heads=self.heads,
                intermediate_size=self.intermediate,
                vocab_size=self.vocab,
                max_position_embeddings=4096,
            )
        else:
            config = GPTNeoXConfig(
                hidden_size=self.hidden,
                num_hidden_layers=self.layers,
                num_attention_heads=self.heads,
                intermediate_size=self.intermediate,
                vocab_size=self.vocab,
                max_position_embeddings=2048,
                rotary_pct=0.25,
            )
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: a 7B model is built in seconds on a GPU
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


SHAPES = {
    "llama-2-7b": Shape("Llama-2-7B", "llama", 4096, 32, 32, 11008, 32000),
    "pythia-2.8b": Shape("Pythia-2.8B", "gpt_neox", 2560, 32, 32, 10240, 50432),
    # Smoke tests of the same code on a CPU.
    "tiny-llama": Shape("tiny Llama", "llama", 64, 2, 2, 128, 1000),
    "tiny-pythia": Shape("tiny Pythia", "gpt_neox", 64, 2, 2, 128, 1000),
}
SHAPE_GROUPS = {"tiny": ["tiny-llama", "tiny-pythia"]}


@dataclass(frozen=True)
class Policy:
    """One row of the table: the full cache, or an evicting policy at a budget."""

    name: str  # "full", "h2o", "streaming", "keynorm"

    def label(self, share: float) -> str:
        labels = {"full": "full", "h2o": "H2O", "streaming": "StreamingLLM", "keynorm": "key-norm"}
        return labels[self.name] if self.name == "full" else f"{labels[self.name]} {share:.0%}"

    def config(self, budget: int, sink: int):
        from h2o_vllm.policy import Budget, PolicyConfig

        if self.name == "full":
            return None
        if self.name in ("h2o", "keynorm"):  # sinks, then half recent window and half kept by score
            return PolicyConfig(self.name, Budget(tokens=budget), n_sink=sink)
        return PolicyConfig("streaming", Budget(tokens=budget), n_sink=sink, n_recent=budget - sink)


class KVSizer:
    """What one sequence's KV needs, in bytes, and so the largest batch a KV memory holds."""

    def __init__(self, model, prompt: int, new: int, margin: int, decisions: str):
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.layers = config.num_hidden_layers
        self.token_layer_bytes = 2 * kv_heads * head_dim * model.dtype.itemsize
        self.prompt, self.new, self.margin, self.decisions = prompt, new, margin, decisions

    def slots(self, policy_config) -> int:
        """KV slots per layer an evicting cache keeps while decoding (its fixed buffers)."""
        from h2o_vllm.hf.slots import PagePlan

        return PagePlan(policy_config, self.margin).steady * policy_config.block_size

    def per_sequence(self, policy_config) -> int:
        if policy_config is None:
            token_layers = self.layers * (self.prompt + self.new)
        elif self.decisions == "shared":
            token_layers = self.layers * max(self.prompt, self.slots(policy_config))
        else:
            token_layers = self.layers * self.slots(policy_config) + self.prompt
        return token_layers * self.token_layer_bytes

    def batch(self, policy_config, kv_memory_bytes: int, max_batch: int) -> int:
        return max(1, min(max_batch, kv_memory_bytes // self.per_sequence(policy_config)))


class PeakMemory:
    """Peak memory of one run: allocated CUDA memory, or the process's resident set on a CPU (sampled)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss())

    @property
    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return self._peak / GIB


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _first_token_timer(device: torch.device):
    """A logits processor that notes when the first token's logits are ready (the prefill's end)."""
    from transformers import LogitsProcessor

    class FirstTokenTimer(LogitsProcessor):
        at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                _sync(device)
                self.at = time.perf_counter()
            return scores

    return FirstTokenTimer()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes(cache) -> int:
    """KV bytes the cache holds (buffers included) after a run."""
    from h2o_vllm.hf import FastH2OCache

    if isinstance(cache, FastH2OCache):
        tensors = [t for layer in cache.layers for t in (layer.key_buffer, layer.value_buffer)]
    else:
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def make_cache(model, policy_config, args):
    from transformers import DynamicCache

    from h2o_vllm.hf import FastH2OCache

    if policy_config is None:
        return DynamicCache()
    per_layer, per_head = {"layer": (True, False), "head": (True, True), "shared": (False, False)}[args.decisions]
    score_dtype = torch.float32 if args.score_dtype == "float32" else None
    return FastH2OCache.for_model(
        model, policy_config, per_layer=per_layer, per_head=per_head, margin=args.margin, score_dtype=score_dtype
    )


def generate(model, policy_config, batch: int, prompt: int, new: int, args) -> dict:
    """One timed ``generate`` of ``batch`` random prompts; throughput, memory and KV held."""
    from transformers import LogitsProcessorList

    device = model.device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(args.seed)).to(device)
    cache = make_cache(model, policy_config, args)
    timer = _first_token_timer(device)
    with PeakMemory(device) as memory, torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new,
            do_sample=False,
            logits_processor=LogitsProcessorList([timer]),
        )
        _sync(device)
        wall = time.perf_counter() - start
    generated = out.shape[1] - prompt
    result = {
        "batch": batch,
        "generated_per_row": generated,
        "wall_s": wall,
        "prefill_s": timer.at - start,
        "output_tok_s": batch * generated / wall,
        "decode_tok_s": batch * (generated - 1) / max(1e-9, wall - (timer.at - start)),
        "peak_memory_gib": memory.gib,
        "kv_held_gib": kv_bytes(cache) / GIB,
    }
    del out, cache
    _release(device)
    return result


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_models(args, device, dtype):
    """(key, display name, builder) for each model to measure."""
    if args.model or (device.type == "cpu" and not args.shapes):
        path = args.model

        def load():
            from transformers import AutoModelForCausalLM

            from h2o_vllm import assets

            folder = path or assets.prepare_default_model().path
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
            return model.to(device).eval()

        name = Path(path).name if path else "default model"
        return [(name, name, load)]
    keys = []
    for key in args.shapes or ["llama-2-7b", "pythia-2.8b"]:
        keys += SHAPE_GROUPS.get(key, [key])
    unknown = [k for k in keys if k not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES) + sorted(SHAPE_GROUPS)}")
    return [(k, SHAPES[k].name, lambda k=k: SHAPES[k].build(device, dtype)) for k in keys]


def measure_model(key: str, name: str, model, args, started: float) -> list[dict]:
    sizer = KVSizer(model, args.prompt_tokens, args.new_tokens, args.margin, args.decisions)
    budget = int(args.budget * (args.prompt_tokens + args.new_tokens))
    kv_memory = int(args.kv_memory * GIB)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    model.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    model.generation_config.pad_token_id = 0
    print(f"[{key}] warming up ({time.perf_counter() - started:.0f} s)", flush=True)
    for policy in args.policies:  # kernels, allocator and cuBLAS handles, outside the timed runs
        generate(model, Policy(policy).config(min(budget, 16), min(args.sink, 4)), 2, 32, 4, args)
    rows = []
    for policy_name in args.policies:
        policy = Policy(policy_name)
        config = policy.config(budget, args.sink)
        batch = sizer.batch(config, kv_memory, args.max_batch)
        per_sequence = sizer.per_sequence(config) / (1 << 20)
        print(
            f"[{key}] {policy.label(args.budget)}: batch {batch} ({per_sequence:.1f} MiB of KV per sequence) "
            f"x {args.prompt_tokens} + {args.new_tokens} tokens ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        row = {
            "model": name,
            "shape": key,
            "policy": policy_name,
            "label": policy.label(args.budget),
            "budget_tokens": None if config is None else budget,
            "slots_per_layer": args.prompt_tokens + args.new_tokens if config is None else sizer.slots(config),
            "kv_per_sequence_mib": per_sequence,
            "weights_gib": weights,
        }
        try:
            row.update(generate(model, config, batch, args.prompt_tokens, args.new_tokens, args))
        except torch.OutOfMemoryError as exc:
            _release(model.device)
            row.update({"batch": batch, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            print(f"    out of memory at batch {batch}", flush=True)
            rows.append(row)
            continue
        full = next((r for r in rows if r["policy"] == "full" and "error" not in r), None)
        row["x_full"] = row["output_tok_s"] / full["output_tok_s"] if full else None
        rows.append(row)
        print(
            f"    {row['output_tok_s']:.0f} output tok/s ({row['wall_s']:.1f} s, prefill {row['prefill_s']:.1f} s), "
            f"peak {row['peak_memory_gib']:.1f} GiB, KV held {row['kv_held_gib']:.2f} GiB",
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | policy | KV slots per layer | batch | KV held GiB | output tok/s | x full | peak memory GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['label']} | {r['slots_per_layer']} | {r['batch']} | | {r['error']} | | |"
            )
            continue
        x_full = "" if r.get("x_full") is None else f"{r['x_full']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['label']} | {r['slots_per_layer']} | {r['batch']} | {r['kv_held_gib']:.2f} | "
            f"{r['output_tok_s']:.0f} | "
            f"{x_full} | {r['peak_memory_gib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", help=f"random-weight shapes: {', '.join([*SHAPES, *SHAPE_GROUPS])}")
    parser.add_argument("--model", help="a local model folder instead (CPU default: the default model)")
    parser.add_argument("--dtype", help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--policies", nargs="+", default=["full", "h2o", "streaming"], choices=["full", "h2o", "streaming", "keynorm"]
    )
    parser.add_argument("--prompt-tokens", type=int, help="default: 512 on CUDA, 256 on CPU")
    parser.add_argument("--new-tokens", type=int, help="default: 256 on CUDA, 64 on CPU")
    parser.add_argument("--kv-memory", type=float, help="GiB of KV per run; default: 24 on CUDA, 0.25 on CPU")
    parser.add_argument("--budget", type=float, default=0.2, help="share of prompt + new tokens kept (default 0.2)")
    parser.add_argument("--sink", type=int, default=4, help="sink tokens of H2O and StreamingLLM")
    parser.add_argument("--margin", type=int, default=1, help="slots beyond the budget (one decoding token needs one)")
    parser.add_argument(
        "--decisions",
        choices=["layer", "head", "shared"],
        default="layer",
        help="evictions decided per layer (default), per layer and KV head, or once for all layers",
    )
    parser.add_argument(
        "--score-dtype",
        choices=["float32", "model"],
        default="float32",
        help="logits recomputed for H2O's scores in float32 (as the reference cache) or the model's dtype",
    )
    parser.add_argument("--max-batch", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    run = Run.start(__file__, argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    args.prompt_tokens = args.prompt_tokens or (512 if cuda else 256)
    args.new_tokens = args.new_tokens or (256 if cuda else 64)
    args.kv_memory = args.kv_memory or (24.0 if cuda else 0.25)
    args.out = args.out or Path("results/gpu" if cuda else "results/hf-throughput")
    if "full" in args.policies:
        args.policies = ["full"] + [p for p in args.policies if p != "full"]  # the reference first
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"{device_name}, {str(dtype).removeprefix('torch.')}: {args.prompt_tokens} prompt + {args.new_tokens} new "
        f"tokens, {args.kv_memory:g} GiB of KV, budget {args.budget:.0%}, decisions per {args.decisions}",
        flush=True,
    )
    started = time.perf_counter()
    rows = []
    for key, name, build in load_models(args, device, dtype):
        print(f"[{key}] building {name} ({time.perf_counter() - started:.0f} s)", flush=True)
        model = build()
        rows += measure_model(key, name, model, args, started)
        del model
        _release(device)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)

    settings = {
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "kv_memory_gib": args.kv_memory,
        "budget": args.budget,
        "sink": args.sink,
        "margin": args.margin,
        "decisions": args.decisions,
        "score_dtype": args.score_dtype,
        "torch": torch.__version__,
    }
    intro = (
        f"Generation throughput on {device_name} ({settings['dtype']}): {args.prompt_tokens} prompt tokens and "
        f"{args.new_tokens} new tokens per sequence, as many sequences at once as {args.kv_memory:g} GiB of KV "
        f"holds. H2O and StreamingLLM keep {args.budget:.0%} of prompt + new tokens ({args.sink} sinks) in "
        f"FastH2OCache's fixed buffers, decisions per {args.decisions}; the full cache is transformers' "
        "DynamicCache. KV held: the cache's tensors at the end of the run (the evicting caches' budget is "
        "smaller than the KV memory by one layer's prompt, which prefill needs). "
        "Output tok/s: generated tokens over the whole generate() call, prefill included. "
        + (
            "Peak memory: the run's peak CUDA allocation, weights included."
            if cuda
            else "Peak memory: the process's peak resident set during the run, weights included."
        )
    )
    print(run.write(args.out, "throughput", {"settings": settings, "rows": rows}, f"{intro}\n\n{table(rows)}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
