"""Loggers for the `logger` config group.

TensorBoard is imported on first use: the import costs ~0.5 s that would
otherwise sit between the command and the first training step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path, subdir: str = "tensorboard") -> None:
        self.log_dir = Path(log_dir) / subdir
        self.purge_step: int | None = None
        self._writer = None
        self._pending_text: list[tuple[str, str, int]] = []

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
            for tag, text, step in self._pending_text:
                self._writer.add_text(tag, text, step)
            self._pending_text.clear()
        return self._writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Markdown code block keeps the YAML indentation in TensorBoard's text tab.
        # Held until the writer exists, so logging text never delays the first step.
        block = "```\n" + text + "\n```"
        if self._writer is None:
            self._pending_text.append((tag, block, step))
        else:
            self._writer.add_text(tag, block, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write the HParams entry into this run's own event file.

        SummaryWriter.add_hparams would open a second run folder per call,
        which splits a sweep job's scalars from its HParams row. The metric
        values shown are the last points of the scalar tags named in `metrics`.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
        }
        experiment, start, end = hparams_summary(clean, metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._pending_text:
            self.writer  # noqa: B018 - creating the writer flushes the pending text
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._pending_text: list[tuple[str, str, int]] = []
