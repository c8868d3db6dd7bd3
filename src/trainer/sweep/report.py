"""One table for a whole sweep: `python scripts/sweep_report.py multirun/<date>/<time>`.

Reads every job folder's `.hydra/overrides.yaml` and `results.json`, sorts the
jobs by the optimized metric, marks failed, pruned and unfinished jobs, prints
the table and writes it as Markdown and CSV next to the jobs. Jobs that differ
only in `seed` are also summarized as mean ± std per config. The best job's
command line is printed, to reproduce it as a single run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SEED_KEY = "seed"
FINISHED = ("completed", "pruned")


@dataclass
class Job:
    """One job folder. Its identity is `name`, the folder's name: the job's sorted
    overrides (`<trial>_<overrides>` for Optuna), the same in every rerun of the sweep;
    `num`, the position in the launch that ran it, can repeat after a reordered rerun."""

    folder: Path
    num: int | None
    overrides: list[str]
    status: str  # completed | pruned | failed | unfinished
    results: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def params(self) -> dict[str, str]:
        return dict(o.lstrip("+~").split("=", 1) for o in self.overrides if "=" in o)

    def metric(self, name: str) -> float | None:
        value = self.results.get("metrics", {}).get(name)
        return None if value is None or math.isnan(value) else float(value)


def read_job(folder: Path) -> Job:
    overrides = [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    results: dict[str, Any] = {}
    if (folder / "results.json").is_file():
        results = json.loads((folder / "results.json").read_text())
    error = ""
    if (folder / "error.txt").is_file():
        error = (folder / "error.txt").read_text().strip().splitlines()[-1]
    status = results.get("status", "completed") if results else "unfinished"
    if error:
        status = "failed"
    num = results.get("job_num")
    if num is None:  # unfinished: no results.json yet
        hydra = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
        num = OmegaConf.select(hydra, "job.num", default=None)
    return Job(folder, num, overrides, status, results, results.get("error", error))


def read_sweep(sweep_dir: Path) -> list[Job]:
    folders = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    jobs = [read_job(folder) for folder in folders]
    return sorted(jobs, key=lambda j: j.name)


def metric_and_mode(jobs: list[Job], metric: str | None, mode: str | None) -> tuple[str, str]:
    """The optimized metric and its direction, from the jobs' configs unless given."""
    config = OmegaConf.load(jobs[0].folder / ".hydra" / "config.yaml")
    metric = metric or config.get("optimized_metric") or config.trainer.monitor
    if mode:
        return metric, mode
    hydra = OmegaConf.load(jobs[0].folder / ".hydra" / "hydra.yaml").hydra
    direction = OmegaConf.select(hydra, "sweeper.direction", default=None)
    if isinstance(direction, str) and direction in ("maximize", "minimize"):
        return metric, "max" if direction == "maximize" else "min"
    if metric == config.trainer.monitor:
        return metric, config.trainer.monitor_mode
    return metric, "min" if "loss" in metric else "max"


def sort_jobs(jobs: list[Job], metric: str, mode: str) -> list[Job]:
    """Completed jobs by the metric, then pruned ones (stopped early: not comparable), then
    failed and unfinished ones."""
    sign = -1.0 if mode == "max" else 1.0
    order = {"completed": 0, "pruned": 1}

    def key(job: Job) -> tuple[int, float, str]:
        value = job.metric(metric)
        if job.status not in order or value is None:
            return (2, 0.0, job.name)
        return (order[job.status], sign * value, job.name)

    return sorted(jobs, key=key)


