"""Export a checkpoint's model as `model.safetensors` + `model.yaml`.

LoRA adapters are merged, so the export holds plain weights under the names of
the plain model: `finetune.init_from=<out>/model.safetensors` loads it into a
model built from `model.yaml`.

A Hugging Face model (`model=hf_causal_lm`) exports as a transformers folder
(`save_pretrained`: config, safetensors, tokenizer, chat template), which
`AutoModelForCausalLM.from_pretrained(<out>)` loads and `model.name_or_path=<out>`
trains further; its LoRA adapters are also saved unmerged in peft's format
under `<out>/adapter` (`PeftModel.from_pretrained(base, <out>/adapter)`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from trainer.checkpoint.io import load_checkpoint, load_model_state
from trainer.errors import CheckpointError, UserError
from trainer.finetune.lora import apply_lora, has_lora, merge_lora, save_adapter

log = logging.getLogger(__name__)


def build_model(run_config: dict[str, Any]) -> nn.Module:
    """The model a run trained, LoRA adapters included, from the config it saved."""
    model = instantiate(OmegaConf.create(run_config["model"]), _convert_="all")
    lora = (run_config.get("finetune") or {}).get("lora") or {}
    if lora.get("targets"):
        apply_lora(model, lora["targets"], lora["rank"], lora["alpha"], lora["dropout"])
    return model


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the merged weights and the model config; returns the safetensors path."""
    from safetensors.torch import save_file

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path} does not exist; pass the path of a checkpoint file")
    state = load_checkpoint(ckpt_path)
    run_config = state.get("config")
    if not run_config or "model" not in run_config:
        raise CheckpointError(f"{ckpt_path} does not record the model config it was trained with")
    model = build_model(run_config)
    load_model_state(model, state["model"], str(ckpt_path))
    out_dir = Path(out_dir) if out_dir else ckpt_path.parent / f"{ckpt_path.stem}_export"
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        return _export_pretrained(model.eval(), run_config["model"], ckpt_path, out_dir)
    merge_lora(model.eval())
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model_config = dict(run_config["model"])
    metadata = {
        "format": "pt",
        "model_config": json.dumps(model_config),
        "source": str(ckpt_path),
    }
    weights = out_dir / "model.safetensors"
    _write_atomic(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    header = (
        f"# The model of {ckpt_path}, exported with LoRA merged. Fine-tune from it with\n"
        f"# finetune.init_from={weights} and these model settings\n"
        "# (copy this file to configs/model/ or pass them as model.<key>=... overrides).\n"
    )
    yaml_text = header + OmegaConf.to_yaml(OmegaConf.create(model_config))
    _write_atomic(out_dir / "model.yaml", lambda tmp: Path(tmp).write_text(yaml_text))
    log.info("exported %s (%d tensors) to %s", ckpt_path, len(tensors), out_dir)
    return weights


def _export_pretrained(
    model: nn.Module, model_config: dict[str, Any], ckpt_path: Path, out_dir: Path
) -> Path:
    from trainer.models.hf import load_tokenizer, resolve_pretrained

    source = resolve_pretrained(model_config["name_or_path"], model_config.get("gguf_file"))
    if has_lora(model):
        save_adapter(model, out_dir / "adapter", base_model=source)
    merge_lora(model)
    model.config.use_cache = True  # training turned it off; generation wants it
    model.save_pretrained(out_dir)
    load_tokenizer(source).save_pretrained(out_dir)
    exported = {**model_config, "name_or_path": str(out_dir.resolve()), "gguf_file": None}
    header = (
        f"# The model of {ckpt_path}, exported with LoRA merged. Train or evaluate it with\n"
        "# these model settings (copy this file to configs/model/ or pass model.name_or_path).\n"
    )
    yaml_text = header + OmegaConf.to_yaml(OmegaConf.create(exported))
    _write_atomic(out_dir / "model.yaml", lambda tmp: Path(tmp).write_text(yaml_text))
    log.info("exported %s as a transformers model folder %s", ckpt_path, out_dir)
    return out_dir / "model.safetensors"


def _write_atomic(path: Path, write: Any) -> None:
    # Same folder then rename: an interrupted export never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a trainer checkpoint as model.safetensors + model.yaml "
        "(LoRA adapters merged into plain weights)."
    )
    parser.add_argument("ckpt", help="a checkpoint of this trainer, e.g. .../checkpoints/best.pt")
    parser.add_argument("--out", help="output folder (default: <ckpt folder>/<ckpt name>_export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    try:
        weights = export_checkpoint(args.ckpt, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(weights)


if __name__ == "__main__":
    main()
