"""Audit a result: print its provenance chain and check every recorded hash against the disk.

``python -m mechrepro audit <artifact-or-figure> [...]`` (run from the workflow's directory, or
pass ``--root``). For an artifact ``X`` it reads the sidecar ``X.prov.json`` (see
:mod:`mechrepro.workflow.artifacts`) and prints the rule that made ``X``, the config values the rule read,
the model and its weight hash, the code version, and each input with its hash — recursively, through
the inputs' own sidecars, down to source files (config, notebooks, reference numbers) and the model
files listed in the model's ``manifest.json``.

Checked, each a failure (exit status 1) naming the file that differs:

* ``X`` against the SHA-256 in its sidecar (a file changed after it was written);
* every input against the SHA-256 its consumer recorded (the input was modified or rebuilt since:
  the consumer is stale or was made from something else);
* every file of a local model against ``manifest.json`` (a truncated or replaced weights file), and
  the manifest's weight hash against the one each artifact recorded;
* for the scorecard, that each row's number is the value at ``key`` in the artifact it names;
* missing files and missing or unreadable sidecars.

A change of the *code* since ``X`` was made is reported as a note (it makes a result stale, not
wrong): the sidecar records the source hash, version and git commit of the code that ran.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mechrepro.workflow import integrity as msg
from mechrepro.workflow.artifacts import PROV_SUFFIX, sha256_file, source_sha256
from mechrepro.workflow.scorecard import lookup

MANIFEST = "manifest.json"


@dataclass
class AuditResult:
    """Problems (each makes the audit fail), notes, and how many files were checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def _fmt_config(config: dict) -> list[str]:
    flat = _flatten("", config or {}, {})
    return [f"{k} = {json.dumps(v)}" for k, v in flat.items()]


