"""A real TensorBoard server on loopback, read through the HTTP data API its web page uses.

`served(logdir_args)` starts `tensorboard <args> --port <free port> --host 127.0.0.1`,
waits (bounded) until it answers, yields a client, and stops the server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 120.0


def tensorboard_command() -> list[str]:
    """The `tensorboard` script installed beside this Python, else the module it runs."""
    beside = Path(sys.executable).parent / "tensorboard"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("tensorboard")
    return [found] if found else [sys.executable, "-m", "tensorboard.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoardClient:
    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        self.url, self.proc = url, proc

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def wait_for(self, what: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Poll until `what()` is truthy: the server loads event files after it answers."""
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def runs(self) -> list[str]:
        return self.get("/data/runs")

    def scalars(self, run: str, tag: str) -> list[tuple[float, int, float]]:
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        return [tuple(p) for p in self.get(f"/data/plugin/scalars/scalars?{query}")]

    def scalar_tags(self) -> dict[str, list[str]]:
        return {run: sorted(tags) for run, tags in self.get("/data/plugin/scalars/tags").items()}

    def text(self, run: str, tag: str) -> str:
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        return self.get(f"/data/plugin/text/text?{query}")[0]["text"]

    def hparams_sessions(self) -> list[dict[str, Any]]:
        """The HParams dashboard's table: one entry per session, with its hparams and
        metric values."""
        experiment = self.post("/data/plugin/hparams/experiment", {"experimentName": ""})
        col_params = [
            {"hparam": h["name"], "includeInResult": True}
            for h in experiment.get("hparamInfos", [])
        ] + [
            {"metric": m["name"], "includeInResult": True}
            for m in experiment.get("metricInfos", [])
        ]
        body = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE"],
            "colParams": col_params,
            "startIndex": 0,
            "sliceSize": 100,
        }
        groups = self.post("/data/plugin/hparams/session_groups", body)
        return groups.get("sessionGroups", [])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/data/runs", timeout=5):
            return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@contextmanager
def served(args: list[str], cwd: Path | None = None) -> Iterator[TensorBoardClient]:
    """Run `tensorboard <args>` on a free loopback port until the block ends."""
    port = free_port()
    command = [*tensorboard_command(), *args, "--port", str(port), "--host", "127.0.0.1"]
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if proc.poll() is not None:
                raise AssertionError(f"{' '.join(command)} exited: {proc.stdout.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{' '.join(command)} did not answer in {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield TensorBoardClient(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        proc.stdout.close()
