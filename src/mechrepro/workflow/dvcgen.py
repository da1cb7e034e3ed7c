"""Generate ``dvc.yaml`` from the Snakemake DAG, so that the two pipelines cannot drift.

Every Snakemake job of ``snakemake all`` becomes one DVC stage with the same inputs (``deps``),
outputs (``outs``; each study's metrics file as a DVC metric; the CSVs of the figures that declare
a :class:`mechrepro.studies.Plot` as top-level DVC plots) and config keys (``params``, from
:func:`mechrepro.workflow.pipeline.config_keys`). Stages also depend on the library code
(:data:`CODE_DEPS`). A stage's command asks Snakemake to rebuild exactly that job: ``snakemake --cores 2 --force --allowed-rules <rule> <outputs>``.

Usage: ``python -m mechrepro.workflow.dvcgen [--check]`` (``--check`` exits 1 if dvc.yaml is stale).
A test runs the check, so a rule change without regenerating ``dvc.yaml`` fails CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import yaml

from mechrepro.workflow.pipeline import config_keys

# DVC stages also depend on the library and the stage script, so that a code change reruns them
# under `dvc repro` (Snakemake records the code version in each artifact's provenance instead).
CODE_DEPS = ["src/mechrepro", "workflow/scripts/stage.py"]
HEADER = ("# Generated from the Snakemake DAG by `python -m mechrepro.workflow.dvcgen`; do not edit by hand.\n"
          "# `dvc repro` runs each Snakemake job as a stage; `dvc metrics show` lists every study's metrics;\n"
          "# `dvc plots show` / `dvc plots diff` draw the headline figures' numbers.\n")


def snakemake_jobs(root: Path, configfile: str = "config/config.yaml") -> list[dict]:
    """The jobs of ``snakemake all``: ``{rule, wildcards, input, output, log}`` each, in DAG order."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import (
        ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, StorageSettings,
    )

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wf_api = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(configfiles=[root / configfile]),
                storage_settings=StorageSettings(),
                snakefile=root / "Snakefile",
                workdir=root,
            )
            dag_api = wf_api.dag(dag_settings=DAGSettings(targets={"all"}, forceall=True))
            wf = dag_api.workflow_api._workflow
            wf._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
            wf._build_dag()
            jobs = _topo(wf.dag)
    return jobs


def _topo(dag) -> list[dict]:
    out = []
    for level in dag.toposorted():
        for job in sorted(level, key=lambda j: (j.rule.name, sorted(map(str, j.output)))):
            if job.rule.name == "all":
                continue
            out.append({"rule": job.rule.name, "wildcards": dict(job.wildcards_dict),
                        "input": sorted(map(str, job.input)), "output": [str(o) for o in job.output],
                        "log": [str(x) for x in job.log]})
    return out


def stage_name(job: dict) -> str:
    suffix = "_".join(str(v) for v in job["wildcards"].values())
    return job["rule"] + (f"-{suffix}" if suffix else "")


def plots(jobs: list[dict]) -> list[dict]:
    """DVC plots: the CSV of every figure job whose figure declares one (:class:`mechrepro.studies.Plot`)."""
    from mechrepro.studies import study

    out = []
    for job in jobs:
        w = job["wildcards"]
        if job["rule"] != "figure" or (plot := study(w["study"]).figures[w["fig"]].dvc_plot) is None:
            continue
        csv = next(o for o in job["output"] if o.endswith(".csv"))
        spec = {"x": plot.x, "y": list(plot.y) if isinstance(plot.y, tuple) else plot.y, "template": plot.template}
        out.append({csv: {**spec, **({"title": plot.title} if plot.title else {})}})
    return out


def build(jobs: list[dict]) -> dict:
    """``dvc.yaml``'s content for ``jobs``: one stage per job; each study's metrics file (from the
    registry) is a DVC metric, cached like the other outputs so that ``dvc metrics diff`` finds the
    values of another revision; the declared figure CSVs are DVC plots (:func:`plots`)."""
    from mechrepro.studies import studies

    metric_files = {s.metrics for s in studies().values()}
    stages = {}
    for job in jobs:
        outs = [o for o in job["output"] if o not in metric_files]
        metrics = [o for o in job["output"] if o in metric_files]
        keys = config_keys(job["rule"], job["wildcards"])
        stage = {
            "cmd": f"snakemake --cores 2 --force --allowed-rules {job['rule']} {' '.join(job['output'])}",
            "deps": sorted(set(job["input"]) | set(CODE_DEPS)),
        }
        if keys:  # a rule that reads no config key has no params (an empty list is not one)
            stage["params"] = [{"config/config.yaml": keys}]
        if outs:  # a model's weights: hash recorded, not copied into DVC's cache (rebuilt by their rule)
            stage["outs"] = [{o: {"cache": False}} if o.endswith("model.safetensors") else o for o in outs]
        if metrics:
            stage["metrics"] = metrics
        stages[stage_name(job)] = stage
    declared = plots(jobs)
    return {"stages": stages, **({"plots": declared} if declared else {})}


def render(root: Path) -> str:
    return HEADER + yaml.safe_dump(build(snakemake_jobs(root)), sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs from the DAG")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="workflow directory (default: .)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    text = render(root)
    path = root / "dvc.yaml"
    if args.check:
        if not path.exists() or path.read_text() != text:
            print("dvc.yaml is out of date with the Snakemake DAG: run 'python -m mechrepro.workflow.dvcgen'",
                  file=sys.stderr)
            return 1
        print("dvc.yaml matches the Snakemake DAG")
        return 0
    from mechrepro.workflow.artifacts import write_text

    write_text(path, text)
    print(f"wrote {path} ({text.count('cmd:')} stages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
