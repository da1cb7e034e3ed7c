"""Recording a finished run in dvc.lock must not change the artifacts' modification times.

'dvc commit' checks its outputs out of the cache again; the new times came in no particular order,
so a second 'snakemake all' saw inputs newer than their outputs and reran jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mechrepro.workflow.pipeline import record_in_dvc

BIN = Path(sys.executable).parent


pytestmark = pytest.mark.workflow  # runs 'dvc init' and 'dvc commit'


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env)
    stages = {"make_a": {"cmd": "true", "outs": ["out/a.json"]}, "make_b": {"cmd": "true", "deps": ["out/a.json"],
                                                                           "outs": ["out/b.json", "out/dir"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "out" / "dir").mkdir(parents=True)
    files = {"out/a.json": 1_000_000_000, "out/b.json": 2_000_000_000, "out/dir/c.csv": 3_000_000_000}
    for i, (rel, mtime) in enumerate(files.items()):
        (tmp_path / rel).write_text(f'{{"x": {i}}}')
        os.utime(tmp_path / rel, ns=(mtime, mtime))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    return tmp_path, files


def test_record_in_dvc_keeps_modification_times(dvc_repo):
    root, files = dvc_repo
    record_in_dvc(SimpleNamespace(config={}, configfiles=[]))
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"make_a", "make_b"}
    assert {rel: (root / rel).stat().st_mtime_ns for rel in files} == files


def test_record_in_dvc_skipped_with_config_overrides(dvc_repo, capsys):
    root, _ = dvc_repo
    record_in_dvc(SimpleNamespace(config={"figures": {"dpi": 61}}, configfiles=[]))
    assert not (root / "dvc.lock").exists()
    assert "config overrides" in capsys.readouterr().out
