"""Integrity checks: a file that differs from its record is never used or recorded as good.

Every artifact ``X`` has a provenance sidecar ``X.prov.json`` holding its SHA-256
(:mod:`mechrepro.workflow.artifacts`); the files of a prepared model are listed with theirs in the
model's ``manifest.json``. A file changed after the workflow wrote it (an editor, a stray write, a
disk error) differs from that record. It is refused, with the audit's message and a command that
repairs it (:func:`modified`, :func:`model_file`, …; the audit uses the same messages):

* when ``snakemake all`` lists its targets (:func:`check_targets`: every existing output, even
  when nothing needs to run);
* before any job of a run starts (Snakemake's ``onstart``: :func:`check_before_run`), so that no
  job deletes its old outputs to run on a bad input;
* before a job reads its inputs (:func:`preflight`: the stage dispatch and, for the figure
  notebooks, ``python -m mechrepro preflight``), which also covers ``dvc repro``, ``--no-hooks``
  and files changed while the run was under way;
* before ``dvc.lock`` records the artifacts' hashes (:func:`pipeline.record_in_dvc
  <mechrepro.workflow.pipeline.record_in_dvc>`), so that ``dvc status`` never calls a damaged
  file up to date.

Hashing is cheap after the first time: each file's SHA-256 is cached under its size and
modification time in :data:`CACHE_FILE` (a file rewritten with the same size within the same
nanosecond would be missed; any ordinary write changes the modification time).

The repair of a damaged or missing artifact is always ``rm <file> && snakemake all``: ``rule all``
lists every job's outputs, so a missing file is rebuilt (:func:`pipeline.every_output
<mechrepro.workflow.pipeline.every_output>`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from mechrepro.workflow.artifacts import PROV_SUFFIX, ArtifactError, sha256_file, write_text

CACHE_FILE = Path(".snakemake") / "mechrepro" / "sha256.json"
MANIFEST = "manifest.json"
# Directories of files the workflow makes (every such file has a sidecar, except a model's own files,
# which its manifest.json lists).
ARTIFACT_ROOTS = ("results/", "figures/")
MODEL_ROOT = "resources/"


class IntegrityError(ArtifactError):
    """A file differs from its provenance record (or its model's manifest)."""


# ------------------------------------------------------------------ messages (shared with the audit)
def rebuild(rel: str) -> str:
    """The command that rebuilds a file the workflow makes."""
    return f"rm {rel} && snakemake all"


def modified(rel: str, recorded: str | None, actual: str) -> str:
    return (f"{rel} differs from its provenance record {rel}{PROV_SUFFIX}: recorded sha256 {recorded}, on disk "
            f"{actual}. The file was changed after the workflow wrote it; rebuild it: {rebuild(rel)}")


def no_sidecar(rel: str) -> str:
    return (f"{rel} has no provenance sidecar {rel}{PROV_SUFFIX}: it was not made by the workflow, or the sidecar "
            f"was deleted; rebuild it: {rebuild(rel)}")


def bad_sidecar(rel: str, why: str) -> str:
    return f"{rel}{PROV_SUFFIX} is unreadable ({why}); rebuild {rel}: {rebuild(rel)}"


def model_file(frel: str, manifest_rel: str, recorded: str, actual: str | None) -> str:
    state = "is missing" if actual is None else f"differs from {manifest_rel} (recorded sha256 {recorded}, on disk {actual})"
    return (f"model file {frel} {state}; rebuild the model: {rebuild(manifest_rel)} (the rule that made it "
            "prepares it again, and the jobs that use it rerun)")


def bad_manifest(manifest_rel: str, why: str) -> str:
    return f"{manifest_rel} is unreadable ({why}); rebuild the model: {rebuild(manifest_rel)}"


def is_artifact(rel: str) -> bool:
    """Whether ``rel`` (relative to the workflow directory) is a file the workflow makes."""
    return rel.startswith(ARTIFACT_ROOTS + (MODEL_ROOT,))


# ------------------------------------------------------------------ cached hashes
class HashCache:
    """SHA-256 of files, cached by (size, mtime) in :data:`CACHE_FILE` (shared by the jobs of a run;
    concurrent writers may lose each other's entries, which only costs a second hash)."""

    def __init__(self, path: str | os.PathLike = CACHE_FILE):
        self.path = Path(path)
        self.entries: dict[str, list] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.entries = loaded
        self.dirty = False

    def sha(self, path: str | os.PathLike) -> str | None:
        """The file's SHA-256, or None if it does not exist."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = os.path.abspath(path)
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns]:
            return entry[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        with contextlib.suppress(OSError, ValueError):
            merged = {}
            with contextlib.suppress(OSError, ValueError):
                merged = json.loads(self.path.read_text())
            merged = {**(merged if isinstance(merged, dict) else {}), **self.entries}
            merged = {k: v for k, v in merged.items() if os.path.exists(k)}
            write_text(self.path, json.dumps(merged, sort_keys=True))
            self.dirty = False


# ------------------------------------------------------------------ checks
def read_sidecar(rel: str, root: str | os.PathLike = ".") -> tuple[dict | None, str | None]:
    """The provenance record of ``rel`` (relative to ``root``): (record, None), (None, None) without a
    sidecar, or (None, problem) when it is unreadable. Shared by the run's checks and the audit."""
    side = Path(root) / (rel + PROV_SUFFIX)
    if not side.is_file():
        return None, None
    try:
        record = json.loads(side.read_text())
        if not isinstance(record, dict) or "sha256" not in record:
            raise ValueError("no 'sha256' field")
        return record, None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, bad_sidecar(rel, str(exc))


def check_manifest(manifest_rel: str, cache: HashCache) -> list[str]:
    """Every file of a local model against its ``manifest.json``."""
    try:
        manifest = json.loads(Path(manifest_rel).read_text())
        files = manifest.get("files") or {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as exc:
        return [bad_manifest(manifest_rel, str(exc))]
    folder = Path(manifest_rel).parent
    problems = []
    for name, recorded in files.items():
        frel = (folder / name).as_posix()
        actual = cache.sha(frel)
        if actual != recorded:
            problems.append(model_file(frel, manifest_rel, recorded, actual))
    return problems


def check_file(rel: str, cache: HashCache) -> list[str]:
    """Problems of one file: against its sidecar, or (a model's manifest) its model's files. A
    missing file or a source file (config, notebook, code) has none."""
    rel = Path(rel).as_posix()
    if not Path(rel).is_file():
        return []
    record, problem = read_sidecar(rel)
    if problem:
        return [problem]
    problems = []
    if record is not None:
        actual = cache.sha(rel)
        if record.get("sha256") != actual:
            problems.append(modified(rel, record.get("sha256"), actual))
    elif rel.startswith(ARTIFACT_ROOTS):
        problems.append(no_sidecar(rel))
    if Path(rel).name == MANIFEST and rel.startswith(MODEL_ROOT):
        problems += check_manifest(rel, cache)
    return problems


def check_files(paths: Iterable[str | os.PathLike], cache: HashCache | None = None) -> list[str]:
    """Problems of every file of ``paths`` (each listed once)."""
    cache = cache or HashCache()
    problems: list[str] = []
    for path in dict.fromkeys(str(p) for p in paths):
        problems += [p for p in check_file(path, cache) if p not in problems]
    cache.save()
    return problems


def refusal(problems: list[str], what: str) -> str:
    return f"{what}: {len(problems)} file(s) differ from their records:\n  - " + "\n  - ".join(problems)


def remove_sidecars(outputs: Iterable[str | os.PathLike]) -> None:
    """Delete the sidecars of a job's outputs before it runs: Snakemake has deleted the outputs, and a
    job that fails must not leave the old sidecars behind (orphans describing files that are gone)."""
    for out in outputs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(out) + PROV_SUFFIX)


def preflight(inputs: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike] = ()) -> None:
    """Before a job runs: remove the sidecars of its outputs (Snakemake has deleted the outputs), then
    raise :class:`IntegrityError` if an input differs from its record."""
    remove_sidecars(outputs)
    problems = check_files(inputs)
    if problems:
        raise IntegrityError(refusal(problems, "refusing to run on damaged inputs"))


