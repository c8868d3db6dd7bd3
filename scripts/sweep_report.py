"""Summarize a sweep: `python scripts/sweep_report.py multirun/<date>/<time>` (docs/sweeps.md)."""

from trainer.sweep.report import main

if __name__ == "__main__":
    main()
