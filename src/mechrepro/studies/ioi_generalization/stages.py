"""Stage functions of Study A (``workflow/rules/ioi_generalization.smk``), one per rule.

Each takes the ``snakemake`` object of a ``script:`` rule (called by
:func:`mechrepro.workflow.stage.dispatch`), reads the config and its inputs, calls the library
(``data``, ``circuit``, ``analysis``) and writes artifacts with provenance sidecars.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from mechrepro.workflow import artifacts as art
from mechrepro.workflow import stage
from mechrepro.studies.ioi_generalization.checks import load_ioi_data

log = logging.getLogger("mechrepro")


def _circuit(snk) -> dict:
    """The circuit artifact, checked against the model's shape (before the model is loaded)."""
    from mechrepro.studies.ioi_generalization.circuit import check_circuit

    circuit = art.read_json(snk.input.circuit)
    check_circuit(circuit, art.read_json(snk.input.manifest)["spec"], str(snk.input.circuit))
    return circuit


def _batch(path: str, lm, n: int | None = None):
    from mechrepro.studies.ioi_generalization.data import to_batch

    ds = art.read_json(path)
    if n is not None:
        ds = dict(ds, prompts=ds["prompts"][:n])
    return ds, to_batch(ds, lm.bos_id)


def ioi_dataset(snk) -> None:
    from mechrepro.studies.ioi_generalization.data import make_dataset
    from mechrepro.core.registry import load_model

    stage.setup(snk)
    cfg = snk.config["ioi"]
    data = load_ioi_data(snk.input.data)
    lm = load_model(Path(snk.input.manifest).parent)
    ds = make_dataset(data, snk.wildcards.variant, cfg["n_prompts"], lm.tokenizer, lm.bos_id, snk.config["seed"],
                      min_names=cfg["min_single_token_names"])
    ds["model"] = lm.name
    log.info("%s: %d prompts, %d single-token names, e.g. %r", snk.wildcards.variant, ds["n"], len(ds["names"]),
             ds["prompts"][0]["text"])
    art.save_json(snk.output[0], ds, stage.prov(snk, lm.manifest))


def ioi_split(snk) -> None:
    from mechrepro.core.registry import load_model
    from mechrepro.studies.ioi_generalization.data import discovery_split

    stage.setup(snk)
    cfg, ioi = snk.config["circuit"], snk.config["ioi"]
    lm = load_model(Path(snk.input.manifest).parent)
    ds = discovery_split(load_ioi_data(snk.input.data), cfg["n_prompts"] + cfg["n_validation"], lm.tokenizer,
                         lm.bos_id, snk.config["seed"], art.read_json(snk.input.eval), ioi["min_single_token_names"])
    ds["model"], ds["n_search"], ds["n_validation"] = lm.name, cfg["n_prompts"], cfg["n_validation"]
    log.info("discovery split: %d prompts (%d for ranking, %d held out for admission), %d dropped as evaluation "
             "prompts", ds["n"], cfg["n_prompts"], cfg["n_validation"], ds["n_dropped"])
    art.save_json(snk.output[0], ds, stage.prov(snk, lm.manifest))


def ioi_means(snk) -> None:
    from mechrepro.core.patching import template_means_batched
    from mechrepro.core.tokens import pad
    from mechrepro.studies.ioi_generalization.data import abc_sample

    stage.setup(snk)
    lm = stage.load_model(snk)
    n = snk.config["ablation"]["n_prompts"]
    tokens, templates = abc_sample(load_ioi_data(snk.input.data), snk.wildcards.variant, n, lm.tokenizer, lm.bos_id,
                                   snk.config["seed"], snk.config["ioi"]["min_single_token_names"])
    t = time.time()
    with torch.no_grad():
        means = template_means_batched(lm.model, pad(tokens, lm.bos_id), torch.tensor(templates),
                                       snk.config["model"]["batch_size"])
    log.info("%s: means of every head's z over %d ABC prompts, %d templates (%.1fs)", snk.wildcards.variant, n,
             len(means), time.time() - t)
    art.save_safetensors(snk.output[0], means_to_tensors(means, templates), stage.prov(snk, lm.manifest))


