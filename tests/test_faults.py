"""Faults survived: crashes inside an atomic write, SIGKILLs of the smoke pipeline, tampering.

* Library level: a write that fails half-way (or at the rename) leaves the old artifact in place;
  a writer SIGKILLed mid-write leaves the old artifact and a temporary file that the next write of
  the same artifact removes; an artifact written without its sidecar is caught by the audit.
* Pipeline level: the session's serial smoke run (``snakemake all --cores 1``,
  ``smoke_utils.killed_serial_run``) is killed with SIGKILL (the whole process group) at three
  points. After each kill no file under its final name is truncated. The next ``snakemake all``
  stops at once with Snakemake's stale-lock message naming the recovery command (``snakemake
  --unlock``) and changes nothing; after it, ``snakemake all`` completes (the workflow profile
  sets ``rerun-incomplete``), the audit passes, and test_parallel.py finds its artifacts equal to
  those of the clean ``--cores 2`` run, byte for byte.
* Tampering: one byte of an intermediate artifact changed is reported by ``dvc status`` and by
  ``python -m mechrepro audit``; ``dvc repro`` restores it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from smoke_utils import BIN, KILL_POINTS, KILL_REPORT, RUN_OUTPUT, output_files, run

from mechrepro.workflow import artifacts as A
from mechrepro.workflow.audit import audit
from mechrepro.studies import study

RESULTS = study("ioi_generalization").results



# ------------------------------------------------------------------------------------------------
# Faults inside the atomic write (library level)


def test_write_failing_half_way_keeps_old_artifact(tmp_path, monkeypatch):
    path = tmp_path / "scores.csv"
    A.write_csv(path, pd.DataFrame({"x": [1.0, 2.0]}))
    old = path.read_bytes()

    def half_then_fail(self, target, **kwargs):
        Path(target).write_text("x\n1.0\n2.")  # a partial file ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        A.write_csv(path, pd.DataFrame({"x": [3.0, 4.0, 5.0]}))
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_failure_at_rename_keeps_old_artifact(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    A.write_json(path, {"v": 1})

    def fail(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(A.os, "replace", fail)
    with pytest.raises(OSError, match="Input/output"):
        A.write_json(path, {"v": 2})
    assert A.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from mechrepro.workflow.artifacts import atomic_path
path, ready = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"new bytes " * 100_000)
        f.flush()
        ready.touch()
        time.sleep(120)  # killed here, half-way through the write
        f.write(b"the rest")
"""


def test_sigkill_inside_atomic_write_keeps_old_artifact(tmp_path):
    path, ready = tmp_path / "model.safetensors", tmp_path / "ready"
    A.write_text(path, "old complete artifact\n")
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(ready)])
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert child.poll() is None and time.time() < deadline, "writer did not start"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert path.read_text() == "old complete artifact\n"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".model.safetensors.")]
    assert len(leftovers) == 1 and f".{child.pid}." in leftovers[0].name  # the killed writer's temp file
    assert leftovers[0].stat().st_size == 1_000_000  # truncated: never renamed, never read
    A.write_text(path, "rewritten\n")  # the next write of the artifact removes the dead writer's file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "ready"]


def test_artifact_without_its_new_sidecar_is_caught_by_audit(tmp_path, monkeypatch):
    """A crash between writing an artifact and its sidecar leaves a pair that does not match."""
    (tmp_path / "Snakefile").touch()
    inp = tmp_path / "in.json"
    A.write_json(inp, {"a": 1})
    out = tmp_path / "out.json"
    monkeypatch.chdir(tmp_path)
    A.save_json("out.json", {"v": 1}, A.provenance("r", {}, ["in.json"]))
    assert audit(["out.json"], root=tmp_path, out=lambda s: None).ok

    def crash(path, prov):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "write_provenance", crash)
    with pytest.raises(KeyboardInterrupt):
        A.save_json("out.json", {"v": 2}, A.provenance("r", {}, ["in.json"]))
    assert json.loads(out.read_text()) == {"v": 2}
    lines = []
    res = audit(["out.json"], root=tmp_path, out=lines.append)
    assert not res.ok
    assert any("out.json differs from its provenance record" in p for p in res.problems), res.problems


# ------------------------------------------------------------------------------------------------
# SIGKILL of the smoke pipeline: the session's serial run (smoke_utils.killed_serial_run) is killed
# at three points and completed; test_parallel.py checks that it equals the clean --cores 2 run.


@pytest.mark.robustness
def test_killed_serial_run_recovered(smoke_serial):
    """Every kill point was reached, the completed run left no temporary file, and the audit passes
    every artifact, sidecar and model file."""
    assert len(KILL_REPORT) == len(KILL_POINTS), KILL_REPORT
    assert "dvc.lock updated" in RUN_OUTPUT["serial"]
    assert not [rel for rel in output_files(smoke_serial) if "/." in rel], "temporary files left behind"
    done = run([sys.executable, "-m", "mechrepro", "audit", "results", "figures", "resources"], smoke_serial)
    assert "audit OK" in done.stdout


# ------------------------------------------------------------------------------------------------
# Tampering


def _flip_digit(path: Path) -> int:
    """Change one digit of a number in ``path`` (one byte); return its offset."""
    data = bytearray(path.read_bytes())
    at = data.index(b'"n": ') + 5
    data[at] = ord("7") if data[at] != ord("7") else ord("8")
    path.write_bytes(bytes(data))
    return at


@pytest.mark.workflow
def test_tampered_artifact_reported_and_restored(smoke_copy):
    work = smoke_copy
    rel = f"{RESULTS}/data/triple_io.json"  # an intermediate artifact (input of inference, evaluation)
    path = work / rel
    original = path.read_bytes()
    assert run([BIN / "dvc", "status"], work).stdout.strip().endswith("up to date.")
    _flip_digit(path)
    assert len(path.read_bytes()) == len(original) and path.read_bytes() != original

    status = run([BIN / "dvc", "status"], work)
    assert rel in status.stdout and "modified" in status.stdout, status.stdout

    done = run([sys.executable, "-m", "mechrepro", "audit", f"{RESULTS}/metrics.json"], work, check=False)
    assert done.returncode == 1, done.stdout
    assert f"{rel} differs from its provenance record" in done.stdout
    assert f"{rel} differs from the hash recorded by {RESULTS}/eval/triple_io.json" in done.stdout

    repro = run([BIN / "dvc", "repro"], work)
    assert "ioi_dataset-triple_io" in repro.stdout
    assert path.read_bytes() == original
    assert run([BIN / "dvc", "status"], work).stdout.strip().endswith("up to date.")
    done = run([sys.executable, "-m", "mechrepro", "audit", f"{RESULTS}/metrics.json"], work)
    assert "audit OK" in done.stdout
