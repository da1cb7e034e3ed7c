"""Running the smoke pipeline (config/smoke.yaml) in temporary copies of the repository.

A smoke run of ``snakemake all`` costs about 6 minutes on 2 cores, so finished runs are shared by every
test module of a pytest session: :func:`shared_run` runs each named configuration once and returns
its directory. Every copy is made from one snapshot of the repository taken at first use, so all
runs of a session use the same code even while the checkout is being edited, and each copy runs
its own ``src/`` (``PYTHONPATH``), not the installed package.

:func:`compare_runs` compares the artifacts of two runs (see its docstring for what is excluded
and why).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mechrepro.studies import study
from mechrepro.workflow.integrity import incomplete_files
from mechrepro.workflow.pipeline import model_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SKIP = {".git", ".venv", "results", "resources", "figures", "logs", ".snakemake", ".pytest_cache", "report.html",
        "dvc-cache"}

# Directories holding what a run makes (compared between runs); logs and timings are not compared.
OUTPUT_DIRS = ("results", "figures", "resources")
NOT_COMPARED = ("results/benchmarks/",)
# Keys of JSON artifacts that hold wall-clock measurements (different in every run by nature): timings, and
# the seconds of each evaluation in the organism's training history (its training-time curve).
VOLATILE_KEYS = {"timings", "seconds"}


def env(work: Path | None = None) -> dict:
    e = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    if work is not None:
        e["PYTHONPATH"] = str(Path(work) / "src")
    return e


def run(args, cwd, check=True, timeout=1200, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env={**env(cwd), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return done


def copy_repo(dst: Path, src: Path = ROOT) -> None:
    """Copy the repository's sources (not its results, environment or git data) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in SKIP or item.name.endswith(".egg-info"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(item, dst / item.name)


_SNAPSHOT: list[Path] = []
_RUNS: dict[str, Path] = {}
RUN_OUTPUT: dict[str, str] = {}  # name -> Snakemake's stdout + stderr of that shared run


def snapshot(tmp_path_factory) -> Path:
    """One copy of the repository per session, configured for the smoke run (config = smoke.yaml)."""
    if not _SNAPSHOT:
        snap = tmp_path_factory.mktemp("snapshot")
        copy_repo(snap)
        shutil.copy(snap / "config" / "smoke.yaml", snap / "config" / "config.yaml")
        run([BIN / "dvc", "config", "core.no_scm", "true"], snap)
        run([sys.executable, "-m", "mechrepro.workflow.dvcgen", "--root", str(snap)], snap)
        _SNAPSHOT.append(snap)
    return _SNAPSHOT[0]


def smoke_copy(tmp_path_factory, name: str) -> Path:
    """A fresh copy of the session snapshot (nothing run yet)."""
    work = tmp_path_factory.mktemp(name)
    shutil.rmtree(work)
    shutil.copytree(snapshot(tmp_path_factory), work, symlinks=True)
    return work


def shared_run(tmp_path_factory, name: str, cores: str = "2") -> Path:
    """``snakemake all --cores <cores>`` in a fresh copy, once per session and ``name``."""
    if name not in _RUNS:
        work = smoke_copy(tmp_path_factory, name)
        t = time.time()
        done = run([BIN / "snakemake", "all", "--cores", cores], work, timeout=1500)
        RUN_OUTPUT[name] = done.stdout + done.stderr
        print(f"smoke run {name} (--cores {cores}) took {time.time() - t:.0f}s")
        _RUNS[name] = work
    return _RUNS[name]


# ------------------------------------------------------------------------------------------------
# Processes


def popen_snakemake(work: Path, *args, log: Path) -> subprocess.Popen:
    """Start ``snakemake <args>`` in its own process group (so that it can be killed as a whole)."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(BIN / "snakemake"), *map(str, args)], cwd=work, env=env(work), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def processes_in(work: Path) -> list[int]:
    """PIDs of the live processes whose working directory is ``work`` (or below)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == str(work) or cwd.startswith(str(work) + os.sep)):
            pids.append(int(proc.name))
    return pids


def kill_group(proc: subprocess.Popen, work: Path, grace: float = 15.0) -> list[int]:
    """SIGKILL the process group of ``proc``; wait for what it started elsewhere to exit.

    Jupyter kernels run in a session of their own (jupyter_client), so a group kill leaves them
    orphaned; they exit by themselves within about a second (ipykernel watches its parent). Any
    that are still alive after ``grace`` seconds (they are our own test's processes) are killed
    one by one. Returns the PIDs that outlived the group kill.
    """
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # SIGKILL is delivered asynchronously
    survivors = processes_in(work)
    deadline = time.time() + grace
    while processes_in(work) and time.time() < deadline:
        time.sleep(0.1)
    for pid in processes_in(work):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors


