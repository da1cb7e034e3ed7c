"""Determinism and load: the smoke pipeline run serially, with --cores 2 and with --cores 8.

Three fresh copies of the repository (one session snapshot, see smoke_utils), each after
``snakemake all``:

* ``serial``  — ``--cores 1``: one job at a time;
* ``cores2``  — ``--cores 2`` (shared with test_integration.py);
* ``cores8``  — ``--cores 8``: more cores than this DAG can use at once (3 datasets, then 3 inference
  runs + circuit discovery = 8 threads), so Snakemake starts every job as soon as its inputs exist.

Snakemake gives a job ``min(threads, --cores)`` threads; a job's torch threads are its rule's
``threads`` whatever ``--cores`` allows (``mechrepro.workflow.stage.torch_threads``), so every job
adds its sums (gradients, means) in the same order in all three runs. All three runs are equal byte
for byte: every artifact, sidecar, figure PNG and CSV and ``dvc.lock``; executed notebooks are
compared without papermill's timestamps, random cell ids and the run directory's path, JSON
artifacts without wall-clock ``timings``. Nothing is compared with a tolerance.
"""

from __future__ import annotations

import re
import sys

import pytest
from smoke_utils import RUN_OUTPUT, compare_runs, output_files, run, shared_run

from mechrepro.studies import study

RESULTS = study("ioi_generalization").results

pytestmark = pytest.mark.integration


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
    diffs, how = compare_runs(serial, work)
    assert not diffs, "\n".join(diffs)
    # byte for byte, except the executed notebooks' execution metadata and the JSON timings
    assert all(rel.startswith("results/notebooks/") or "JSON" in kind or "without the hashes" in kind
               for rel, kind in how.items()), how
    notebooks = [rel for rel in output_files(serial) if rel.startswith("results/notebooks/")]
    assert len(notebooks) >= 20 and f"{RESULTS}/circuit_scores.csv" in output_files(serial)


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