def check_before_run(jobs: Iterable[tuple[Iterable, Iterable]]) -> None:
    """Snakemake's ``onstart``: the inputs of the jobs about to run that no job of this run remakes.

    ``jobs`` are ``(inputs, outputs)`` of every job that will run. A damaged input stops the run
    before any job starts (so before Snakemake deletes any job's old outputs); exits with status 1.
    """
    jobs = [(list(map(str, i)), list(map(str, o))) for i, o in jobs]
    remade = {o for _, outs in jobs for o in outs}
    problems = check_files(f for ins, _ in jobs for f in ins if f not in remade)
    if problems:
        import sys

        print(refusal(problems, "Refusing to start: inputs of this run"), file=sys.stderr)
        raise SystemExit(1)


def incomplete_files(root: str | Path = ".") -> set[str]:
    """Files Snakemake has marked incomplete (their job started and did not finish: rerun by
    ``rerun-incomplete``). Snakemake keeps one marker per file in ``.snakemake/incomplete``, named
    by the file's path in URL-safe base64."""
    import base64

    names = set()
    for marker in (Path(root) / ".snakemake" / "incomplete").glob("*"):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            names.add(base64.urlsafe_b64decode(marker.name).decode())
    return names


def check_targets(targets: Iterable[str]) -> None:
    """``snakemake all``: every existing file the run targets must match its record, even when no job
    needs it (a damaged file is reported whatever the run does; ``rm <file> && snakemake all``
    rebuilds it). Files marked incomplete are skipped (their jobs rerun), and so are files without a
    sidecar (the output of a job killed before it wrote the sidecar). Exits with status 1."""
    import sys

    skip = incomplete_files()
    cache = HashCache()
    problems = []
    for rel in sorted(set(map(str, targets)) - skip):
        if Path(rel + PROV_SUFFIX).is_file() or Path(rel).name == MANIFEST:
            problems += [p for p in check_file(rel, cache) if p not in problems]
    cache.save()
    if problems:
        print(refusal(problems, "Refusing to run: files of this workflow"), file=sys.stderr)
        raise SystemExit(1)


def remove_orphan_sidecars(roots: Iterable[str] = ("results", "figures", "resources")) -> list[str]:
    """Snakemake's ``onerror``: delete the sidecars of files that no longer exist (the outputs of a
    failed job, which Snakemake deletes). Returns their paths."""
    removed = []
    for root in roots:
        for side in Path(root).rglob("*" + PROV_SUFFIX) if Path(root).is_dir() else []:
            artifact = Path(str(side)[: -len(PROV_SUFFIX)])
            if not artifact.exists():
                with contextlib.suppress(FileNotFoundError):
                    side.unlink()
                removed.append(side.as_posix())
    return removed