# ------------------------------------------------------------------------------------------------
# Comparing runs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_files(work: Path) -> dict[str, Path]:
    """Every file a run made (relative path -> path), without logs and timings; plus dvc.lock."""
    files = {}
    for d in OUTPUT_DIRS:
        for p in sorted((work / d).rglob("*")):
            rel = p.relative_to(work).as_posix()
            if p.is_file() and not rel.startswith(NOT_COMPARED):
                files[rel] = p
    if (work / "dvc.lock").exists():
        files["dvc.lock"] = work / "dvc.lock"
    return files


def _notebook(path: Path, work: Path) -> dict:
    """An executed notebook without what papermill/Jupyter record about the execution itself:
    timestamps and durations, random cell ids, and the absolute paths of the run directory."""
    nb = json.loads(path.read_text().replace(str(work), "<work>"))
    nb.get("metadata", {}).pop("papermill", None)
    for cell in nb.get("cells", []):
        cell.pop("id", None)
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
    return nb


def _close(a, b, rtol: float, path: str, diffs: list[str], skip_keys=()) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) - set(skip_keys) != set(b) - set(skip_keys):
            diffs.append(f"{path}: keys {sorted(set(a) ^ set(b))}")
            return
        for k in a:
            if k not in skip_keys:
                _close(a[k], b[k], rtol, f"{path}.{k}", diffs, skip_keys)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, rtol, f"{path}[{i}]", diffs, skip_keys)
    elif isinstance(a, float) or isinstance(b, float):
        try:
            ok = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3)
        except TypeError:
            ok = False
        if not ok:
            diffs.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        diffs.append(f"{path}: {a!r} != {b!r}")


def _csv_close(pa: Path, pb: Path, rtol: float) -> list[str]:
    import numpy as np
    import pandas as pd

    a, b = pd.read_csv(pa), pd.read_csv(pb)
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        return [f"shape/columns {a.shape} {list(a.columns)} != {b.shape} {list(b.columns)}"]
    diffs = []
    for c in a.columns:
        if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c]):
            x, y = a[c].to_numpy(float), b[c].to_numpy(float)
            bad = ~(np.isclose(x, y, rtol=rtol, atol=rtol * 1e-3, equal_nan=True))
            if bad.any():
                i = int(np.argmax(bad))
                diffs.append(f"column {c}: {bad.sum()} values differ beyond rtol {rtol}, e.g. row {i}: {x[i]!r} vs {y[i]!r}")
        elif not a[c].equals(b[c]):
            diffs.append(f"column {c} differs")
    return diffs


def compare_runs(a: Path, b: Path, rtol: float = 0.0) -> tuple[list[str], dict[str, str]]:
    """Compare the outputs of two runs; return (differences, {file: how it was compared}).

    A file is equal when its bytes are equal. Otherwise:

    * executed notebooks (``results/notebooks``) are compared without execution timestamps,
      durations, random cell ids and the run directory's absolute path;
    * JSON artifacts are compared without :data:`VOLATILE_KEYS` (wall-clock timings);
    * with ``rtol > 0``, CSV and JSON numbers may differ by that relative tolerance;
    * provenance sidecars and ``dvc.lock`` are then compared without the hashes of the files
      found equal only in one of these ways (those hashes are checked within each run by the
      audit).

    Everything else must be byte-identical; a file present in only one run is a difference.
    """
    fa, fb = output_files(a), output_files(b)
    diffs = [f"{f}: only in {a if f in fa else b}" for f in sorted(set(fa) ^ set(fb))]
    how: dict[str, str] = {}
    later = []
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = fa[rel], fb[rel]
        if pa.read_bytes() == pb.read_bytes():
            continue
        if rel.endswith(".prov.json") or rel == "dvc.lock":
            later.append(rel)
        elif rel.startswith("results/notebooks/") and rel.endswith(".ipynb"):
            d: list[str] = []
            _close(_notebook(pa, a), _notebook(pb, b), rtol, rel, d)
            diffs += d
            how[rel] = "notebook without execution metadata"
        elif rel.endswith(".json"):
            d = []
            _close(json.loads(pa.read_text()), json.loads(pb.read_text()), rtol, rel, d, VOLATILE_KEYS)
            diffs += d
            how[rel] = f"JSON without {sorted(VOLATILE_KEYS)}" + (f", rtol {rtol}" if rtol else "")
        elif rel.endswith(".csv") and rtol > 0:
            diffs += [f"{rel}: {d}" for d in _csv_close(pa, pb, rtol)]
            how[rel] = f"CSV, rtol {rtol}"
        else:
            diffs.append(f"{rel}: bytes differ (sha256 {sha256(pa)[:12]} vs {sha256(pb)[:12]})")
    loose = set(how)
    for rel in later:
        pa, pb = fa[rel], fb[rel]
        if rel == "dvc.lock":
            la, lb = yaml.safe_load(pa.read_text()), yaml.safe_load(pb.read_text())
            _strip_lock(la, loose)
            _strip_lock(lb, loose)
            d = [] if la == lb else [f"dvc.lock differs beyond the entries of {sorted(loose)}"]
        else:
            sa, sb = json.loads(pa.read_text()), json.loads(pb.read_text())
            for s in (sa, sb):
                if s.get("artifact") in loose:
                    s.pop("sha256", None)
                for k in list(s.get("inputs") or {}):
                    if k in loose:
                        s["inputs"][k] = "<compared separately>"
            d = []
            _close(sa, sb, 0.0, rel, d)
        diffs += d
        how[rel] = "without the hashes of files compared loosely"
    return diffs, how


