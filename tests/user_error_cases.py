"""The table of bad inputs that tests/test_user_errors.py runs, and the broken data it uses.

Each case is the arguments of one `python train.py ...` (or eval.py) command and
the phrase its one `error:` line must contain. Placeholders: {tmp} is the test's
folder, {file} a plain text file in it, {ckpt} a real checkpoint of a finished run,
{gpt_ckpt} one of a GPT on tiny Shakespeare at block_size 32 (in its interrupted
run folder {gpt_run}), {other_chars} a text of as many distinct characters as tiny
Shakespeare but not the same ones.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.conftest import DATA_DIR

TINY = ["model.hidden_sizes=[16]", "logger=none", "trainer.progress_bar=false"]
FIT_ONE_EPOCH = [
    *TINY,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=1",
    "data.eval_batch_size=2000",
]

# The GPT recipe, cut to 2 steps in case a check does not fire.
LM_TINY = [
    "experiment=shakespeare_char_cpu",
    "logger=none",
    "trainer.progress_bar=false",
    "trainer.max_steps=2",
    "scheduler.warmup_steps=1",
    "data.val_windows=12",
]
GPT_CKPT_RUN = [*LM_TINY, "data.block_size=32"]


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    phrase: str
    script: str = "train.py"
    env: dict[str, str] = field(default_factory=dict)
    # False for cases that cannot point Hydra at the finished run's folder.
    in_run_dir: bool = True
    # Hydra's own flags (--cfg, -m, -cn) go before all overrides.
    flags: list[str] = field(default_factory=list)
    # train.py runs get a tiny MLP on MNIST (TINY) or, with lm=True, the GPT recipe (LM_TINY).
    lm: bool = False


CASES = [
    # Hydra composition: unknown group option, unknown keys, types, override syntax.
    Case(
        "group-option",
        ["model=mlpp"],
        "model=mlpp is not an option; available: cnn, gpt, gpt_moe, hf_causal_lm, mlp,",
    ),
    Case("group-option-data", ["data=cifar"], "data=cifar is not an option; available:"),
    Case("key-typo", ["trainer.max_epoch=3"], "did you mean trainer.max_epochs"),
    Case("key-misplaced", ["lr=0.1"], "unknown config key lr; did you mean optimizer.lr"),
    Case("model-key-typo", ["model.hidden_sizez=[8]"], "did you mean model.hidden_sizes"),
    Case("nested-key-typo", ["trainer.early_stopping.patiense=2"], "early_stopping.patience"),
    Case("wrong-type", ["trainer.max_epochs=abc"], "trainer.max_epochs='abc' has the wrong type"),
    Case("override-syntax", ["trainer.max_epochs=[1"], "cannot parse the override"),
    Case("ambiguous-list", ["data.batch_size=1,2"], "data.batch_size=1,2 is ambiguous"),
    Case("delete-missing-key", ["~trainer.nothing"], "'trainer.nothing' does not exist"),
    Case("no-such-config", [], "there is no config named 'nope'", flags=["-cn", "nope"]),
    Case("cfg-job-typo", ["trainer.max_epoch=3"], "did you mean", flags=["--cfg", "job"]),
    Case("multirun-option", ["model=mlpp,cnn"], "model=mlpp is not an option", flags=["-m"]),
    # Keys the target does not take, and targets that do not exist.
    Case("added-model-kwarg", ["+model.foo=1"], "model.foo is not an argument of"),
    Case("added-trainer-key", ["+trainer.foo=1"], "unknown config key trainer.foo"),
    # `+` bypasses the typed config; a top-level key nothing reads gets a typo's hint.
    Case("added-top-key", ["+max_epoch=3"], "unknown config key max_epoch; did you mean trainer."),
    Case("added-top-key-unlike", ["+foo=1"], "unknown config key foo; the top level has: "),
    Case("eval-added-key", ["ckpt_path={ckpt}", "+splt=val"], "did you mean split?", "eval.py"),
    Case("bad-target", ["model._target_=trainer.models.mlp.Nope"], "cannot be imported"),
    Case("interpolation", ["model.in_shape=${data.shap}"], "cannot resolve an interpolation"),
    # Values, checked before data loads.
    Case("lr-zero", ["optimizer.lr=0"], "optimizer.lr=0 must be > 0"),
    Case("batch-size-zero", ["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    Case("no-length", ["trainer.max_epochs=null"], "set trainer.max_epochs or trainer.max_steps"),
    Case("steps-zero", ["trainer.max_steps=0"], "trainer.max_steps=0 must be >= 1"),
    Case("precision-alias", ["trainer.precision=16-mixed"], "did you mean trainer.precision=fp16"),
    Case(
        "fp16-on-cpu",
        ["trainer.accelerator=cpu", "trainer.precision=fp16"],
        "trainer.precision=fp16 needs a CUDA GPU",
    ),
    Case("accumulate-zero", ["trainer.accumulate_grad_batches=0"], "must be >= 1"),
    Case("clip-negative", ["trainer.gradient_clip_val=-1"], "gradient_clip_val=-1.0 must be > 0"),
    Case("monitor", ["trainer.monitor=val/accuracy"], "not a validation metric"),
    Case("nan-policy", ["trainer.nan_policy=ignore"], "nan_policy='ignore' must be one of"),
    Case("strategy", ["trainer.strategy=fsdpp"], "did you mean fsdp?"),
    Case(
        "monitor-of-other-task",
        ["trainer.monitor=val/ppl"],
        "not a validation metric of the task; choose one of val/loss, val/acc",
    ),
    Case(
        "stopping-without-val",
        ["data.val_size=0", "trainer.early_stopping.patience=2"],
        "need validation, but data.val_size=0",
    ),
    Case(
        "optimized-metric",
        ["optimized_metric=test/acc", "trainer.test_after_fit=false"],
        "optimized_metric='test/acc' is not a result of this run",
    ),
    Case("accelerator-name", ["trainer.accelerator=tpu"], "trainer.accelerator='tpu' is not one"),
    Case("devices-zero", ["trainer.devices=0"], "trainer.devices=0 must be >= 1"),
    Case("data-name", ["data.name=MNSIT"], "did you mean MNIST"),
    Case("optimizer-range", ["optimizer.betas=[1.5,0.9]"], "Invalid beta parameter"),
    # Model/data mismatch, caught by a dry forward at setup.
    Case("model-input", ["model.in_shape=[1,32,32]"], "model.in_shape=[1, 32, 32]"),
    Case("model-classes", ["model.num_classes=5"], "data.num_classes=10"),
    # Output.
    Case("output-dir", ["paths.output_dir={file}/out"], "is not a writable folder"),
    Case(
        "run-dir",
        ["hydra.run.dir={file}/run"],
        "cannot write the run's output folder",
        in_run_dir=False,
    ),
    # Data, read through the real loader.
    Case("data-missing", ["data.download=false"], "downloading is off", env={"D": "missing"}),
    Case("data-corrupt-gz", ["data.download=false"], "truncated gzip", env={"D": "gz"}),
    Case("data-magic", ["data.download=false"], "bad magic number", env={"D": "magic"}),
    Case("data-truncated", ["data.download=false"], "truncated data", env={"D": "truncated"}),
    Case("data-count", ["data.download=false"], "holds 9999 labels", env={"D": "count"}),
    Case("data-dir-unwritable", ["paths.data_dir={file}/data"], "is not writable"),
    Case("labels-vs-classes", ["data.num_classes=5"], "labels range from 0 to 9", in_run_dir=False),
    Case("val-size", ["data.val_size=60000"], "smaller than the 60000 training images"),
    Case("onecycle-too-short", ["trainer.max_steps=2"], "scheduler=onecycle needs each phase"),
    # Checkpoints.
    Case("ckpt-missing", ["ckpt_path={tmp}/nope.pt"], "does not exist"),
    Case(
        "ckpt-not-a-ckpt",
        ["ckpt_path={file}"],
        "not a file written by torch.save",
        in_run_dir=False,
    ),
    Case(
        "ckpt-truncated", ["ckpt_path={tmp}/truncated.pt"], "truncated or corrupt", in_run_dir=False
    ),
    Case(
        "ckpt-other-model",
        ["ckpt_path={ckpt}", "model.hidden_sizes=[32]"],
        "does not fit this model (shape mismatch: net.",
    ),
    Case("ckpt-newer", ["ckpt_path={tmp}/newer.pt"], "newer than this version's", in_run_dir=False),
    # Evaluation.
    Case("eval-no-ckpt", [], "ckpt_path is required", script="eval.py"),
    Case("eval-split", ["ckpt_path={ckpt}", "split=train"], "must be test or val", "eval.py"),
    Case("eval-not-a-ckpt", ["ckpt_path={file}"], "not a file written by torch.save", "eval.py"),
    Case("eval-newer", ["ckpt_path={tmp}/newer.pt"], "newer than this version's", "eval.py"),
    # Language models: sizes, and checkpoints of another context length or vocabulary.
    Case(
        "gpt-heads",
        ["model.n_embd=30"],
        "model.n_embd=30 must be divisible by model.n_head=4",
        lm=True,
    ),
    Case(
        "moe-top-k",
        ["model=gpt_moe", "model.moe.top_k=5"],
        "model.moe.top_k=5 must be between 1 and model.moe.num_experts=4",
        lm=True,
    ),
    Case(
        "gpt-ckpt-block-size",
        ["ckpt_path={gpt_ckpt}"],
        "trained with model.block_size=32 and this run's model has block_size=64; "
        "set data.block_size=32",
        in_run_dir=False,
        lm=True,
    ),
    Case(
        "gpt-resume-block-size",
        ["hydra.run.dir={gpt_run}", "resume=auto"],
        "trained with model.block_size=32 and this run's model has block_size=64",
        in_run_dir=False,
        lm=True,
    ),
    Case(
        "gpt-init-block-size",
        ["finetune.init_from={gpt_ckpt}"],
        "does not fit this model: it was trained with model.block_size=32",
        in_run_dir=False,
        lm=True,
    ),
    Case(
        "gpt-ckpt-vocab-size",
        ["ckpt_path={gpt_ckpt}", "data.block_size=32", "data.vocab_size=66"],
        "trained with model.vocab_size=65 and this run's model has vocab_size=66",
        in_run_dir=False,
        lm=True,
    ),
    Case(
        "gpt-ckpt-vocab",
        ["ckpt_path={gpt_ckpt}", "data.block_size=32", "data.corpus={other_chars}"],
        "another vocabulary than this data's (65 characters in the checkpoint, 65 in the data; "
        "only in the checkpoint: 'z'; only in the data: '#')",
        in_run_dir=False,
        lm=True,
    ),
    Case(
        "gpt-init-vocab",
        ["finetune.init_from={gpt_ckpt}", "data.block_size=32", "data.corpus={other_chars}"],
        "only in the checkpoint: 'z'; only in the data: '#'",
        in_run_dir=False,
        lm=True,
    ),
]
# Cases that need {gpt_run}, {gpt_ckpt} or {other_chars}: they wait for a GPT run of their own.
LM_FILE_IDS = {
    "gpt-ckpt-block-size", "gpt-resume-block-size", "gpt-init-block-size",
    "gpt-ckpt-vocab-size", "gpt-ckpt-vocab", "gpt-init-vocab",
}  # fmt: skip
# These get past the plain value checks, so they import torch (~2 s of CPU each) and
# some read the dataset; the others fail in well under a second.
SLOW_IDS = {
    "added-model-kwarg", "bad-target", "interpolation", "data-name", "optimizer-range",
    "model-input", "model-classes", "fp16-on-cpu", "data-missing", "data-corrupt-gz",
    "data-magic", "data-truncated", "data-count", "data-dir-unwritable", "labels-vs-classes",
    "val-size", "onecycle-too-short", "ckpt-not-a-ckpt", "ckpt-truncated", "ckpt-other-model",
    "ckpt-newer", "eval-no-ckpt", "eval-split", "eval-not-a-ckpt", "eval-newer",
    "devices-too-many", "no-cuda", "gpt-heads", "moe-top-k", *LM_FILE_IDS,
}  # fmt: skip
if torch.cuda.is_available():
    CASES.append(Case("devices-too-many", ["trainer.devices=999"], "device"))
else:
    CASES.append(Case("no-cuda", ["trainer.accelerator=cuda"], "no CUDA GPU is visible"))


# Fine-tuning a language model (issue 14), run by tests/chat/test_lm_user_errors.py on a
# tiny random llama: {llama} its folder, {plain_llama} a copy without a chat template,
# {chatterbot} the ChatterBot corpus cache, {sft_jsonl} a file of prompt/completion rows.
LM_RUN = [
    "model=hf_causal_lm",
    "task=language_modeling",
    "trainer=debug",
    "trainer.progress_bar=false",
    "logger=none",
]
CHATTERBOT = ["data=chatterbot_sft", "data.dataset.cache_dir={chatterbot}"]
CHAT = [*CHATTERBOT, "model.name_or_path={llama}"]
LM_CASES = [
    Case(
        "lm-model-offline",
        [*CHATTERBOT, "model.name_or_path=nobody/nothing"],
        "model.name_or_path=nobody/nothing could not be loaded; tried a local folder",
        env={"HF_HUB_OFFLINE": "1"},
    ),
    Case(
        "lm-lora-target",
        [*CHAT, "finetune=lora_lm", "finetune.lora.targets=[q_proj,query]"],
        "finetune.lora.targets entry 'query' matches no Linear or Conv2d layer; the model's "
        "are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ),
    Case(
        "lm-prompt-past-max-length",
        [*CHAT, "data.dataset.max_length=8"],
        "max_length is 8, so nothing of the answer is left to train on; raise",
    ),
    Case(
        "lm-max-length-past-context",
        [*CHAT, "data.dataset.max_length=1024"],
        "data.dataset.max_length=1024 is longer than the model's context of 512 tokens",
    ),
    Case(
        "lm-no-chat-template",
        [*CHATTERBOT, "model.name_or_path={plain_llama}"],
        "has no chat template, so it cannot format instruction or preference data",
    ),
    Case("lm-dpo-on-sft-data", [*CHAT, "task=dpo"], "task=dpo needs preference batches"),
    Case(
        "lm-dpo-jsonl-without-pairs",
        [
            "model.name_or_path={llama}",
            "task=dpo",
            "data=jsonl_dpo",
            "data.dataset.path={sft_jsonl}",
        ],
        "missing field 'chosen'",
    ),
]


def check_case(case: Case, done: subprocess.CompletedProcess, after: dict, before: dict) -> None:
    """One `error:` line with the case's phrase, exit code 2, no traceback, and the run
    folder's files (`before`) as they were (`after`)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, done.stderr
    assert case.phrase in error_lines[0]
    assert "Error executing job" not in done.stderr
    for name, content in before.items():
        if name.endswith(".log"):
            # Hydra appends to the log file; what was there stays.
            assert after[name].startswith(content), name
        else:
            assert after[name] == content, f"{name} changed"
    assert not [n for n in set(after) - set(before) if not n.endswith(".log")]