def varying_keys(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose values differ between jobs, and the ones all jobs share."""
    keys = sorted({k for job in jobs for k in job.params})
    varying = [k for k in keys if len({job.params.get(k) for job in jobs}) > 1]
    common = {k: jobs[0].params[k] for k in keys if k not in varying}
    return varying, common


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def job_rows(jobs: list[Job], keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    rows = []
    for rank, job in enumerate(jobs, 1):
        ranked = job.status == "completed" and job.metric(metrics[0]) is not None
        row: dict[str, Any] = {"rank": rank if ranked else "", "job": job.name}
        row.update({k: job.params.get(k, "") for k in keys})
        row.update({m: job.metric(m) for m in metrics})
        row["epochs"] = job.results.get("epochs")
        row["status"] = job.status
        seconds = job.results.get("wall_time_s")
        row["time_s"] = None if seconds is None else f"{seconds:.1f}"
        rows.append(row)
    return rows


def seed_group_rows(
    jobs: list[Job], keys: list[str], metrics: list[str], mode: str
) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each config (jobs equal in all other overrides)."""
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.params.get(k, "") for k in keys), []).append(job)
    rows = []
    for values, members in groups.items():
        done = [j for j in members if j.status in FINISHED]
        row: dict[str, Any] = dict(zip(keys, values, strict=True))
        row["seeds"] = f"{len(done)}/{len(members)}"
        for name in metrics:
            points = [v for v in (j.metric(name) for j in done) if v is not None]
            row[name] = _mean_std(points)
            row[f"_{name}_mean"] = statistics.fmean(points) if points else None
        rows.append(row)
    sign = -1.0 if mode == "max" else 1.0
    first = f"_{metrics[0]}_mean"
    rows.sort(key=lambda r: (r[first] is None, sign * (r[first] or 0.0)))
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _mean_std(points: list[float]) -> str:
    if not points:
        return ""
    if len(points) == 1:
        return f"{points[0]:.4f}"
    return f"{statistics.fmean(points):.4f} ± {statistics.stdev(points):.4f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def reproduce_command(job: Job) -> str:
    return "python train.py " + " ".join(shlex.quote(o) for o in job.overrides)


def build_report(
    sweep_dir: Path, metric: str | None = None, mode: str | None = None
) -> dict[str, Any]:
    jobs = read_sweep(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job folders (with .hydra/overrides.yaml) in {sweep_dir}")
    metric, mode = metric_and_mode(jobs, metric, mode)
    jobs = sort_jobs(jobs, metric, mode)
    keys, common = varying_keys(jobs)
    names = {m for job in jobs for m in job.results.get("metrics", {})}
    metrics = [metric] + sorted(names - {metric})
    report: dict[str, Any] = {"metric": metric, "mode": mode, "jobs": jobs, "common": common}
    report["rows"] = job_rows(jobs, keys, metrics)
    report["groups"] = []
    if SEED_KEY in keys:
        config_keys = [k for k in keys if k != SEED_KEY]
        groups = seed_group_rows(jobs, config_keys, metrics, mode)
        if len(groups) < len(jobs):
            report["groups"] = groups
    best = jobs[0] if jobs[0].status == "completed" and jobs[0].metric(metric) is not None else None
    report["best"] = best
    return report


def render(report: dict[str, Any], sweep_dir: Path) -> str:
    jobs = report["jobs"]
    counts = {s: sum(j.status == s for j in jobs) for s in ("completed", "pruned", "failed")}
    counts["unfinished"] = len(jobs) - sum(counts.values())
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    arrow = "higher" if report["mode"] == "max" else "lower"
    parts = [
        f"# Sweep report: {sweep_dir}",
        f"{len(jobs)} jobs ({summary}), sorted by {report['metric']} ({arrow} is better).",
    ]
    if report["common"]:
        shared = " ".join(f"{k}={v}" for k, v in report["common"].items())
        parts.append(f"Overrides shared by all jobs: `{shared}`")
    # A job is named by its folder (its overrides): the same in every rerun of the sweep.
    parts.append(markdown_table(report["rows"]))
    if report["groups"]:
        parts += ["## Mean ± std over seeds, per config", markdown_table(report["groups"])]
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        parts.append("## Failed jobs")
        parts.append("\n".join(f"- `{j.name}`: {j.error}" for j in failed))
    best = report["best"]
    if best is not None:
        value = best.metric(report["metric"])
        parts += [
            f"Best: `{best.name}` with {report['metric']} = {value:.4f}; to reproduce it:",
            f"```\n{reproduce_command(best)}\n```",
        ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder: multirun/<date>/<time>")
    parser.add_argument("--metric", help="sort by this metric (default: optimized_metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="default: from the sweep config")
    parser.add_argument(
        "--out", type=Path, help="where sweep_report.md/.csv go (default: the sweep folder)"
    )
    args = parser.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise FileNotFoundError(f"{args.sweep_dir} is not a folder; pass a multirun folder")
        report = build_report(args.sweep_dir, args.metric, args.mode)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    text = render(report, args.sweep_dir)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_report.md").write_text(text)
    write_csv(out / "sweep_report.csv", report["rows"])
    if report["groups"]:
        write_csv(out / "sweep_report_by_config.csv", report["groups"])
    print(text, end="")
    print(f"(written to {out / 'sweep_report.md'} and {out / 'sweep_report.csv'})")


if __name__ == "__main__":
    main()