def _strip_lock(lock: dict, loose: set[str]) -> None:
    for stage in (lock or {}).get("stages", {}).values():
        for kind in ("deps", "outs"):
            for entry in stage.get(kind, []):
                if entry.get("path") in loose:
                    entry.pop("md5", None)
                    entry.pop("size", None)


# ------------------------------------------------------------------------------------------------
# The serial run, SIGKILLed at three points and completed

MODEL_DIR = model_dir("tiny-gpt2")  # the smoke config's model
IOI_RESULTS = study("ioi_generalization").results
KILL_REPORT: list[str] = []  # one line per kill of the serial run: when, what was under way, what was left


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
     lambda w: (w / IOI_RESULTS / "eval" / "base.json").exists()),
    ("figure: papermill writing an executed notebook",
     lambda w: any((w / "results" / "notebooks").glob("*/*.ipynb"))),
]


def assert_nothing_truncated(work: Path) -> list[str]:
    """Every file under its final name is complete; return the artifacts lacking a sidecar."""
    import pandas as pd
    from safetensors.torch import load_file

    from mechrepro.workflow.artifacts import PROV_SUFFIX

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
        if rel.endswith(PROV_SUFFIX) or (rel.startswith(MODEL_DIR + "/") and not rel.endswith("manifest.json")):
            continue  # sidecars; model files (their hashes are in manifest.json, written last)
        side = Path(str(path) + PROV_SUFFIX)
        if side.exists():
            assert json.loads(side.read_text())["sha256"] == sha256(path), rel
        else:
            unsigned.append(rel)  # written just before the kill; its job is rerun
    assert not bad, bad
    return unsigned


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


def killed_serial_run(tmp_path_factory) -> Path:
    """``snakemake all --cores 1`` in a fresh copy, SIGKILLed (the whole process group) at each of
    :data:`KILL_POINTS`, then completed; once per session (shared as ``serial``).

    After each kill no file under its final name is truncated. After the first, the next
    ``snakemake all`` stops at once on Snakemake's stale lock, names the recovery command
    (``--unlock``) and changes nothing. The completing run's output is ``RUN_OUTPUT["serial"]``.
    """
    if "serial" in _RUNS:
        return _RUNS["serial"]
    work = smoke_copy(tmp_path_factory, "serial")
    log = work.parent / f"{work.name}-snakemake.log"
    t = time.time()
    for i, (point, condition) in enumerate(KILL_POINTS):
        after = _snakemake_until(work, condition, log)
        unsigned = assert_nothing_truncated(work)
        KILL_REPORT.append(f"killed after {after:.1f}s during {point}; outputs marked incomplete: "
                           f"{sorted(incomplete_files(work))}; artifacts without sidecar: {unsigned}")
        before = {rel: sha256(p) for rel, p in output_files(work).items()}
        if i == 0:
            nxt = run([BIN / "snakemake", "all", "--cores", "1"], work, check=False)
            out = nxt.stdout + nxt.stderr
            assert nxt.returncode != 0 and "LockException" in out and "--unlock" in out, out[-2000:]
            assert before == {rel: sha256(p) for rel, p in output_files(work).items()}
        run([BIN / "snakemake", "--unlock"], work)
    done = run([BIN / "snakemake", "all", "--cores", "1"], work, timeout=1500)
    RUN_OUTPUT["serial"] = done.stdout + done.stderr
    print(f"smoke run serial (--cores 1, killed {len(KILL_POINTS)} times) took {time.time() - t:.0f}s")
    print("\n".join(KILL_REPORT))
    _RUNS["serial"] = work
    return work
