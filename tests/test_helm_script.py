"""benchmarks/helm.py without HELM: its options, the prod_env it writes, HELM's environment's
requirements, and the tables it builds from HELM's run directories (fast: no server, no network)."""

import json
from pathlib import Path

import pytest
import yaml
from benchmark_scripts import benchmark_script

from h2o_vllm.aliases import DEFAULT_ALIASES, alias_settings
from h2o_vllm.assets import DEFAULT_SERVED_NAME

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def helm():
    with benchmark_script("helm") as module:
        yield module


def test_defaults_run_two_offline_scenarios_on_two_aliases_over_completions(helm):
    args = helm.parse_args([])
    assert args.scenarios == ["synthetic_reasoning:mode=pattern_match", "dyck_language:num_parenthesis_pairs=3"]
    assert args.aliases == ["full", "h2o-0.2"]
    assert args.api == ["completions"]
    assert args.max_eval_instances == 100 and args.threads == 4
    assert args.base_url is None
    assert args.helm_venv == ROOT / ".venv-helm"
    assert args.out == ROOT / "results" / "helm"


def test_options(helm):
    argv = ["--base-url", "http://127.0.0.1:8141/v1/", "--api", "chat", "completions", "chat", "--threads", "2"]
    args = helm.parse_args([*argv, "--max-eval-instances", "5", "--aliases", "full", "streaming-0.2"])
    assert args.base_url == "http://127.0.0.1:8141"
    assert args.api == ["chat", "completions"]
    assert (args.threads, args.max_eval_instances, args.aliases) == (2, 5, ["full", "streaming-0.2"])
    assert helm.parse_args(["--base-url", "http://localhost:8000"]).base_url == "http://localhost:8000"


@pytest.mark.parametrize(
    "argv",
    [
        ["--base-url", "http://10.0.0.5:8000"],
        ["--base-url", "http://example.com:8000"],
        ["--max-eval-instances", "0"],
        ["--api", "legacy"],
    ],
)
def test_bad_options_are_refused(helm, argv, capsys):
    with pytest.raises(SystemExit):
        helm.parse_args(argv)


def test_names_of_models_and_run_entries(helm):
    assert helm.model_name("h2o-0.2", "chat") == "h2o-vllm/smollm2-135m-h2o-0.2"
    assert helm.model_name("full", "completions") == "h2o-vllm/smollm2-135m-full-completions"
    assert helm.run_entry("simple_classification", "a/b") == "simple_classification:model=a/b"
    assert (
        helm.run_entry("dyck_language:num_parenthesis_pairs=3", "a/b")
        == "dyck_language:num_parenthesis_pairs=3,model=a/b"
    )
    # HELM names a run its own way (dyck_language_np=3); the label drops only the model.
    assert helm.scenario_label("dyck_language_np=3:model=h2o-vllm_x") == "dyck_language_np=3"
    assert (
        helm.scenario_label("synthetic_reasoning:mode=pattern_match,model=m")
        == "synthetic_reasoning:mode=pattern_match"
    )
    assert helm.scenario_label("simple_classification") == "simple_classification"


def test_prod_env_written_for_another_server(helm, tmp_path):
    out = helm.write_prod_env(helm.PROD_ENV, tmp_path / "prod_env", "http://127.0.0.1:8142")
    assert sorted(p.name for p in out.iterdir()) == ["model_deployments.yaml", "model_metadata.yaml"]
    text = (out / "model_deployments.yaml").read_text()
    urls = [line.strip() for line in text.splitlines() if line.strip().startswith("base_url:")]
    assert urls == ["base_url: http://127.0.0.1:8142/v1"] * 2 * len(DEFAULT_ALIASES)
    assert text.splitlines()[0] == (helm.PROD_ENV / "model_deployments.yaml").read_text().splitlines()[0]
    assert (out / "model_metadata.yaml").read_text() == (helm.PROD_ENV / "model_metadata.yaml").read_text()
    # Written again over an older copy, with a base URL given with /v1.
    again = helm.write_prod_env(helm.PROD_ENV, out, "http://127.0.0.1:8143/v1")
    assert "base_url: http://127.0.0.1:8143/v1\n" in (again / "model_deployments.yaml").read_text()


def test_committed_prod_env_has_both_apis_for_every_served_alias(helm):
    deployments = helm.read_deployments(helm.PROD_ENV)
    raw = yaml.safe_load((helm.PROD_ENV / "model_deployments.yaml").read_text())["model_deployments"]
    metadata = yaml.safe_load((helm.PROD_ENV / "model_metadata.yaml").read_text())["models"]
    assert {d["model_name"] for d in raw} == {m["name"] for m in metadata} == set(deployments)
    classes = {
        "chat": "helm.clients.vllm_client.VLLMChatClient",
        "completions": "helm.clients.openai_client.OpenAILegacyCompletionsClient",
    }
    for alias in DEFAULT_ALIASES:
        alias_settings(alias)  # a name the server accepts
        for api, class_name in classes.items():
            d = deployments[helm.model_name(alias, api)]
            assert (d["class"], d["served"], d["api"]) == (class_name, f"{DEFAULT_SERVED_NAME}@{alias}", api)
    assert len(deployments) == 2 * len(DEFAULT_ALIASES)
    # VLLMClient cannot be constructed in crfm-helm 0.5.16; no deployment needs a tokenizer.
    assert all("tokenizer_name" not in d and "VLLMClient" not in d["client_spec"]["class_name"] for d in raw)


