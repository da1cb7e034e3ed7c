"""What every stage function shares: logging, device, threads, provenance, the model, dispatch.

A Snakemake rule ``X`` of study ``S`` runs ``workflow/scripts/stage.py``, which calls
:func:`dispatch`: it finds the function ``X`` in the stages module that the study declares
(:mod:`mechrepro.studies`) and calls it with the ``snakemake`` object of the ``script:`` rule
(``config``, ``input``, ``output``, ``wildcards``, ``log``, ``rule``, ``threads``). A stage
function reads the config and its inputs, calls the library and writes its artifacts, each
with a provenance sidecar (:mod:`mechrepro.workflow.artifacts`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mechrepro.workflow import artifacts as art
from mechrepro.workflow.config import resolve_device
from mechrepro.workflow.pipeline import rule_config

log = logging.getLogger("mechrepro")


def setup(snk) -> None:
    """Log to stderr and the rule's log file; device, dtype, seed and thread count of the job."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if snk.log:
        Path(snk.log[0]).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(snk.log[0], mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)
    use_device(snk.config["model"]["device"], snk.config["model"].get("dtype", "float32"))
    torch.manual_seed(snk.config["seed"])
    torch.set_num_threads(torch_threads(snk))


def torch_threads(snk) -> int:
    """The job's torch thread count: its rule's ``threads``, whatever ``--cores`` allows.

    Snakemake gives a job ``min(threads, --cores)`` threads, and a sum over many terms (a gradient,
    a mean over a large tensor) is added in another order on one thread than on two, so a job's
    numbers would depend on ``--cores``. The Snakefile copies each rule's declared ``threads`` into
    the resource ``torch_threads`` (not capped by ``--cores``); a serial run then runs a two-thread
    job on two threads, one job at a time.
    """
    resources = getattr(snk, "resources", None)
    declared = getattr(resources, "torch_threads", None) if resources is not None else None
    return max(1, int(declared or getattr(snk, "threads", 1) or 1))


def use_device(device: str, dtype: str = "float32") -> str:
    """Make ``device`` (``auto`` resolved) and ``dtype`` the defaults for every new tensor.

    Every tensor a stage creates (batches, index tensors, accumulators) then lives where the
    model does, so the same code runs on a CPU or a CUDA GPU. Returns the resolved device.
    """
    resolved = resolve_device(device)
    torch.set_default_device(resolved)
    torch.set_default_dtype(getattr(torch, dtype))
    return resolved


def prov(snk, model: dict | None = None) -> dict:
    """The provenance record of the job's outputs: rule, config values read, inputs, model."""
    return art.provenance(snk.rule, rule_config(snk.rule, snk.config, getattr(snk, "wildcards", None)),
                          list(snk.input), model)


def save_table_and_summary(snk, frame: pd.DataFrame, summary: dict, model: dict | None = None) -> None:
    """Write a stage's ``output.csv`` table and ``output.json`` summary with one provenance record."""
    record = prov(snk, model)
    art.save_csv(snk.output.csv, frame, record)
    art.save_json(snk.output.json, summary, record)


def load_model(snk, manifest: str | None = None):
    """The prepared model of the job's ``input.manifest`` on the configured device and dtype."""
    from mechrepro.core.registry import load_model as load

    device = resolve_device(snk.config["model"]["device"])
    t = time.time()
    lm = load(Path(manifest or snk.input.manifest).parent, device=device, dtype=snk.config["model"]["dtype"])
    log.info("loaded %s in %.1fs", lm.description(), time.time() - t)
    return lm


def dispatch(snk) -> None:
    """Run the stage function named after the Snakemake rule ``snk.rule``.

    First the job's inputs are checked against their provenance records (a damaged input is
    refused: :func:`mechrepro.workflow.integrity.preflight`) and the old sidecars of its outputs
    are removed; if the stage fails, the sidecars it wrote are removed as well, since Snakemake
    deletes a failed job's outputs (no sidecar outlives its artifact).
    """
    import importlib

    from mechrepro.studies import stage_module
    from mechrepro.workflow.integrity import preflight, remove_sidecars

    module = stage_module(snk.rule)
    fn = getattr(importlib.import_module(module), snk.rule, None)
    if not callable(fn):
        raise LookupError(f"no stage function '{snk.rule}' in {module}")
    preflight(list(snk.input), list(snk.output))
    try:
        return fn(snk)
    except BaseException:
        remove_sidecars(list(snk.output))
        raise


# --------------------------------------------------------------------------------------------
# The stages every study shares


def prepare_model(snk) -> None:
    """The configured model, converted and saved with its manifest (weight hashes, spec)."""
    from mechrepro.core.registry import prepare_model as prepare

    setup(snk)
    name = snk.config["model"]["name"]
    t = time.time()
    manifest = prepare(name, Path(snk.output.manifest).parent, seed=snk.config["seed"])
    log.info("prepared %s (%s) in %.1fs, weights sha256 %s", name, manifest["description"], time.time() - t,
             manifest["weight_sha256"][:16])
    check_config_against_model(snk)
    art.write_provenance(snk.output.manifest, prov(snk, manifest))


def check_config_against_model(snk) -> None:
    """Once a model is prepared, check the configuration against its shape (layer indices, head
    counts, memory), before any job uses it: at parse time the shape of a hub model that was not
    in the local cache was unknown. A ``ConfigError`` fails this job, so no dependent job runs."""
    from mechrepro.workflow.config import validate

    validate(dict(snk.config), root=".")


def scorecard(snk) -> None:
    """The published numbers and claims of every configured study beside ours: the scorecard and the
    replication report (:func:`mechrepro.workflow.report.scorecard`)."""
    from mechrepro.workflow.report import scorecard as build_report

    build_report(snk)
