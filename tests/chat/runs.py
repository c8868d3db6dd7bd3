"""The tiny chat runs the CLI tests share: a tiny random llama on the ChatterBot
corpus, 64-token examples, a few steps of batch 4; as `train.py` arguments or,
for runs inside the test process, as a composed config."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tests.conftest import compose_config


def tiny_run(
    tiny_llama_dir: Path, chatterbot_dir: Path, out: Path | None, *extra: str, lora_lm: bool = False
) -> list[str]:
    """`lora_lm`: the model as users name it (model=hf_causal_lm finetune=lora_lm);
    otherwise tests.chat.models.causal_lm, which a test may wrap in a PeftModel.
    `out`: the run's folder; None in a sweep, whose jobs get their own."""
    if lora_lm:
        model = ["model=hf_causal_lm", f"model.name_or_path={tiny_llama_dir}", "finetune=lora_lm"]
    else:
        model = ["~model", "+model._target_=tests.chat.models.causal_lm"]
        model.append(f"+model.name_or_path={tiny_llama_dir}")
    return [
        "train.py",
        *model,
        f"data.dataset.cache_dir={chatterbot_dir}",
        "data.val_size=0.03",
        "data.dataset.max_length=64",
        "data.dataset.skip_long_prompts=true",
        "data.batch_size=4",
        "data.eval_batch_size=16",
        "trainer=debug",
        "trainer.limit_train_batches=6",
        "trainer.progress_bar=false",
        "trainer.test_after_fit=false",
        "optimizer.lr=0.01",
        "scheduler=none",
        "logger=none",
        *([f"paths.output_dir={out}", f"hydra.run.dir={out}"] if out else []),
        *extra,
    ]


def tiny_config(args: list[str], out: Path) -> DictConfig:
    """The run of `tiny_run`'s arguments, composed for `trainer.run.train` in this process."""
    overrides = [a for a in args[1:] if not a.startswith(("paths.output_dir=", "hydra."))]
    return compose_config(overrides, out)