def test_helm_requirements_leave_out_torch_and_add_the_clients(helm):
    kept = helm.filter_requirements(
        [
            "torch<3.0.0,>=1.13.1",
            "torchvision<3.0.0,>=0.14.1",
            "Torch>=2",
            "transformers<6.0.0,>=4.53.0",
            "torchmetrics",
        ]
    )
    assert kept[:2] == ["transformers<6.0.0,>=4.53.0", "torchmetrics"]
    assert kept[2:] == list(helm.EXTRA_REQUIREMENTS)
    assert any(r.startswith("openai") for r in kept) and any(r.startswith("pillow") for r in kept)


def test_server_counters_from_metrics(helm):
    text = "\n".join(
        [
            "# HELP h2o_vllm:requests_total requests",
            'h2o_vllm:requests_total{policy="h2o"} 3.0',
            'h2o_vllm:requests_total{policy="none"} 15.0',
            "h2o_vllm:evicted_blocks_total 6.0",
            "h2o_vllm:evicted_shared_blocks_total 1.0",
            'h2o_vllm:engine_evicted_blocks_total{engine="0"} 6.0',
        ]
    )
    assert helm.parse_h2o_counters(text) == {"requests_h2o": 3.0, "requests_none": 15.0, "evicted_blocks": 6.0}


def stat(name, split, mean, count=1, **extra):
    return {"name": {"name": name, "split": split, **extra}, "count": count, "mean": mean, "sum": mean}


def write_run(suite, name, deployment, groups, stats):
    run_dir = suite / name.replace("/", "_")
    run_dir.mkdir(parents=True)
    spec = {"name": name, "adapter_spec": {"model": deployment, "model_deployment": deployment}, "groups": groups}
    (run_dir / "run_spec.json").write_text(json.dumps(spec))
    (run_dir / "stats.json").write_text(json.dumps(stats))
    return run_dir


@pytest.fixture
def suite(helm, tmp_path):
    suite = tmp_path / "runs" / "s"
    full = helm.model_name("full", "completions")
    h2o = helm.model_name("h2o-0.2", "chat")
    robustness = {"name": "robustness", "robustness": True, "fairness": False, "computed_on": "worst"}
    write_run(
        suite,
        f"synthetic_reasoning:mode=pattern_match,model={full}",
        full,
        ["synthetic_reasoning", "synthetic_reasoning_pattern_match"],
        [
            stat("num_instances", "test", 1.0),
            stat("num_instances", "valid", 2.0),
            stat("exact_match", "test", 0.0),
            stat("exact_match", "valid", 0.5),
            stat("exact_match", "test", 1.0, perturbation=robustness),  # not shown
            stat("num_output_tokens", "test", 50.0),
            stat("logprob", "test", -3.0),  # not an accuracy metric
            stat("ece_10_bin", "test", None, count=0),
        ],
    )
    write_run(
        suite,
        f"dyck_language_np=3:model={h2o}",
        h2o,
        ["dyck_language"],
        [stat("num_instances", "test", 3.0), stat("exact_match_indicator", "test", 1 / 3)],
    )
    (suite / "groups").mkdir()
    (suite / "groups" / "dyck_language.json").write_text("[]")
    (suite / "eval_cache").mkdir()
    return suite


def test_runs_collected_from_helm_output(helm, suite):
    runs = helm.collect_runs(suite, helm.read_deployments(helm.PROD_ENV))
    assert [(r["scenario"], r["served"], r["api"]) for r in runs] == [
        ("dyck_language_np=3", "smollm2-135m@h2o-0.2", "chat"),
        ("synthetic_reasoning:mode=pattern_match", "smollm2-135m@full", "completions"),
    ]
    assert runs[0]["metrics"] == {"test": {"n": 3.0, "exact_match_indicator": 1 / 3}}
    assert runs[1]["metrics"] == {
        "test": {"n": 1.0, "exact_match": 0.0, "num_output_tokens": 50.0},
        "valid": {"n": 2.0, "exact_match": 0.5},
    }


def test_tables_and_copied_group_tables(helm, suite, tmp_path):
    runs = helm.collect_runs(suite, helm.read_deployments(helm.PROD_ENV))
    runs[0].update({"returncode": 0, "server": {"evicted_blocks": 13.0, "requests_h2o": 3.0}})
    runs[1].update({"returncode": 2, "server": {"requests_none": 3.0}})
    tables = helm.metrics_tables(runs)
    assert tables.splitlines()[:5] == [
        "### dyck_language_np=3",
        "",
        "| model (served as) | API | split | n | exact_match_indicator |",
        "| --- | --- | --- | ---: | ---: |",
        "| `smollm2-135m@h2o-0.2` | chat | test | 3 | 0.333 |",
    ]
    assert "| `smollm2-135m@full` | completions | test | 1 | 0.000 | 50.000 |" in tables
    assert "| `smollm2-135m@full` | completions | valid | 2 | 0.500 |  |" in tables
    server = helm.server_table(runs)
    assert "| dyck_language_np=3 | `smollm2-135m@h2o-0.2` | chat | ok | h2o 3 | 13 |" in server
    assert (
        "| synthetic_reasoning:mode=pattern_match | `smollm2-135m@full` | completions | exit 2 | none 3 | 0 |" in server
    )
    out = tmp_path / "out"
    assert helm.copy_group_tables(suite, runs, out) == ["summarize/dyck_language.json"]
    assert [p.name for p in (out / "summarize").iterdir()] == ["dyck_language.json"]
