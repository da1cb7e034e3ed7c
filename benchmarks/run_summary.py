"""Summarise a workflow run's timings and memory per study and per rule.

Every rule writes Snakemake's benchmark file ``results/benchmarks/<study>/<rule>/….tsv`` (wall
seconds, ``max_rss`` in MB, CPU seconds; ``<study>`` is ``shared`` for the model and the scorecard).
This script reads the newest line of each and prints, per study, the number of jobs, the summed job
wall and CPU times and the largest peak memory, then every rule.
Jobs run side by side with ``--cores 2``, so summed job times exceed the run's wall time.

Usage: python benchmarks/run_summary.py [results/benchmarks] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # "-" or "NA" when a job was too short to sample
        return 0.0


def read(root: Path) -> list[dict]:
    """One row per job: rule, job (the file's path under ``root``), study, wall s, CPU s, max_rss MB.

    The study and the rule are the first two parts of the file's path under ``root``."""
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        with path.open() as fh:
            records = list(csv.DictReader(fh, delimiter="\t"))
        if not records:
            continue
        last = records[-1]
        job = path.relative_to(root).as_posix()[:-4]
        study, rule = (job.split("/") + [""])[:2]
        rows.append({"rule": rule, "job": job, "study": study, "wall_s": _number(last["s"]),
                     "cpu_s": _number(last.get("cpu_time", "0")), "max_rss_mb": _number(last["max_rss"])})
    return rows


def summarise(rows: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r[key], {"jobs": 0, "wall_s": 0.0, "cpu_s": 0.0, "max_rss_mb": 0.0, "peak_rule": ""})
        s["jobs"] += 1
        s["wall_s"] += r["wall_s"]
        s["cpu_s"] += r["cpu_s"]
        if r["max_rss_mb"] > s["max_rss_mb"]:
            s["max_rss_mb"], s["peak_rule"] = r["max_rss_mb"], r["rule"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=ROOT / "results" / "benchmarks")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    rows = read(args.root)
    if not rows:
        print(f"no benchmark files under {args.root}: run 'snakemake all' first", file=sys.stderr)
        return 1
    studies, rules = summarise(rows, "study"), summarise(rows, "rule")
    print(f"{'study':<20}{'jobs':>5}{'summed wall min':>17}{'summed CPU min':>16}{'peak MB':>9}  peak rule")
    for name, s in sorted(studies.items()):
        print(f"{name:<20}{s['jobs']:>5}{s['wall_s'] / 60:>17.1f}{s['cpu_s'] / 60:>16.1f}{s['max_rss_mb']:>9.0f}  "
              f"{s['peak_rule']}")
    print(f"\n{'rule':<24}{'jobs':>5}{'wall s':>9}{'CPU s':>9}{'peak MB':>9}")
    for name, s in sorted(rules.items(), key=lambda kv: -kv[1]["wall_s"]):
        print(f"{name:<24}{s['jobs']:>5}{s['wall_s']:>9.1f}{s['cpu_s']:>9.1f}{s['max_rss_mb']:>9.0f}")
    if args.json:
        args.json.write_text(json.dumps({"studies": studies, "rules": rules}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
