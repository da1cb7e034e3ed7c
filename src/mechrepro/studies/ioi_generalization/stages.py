"""Stage functions of Study A (``workflow/rules/ioi_generalization.smk``), one per rule.

Each takes the ``snakemake`` object of a ``script:`` rule (called by
:func:`mechrepro.workflow.stage.dispatch`), reads the config and its inputs, calls the library
(``data``, ``circuit``, ``analysis``) and writes artifacts with provenance sidecars.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from mechrepro.workflow import artifacts as art
from mechrepro.workflow import stage
from mechrepro.studies.ioi_generalization.checks import load_ioi_data

log = logging.getLogger("mechrepro")


def check_circuit(circuit: dict, spec: dict, where: str) -> None:
    """Every circuit head must be a ``[layer, head]`` pair of integers inside the model.

    A negative index would otherwise silently select a head counted from the end (tensor
    indexing), and a too large one fail deep inside the ablation code.
    """
    n_layers, n_heads = spec["n_layers"], spec["n_heads"]
    classes = circuit.get("classes") if isinstance(circuit, dict) else None
    if not isinstance(classes, dict):
        raise ValueError(f"{where}: no 'classes' mapping of circuit heads")
    for cls, heads in classes.items():
        for head in heads or []:
            ok = (isinstance(head, (list, tuple)) and len(head) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in head)
                  and 0 <= head[0] < n_layers and 0 <= head[1] < n_heads)
            if not ok:
                raise ValueError(
                    f"{where}: head {head!r} of class '{cls}' is not a [layer, head] pair inside the model "
                    f"(layers 0-{n_layers - 1}, heads 0-{n_heads - 1}); fix it there, or rebuild the circuit "
                    "with 'snakemake --forcerun ioi_circuit'")


def _circuit(snk) -> dict:
    """The circuit artifact, checked against the model's shape (before the model is loaded)."""
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


def ioi_inference(snk) -> None:
    from mechrepro.core.patching import ioi_metrics, run_end_logits

    stage.setup(snk)
    lm = stage.load_model(snk)
    ds, batch = _batch(snk.input.data, lm)
    with torch.no_grad():
        logits, _ = run_end_logits(lm.model, batch.tokens, batch.pos["END"], batch_size=snk.config["model"]["batch_size"])
    m = ioi_metrics(logits, batch.io, batch.s)
    frame = pd.DataFrame({"prompt": range(len(batch)), "order": batch.order, "template": batch.template.tolist(),
                          "ld": m["ld"].tolist(), "correct": m["correct"].tolist(), "p_io": m["p_io"].tolist()})
    summary = {"variant": snk.wildcards.variant, "model": lm.name, "n": len(batch),
               "pooled": {"ld": frame.ld.mean(), "accuracy": frame.correct.mean(), "p_io": frame.p_io.mean()},
               "by_order": {o: {"ld": g.ld.mean(), "accuracy": g.correct.mean(), "p_io": g.p_io.mean(), "n": len(g)}
                            for o, g in frame.groupby("order")}}
    log.info("%s: LD %.3f, accuracy %.3f, P(IO) %.3f", snk.wildcards.variant, *summary["pooled"].values())
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def ioi_circuit(snk) -> None:
    from mechrepro.studies.ioi_generalization.circuit import CLASSES, discover

    stage.setup(snk)
    cfg = snk.config["circuit"]
    name = snk.config["model"]["name"]
    source = cfg["source"]
    if source == "auto":
        source = "reference" if name == "gpt2" else "discover"
    manifest = art.read_json(snk.input.manifest)
    if source == "reference":
        if name != "gpt2":
            raise ValueError("circuit.source 'reference' is Wang et al.'s GPT-2 small circuit; it needs model.name gpt2")
        classes = yaml.safe_load(Path(snk.input.reference).read_text())["study_a"]["wang_circuit"]
        circuit = {"source": "reference", "method": "Wang et al. 2022", "classes": classes, "scores": {}}
        check_circuit(circuit, manifest["spec"], f"{snk.input.reference} (study_a.wang_circuit)")
    else:
        lm = stage.load_model(snk)
        ds, batch = _batch(snk.input.data, lm, cfg["n_prompts"])
        t = time.time()
        circuit = discover(lm.model, batch, {**cfg, "batch_size": snk.config["model"]["batch_size"]}, progress=log.info)
        log.info("discovery took %.1fs", time.time() - t)
    circuit["model"] = manifest["name"]
    circuit["classes"] = {c: circuit["classes"].get(c, []) for c in CLASSES}
    circuit["n_heads"] = len({tuple(h) for v in circuit["classes"].values() for h in v})
    rows = [dict(step=step, **r) for step, lst in circuit.pop("scores").items() for r in lst]
    log.info("circuit (%d heads): %s", circuit["n_heads"],
             {c: [f"{l}.{h}" for l, h in v] for c, v in circuit["classes"].items()})
    prov = stage.prov(snk, manifest)
    art.save_json(snk.output.circuit, circuit, prov)
    art.save_csv(snk.output.scores, pd.DataFrame(rows, columns=["step", "layer", "head", "effect", "attribution"]), prov)