class Auditor:
    """Walks provenance sidecars from one or more targets; collects an :class:`AuditResult`."""

    def __init__(self, root: str | Path = ".", out=print):
        self.root = Path(root).resolve()
        self.out = out
        self.result = AuditResult()
        self._shown: set[str] = set()
        self._hashes: dict[str, str | None] = {}
        self._manifests_checked: dict[str, dict | None] = {}
        self._current_code: str | None = None

    # ---------------------------------------------------------------- helpers

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the root (sidecars record root-relative paths)."""
        p = Path(path)
        if not p.is_absolute():
            p = Path.cwd() / p
        p = Path(*p.parts)  # normalise
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def abs(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def sha(self, rel: str) -> str | None:
        if rel not in self._hashes:
            path = self.abs(rel)
            self._hashes[rel] = sha256_file(path) if path.is_file() else None
            self.result.checked += path.is_file()
        return self._hashes[rel]

    def problem(self, indent: str, msg: str) -> None:
        if msg not in self.result.problems:
            self.result.problems.append(msg)
        self.out(f"{indent}  !! {msg}")

    def load_sidecar(self, rel: str, indent: str) -> dict | None:
        record, problem = msg.read_sidecar(rel, self.root)
        if problem:
            self.problem(indent, problem)
            return {}
        return record

    # ---------------------------------------------------------------- walk

    def audit(self, target: str | Path) -> None:
        rel = self.rel(target)
        if rel.endswith(PROV_SUFFIX):
            rel = rel[: -len(PROV_SUFFIX)]
        if not self.abs(rel).exists():
            self.out(rel)
            self.problem("", f"{rel} does not exist")
            return
        if self.abs(rel).is_dir():
            found = sorted(p for p in self.abs(rel).rglob("*" + PROV_SUFFIX))
            if not found:
                self.problem("", f"{rel} holds no artifact with a provenance sidecar")
            for side in found:
                self.audit(str(side)[: -len(PROV_SUFFIX)])
            return
        self.node(rel, depth=0)

    def node(self, rel: str, depth: int, recorded: str | None = None, consumer: str | None = None) -> None:
        """Print ``rel`` (an artifact, or an input of ``consumer`` recorded with hash ``recorded``)."""
        ind = "    " * depth
        actual = self.sha(rel)
        head = f"{ind}{rel}"
        if actual is None:
            self.out(head + "  MISSING")
            who = f" (an input of {consumer})" if consumer else ""
            fix = "rebuild it: snakemake all" if msg.is_artifact(rel) else "restore it (a source file)"
            self.problem(ind, f"{rel}{who} does not exist; {fix}")
            return
        if recorded is not None and recorded != actual:
            self.out(f"{head}  sha256 {actual}  DIFFERS")
            self.problem(ind, f"{rel} differs from the hash recorded by {consumer}: recorded {recorded}, "
                              f"on disk {actual}; {consumer} is out of date: 'snakemake all' rebuilds it")
        record = self.load_sidecar(rel, ind)
        if record is None:
            kind = self.manifest_listing(rel)
            if recorded is None or recorded == actual:
                self.out(f"{head}  sha256 {actual}  OK ({kind or 'source file, no sidecar'})")
            if kind is None and depth == 0:
                self.problem(ind, msg.no_sidecar(rel) if msg.is_artifact(rel) else
                             f"{rel} is a source file, not made by the workflow (no provenance sidecar); audit "
                             "a result instead (a file under results/ or figures/)")
            if kind is not None:
                self.check_manifest(str(Path(rel).parent / MANIFEST), ind + "    ")
            return
        if not record:  # unreadable sidecar, already reported
            return
        own_ok = record.get("sha256") == actual
        if recorded is None or recorded == actual:
            self.out(f"{head}  sha256 {actual}  {'OK' if own_ok else 'DIFFERS'}")
        if not own_ok:
            self.problem(ind, msg.modified(rel, record.get("sha256"), actual))
        if record.get("artifact") not in (None, rel):
            self.result.notes.append(f"{rel}{PROV_SUFFIX} names the artifact {record.get('artifact')}")
        if rel in self._shown:
            self.out(f"{ind}    (provenance shown above)")
            return
        self._shown.add(rel)
        self.describe(rel, record, ind)
        self.check_model(rel, record, ind)
        self.check_rows(rel, record, ind)
        inputs = record.get("inputs") or {}
        if inputs:
            self.out(f"{ind}  inputs:")
        for path, digest in inputs.items():
            self.node(path, depth + 1, recorded=digest, consumer=rel)

    def describe(self, rel: str, record: dict, ind: str) -> None:
        self.out(f"{ind}  rule:   {record.get('rule')}")
        lines = _fmt_config(record.get("config") or {})
        self.out(f"{ind}  config: {lines[0] if lines else '(none)'}")
        for line in lines[1:]:
            self.out(f"{ind}          {line}")
        model = record.get("model")
        if model:
            self.out(f"{ind}  model:  {model.get('name')}, weights sha256 {model.get('weight_sha256')}")
            if model.get("description"):
                self.out(f"{ind}          {model['description']}")
        code = record.get("code") or {}
        if code:
            git = code.get("git_commit")
            git_s = f"git {git}{' (uncommitted changes)' if code.get('git_dirty') else ''}" if git else "no git commit"
            self.out(f"{ind}  code:   {code.get('package')} {code.get('version')}, "
                     f"source sha256 {code.get('source_sha256', '(not recorded)')}, {git_s}")
            if self._current_code is None:
                self._current_code = source_sha256()
            if code.get("source_sha256") and code["source_sha256"] != self._current_code:
                note = (f"{rel} was made by other code than the installed mechrepro (source sha256 "
                        f"{code['source_sha256'][:12]}… vs {self._current_code[:12]}…); rerun to refresh it")
                if note not in self.result.notes:
                    self.result.notes.append(note)

    def manifest_listing(self, rel: str) -> str | None:
        """'model file listed in <manifest>' when ``rel`` is a file of a prepared model."""
        manifest = self.abs(str(Path(rel).parent / MANIFEST))
        if Path(rel).name == MANIFEST or not manifest.is_file():
            return None
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except (ValueError, UnicodeDecodeError):
            return None
        return f"model file listed in {self.rel(manifest)}" if Path(rel).name in files else None

    def check_manifest(self, manifest_rel: str, ind: str) -> dict | None:
        """Check every file of a local model against ``manifest.json`` (once per manifest)."""
        if manifest_rel in self._manifests_checked:
            return self._manifests_checked[manifest_rel]
        path = self.abs(manifest_rel)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self.problem(ind, msg.bad_manifest(manifest_rel, str(exc)))
            self._manifests_checked[manifest_rel] = None
            return None
        self._manifests_checked[manifest_rel] = manifest
        files = manifest.get("files") or {}
        bad = []
        for name, digest in files.items():
            frel = str(Path(manifest_rel).parent / name)
            actual = self.sha(frel)
            if actual != digest:
                bad.append(frel)
                self.problem(ind, msg.model_file(frel, manifest_rel, digest, actual))
        where = (manifest.get("source") or {}).get("kind")
        if files:
            self.out(f"{ind}  model files: {len(files) - len(bad)}/{len(files)} match {manifest_rel}")
        elif where == "hub":
            self.out(f"{ind}  model files: Hugging Face cache (repo {manifest['source'].get('repo_id')}); "
                     f"weight sha256 recorded as {manifest.get('weight_sha256')}")
        return manifest

    def check_model(self, rel: str, record: dict, ind: str) -> None:
        """The model's weight hash recorded by ``rel`` must match its manifest; check the model files."""
        model = record.get("model") or {}
        candidates = [p for p in (record.get("inputs") or {}) if Path(p).name == MANIFEST]
        if Path(rel).name == MANIFEST:
            candidates.append(rel)
        for manifest_rel in candidates:
            if self.sha(manifest_rel) is None:
                continue
            manifest = self.check_manifest(manifest_rel, ind)
            if manifest and model.get("weight_sha256") and manifest.get("weight_sha256") != model["weight_sha256"]:
                self.problem(ind, f"{rel} records model weights {model['weight_sha256']} but {manifest_rel} "
                                  f"has {manifest.get('weight_sha256')}: {rel} is out of date; 'snakemake all' "
                                  "rebuilds it")

    _MD_ROW = re.compile(r"^\| (?P<study>[^|]+) \| (?P<id>[^|]+) \| [^|]* \| [^|]* \| (?P<ours>[^|]+) \| "
                         r"[^|]* \| [^|]* \| `(?P<artifact>[^`]+)` : `(?P<key>[^`]+)` \|$")

    def check_rows(self, rel: str, record: dict, ind: str) -> None:
        """Scorecard: every row's number is the value at ``key`` in the artifact it names."""
        rows = []
        path = self.abs(rel)
        if rel.endswith(".json"):
            try:
                data = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                return
            if isinstance(data, dict) and isinstance(data.get("rows"), list):
                rows = [(r.get("id"), r.get("artifact"), r.get("key"), r.get("ours"), False)
                        for r in data["rows"] if isinstance(r, dict) and "artifact" in r]
        elif rel.endswith(".md"):
            for line in path.read_text().splitlines():
                m = self._MD_ROW.match(line)
                if m:
                    rows.append((m["id"].strip(), m["artifact"], m["key"], m["ours"].strip(), True))
        if not rows:
            return
        from mechrepro.workflow.scorecard import _fmt

        inputs = record.get("inputs") or {}
        cache: dict[str, dict | None] = {}
        bad = 0
        for rid, art, key, ours, as_text in rows:
            if art not in inputs:
                bad += 1
                self.problem(ind, f"{rel}: row '{rid}' names {art}, which is not a recorded input of {rel}; "
                                  f"rebuild it: {msg.rebuild(rel)}")
                continue
            if art not in cache:
                try:
                    cache[art] = json.loads(self.abs(art).read_text())
                except (OSError, ValueError, UnicodeDecodeError):
                    cache[art] = None
            value = lookup(cache[art], key) if cache[art] is not None else None
            expected = _fmt(value) if as_text else value
            if expected != ours:
                bad += 1
                self.problem(ind, f"{rel}: row '{rid}' shows {ours!r} but {art} : {key} is {value!r}; "
                                  f"rebuild it: {msg.rebuild(rel)}")
        arts = sorted({r[1] for r in rows})
        self.out(f"{ind}  rows:   {len(rows) - bad}/{len(rows)} numbers equal the value at their key in "
                 f"{', '.join(arts)}")


def audit(targets, root: str | Path = ".", out=print) -> AuditResult:
    """Audit each of ``targets`` (paths); print the chain with ``out``; return the result."""
    auditor = Auditor(root, out)
    for target in targets:
        auditor.audit(target)
        out("")
    res = auditor.result
    for note in res.notes:
        out(f"note: {note}")
    if res.ok:
        out(f"audit OK: {res.checked} files checked, every recorded hash matches")
    else:
        out(f"audit FAILED: {len(res.problems)} problem(s) in {res.checked} files checked:")
        for p in res.problems:
            out(f"  - {p}")
    return res
