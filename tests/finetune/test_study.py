"""scripts/finetune_study.py runs all stages and prints the comparison table."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, require_data, run_cli


@pytest.mark.slow
def test_study_script_runs_every_method_on_a_tiny_budget(tmp_path: Path) -> None:
    require_data()
    done = run_cli(
        [
            str(REPO / "scripts" / "finetune_study.py"),
            f"--out={tmp_path}",
            "--pretrain-batches=8",
            "--batches=8",
            "--val-batches=1",
            "trainer.limit_test_batches=1",
            "data.batch_size=32",
            "data.eval_batch_size=500",
            "model.channels=[4,8]",
            "model.hidden_size=16",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    table = {row.split("|")[1].strip(): row.split("|")[2:5] for row in rows[1:]}
    assert list(table) == ["frozen backbone", "LoRA", "full fine-tune", "from scratch"]
    params = {name: int(cells[1].strip().replace(",", "")) for name, cells in table.items()}
    assert params["LoRA"] < params["frozen backbone"] < params["full fine-tune"]
    assert params["full fine-tune"] == params["from scratch"]
    for cells in table.values():
        assert 0.0 <= float(cells[0]) <= 1.0 and float(cells[2]) > 0
    assert "Fashion-MNIST, 8 steps each" in done.stdout
