"""Artifact I/O: atomic writes, open formats, and a provenance sidecar for every artifact.

Every artifact is written to a temporary file in the same directory and renamed into place, so a
killed run never leaves a truncated file under the final name. Next to each artifact
``X`` a sidecar ``X.prov.json`` records what made it: the rule, the config values used, the model
and its weight hash, the code version, and the SHA-256 of each input file and of ``X`` itself.

Formats: JSON, CSV, and safetensors for tensors (:func:`save_safetensors` /
:func:`load_safetensors`; the metadata is one JSON entry with sorted keys, so equal tensors and
metadata give equal bytes). A reader that finds an artifact missing, corrupt or not holding what
it needs raises :class:`ArtifactError` naming the file, what is wrong and how to rebuild it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

PROV_SUFFIX = ".prov.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or does not match its recorded hash."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files of ``path`` left by killed writers (``.{name}.{pid}.*.tmp``, pid gone)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name carries the writer's pid; temporaries of ``path`` whose writer is gone
    (a SIGKILL skips the cleanup below) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(_dumps(obj))
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV, atomically (floats with full precision)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.10g")
    return Path(path)


def read_json(path: str | os.PathLike):
    """Read a JSON artifact; a missing or corrupt file raises :class:`ArtifactError`."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: run 'snakemake all', which rebuilds missing files")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); delete it and rerun: rm {path} && snakemake all") from exc


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_sha256() -> str:
    """SHA-256 over the package's source files (relative names and bytes): identifies the code
    exactly even when the git tree is dirty or absent."""
    pkg = Path(__file__).resolve().parents[1]  # src/mechrepro
    h = hashlib.sha256()
    for f in sorted(p for p in pkg.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".json")
                    and "__pycache__" not in p.parts):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def code_version() -> dict:
    """Package version, a hash of its source files and, when run from a git checkout, the commit
    and whether the tree is dirty."""
    from mechrepro import __version__

    info = {"package": "mechrepro", "version": __version__, "source_sha256": source_sha256(),
            "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parents[3]  # the repository
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                                    capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def provenance(
    rule: str,
    config: dict,
    inputs: Iterable[str | os.PathLike] = (),
    model: dict | None = None,
) -> dict:
    """Provenance record of an artifact made by ``rule`` from ``inputs`` with ``config``."""
    return {
        "rule": rule,
        "config": config,
        "model": None if model is None else {
            "name": model.get("name"), "weight_sha256": model.get("weight_sha256"),
            "description": model.get("description"),
        },
        "code": code_version(),
        "inputs": {str(p): sha256_file(p) for p in inputs if Path(p).is_file()},
    }


def write_provenance(path: str | os.PathLike, prov: dict) -> Path:
    """Write the sidecar of artifact ``path`` (after the artifact itself)."""
    record = dict(prov, artifact=str(path), sha256=sha256_file(path))
    return write_json(str(path) + PROV_SUFFIX, record)


def save_json(path: str | os.PathLike, obj, prov: dict) -> Path:
    """Write a JSON artifact and its provenance sidecar."""
    write_json(path, obj)
    write_provenance(path, prov)
    return Path(path)


def save_csv(path: str | os.PathLike, frame, prov: dict) -> Path:
    """Write a CSV artifact and its provenance sidecar."""
    write_csv(path, frame)
    write_provenance(path, prov)
    return Path(path)


# ------------------------------------------------------------------ safetensors
SAFETENSORS_KEY = "mechrepro"  # the one metadata entry of our safetensors artifacts


def _rebuild(path: str | os.PathLike, rule: str | None) -> str:
    """How to remake an artifact whose bytes are intact but whose content is not what is expected."""
    return f"rebuild it: snakemake --forcerun {rule}" if rule else f"delete it and rerun: rm {path} && snakemake all"


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping | None = None) -> Path:
    """Write ``tensors`` as safetensors (an open format), atomically (no sidecar).

    ``metadata`` (values stored as strings) becomes one JSON string with sorted keys under the
    key ``mechrepro``: safetensors writes several metadata entries in an arbitrary order, which
    would make equal files differ. ``None``: no metadata at all (e.g. model weights for Hugging
    Face, which rejects metadata without a ``format`` entry).
    """
    from safetensors.torch import save_file

    meta = None if metadata is None else {
        SAFETENSORS_KEY: json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], prov: dict,
                     metadata: Mapping | None = None) -> Path:
    """Write a safetensors artifact (:func:`write_safetensors`; metadata ``{}`` if none) and its
    provenance sidecar."""
    write_safetensors(path, tensors, dict(metadata or {}))
    write_provenance(path, prov)
    return Path(path)


def load_safetensors(path: str | os.PathLike, *, keys: Iterable[str] = (),
                     shapes: Mapping[str, Sequence[int]] | None = None,
                     rule: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (on the CPU) and metadata of a safetensors artifact written by :func:`save_safetensors`.

    ``keys`` must be present and each of ``shapes`` present with that shape; ``rule`` (the rule
    that makes the file) is named in the errors. A missing or corrupt file, a missing tensor or a
    wrong shape raises :class:`ArtifactError`.
    """
    from safetensors import safe_open

    path = Path(path)
    fix = _rebuild(path, rule)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: run 'snakemake all', which rebuilds missing files")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(dict(f.metadata() or {}).get(SAFETENSORS_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ArtifactError(f"{path} is corrupt ({exc}); delete it and rerun: rm {path} && snakemake all") from exc
    missing = [k for k in [*keys, *(shapes or {})] if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks the tensors {missing} (it has {sorted(tensors)}); {fix}")
    for k, shape in (shapes or {}).items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ArtifactError(f"{path}: tensor '{k}' has shape {tuple(tensors[k].shape)}, expected "
                                f"{tuple(shape)}; {fix}")
    return tensors, meta
