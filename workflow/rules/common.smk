# Shared setup: config validation (before any rule runs), paths, and helper functions.
import os
import sys

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from mechrepro.config import ConfigError, validate
from mechrepro.pipeline import FIGURES, RESULTS, figures_for, rule_config

try:
    _validated = validate(dict(config), root=workflow.basedir)
except ConfigError as _err:
    sys.exit(f"Configuration error: {_err}")
config.clear()
config.update(_validated)

VARIANTS = config["ioi"]["variants"]
MODEL_DIR = "resources/models/" + config["model"]["name"].replace("/", "--").replace(":", "_")
MANIFEST = f"{MODEL_DIR}/manifest.json"
ENV = "../../env.yml"


def cfg(rule):
    """The config values a rule reads (its params: a change reruns the rule)."""
    return lambda wildcards: rule_config(rule, config)


def all_outputs():
    return (
        expand(f"{FIGURES}/{{fig}}.png", fig=figures_for(VARIANTS))
        + [f"{RESULTS}/metrics.json", "results/scorecard.md"]
    )
