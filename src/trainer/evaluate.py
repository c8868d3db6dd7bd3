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
    import torch

    from trainer.checkpoint import load_checkpoint, load_model_state
    from trainer.evaluation import AUTOCAST_DTYPES, evaluate_model
    from trainer.finetune.export import build_model
    from trainer.validation import check_model_fits_data, validate_eval_config

    device = validate_eval_config(cfg)
    precision = str(cfg.trainer.precision)
    state = load_checkpoint(cfg.ckpt_path, device)
    saved = state.get("config")
    if not saved or "model" not in saved or "data" not in saved:
        raise CheckpointError(f"{cfg.ckpt_path} does not record the config it was trained with")
    saved = OmegaConf.create(saved)
    data_cfg = cfg.data if cfg.data is not None else saved.data
    model = build_model(OmegaConf.to_container(saved)).to(device)  # with LoRA adapters, if any
    load_model_state(model, state["model"], str(cfg.ckpt_path))
    loss_fn = instantiate(saved.loss, _convert_="all")
    check_model_fits_data(model, loss_fn, data_cfg, device)
    data = instantiate(data_cfg, _convert_="all")
    data.setup(device)
    dtype = AUTOCAST_DTYPES[precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else None
    metrics = evaluate_model(
        model,
        data.batches(cfg.split, limit_batches=cfg.trainer.get(f"limit_{cfg.split}_batches")),
        loss_fn,
        cfg.split,
        **({"autocast": autocast} if autocast else {}),
    )
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "metrics": metrics}
    (output_dir / "eval_results.json").write_text(json.dumps(record, indent=2) + "\n")
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    log.info("evaluated %s: %s", cfg.ckpt_path, json.dumps(metrics))
    return metrics
