"""Faults survived: crashes inside an atomic write, SIGKILLs of the smoke pipeline, tampering.

* Library level: a write that fails half-way (or at the rename) leaves the old artifact in place;
  a writer SIGKILLed mid-write leaves the old artifact and a temporary file that the next write of
  the same artifact removes; an artifact written without its sidecar is caught by the audit.
* Pipeline level: ``snakemake all --cores 1`` on a smoke copy is killed with SIGKILL (the whole
  process group) at three points. After each kill no file under its final name is truncated.
  The next ``snakemake all`` stops at once with Snakemake's stale-lock message naming the recovery
  command (``snakemake --unlock``) and changes nothing; after it, ``snakemake all`` completes (the
  workflow profile sets ``rerun-incomplete``) and its artifacts equal those of the clean serial
  run and of the clean ``--cores 2`` run, byte for byte.
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
from smoke_utils import (
    BIN, compare_runs, kill_group, output_files, popen_snakemake, run, sha256, smoke_copy,
)

from mechrepro.workflow import artifacts as A
from mechrepro.workflow.audit import audit
from mechrepro.studies import study

RESULTS = study("ioi_generalization").results

MODEL_DIR = "resources/models/tiny-gpt2"


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
# SIGKILL of the smoke pipeline


def _tmp_of(work: Path, pattern: str) -> bool:
    for p in work.glob(pattern):
        try:
            if p.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
    return False


# (what is under way, condition to kill at); tried in this order, one run each
KILL_POINTS = [
    ("prepare_model writing model.safetensors (temporary file not yet renamed), or just after",
     lambda w: _tmp_of(w, f"{MODEL_DIR}/.model.safetensors.*.tmp") or (w / MODEL_DIR / "manifest.json").exists()),
    ("ioi_evaluate (base) after writing its first output",
     lambda w: (w / RESULTS / "eval" / "base.json").exists()),
    ("figure: papermill writing an executed notebook",
     lambda w: any((w / "results" / "notebooks").glob("*/*.ipynb"))),
]


def _assert_nothing_truncated(work: Path) -> list[str]:
    """Every file under its final name is complete; return the artifacts lacking a sidecar."""
    from safetensors.torch import load_file

    bad, unsigned = [], []
    for rel, path in output_files(work).items():
        if rel.startswith("results/notebooks/") or rel == "dvc.lock":
            continue  # papermill writes the executed notebook in place; it is no rule's input
        if "/." in rel:
            assert rel.endswith(".tmp"), rel
            continue  # a killed writer's temporary file: never read, removed by the next write
        try:
            if rel.endswith(".json"):
                json.loads(path.read_text())
            elif rel.endswith(".csv"):
                pd.read_csv(path)
            elif rel.endswith(".png"):
                assert path.read_bytes()[-8:] == b"IEND\xaeB`\x82", "no PNG end chunk"
            elif rel.endswith(".safetensors"):
                load_file(path)
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{rel}: {exc}")
        if rel.endswith(A.PROV_SUFFIX) or (rel.startswith(MODEL_DIR + "/") and not rel.endswith("manifest.json")):
            continue  # sidecars; model files (their hashes are in manifest.json, written last)
        side = Path(str(path) + A.PROV_SUFFIX)
        if side.exists():
            assert json.loads(side.read_text())["sha256"] == sha256(path), rel
        else:
            unsigned.append(rel)  # written just before the kill; its job is rerun
    assert not bad, bad
    return unsigned


def _incomplete(work: Path) -> list[str]:
    """Outputs Snakemake has marked incomplete (their job started and did not finish)."""
    import base64

    names = []
    for p in (work / ".snakemake" / "incomplete").rglob("*"):
        if p.is_file():
            try:
                names.append(base64.urlsafe_b64decode(p.name).decode())
            except ValueError:
                names.append(base64.b64decode(p.name).decode())
    return sorted(names)


def _snakemake_until(work: Path, condition, log: Path, timeout: float = 600) -> float:
    proc = popen_snakemake(work, "all", "--cores", "1", log=log)
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < timeout:
            if condition(work):
                kill_group(proc, work)
                return time.time() - t0
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            kill_group(proc, work)
    raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def serial(smoke_serial):
    return smoke_serial


@pytest.fixture(scope="module")
def killed_and_recovered(tmp_path_factory):
    """A smoke copy whose `snakemake all` was SIGKILLed at each of KILL_POINTS, then completed."""
    work = smoke_copy(tmp_path_factory, "killed")
    log = work.parent / f"{work.name}-snakemake.log"
    report = []
    for i, (point, condition) in enumerate(KILL_POINTS):
        after = _snakemake_until(work, condition, log)
        unsigned = _assert_nothing_truncated(work)
        report.append(f"killed after {after:.1f}s during {point}; outputs marked incomplete: {_incomplete(work)}; "
                      f"artifacts without sidecar: {unsigned}")
        before = {rel: sha256(p) for rel, p in output_files(work).items()}
        if i == 0:
            # the next run stops at once on Snakemake's stale lock, names the recovery, changes nothing
            nxt = run([BIN / "snakemake", "all", "--cores", "1"], work, check=False)
            out = nxt.stdout + nxt.stderr
            assert nxt.returncode != 0 and "LockException" in out and "--unlock" in out, out[-2000:]
            assert before == {rel: sha256(p) for rel, p in output_files(work).items()}
        run([BIN / "snakemake", "--unlock"], work)
    done = run([BIN / "snakemake", "all", "--cores", "1"], work)
    assert "dvc.lock updated" in done.stdout + done.stderr
    print("\n".join(report))
    return work, report


@pytest.mark.workflow
@pytest.mark.parametrize("clean", ["serial", "smoke"])
def test_killed_runs_recover_to_the_clean_result(killed_and_recovered, clean, request):
    """The killed-and-recovered serial run equals the clean serial run and the clean --cores 2 run
    (``smoke``), byte for byte (executed notebooks without papermill's execution metadata)."""
    work, report = killed_and_recovered
    assert len(report) == len(KILL_POINTS)
    diffs, how = compare_runs(request.getfixturevalue(clean), work)
    assert not diffs, "\n".join(diffs)
    assert all(rel.startswith("results/notebooks/") or "JSON" in kind or "without the hashes" in kind
               for rel, kind in how.items()), how
    assert not [rel for rel in output_files(work) if "/." in rel], "temporary files left behind"
    done = run([sys.executable, "-m", "mechrepro", "audit", "results", "figures", "resources"], work)
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
def test_tampered_artifact_reported_and_restored(killed_and_recovered):
    work, _ = killed_and_recovered
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