def means_to_tensors(means: dict[int, torch.Tensor], templates: list[int]) -> dict[str, torch.Tensor]:
    """The per-template means as one ``means [T, p, L, h, e]`` tensor (template ids ``templates``, prompt counts)."""
    ids = sorted(means)
    return {"means": torch.stack([means[t] for t in ids]), "templates": torch.tensor(ids),
            "counts": torch.tensor([templates.count(t) for t in ids])}


def _means(path: str) -> dict[int, torch.Tensor]:
    tensors, _ = art.load_safetensors(path, keys=["means", "templates"], rule="ioi_means")
    return {int(t): m for t, m in zip(tensors["templates"].tolist(), tensors["means"])}


def ioi_inference(snk) -> None:
    from mechrepro.core.patching import ioi_metrics, run_end_logits
    from mechrepro.studies.ioi_generalization.analysis import inference_table

    stage.setup(snk)
    lm = stage.load_model(snk)
    ds, batch = _batch(snk.input.data, lm)
    with torch.no_grad():
        logits, _ = run_end_logits(lm.model, batch.tokens, batch.pos["END"], batch_size=snk.config["model"]["batch_size"])
    frame, summary = inference_table(batch, ioi_metrics(logits, batch.io, batch.s), snk.wildcards.variant, lm.name)
    log.info("%s: LD %.3f, accuracy %.3f, P(IO) %.3f", snk.wildcards.variant, *summary["pooled"].values())
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def ioi_circuit(snk) -> None:
    from mechrepro.studies.ioi_generalization.circuit import (CURVE_COLUMNS, build_circuit, check_circuit,
                                                              circuit_source, finish_circuit, reference_circuit)

    stage.setup(snk)
    cfg = snk.config["circuit"]
    name = snk.config["model"]["name"]
    manifest = art.read_json(snk.input.manifest)
    curve = pd.DataFrame(columns=CURVE_COLUMNS)
    if circuit_source(cfg["source"], name) == "reference":
        circuit = reference_circuit(yaml.safe_load(Path(snk.input.reference).read_text())["study_a"]["wang_circuit"],
                                    name)
        check_circuit(circuit, manifest["spec"], f"{snk.input.reference} (study_a.wang_circuit)")
    else:
        lm = stage.load_model(snk)
        ds, batch = _batch(snk.input.data, lm)
        search, validation = batch.subset(range(cfg["n_prompts"])), batch.subset(range(cfg["n_prompts"], len(batch)))
        t = time.time()
        circuit, curve = build_circuit(lm.model, search, validation, _means(snk.input.means),
                                       {**cfg, "batch_size": snk.config["model"]["batch_size"]}, progress=log.info)
        log.info("discovery and admission took %.1fs; held-out faithfulness %.3f (target %.2f%s)", time.time() - t,
                 circuit["admission"]["faithfulness"], cfg["target_faithfulness"],
                 "" if circuit["admission"]["reached"] else f"; {circuit['admission']['reason']}")
        log.info("path patching, wang vs direct: %s", circuit["path_patching_agreement"])
    circuit, scores = finish_circuit(circuit, manifest["name"])
    log.info("circuit (%d heads): %s; positions %s", circuit["n_heads"],
             {c: [f"{l}.{h}" for l, h in v] for c, v in circuit["classes"].items()}, circuit["positions"])
    prov = stage.prov(snk, manifest)
    art.save_json(snk.output.circuit, circuit, prov)
    art.save_csv(snk.output.scores, scores, prov)
    art.save_csv(snk.output.curve, curve.reindex(columns=CURVE_COLUMNS), prov)


