"""Determinism and load: the smoke pipeline run serially and with --cores 2.

Two fresh copies of the repository (one session snapshot, see smoke_utils), each after
``snakemake all``:

* ``serial``  — ``--cores 1``: one job at a time, and SIGKILLed at three points on the way
  (``smoke_utils.killed_serial_run``; the kills are checked in test_faults.py);
* ``cores2``  — ``--cores 2``: two jobs at a time (shared with test_integration.py).

Snakemake gives a job ``min(threads, --cores)`` threads; a job's torch threads are its rule's
``threads`` whatever ``--cores`` allows (``mechrepro.workflow.stage.torch_threads``), so every job
adds its sums (gradients, means) in the same order in both runs. The two runs are equal byte for
byte: every artifact, sidecar, figure PNG and CSV and ``dvc.lock``; executed notebooks are compared
without papermill's timestamps, random cell ids and the run directory's path, JSON artifacts
without wall-clock ``timings``. Nothing is compared with a tolerance. (A third run, ``--cores 8``,
was dropped to keep ``make test`` within its time budget: it cost 7 minutes, and a job's threads
do not depend on ``--cores`` in any run.)
"""

from __future__ import annotations

import re
import sys

import pytest
from smoke_utils import RUN_OUTPUT, compare_runs, output_files, run

from mechrepro.studies import study

RESULTS = study("ioi_generalization").results

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def serial(smoke_serial):
    return smoke_serial


@pytest.fixture(scope="module")
def cores2(smoke):
    return smoke


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


def test_sidecars_have_no_absolute_paths(cores2):
    for rel, path in output_files(cores2).items():
        if rel.endswith(".prov.json"):
            text = path.read_text()
            assert str(cores2) not in text and '"/' not in text, rel


@pytest.mark.robustness
def test_parallel_run_equals_the_serial_run(cores2, serial):
    """Two fresh directories, one and two jobs at a time: byte for byte the same results."""
    assert max_concurrent_jobs(RUN_OUTPUT["cores2"]) >= 2
    assert max_concurrent_jobs(RUN_OUTPUT["serial"]) == 1
    diffs, how = compare_runs(serial, cores2)
    assert not diffs, "\n".join(diffs)
    # byte for byte, except the executed notebooks' execution metadata and the JSON timings
    assert all(rel.startswith("results/notebooks/") or "JSON" in kind or "without the hashes" in kind
               for rel, kind in how.items()), how
    files = output_files(cores2)
    notebooks = [rel for rel in files if rel.startswith("results/notebooks/")]
    assert len(files) > 100 and len(notebooks) >= 20 and f"{RESULTS}/circuit_scores.csv" in files


@pytest.mark.robustness
def test_parallel_run_lost_or_clobbered_nothing(cores2, serial):
    """Every output exists, every sidecar matches its file and every consumer's record of its inputs
    (the audit), each job wrote its own log, and no temporary file is left."""
    work = cores2
    assert set(output_files(work)) == set(output_files(serial))
    assert not [f for f in output_files(work) if "/." in f], "temporary files left behind"
    done = run([sys.executable, "-m", "mechrepro", "audit", "results", "figures", "resources"], work)
    assert "audit OK" in done.stdout
    logs = sorted(p.relative_to(work).as_posix() for p in (work / "logs").rglob("*.log"))
    assert len(logs) == len([b for b in (work / "results" / "benchmarks").rglob("*.tsv")]) >= 22
    for log in (work / "logs" / "ioi_generalization" / "ioi_inference").glob("*.log"):
        assert log.stem in log.read_text()  # the variant's own log, not another job's
