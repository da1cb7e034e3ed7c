# mechrepro workflow: `snakemake all` regenerates every figure, the metrics and the scorecard.
# Config: config/config.yaml, validated against workflow/schemas/ by workflow/rules/common.smk.
# Studies: every study registered in src/mechrepro/studies/ brings workflow/rules/<study>.smk.
from snakemake.utils import min_version

min_version("9.0")


# Snakemake's own message for a YAML syntax error names neither the file nor the line.
import sys

import yaml as _yaml

try:
    with open("config/config.yaml") as _f:
        _yaml.safe_load(_f)
except _yaml.YAMLError as _err:
    sys.exit(f"Configuration error: config/config.yaml is not valid YAML; fix it where shown:\n{_err}")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"


for _study in STUDIES:

    include: f"workflow/rules/{_study}.smk"


include: "workflow/rules/figures.smk"
include: "workflow/rules/scorecard.smk"


# The front page of `snakemake --report`: the replication report (every claim with its verdict).
report: report_front(workflow.basedir)


# Every job's outputs, not only the figures and metrics: a missing intermediate is rebuilt; a damaged
# one stops the run (common.smk: all_targets).
rule all:
    default_target: True
    input:
        all_targets,


# A job's torch threads are its rule's threads, whatever --cores allows (workflow.stage.torch_threads).
for _rule in workflow.rules:
    _rule.resources["torch_threads"] = _rule.resources["_cores"].raw


onstart:
    # Before any job starts (and deletes its old outputs): refuse inputs that differ from their records.
    check_before_run([(job.input, job.output) for job in workflow.dag.needrun_jobs()])


onerror:
    # A failed job's outputs are deleted by Snakemake: delete their provenance sidecars too.
    remove_orphan_sidecars()


onsuccess:
    # Record the artifacts' hashes in dvc.lock, so that `dvc status` / `dvc repro` see what
    # Snakemake built (never a file that differs from its provenance record). Skipped when
    # --config/--configfile overrides make config.yaml untrue.
    record_in_dvc(workflow.config_settings)
