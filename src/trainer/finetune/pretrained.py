"""`init_from`: load pre-trained weights (only the weights) into a freshly built model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint.fits import size_mismatch
from trainer.checkpoint.io import load_checkpoint, unwrapped_state_dict
from trainer.errors import CheckpointError, ConfigError
from trainer.patterns import matches_any

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # kept the model's fresh init
    excluded: list[str] = field(default_factory=list)
    tokenizer: dict | None = None  # a trainer checkpoint's tokenizer state


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a `.safetensors` file or the model weights of a trainer checkpoint,
    and what else that checkpoint says of them (its run `config`, its `tokenizer`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check finetune.init_from")
    if path.suffix != ".safetensors":
        state = load_checkpoint(path)
        return state["model"], {k: state[k] for k in ("config", "tokenizer") if k in state}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu"), {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def parse_key_map(entries: Sequence[str]) -> dict[str, str]:
    """["backbone:features", "model:"] -> {"backbone": "features", "model": ""}."""
    mapping = {}
    for entry in entries:
        old, sep, new = entry.partition(":")
        if not sep or ":" in new:
            raise ConfigError(
                f"finetune.key_map entry {entry!r} must be old_prefix:new_prefix, "
                "e.g. backbone:features (or model: to strip a prefix)"
            )
        mapping[old.strip(".")] = new.strip(".")
    return mapping


def rename_keys(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> dict:
    """Replace the longest matching dotted prefix: {backbone: features} maps
    `backbone.0.weight` to `features.0.weight`; {model: ""} strips `model.`."""
    prefixes = sorted(key_map, key=len, reverse=True)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        for prefix in prefixes:
            if prefix == "" or key == prefix or key.startswith(prefix + "."):
                rest = key[len(prefix) :].lstrip(".")
                target = key_map[prefix]
                new_key = f"{target}.{rest}" if target and rest else target or rest
                break
        if new_key in renamed:
            raise ConfigError(
                f"finetune.key_map maps two keys of the file to {new_key!r}; fix the mapping"
            )
        renamed[new_key] = value
    return renamed


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    strict: bool = True,
    key_map: Sequence[str] = (),
    skip_mismatched: bool = False,
    exclude: Sequence[str] = (),
) -> LoadReport:
    """Copy the file's weights into `model`; what was not loaded is logged and returned."""
    weights, saved = read_weights(path)
    source = rename_keys(unwrapped_state_dict(weights), parse_key_map(key_map))
    own = model.state_dict()
    report = LoadReport(tokenizer=saved.get("tokenizer"))
    to_load = {}
    for key, value in source.items():
        if matches_any(key, exclude):
            report.excluded.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif value.shape != own[key].shape:
            report.mismatched.append(
                f"{key} (file {list(value.shape)} vs model {list(own[key].shape)})"
            )
        else:
            to_load[key] = value
    report.missing = [k for k in own if k not in source]
    report.loaded = list(to_load)
    if report.mismatched and not skip_mismatched:
        why = size_mismatch(saved.get("config"), model)
        if why:
            raise CheckpointError(f"finetune.init_from={path} does not fit this model: {why}")
        raise CheckpointError(
            f"finetune.init_from={path}: shapes differ for {_shown(report.mismatched)}; set "
            "finetune.skip_mismatched=true to keep fresh weights there (e.g. a new head)"
        )
    if strict and (report.missing or report.unexpected):
        parts = [
            f"{label}: {_shown(keys)}"
            for label, keys in (("missing", report.missing), ("unexpected", report.unexpected))
            if keys
        ]
        raise CheckpointError(
            f"finetune.init_from={path} does not fit this model ({'; '.join(parts)}); "
            "rename keys with finetune.key_map or set finetune.strict=false"
        )
    model.load_state_dict(to_load, strict=False)
    log.info("init_from %s: loaded %d of %d tensors", path, len(to_load), len(own))
    if report.mismatched:
        # Skipped tensors keep the init of the freshly built layer: a new head.
        log.warning(
            "re-initialized (shape differs from the file): %s", "; ".join(report.mismatched)
        )
    for label, keys in (
        ("kept fresh (excluded)", report.excluded),
        ("kept fresh (not in the file)", report.missing),
        ("ignored (not in the model)", report.unexpected),
    ):
        if keys:
            log.warning("init_from %s: %s", label, _shown(keys))
    return report


def _shown(keys: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
