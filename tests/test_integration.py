"""Integration: the whole Snakemake pipeline on config/smoke.yaml in a fresh copy of the repository.

Checks that every figure and the metrics file exist and are well-formed, that `dvc repro` then
has nothing to do, that `dvc.yaml` matches the DAG, and that a parameter change reruns only the
rules that depend on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from smoke_utils import BIN, RUN_OUTPUT
from smoke_utils import run as _run

from mechrepro.studies import study

A = study("ioi_generalization")
RESULTS, FIGURES = A.results, A.figures_dir

pytestmark = pytest.mark.integration


def test_run_is_recorded_in_dvc(smoke):
    """The successful run recorded its artifacts' hashes in dvc.lock (the onsuccess hook)."""
    assert "dvc.lock updated" in RUN_OUTPUT["cores2"]


def test_figures_and_metrics_exist(smoke):
    metrics = json.loads((smoke / RESULTS / "metrics.json").read_text())
    assert metrics["model"] == "tiny-gpt2" and metrics["n_prompts"] == 16
    assert set(metrics["variants"]) == {"base", "double_io", "triple_io"}
    for row in metrics["variants"].values():
        for key in ("model_ld", "circuit_ld", "faithfulness", "accuracy"):
            assert isinstance(row[key], float)
        assert row["n"] == 16
    assert isinstance(metrics["circuit"]["n_heads"], int)
    assert set(metrics["restored"]["double_io"]) == {"s2_only", "io2_only", "s2_io2", "all"}
    assert set(metrics["restored"]["triple_io"]) == {"s2_only", "io2_only", "io3_only", "s2_io2", "s2_io2_io3", "all"}
    for fig in A.figure_names({"ioi": {"variants": ["base", "double_io", "triple_io"]}}):
        png = smoke / FIGURES / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
        assert png.stat().st_size > 5000, fig
        pd.read_csv(smoke / FIGURES / f"{fig}.csv")
    for path in (smoke / RESULTS).rglob("*.json"):
        if not path.name.endswith(".prov.json"):
            prov = json.loads(Path(str(path) + ".prov.json").read_text())
            assert prov["rule"] and prov["code"]["version"] and len(prov["sha256"]) == 64
    assert (smoke / "results" / "scorecard.md").read_text().count("| study_a |") >= 30


def test_second_run_has_nothing_to_do(smoke):
    """After a complete run, recorded in dvc.lock, `snakemake all` plans no job."""
    done = _run([BIN / "snakemake", "all", "--cores", "1", "--dry-run"], smoke)
    out = done.stdout + done.stderr
    assert "Nothing to be done" in out, out[-3000:]

def test_dvc_up_to_date_after_snakemake(smoke):
    _run([sys.executable, "-m", "mechrepro.workflow.dvcgen", "--check", "--root", str(smoke)], smoke)
    status = _run([BIN / "dvc", "status"], smoke)
    assert "up to date" in status.stdout, status.stdout
    before = {p: p.stat().st_mtime_ns for p in (smoke / RESULTS).rglob("*.json")}
    repro = _run([BIN / "dvc", "repro"], smoke)
    assert "didn't change" in repro.stdout or "up to date" in repro.stdout, repro.stdout
    assert "Running stage" not in repro.stdout
    assert before == {p: p.stat().st_mtime_ns for p in (smoke / RESULTS).rglob("*.json")}
    shown = _run([BIN / "dvc", "metrics", "show"], smoke)
    assert "variants.base.model_ld" in shown.stdout


def _planned_jobs(smoke, *config) -> dict[str, int]:
    """``{rule: number of jobs}`` that ``snakemake all`` would run with these config overrides."""
    done = _run([BIN / "snakemake", "all", "--cores", "1", "--dry-run", "--config", *config], smoke)
    lines = done.stdout.splitlines()
    start = lines.index("Job stats:") + 3  # skip the header and the rule line
    jobs = {}
    for line in lines[start:]:
        parts = line.split()
        if not parts or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def _planned_rules(smoke, *config) -> set[str]:
    return set(_planned_jobs(smoke, *config))


def test_parameter_change_reruns_only_dependents(smoke):
    planned = _planned_rules(smoke, "figures={dpi: 61}")
    assert "figure" in planned and all(r == "all" or r == "figure" for r in planned), planned
    # a parameter only one figure draws with reruns only that figure
    assert _planned_jobs(smoke, "figures={n_attention_samples: 7}") == {"figure": 1, "all": 1}
    assert _planned_rules(smoke, "value_paths={n_prompts: 6}") == {"ioi_value_paths", "figure", "all"}
    planned = _planned_rules(smoke, "ioi={n_prompts: 12}")
    assert "prepare_model" not in planned and "scorecard" in planned
    assert {"ioi_dataset", "ioi_inference", "ioi_evaluate", "ioi_metrics", "figure"} <= planned
