"""DVC on a copy of the smoke run made a git repository: every study's metrics.json is a DVC metric,
the headline figures' CSVs are DVC plots, and after a parameter change `dvc metrics diff` shows the
change and `dvc plots diff` draws both revisions."""

from __future__ import annotations

import json

import pytest
import yaml
from smoke_utils import BIN, run

from mechrepro.studies import studies

pytestmark = pytest.mark.workflow  # git, DVC and a Snakemake rerun in a copy of the run


def _git(work, *args):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], work)


def _plot_files() -> set[str]:
    return {f"{s.figures_dir}/{name}.csv" for s in studies().values() for name, f in s.figures.items() if f.dvc_plot}


def test_metrics_and_plots_follow_a_parameter_change(smoke_copy):
    work = smoke_copy
    run([BIN / "dvc", "config", "core.no_scm", "false"], work)
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "the smoke run")  # results/ and figures/ are gitignored: their hashes are in dvc.lock
    shown = json.loads(run([BIN / "dvc", "metrics", "show", "--json"], work).stdout)
    files = set(next(iter(shown.values()))["data"])
    assert files == {s.metrics for s in studies().values()}, files
    plots = json.loads(run([BIN / "dvc", "plots", "show", "--json"], work).stdout)["data"]
    assert _plot_files() <= set(plots), sorted(plots)
    assert all(plots[f][0]["type"] == "vega" for f in _plot_files())
    assert len(_plot_files()) == 6

    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    top_k = config["mcq"]["top_k"]
    config["mcq"]["top_k"] = top_k - 2
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    done = run([BIN / "snakemake", "all", "--cores", "2"], work, timeout=1200)
    assert "dvc.lock updated" in done.stdout + done.stderr

    diff = json.loads(run([BIN / "dvc", "metrics", "diff", "--json"], work).stdout)
    changed = diff["results/mcq_circuits/metrics.json"]
    assert changed["dla.top_k"] == {"old": top_k, "new": top_k - 2, "diff": -2}, changed
    assert "dla.top_k_share_abs" in changed
    assert "results/ioi_generalization/metrics.json" not in diff  # Study A did not rerun
    params = json.loads(run([BIN / "dvc", "params", "diff", "--json"], work).stdout)
    assert {k: params["config/config.yaml"]["mcq.top_k"][k] for k in ("old", "new")} == {"old": top_k, "new": top_k - 2}

    both = json.loads(run([BIN / "dvc", "plots", "diff", "HEAD", "--json"], work).stdout)["data"]
    for f in _plot_files():  # every plot drawn for both runs
        assert sorted(both[f][0]["revisions"]) == ["HEAD", "workspace"], (f, both[f][0]["revisions"])
