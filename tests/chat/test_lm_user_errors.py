"""Bad input to LM fine-tuning, through `python train.py` on a tiny llama: one
`error:` line and exit code 2 each (the cases are LM_CASES of tests/user_error_cases.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.user_error_cases import LM_CASES, LM_RUN, Case, check_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_results(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("lm_errors")
    plain = shutil.copytree(tiny_llama_dir, tmp / "plain_llama")
    (plain / "chat_template.jinja").unlink()
    sft_jsonl = tmp / "sft.jsonl"
    sft_jsonl.write_text(json.dumps({"prompt": "What is AI?", "completion": "A field."}) + "\n")
    values = {"llama": tiny_llama_dir, "plain_llama": plain, "chatterbot": chatterbot_dir}
    values["sft_jsonl"] = sft_jsonl

    def run_case(case: Case) -> subprocess.CompletedProcess:
        args = [*LM_RUN, *case.args, f"hydra.run.dir={tmp / case.id}"]
        for name, value in values.items():
            args = [a.replace(f"{{{name}}}", str(value)) for a in args]
        return run_cli([str(REPO / "train.py"), *args], tmp, env=case.env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.id for c in LM_CASES], pool.map(run_case, LM_CASES), strict=True))


@pytest.mark.parametrize("case", LM_CASES, ids=[c.id for c in LM_CASES])
def test_lm_bad_input_gets_one_clear_line(case: Case, lm_results: dict) -> None:
    check_case(case, lm_results[case.id], {}, {})