def ioi_evaluate(snk) -> None:
    from mechrepro.studies.ioi_generalization.analysis import evaluate_variant

    stage.setup(snk)
    circuit = _circuit(snk)
    lm = stage.load_model(snk)
    ds, batch = _batch(snk.input.data, lm)
    with torch.no_grad():
        summary, per_prompt, attention, example = evaluate_variant(
            lm.model, batch, circuit, snk.wildcards.variant, _means(snk.input.means), snk.config["model"]["batch_size"],
            progress=log.info)
    example["token_strings"] = [lm.tokenizer.decode([t]) for t in example.get("tokens", [])]
    summary["example_attention"] = example
    summary["model"] = lm.name
    log.info("%s: model LD %.3f, circuit LD %.3f, faithfulness %.3f", snk.wildcards.variant, summary["model_ld"],
             summary["circuit_ld"], summary["faithfulness"])
    prov = stage.prov(snk, lm.manifest)
    art.save_json(snk.output.summary, summary, prov)
    art.save_csv(snk.output.prompts, per_prompt, prov)
    art.save_csv(snk.output.attention, attention, prov)


def ioi_value_paths(snk) -> None:
    from mechrepro.studies.ioi_generalization.analysis import value_paths_by_variant

    stage.setup(snk)
    circuit = _circuit(snk)
    lm = stage.load_model(snk)
    cfg = {**snk.config["value_paths"], "batch_size": snk.config["model"]["batch_size"],
           "max_rows": snk.config["circuit"]["max_rows"], "path_patching": snk.config["circuit"]["path_patching"]}
    batches = {Path(path).stem: _batch(path, lm, cfg["n_prompts"])[1] for path in snk.input.data}
    frame = value_paths_by_variant(lm.model, batches, circuit, cfg, progress=log.info)
    art.save_csv(snk.output[0], frame, stage.prov(snk, lm.manifest))


def ioi_head_patching(snk) -> None:
    from mechrepro.studies.ioi_generalization.analysis import head_patching

    stage.setup(snk)
    lm = stage.load_model(snk)
    cfg = snk.config["head_patching"]
    ds, batch = _batch(snk.input.data, lm, cfg["n_prompts"])
    frame, summary = head_patching(lm.model, batch, cfg["top_k"], snk.config["circuit"]["max_rows"],
                                   cfg["confirm_all_positions"], cfg["grad_batch"])
    summary["model"] = lm.name
    log.info("head patching on %d prompts: %s; attribution vs exact: END %s, all positions %s", len(batch),
             {k: round(v, 1) for k, v in summary["timings"].items()}, summary["agreement_end"],
             summary["agreement_all_positions"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def ioi_mechanism(snk) -> None:
    from mechrepro.studies.ioi_generalization.analysis import mechanism_test

    stage.setup(snk)
    circuit = _circuit(snk)
    lm = stage.load_model(snk)
    cfg = snk.config["mechanism"]
    base_ld = art.read_json(snk.input.base_inference)["pooled"]["ld"]
    summaries, frames = {}, []
    for data, means in zip(snk.input.data, snk.input.means):
        variant = Path(data).stem
        ds, batch = _batch(data, lm, cfg["n_prompts"])
        with torch.no_grad():
            summary, frame = mechanism_test(lm.model, batch, circuit, _means(means), variant, base_ld, cfg["n_controls"],
                                            snk.config["seed"], snk.config["model"]["batch_size"], progress=log.info)
        log.info("%s: LD %.3f -> %.3f with the IO paths ablated (change %s; controls mean %s, max %s)", variant,
                 summary["model_ld"], summary.get("ablated_ld", float("nan")), summary.get("change"),
                 summary.get("control_mean"), summary.get("control_max"))
        summaries[variant] = summary
        frames.append(frame.assign(variant=variant))
    prov = stage.prov(snk, lm.manifest)
    art.save_json(snk.output.summary, {"model": lm.name, "variants": summaries}, prov)
    art.save_csv(snk.output.runs, pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), prov)


def ioi_metrics(snk) -> None:
    from mechrepro.studies.ioi_generalization.analysis import study_metrics

    stage.setup(snk)
    circuit = art.read_json(snk.input.circuit)
    evals = {Path(p).stem: art.read_json(p) for p in snk.input.evals}
    manifest = art.read_json(snk.input.manifest)
    mechanism = art.read_json(snk.input.mechanism)["variants"]
    metrics = study_metrics(circuit, evals, manifest, snk.config["ioi"]["n_prompts"], snk.config["ablation"], mechanism)
    art.save_json(snk.output[0], metrics, stage.prov(snk, manifest))
