"""`python train.py -m hparams_search=lm_optuna ...` on a tiny llama's SFT: trials report
val/loss after every epoch, the pruner stops the hopeless one, the report is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.chat.runs import tiny_run
from tests.conftest import REPO, run_cli
from tests.sweep_helpers import job_folders, report, results


@pytest.mark.slow
def test_a_pruned_optuna_sweep_of_the_learning_rate(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path
) -> None:
    optuna = pytest.importorskip("optuna")
    # The random model starts as a uniform guess, at val/loss ln(vocab): lr 1e-9 stays
    # there and is pruned after epoch 1; lr 0.05 gets below it (5.90 vs 5.95) and finishes.
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    sweep_dir = tmp_path / "sweep"
    args = tiny_run(
        tiny_llama_dir, chatterbot_dir, None, "task=language_modeling", "data=chatterbot_sft",
        "hparams_search=lm_optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
        "optimizer.lr=choice(1e-9,0.05)", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials", "hydra.sweeper.pruner.n_warmup_steps=0",
        f"+hydra.sweeper.pruner.upper={math.log(vocab) - 0.01}",
        "trainer.max_epochs=2", "trainer.limit_train_batches=3", f"hydra.sweep.dir={sweep_dir}",
        lora_lm=True,
    )  # fmt: skip
    args = [a for a in args[1:] if a != "optimizer.lr=0.01"]  # the sweep's choice instead
    proc = run_cli([str(REPO / "train.py"), "-m", *args], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="lm_optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")
    trials = {t.number: t for t in study.trials}
    folders = job_folders(sweep_dir)
    assert sorted(trials) == [0, 1] and len(folders) == 2
    for folder in folders:
        job = results(folder)
        trial = trials[job["job_num"]]
        assert sorted(trial.intermediate_values) == list(range(1, job["epochs"] + 1))
        assert trial.intermediate_values[job["epochs"]] == job["last_val"]["val/loss"]
        if trial.params["optimizer.lr"] < 1e-6:
            assert trial.state == optuna.trial.TrialState.PRUNED and job["status"] == "pruned"
            assert job["epochs"] == 1
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and job["epochs"] == 2
            assert trial.value == job["metrics"]["val/loss"]
    _, rows = report(sweep_dir)
    assert sorted(r["status"] for r in rows) == ["completed", "pruned"]
    assert (sweep_dir / "sweep_report.md").is_file()