def ioi_evaluate(snk) -> None:
    from mechrepro.studies.ioi_generalization.analysis import evaluate_variant

    stage.setup(snk)
    circuit = _circuit(snk)
    lm = stage.load_model(snk)
    ds, batch = _batch(snk.input.data, lm)
    with torch.no_grad():
        summary, per_prompt, attention, example = evaluate_variant(
            lm.model, batch, circuit, snk.wildcards.variant, snk.config["model"]["batch_size"], progress=log.info)
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
    from mechrepro.studies.ioi_generalization.analysis import value_paths

    stage.setup(snk)
    circuit = _circuit(snk)
    lm = stage.load_model(snk)
    cfg = {**snk.config["value_paths"], "batch_size": snk.config["model"]["batch_size"],
           "max_rows": snk.config["circuit"]["max_rows"]}
    frames = []
    for path in snk.input.data:
        variant = Path(path).stem
        ds, batch = _batch(path, lm, cfg["n_prompts"])
        for role in (["S2", "IO2"] if variant == "double_io" else ["S2"]):
            df = value_paths(lm.model, batch, circuit, role, cfg, progress=log.info)
            df.insert(0, "variant", variant)
            frames.append(df)
    art.save_csv(snk.output[0], pd.concat(frames, ignore_index=True), stage.prov(snk, lm.manifest))


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


def ioi_metrics(snk) -> None:
    stage.setup(snk)
    circuit = art.read_json(snk.input.circuit)
    evals = {Path(p).stem: art.read_json(p) for p in snk.input.evals}
    keys = ("model_ld", "circuit_ld", "faithfulness", "accuracy", "p_io", "n")
    manifest = art.read_json(snk.input.manifest)
    metrics = {
        "model": circuit["model"],
        "model_description": manifest["description"],
        "n_prompts": snk.config["ioi"]["n_prompts"],
        "circuit_method": circuit["method"],
        "ablation": snk.config["ablation"],
        "variants": {v: {k: e[k] for k in keys} for v, e in evals.items()},
        "circuit": {"n_heads": circuit["n_heads"], "source": circuit["source"], "classes": circuit["classes"]},
        "restored": {v: {k: r["ld"] for k, r in e["restored"].items()} for v, e in evals.items() if e["restored"]},
        "restored_faithfulness": {v: {k: r["faithfulness"] for k, r in e["restored"].items()}
                                  for v, e in evals.items() if e["restored"]},
        "table2": {v: _table2_row(v, e) for v, e in evals.items()},
        "by_order": {v: e["by_order"] for v, e in evals.items()},
    }
    art.save_json(snk.output[0], metrics, stage.prov(snk, manifest))


def _table2_row(variant: str, e: dict) -> dict:
    """Table 2: the circuit with the IO-duplicate paths added (all name tokens restored)."""
    key = {"double_io": "s2_io2", "triple_io": "s2_io2_io3"}.get(variant)
    if key is None:
        return {"nodes": e["nodes"], "edges": e["edges"], "edge_overlap": 1.0, "model_ld": e["model_ld"],
                "circuit_ld": e["circuit_ld"], "faithfulness": e["faithfulness"]}
    r = e["restored"][key]
    return {"nodes": e["nodes"], "edges": r["edges"], "edge_overlap": r["edge_overlap_with_base"],
            "model_ld": e["model_ld"], "circuit_ld": r["ld"], "faithfulness": r["faithfulness"]}
