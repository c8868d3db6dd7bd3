"""`evaluate(cfg)`: score a checkpoint on the test (or val) split.

The model and data configs come from the checkpoint itself, so
`python eval.py ckpt_path=...` needs nothing else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.errors import CheckpointError

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from trainer.checkpoint.io import load_checkpoint, load_model_state
    from trainer.config.checks import (
        check_model_fits_data,
        check_task_fits,
        is_image_data,
        validate_eval_config,
    )
    from trainer.finetune.export import build_model
    from trainer.loop.evaluation import evaluate_model
    from trainer.runtime import autocast_context

    device = validate_eval_config(cfg)
    state = load_checkpoint(cfg.ckpt_path, device)
    saved = state.get("config")
    if not saved or "model" not in saved or "data" not in saved:
        raise CheckpointError(f"{cfg.ckpt_path} does not record the config it was trained with")
    saved = OmegaConf.create(saved)
    data_cfg = cfg.data if cfg.data is not None else saved.data
    model = build_model(OmegaConf.to_container(saved)).to(device)  # with LoRA adapters, if any
    load_model_state(model, state["model"], str(cfg.ckpt_path))
    loss_fn = instantiate(saved.loss, _convert_="all") if saved.get("loss") else None
    # Checkpoints of the image-only trainer name no task: they were classification.
    task_cfg = saved.get("task") or {"_target_": "trainer.tasks.classification.ClassificationTask"}
    task = instantiate(task_cfg, loss=loss_fn, _convert_="all")
    if is_image_data(data_cfg):
        check_model_fits_data(model, task.loss, data_cfg, device)
    data = instantiate(data_cfg, _convert_="all")
    data.setup(device)
    if cfg.split == "test" and not getattr(data, "has_test", True):
        raise CheckpointError(f"{type(data).__name__} has no test split; use split=val")
    task.setup(model, device, getattr(data, "tokenizer", None))
    batches = data.batches(cfg.split, limit_batches=cfg.trainer.get(f"limit_{cfg.split}_batches"))
    check_task_fits(task, model, batches, device)
    autocast = autocast_context(str(cfg.trainer.precision), device)
    metrics = evaluate_model(model, batches, task, cfg.split, autocast)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "metrics": metrics}
    (output_dir / "eval_results.json").write_text(json.dumps(record, indent=2) + "\n")
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    log.info("evaluated %s: %s", cfg.ckpt_path, json.dumps(metrics))
    return metrics