def make_bad_data(root: Path) -> None:
    """MNIST folders with one broken file each; the good files are symlinks."""
    source = DATA_DIR / "MNIST" / "raw"
    labels = gzip.decompress((source / "t10k-labels-idx1-ubyte.gz").read_bytes())
    images = gzip.decompress((source / "t10k-images-idx3-ubyte.gz").read_bytes())
    broken = {
        "missing": ("t10k-labels-idx1-ubyte.gz", None),
        "gz": ("t10k-labels-idx1-ubyte.gz", gzip.compress(labels)[:3000]),
        "magic": ("t10k-labels-idx1-ubyte", b"\x12\x34\x08\x01" + labels[4:]),
        "truncated": ("t10k-images-idx3-ubyte", images[: len(images) // 2]),
        "count": ("t10k-labels-idx1-ubyte", labels[:4] + struct.pack(">I", 9999) + labels[8:-1]),
    }
    for name, (bad_file, content) in broken.items():
        raw = root / name / "MNIST" / "raw"
        raw.mkdir(parents=True)
        stem = bad_file.removesuffix(".gz")
        for good in source.iterdir():
            if good.name.removesuffix(".gz") != stem:
                (raw / good.name).symlink_to(good)
        if content is not None:
            (raw / bad_file).write_bytes(content)


def write_other_characters(path: Path) -> None:
    """Tiny Shakespeare with every 'z' a '#': as many distinct characters, not the same."""
    text = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    assert "#" not in text
    path.write_text(text.replace("z", "#"), encoding="utf-8")
