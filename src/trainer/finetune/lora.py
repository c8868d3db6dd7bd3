"""LoRA through `peft`: one implementation for language models and image models.

`apply_lora` injects peft's LoRA layers in place (`inject_adapter_in_model`),
so the model stays the user's own class: the Trainer, checkpoints, DDP and
`model(input_ids)` see the same module, and its state dict holds the frozen
weights (`<layer>.base_layer.weight`) and the adapters
(`<layer>.lora_A.default.weight`, `<layer>.lora_B.default.weight`) together,
which is what exact resume needs. peft's defaults are the LoRA paper's: A like
a fresh layer, B zero, so the adapted model starts as the pre-trained one;
the update is scaled by alpha / rank and dropout applies to the adapter's input.

Targets are glob patterns over module names (`features.*`, `head.2`) or, as in
peft and TRL, bare layer names that match at the end of a module name
(`q_proj` matches `model.layers.0.self_attn.q_proj`). Linear and Conv2d
layers can be adapted. peft needs the `lm` extra.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from trainer.errors import ConfigError
from trainer.patterns import matches

ADAPTER = "default"  # peft's adapter name; one adapter per model here
ADAPTABLE = (nn.Linear, nn.Conv2d)
_GLOB = re.compile(r"[*?\[]")


def target_matches(name: str, target: str) -> bool:
    """A glob over the full module name, or peft's rule: the name or its dotted suffix."""
    return matches(name, target) or name.endswith("." + target)


def apply_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float
) -> list[str]:
    """Add adapters to every Linear/Conv2d matching `targets`; returns their names.

    Which params train is otherwise unchanged: the adapted layers' own weights
    freeze, every other param keeps its requires_grad (a new head still trains)."""
    peft = _import_peft()
    if rank < 1:
        raise ConfigError(f"finetune.lora.rank={rank} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"finetune.lora.dropout={dropout} must be in [0, 1)")
    # Exact types: subclasses such as MultiheadAttention's out_proj are read as raw
    # weights by their parent, so an adapter there would silently do nothing.
    adaptable = {
        name: module for name, module in model.named_modules() if name and type(module) in ADAPTABLE
    }
    for target in targets:
        if not any(target_matches(name, target) for name in adaptable):
            raise ConfigError(_no_match(target, list(adaptable)))
    chosen = [name for name in adaptable if any(target_matches(name, t) for t in targets)]
    for name in chosen:
        _check_adaptable(name, adaptable[name])
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=_peft_targets(model, list(targets), chosen),
        bias="none",
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    # peft freezes every non-adapter param; only the adapted layers' own should be.
    base = {id(p) for layer in _lora_layers(model) for p in layer.get_base_layer().parameters()}
    for param in model.parameters():
        if id(param) in trainable and id(param) not in base:
            param.requires_grad_(trainable[id(param)])
    return chosen


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for layer in _lora_layers(model)
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())
    ]


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in _lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The pre-trained model without its adapters (e.g. DPO's frozen reference), no copy."""
    layers = list(_lora_layers(model))
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and put the plain layer back (for export)."""
    names = [name for name, module in model.named_modules() if _is_lora_layer(module)]
    for name in names:
        layer = model.get_submodule(name)
        layer.merge()
        _replace(model, name, layer.get_base_layer())
    return model


def save_adapter(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """The adapters in peft's own format: `PeftModel.from_pretrained(base, folder)` loads them."""
    from safetensors.torch import save_file

    layers = [(name, m) for name, m in model.named_modules() if _is_lora_layer(m)]
    if not layers:
        raise ConfigError("the model has no LoRA adapters to save; set finetune.lora.targets")
    # The config peft stored on the model when it injected the adapters.
    config = copy.copy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    if hasattr(model, "generate"):
        config.task_type = "CAUSAL_LM"
    tensors = {}
    for name, layer in layers:
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[ADAPTER].weight
            # PeftModel's names: base_model.model.<module>.lora_A.weight (no adapter name).
            tensors[f"base_model.model.{name}.{part}.weight"] = weight.detach().cpu().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return folder


def _lora_layers(model: nn.Module) -> Iterator[Any]:
    return (m for m in model.modules() if _is_lora_layer(m))


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _peft_targets(model: nn.Module, targets: list[str], chosen: list[str]) -> list[str] | str:
    """peft's own form where it selects exactly `chosen` (readable adapter configs:
    ["q_proj", "v_proj"]), else a regex of the names that peft matches in full."""
    if not any(_GLOB.search(t) for t in targets):
        by_peft = [
            name
            for name, _ in model.named_modules()
            if name and any(name == t or name.endswith("." + t) for t in targets)
        ]
        if by_peft == chosen:
            return targets
    return "|".join(re.escape(name) for name in chosen)


def _check_adaptable(name: str, module: nn.Module) -> None:
    # peft's conv adapter A copies kernel, stride and padding but not groups, dilation
    # or the padding mode: it would compute another function (or fail) on such convs.
    if isinstance(module, nn.Conv2d) and (
        module.groups != 1 or module.padding_mode != "zeros" or module.dilation != (1, 1)
    ):
        raise ConfigError(
            f"finetune.lora.targets: {name} is a grouped, dilated or non-zero-padded Conv2d, "
            "which LoRA does not support; leave it out of the targets"
        )


def _no_match(target: str, names: list[str]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    if len(leaves) < len(names):  # repeated blocks (transformers): show the layer names
        shown = ", ".join(leaves)
    else:
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return (
        f"finetune.lora.targets entry {target!r} matches no Linear or Conv2d layer; "
        f"the model's are: {shown or 'none'}"
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            'finetune.lora needs peft, part of the language-model extra; run pip install -e ".[lm]"'
        ) from None
    return peft
