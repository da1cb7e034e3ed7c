# Shared setup: config validation (before any rule runs), the study registry, paths.
import os
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from mechrepro.studies import studies as _studies
from mechrepro.workflow.config import ConfigError, check_output_dirs, validate
from mechrepro.workflow.integrity import check_before_run, check_targets, remove_orphan_sidecars
from mechrepro.workflow.pipeline import (
    all_outputs,
    producers,
    figure_inputs,
    model_dir,
    model_weights,
    record_in_dvc,
    report_front,
    rule_config,
    study_metrics,
)

try:
    _validated = validate(dict(config), root=workflow.basedir, cli_overrides=workflow.config_settings.config)
    check_output_dirs(os.getcwd())
except ConfigError as _err:
    sys.exit(f"Configuration error: {_err}")
config.clear()
config.update(_validated)

STUDIES = _studies()  # name -> mechrepro.studies.Study
MANIFEST = f"{model_dir(config['model']['name'])}/manifest.json"
ENV = "../../env.yml"
GPU = 1 if config["model"]["device"] == "cuda" else 0  # GPU request of the model rules (cluster runs)


def all_targets(wildcards):
    """The inputs of the target all, every job's outputs (pipeline.every_output), after checking that none
    differs from its record, except those this run remakes anyway (--forceall, --forcerun)."""
    made = producers(all_outputs(config), workflow.rules)
    settings = workflow.dag_settings
    if not settings.forceall:
        forced = set(map(str, settings.forcerun or ()))
        check_targets(f for f, rule in made.items() if rule not in forced and f not in forced)
    return sorted(made)


def cfg(rule):
    """Config values read by a job of a rule, as its params (changing one reruns the job)."""
    return lambda wildcards: rule_config(rule, config, wildcards)
