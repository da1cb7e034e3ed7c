# Shared setup: config validation (before any rule runs) and paths.
import os
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from mechrepro.config import ConfigError, check_output_dirs, validate
from mechrepro.pipeline import (FIGURES, MCQ_FIGURES, MCQ_FIGURES_LIST, MCQ_RESULTS, RESULTS, all_outputs, mcq_model_dir,
                               model_dir, record_in_dvc, rule_config, study_metrics)

try:
    _validated = validate(dict(config), root=workflow.basedir, cli_overrides=workflow.config_settings.config)
    check_output_dirs(os.getcwd())
except ConfigError as _err:
    sys.exit(f"Configuration error: {_err}")
config.clear()
config.update(_validated)

VARIANTS = config["ioi"]["variants"]
MANIFEST = f"{model_dir(config['model']['name'])}/manifest.json"
ENV = "../../env.yml"
MCQ_MANIFEST = f"{mcq_model_dir(config['mcq']['model'])}/manifest.json"
MCQ_LABEL_SETS = config["mcq"]["label_sets"]
MCQ_KEY_SETS = [s for s in ("abcd", "random_letters") if s in MCQ_LABEL_SETS]  # keys scatter of the low-rank figure
GPU = 1 if config["model"]["device"] == "cuda" else 0  # GPU request of the model rules (cluster runs)


def cfg(rule):
    """Config values read by a job of a rule, as its params (changing one reruns the job)."""
    return lambda wildcards: rule_config(rule, config, wildcards)
