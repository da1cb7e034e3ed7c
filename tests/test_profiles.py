"""Cluster execution: the slurm profile resolves the whole DAG and every job carries its resources."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.workflow  # a Snakemake dry run of the whole DAG


def test_slurm_profile_dry_run_resolves_dag_with_resources():
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    done = subprocess.run([BIN / "snakemake", "all", "--profile", "profiles/slurm", "--dry-run", "--forceall"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    jobs = re.findall(r"^rule (\w+):", out, flags=re.M)
    assert {"prepare_model", "ioi_circuit", "ioi_evaluate", "figure", "scorecard"} <= set(jobs)
    blocks = re.split(r"^rule ", out, flags=re.M)[1:]
    for block in blocks:
        name = block.split(":")[0]
        if name == "all":
            continue
        res = re.search(r"resources: (.*)", block)
        assert res, f"rule {name} has no resources"
        assert "mem_mb=" in res.group(1) and "runtime=" in res.group(1), (name, res.group(1))
        if name in ("ioi_circuit", "ioi_evaluate", "ioi_inference", "ioi_value_paths", "ioi_head_patching"):
            assert "gpu=" in res.group(1), (name, res.group(1))
