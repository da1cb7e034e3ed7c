"""Determinism and load: the smoke pipeline run serially, with --cores 2 and with --cores 8.

Three fresh copies of the repository (one session snapshot, see smoke_utils), each after
``snakemake all``:

* ``serial``  — ``--cores 1``: one job at a time, each job's torch gets 1 thread;
* ``cores2``  — ``--cores 2`` (shared with test_integration.py);
* ``cores8``  — ``--cores 8``: more cores than this DAG can use at once (3 datasets, then 3 inference
  runs + circuit discovery = 8 threads), so Snakemake starts every job as soon as its inputs exist.

Determinism: ``cores2`` and ``cores8`` run every job with the same number of torch threads (a
rule's ``threads`` are at most 2), in two fresh directories; every artifact, sidecar and dvc.lock
entry is byte-identical. Executed notebooks are compared without papermill's timestamps, random
cell ids and the run directory's path; JSON artifacts without wall-clock ``timings``.

Load: ``cores2`` and ``cores8`` give the serial run's artifacts. One difference is allowed and
compared with a tolerance: attribution columns of CSV artifacts (e.g. ``circuit_scores.csv`` and the
figure CSV that copies it), which come from a backward pass. Snakemake gives a job ``min(threads, cores)`` threads, so with ``--cores 1`` discovery's
backward pass (attribution patching) runs on 1 torch thread instead of 2, and float sums are
added in another order: values differ in the 8th significant digit. Every exact patching
effect, the circuit, every metric and every PNG are byte-identical.
"""

from __future__ import annotations

import re
import sys

import pytest
from smoke_utils import RUN_OUTPUT, compare_runs, output_files, run, shared_run

from mechrepro.studies import study

RESULTS = study("ioi_generalization").results

pytestmark = pytest.mark.integration

# Relative tolerance between runs with different torch thread counts (see the module docstring).
THREADS_RTOL = 1e-5


def inexact_columns(a, b, rel: str) -> set[str]:
    """Columns of CSV ``rel`` whose values are not identical in runs ``a`` and ``b``."""
    import pandas as pd

    x, y = pd.read_csv(a / rel), pd.read_csv(b / rel)
    return {c for c in x.columns if not x[c].equals(y[c])}


@pytest.fixture(scope="module")
def serial(smoke_serial):
    return smoke_serial


@pytest.fixture(scope="module")
def cores2(smoke):
    return smoke


@pytest.fixture(scope="module")
def cores8(tmp_path_factory):
    return shared_run(tmp_path_factory, "cores8", "8")


def max_concurrent_jobs(output: str) -> int:
    """Most jobs running at once, from Snakemake's 'Execute N jobs' / 'Finished jobid' lines."""
    running = peak = 0
    for line in output.splitlines():
        m = re.match(r"Execute (\d+) jobs?\.\.\.", line.strip())
        if m:
            running += int(m.group(1))
            peak = max(peak, running)
        elif line.strip().startswith("Finished jobid"):
            running -= 1
    return peak


def test_determinism_two_fresh_directories(cores2, cores8):
    diffs, how = compare_runs(cores2, cores8)
    assert not diffs, "\n".join(diffs)
    # only the executed notebooks and JSON with timings needed more than a byte comparison
    assert all(rel.startswith("results/notebooks/") or "JSON" in kind or "without the hashes" in kind
               for rel, kind in how.items()), how
    files = output_files(cores2)
    assert len(files) > 100
    assert not [f for f in files if "/." in f], "temporary files left behind"


def test_sidecars_have_no_absolute_paths(cores2):
    for rel, path in output_files(cores2).items():
        if rel.endswith(".prov.json"):
            text = path.read_text()
            assert str(cores2) not in text and '"/' not in text, rel


@pytest.mark.parametrize("name", ["cores2", "cores8"])
def test_parallel_runs_equal_the_serial_run(name, serial, request):
    work = request.getfixturevalue(name)
    assert max_concurrent_jobs(RUN_OUTPUT[name]) >= (3 if name == "cores8" else 2)
    assert max_concurrent_jobs(RUN_OUTPUT["serial"]) == 1
    diffs, how = compare_runs(serial, work, rtol=THREADS_RTOL)
    assert not diffs, "\n".join(diffs)
    # only gradient-based (attribution) numbers may differ, e.g. circuit_scores.csv's attribution
    for rel in [rel for rel, kind in how.items() if "CSV" in kind]:
        cols = inexact_columns(serial, work, rel)
        assert all("attribution" in c for c in cols), (rel, cols)
    for rel in (f"{RESULTS}/circuit.json", f"{RESULTS}/metrics.json", "results/scorecard.md"):
        assert (serial / rel).read_bytes() == (work / rel).read_bytes(), rel


@pytest.mark.parametrize("name", ["cores2", "cores8"])
def test_parallel_run_lost_or_clobbered_nothing(name, request, serial):
    """Every output exists, every sidecar matches its file and every consumer's record of its inputs
    (the audit), each job wrote its own log, and no temporary file is left."""
    work = request.getfixturevalue(name)
    assert set(output_files(work)) == set(output_files(serial))
    done = run([sys.executable, "-m", "mechrepro", "audit", "results", "figures", "resources"], work)
    assert "audit OK" in done.stdout
    logs = sorted(p.relative_to(work).as_posix() for p in (work / "logs").rglob("*.log"))
    assert len(logs) == len([b for b in (work / "results" / "benchmarks").rglob("*.tsv")]) >= 22
    for log in (work / "logs" / "ioi_generalization" / "ioi_inference").glob("*.log"):
        assert log.stem in log.read_text()  # the variant's own log, not another job's
