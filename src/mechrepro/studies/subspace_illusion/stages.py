"""Stage functions of Study B (``workflow/rules/subspace_illusion.smk``), one per rule.

Called by :func:`mechrepro.workflow.stage.dispatch`:

* :func:`subspace_toy` — the Section 3 toy network (``toy.json``);
* :func:`subspace_ioi_dataset` — ABB ↔ BAB pairs, train / test (``ioi_data.json``);
* :func:`subspace_ioi_das` — one DAS direction per site (``das/{site}.safetensors`` + ``.json``);
* :func:`subspace_ioi_eval` — baselines, row/null decompositions, Table 1, histogram data
  (``ioi.json``, ``directions.safetensors``, ``ioi_pairs.csv``, ``ioi_projections.csv``,
  ``ioi_dormant.csv``);
* :func:`facts_dataset` — facts the model knows and their pairs (``facts/data.json``);
* :func:`facts_key_stats` — ROME's key second moment per layer (``rome/key_stats/layer{l}.safetensors``);
* :func:`facts_layer` — one job per layer: 1-D patches vs the full-MLP, row-/null-space and rank-1-edit
  interventions (``facts/layer{l}.*``);
* :func:`rome_layer` — one job per layer: ROME vs its subspace intervention (``rome/layer{l}.*``);
* :func:`facts_summary` / :func:`rome_summary` — the ``facts.json`` / ``rome.json`` parts;
* :func:`subspace_metrics` — ``metrics.json``: the top-level keys of every part file
  (``SUBSPACE_PARTS`` of ``workflow/rules/subspace_illusion.smk``) merged, plus the model.

The library: this study's ``toy``, ``ioi``, ``facts``, ``rome`` and ``metrics`` modules.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mechrepro.workflow import artifacts as art
from mechrepro.workflow.artifacts import load_safetensors, save_safetensors
from mechrepro.studies.subspace_illusion import facts as F
from mechrepro.studies.subspace_illusion.metrics import FACTS_KEYS, ROME_KEYS
from mechrepro.workflow import stage

log = logging.getLogger("mechrepro")


# ------------------------------------------------------------------ helpers
def _site(snk) -> tuple[dict, dict]:
    """The circuit (checked against the model's shape) and the resolved site layer."""
    from mechrepro.studies.ioi_generalization.circuit import check_circuit
    from mechrepro.studies.subspace_illusion.ioi import resolve_layer

    circuit = art.read_json(snk.input.circuit)
    spec = art.read_json(snk.input.manifest)["spec"]
    check_circuit(circuit, spec, str(snk.input.circuit))
    site = resolve_layer(snk.config["subspace"]["layer"], circuit, spec["n_layers"])
    return circuit, site


def _pairs(snk, lm, split: str):
    from mechrepro.studies.subspace_illusion.ioi import to_batch

    data = art.read_json(snk.input.data)
    if split not in data or "pairs" not in data[split]:
        raise art.ArtifactError(f"{snk.input.data} has no '{split}' pairs; rerun 'snakemake --forcerun "
                                f"subspace_ioi_dataset'")
    return to_batch(data[split]["pairs"], lm.bos_id)


# ------------------------------------------------------------------ stages
def subspace_toy(snk) -> None:
    """The paper's Section 3 toy network: patch effects and the hidden states behind them."""
    from mechrepro.studies.subspace_illusion.toy import toy_record

    stage.setup(snk)
    toy = toy_record()
    log.info("toy: full %.3f, e3 %.3f, v %.3f, v_null %.3f, v_row %.3f", toy["full"], toy["e3"],
             toy["v"], toy["v_null"], toy["v_row"])
    art.save_json(snk.output[0], {"toy": toy}, stage.prov(snk))


def subspace_ioi_dataset(snk) -> None:
    from mechrepro.studies.ioi_generalization.checks import load_ioi_data
    from mechrepro.core.registry import load_model
    from mechrepro.studies.subspace_illusion.ioi import load_data, make_pairs

    stage.setup(snk)
    cfg = snk.config["subspace_ioi"]
    templates = load_data(snk.input.templates)
    lists = load_ioi_data(snk.input.names)
    lm = load_model(Path(snk.input.manifest).parent)
    ds = make_pairs(templates, lists, cfg["n_train"], cfg["n_test"], lm.tokenizer, lm.bos_id, snk.config["seed"])
    ds["model"] = lm.name
    for split in ("train", "test"):
        d = ds[split]
        log.info("%s: %d pairs over templates %s; %d names, %d places, %d objects; e.g. %r -> source %r", split,
                 len(d["pairs"]), d["templates"], len(d["names"]), len(d["places"]), len(d["objects"]),
                 d["pairs"][0]["text"], d["pairs"][0]["src_text"])
    art.save_json(snk.output[0], ds, stage.prov(snk, lm.manifest))


def subspace_ioi_das(snk) -> None:
    """DAS for one direction at ``wildcards.site`` (``mlp`` or ``resid``) on the training pairs."""
    from mechrepro.studies.subspace_illusion.ioi import train_das

    stage.setup(snk)
    site_name = snk.wildcards.site
    _, site = _site(snk)
    lm = stage.load_model(snk)
    v, summary = train_das(lm.model, _pairs(snk, lm, "train"), site, site_name, snk.config["subspace_ioi"],
                           snk.config["seed"], snk.config["model"]["batch_size"], lm.name, progress=log.info)
    log.info("DAS %s at layer %d: loss %.3f -> %.3f in %d steps (%.1fs); train FLDD %.1f%%, interchange acc %.3f",
             site_name, site["layer"], summary["loss_first"], summary["loss_last"], summary["steps"],
             summary["timings"]["train_s"], summary["train_fldd"], summary["train_interchange_acc"])
    prov = stage.prov(snk, lm.manifest)
    save_safetensors(snk.output.direction, {"v": v}, prov,
                     {"site": site_name, "layer": str(site["layer"]), "model": lm.name})
    art.save_json(snk.output.json, summary, prov)


def _learned(snk, layer: int) -> dict:
    """The DAS directions (``v_mlp``, ``v_resid``), checked to come from the site layer."""
    learned = {}
    for path in snk.input.das:
        tensors, meta = load_safetensors(path)
        if meta.get("layer") != str(layer) or "v" not in tensors:
            raise art.ArtifactError(f"{path} was learned at layer {meta.get('layer')}, not at the site layer {layer}; "
                                    f"rerun 'snakemake --forcerun subspace_ioi_das'")
        learned[f"v_{meta['site']}"] = tensors["v"]
    return learned


def subspace_ioi_eval(snk) -> None:
    """Baselines, decompositions, Table 1 on the test pairs, and the histogram tables."""
    from mechrepro.studies.subspace_illusion.ioi import evaluate_site

    stage.setup(snk)
    _, site = _site(snk)
    learned = _learned(snk, site["layer"])
    lm = stage.load_model(snk)
    ref = next(iter(lm.model.buffers()))
    learned = {k: v.to(dtype=ref.dtype, device=ref.device) for k, v in learned.items()}
    ev = evaluate_site(lm.model, _pairs(snk, lm, "train"), _pairs(snk, lm, "test"), site, learned,
                       snk.config["model"]["batch_size"], lm.name, lm.description(), progress=log.info)
    for row, r in ev.rows.items():
        log.info("%-13s FLDD %8.2f%%  interchange acc %.3f", row, r["fldd"], r["interchange_acc"])
    d = ev.details
    log.info("clean LD %.3f, clean accuracy %.3f; cos(v_resid, v_grad) %.3f; null norms %s (random: %s)",
             d["clean_ld"], d["clean_acc"], d["cos"]["v_resid_v_grad"], d["null_norm"], d["random_null_norm"])
    prov = stage.prov(snk, lm.manifest)
    art.save_csv(snk.output.pairs, ev.pairs, prov)
    art.save_csv(snk.output.projections, ev.projections, prov)
    art.save_csv(snk.output.dormant, ev.dormant, prov)
    save_safetensors(snk.output.directions, ev.dirs, prov, {"layer": str(site["layer"]), "model": lm.name})
    art.save_json(snk.output.ioi, {"ioi_table1": ev.rows, "ioi": d}, prov)


def subspace_metrics(snk) -> None:
    """``metrics.json``: the model, then the top-level keys of every part file, copied in.

    Parts are listed in ``SUBSPACE_PARTS`` of ``workflow/rules/subspace_illusion.smk`` (toy, IOI, and the facts and
    ROME parts of the other Study B rules); a key found in two parts is an error (it would be lost).
    """
    from mechrepro.studies.subspace_illusion.metrics import merge_parts

    stage.setup(snk)
    manifest = art.read_json(snk.input.manifest)
    metrics = merge_parts(manifest, [(str(path), art.read_json(path)) for path in snk.input.parts])
    log.info("metrics from %d parts: %s", len(snk.input.parts), ", ".join(k for k in metrics if k not in
                                                                            ("model", "model_description")))
    art.save_json(snk.output[0], metrics, stage.prov(snk, manifest))


# ------------------------------------------------------------------ factual recall and fact editing


def _data(snk) -> dict:
    data = art.read_json(snk.input.data)
    for key in ("facts", "pairs"):
        if key not in data:
            raise ValueError(f"{snk.input.data}: no '{key}'; rebuild it with 'snakemake --forcerun facts_dataset'")
    return data


def _load_sigma(path: str, d_mlp: int) -> torch.Tensor:
    """ROME's key second moment ``Σ [f, f]`` (made by ``facts_key_stats``), on the default device."""
    tensors, _ = load_safetensors(path, shapes={"sigma": (d_mlp, d_mlp)}, rule="facts_key_stats")
    return tensors["sigma"].to(torch.get_default_device(), torch.get_default_dtype())


def facts_dataset(snk) -> None:
    stage.setup(snk)
    cfg = snk.config["facts"]
    lm = stage.load_model(snk)
    relations = F.load_facts_data(snk.input.facts_data)
    if cfg["counterfact_file"]:
        relations = {**relations, **F.load_counterfact(cfg["counterfact_file"])}
    facts = F.build_facts(relations, lm.encode, lm.bos_id)
    facts = F.answer_facts(lm.model, facts, snk.config["model"]["batch_size"])
    n_correct, by_rel = F.count_correct(facts)
    log.info("%d facts, %d answered correctly (top-1): %s", len(facts), n_correct,
             {k: f"{v['correct']}/{v['n']}" for k, v in by_rel.items()})
    pairs = F.make_pairs(facts, cfg["n_pairs"], snk.config["seed"], cfg["require_correct"])
    F.check_pairs(pairs, facts, cfg["min_pairs"], lm.name, snk.input.facts_data)
    log.info("%d pairs over %d relations", len(pairs), len({p["relation"] for p in pairs}))
    out = {"model": lm.name, "model_description": lm.description(), "require_correct": cfg["require_correct"],
           "n_facts": len(facts), "n_correct": n_correct, "by_relation": by_rel, "facts": facts, "pairs": pairs}
    art.save_json(snk.output[0], out, stage.prov(snk, lm.manifest))


def facts_key_stats(snk) -> None:
    from mechrepro.studies.subspace_illusion import rome as R

    stage.setup(snk)
    cfg = snk.config["rome"]
    lm = stage.load_model(snk)
    layers = [int(Path(p).stem.removeprefix("layer")) for p in snk.output]
    t = time.time()
    texts = F.corpus_texts(cfg["corpus"])
    log.info("corpus %s: %d paragraphs; keys of %d tokens for layers %s", cfg["corpus"], len(texts),
             cfg["corpus_tokens"], layers)
    batches = F.corpus_batches(texts, lm.encode, lm.bos_id, cfg["corpus_tokens"], cfg["chunk_tokens"],
                               snk.config["model"]["batch_size"])
    sigmas, n = R.key_moments(lm.model, layers, batches)
    log.info("Σ from %d keys in %.1fs", n, time.time() - t)
    prov = stage.prov(snk, lm.manifest)
    for path, layer in zip(snk.output, layers):
        C = sigmas[layer]
        save_safetensors(path, {"sigma": C}, prov, {"layer": layer, "n_keys": n, "corpus": cfg["corpus"]})


def facts_layer(snk) -> None:
    stage.setup(snk)
    cfg = snk.config["facts"]
    layer = int(snk.wildcards.layer)
    data = _data(snk)
    lm = stage.load_model(snk)
    if not 0 <= layer < lm.model.spec.n_layers:
        raise ValueError(f"facts.layers has {layer}, outside the model's layers 0-{lm.model.spec.n_layers - 1}")
    C = _load_sigma(snk.input.sigma, lm.model.spec.d_mlp)
    t = time.time()
    log.info("layer %d: learning %d directions (%s, %d steps, lrs %s, %d trials)", layer, len(data["pairs"]),
             cfg["optimizer"], cfg["steps"], cfg["lrs"], cfg["trials"])
    frame, summary, V = F.sweep_layer(lm.model, layer, data["facts"], data["pairs"], C, steps=cfg["steps"],
                                      lrs=cfg["lrs"], seed=snk.config["seed"], log=log.info, optimizer=cfg["optimizer"],
                                      trials=cfg["trials"], end_factor=cfg["lr_end_factor"])
    summary["optimizer"] = cfg["optimizer"]
    summary["timings"] = {"seconds": time.time() - t}
    summary["model"] = lm.name
    log.info("layer %d: flips 1-D %.3f, full MLP %.3f, row %.3f, null %.3f, rank-1 edit %.3f (agrees %.3f); "
             "null norm %.3f (random %.3f); %.1fs", layer, summary["flip_frac_1d"], summary["flip_frac_full_mlp"],
             summary["flip_frac_row"], summary["flip_frac_null"], summary["flip_frac_rank1_edit"],
             summary["rank1_agrees_1d"], summary["null_norm"], summary["random_null_norm"], summary["timings"]["seconds"])
    prov = stage.prov(snk, lm.manifest)
    art.save_csv(snk.output.csv, frame, prov)
    save_safetensors(snk.output.directions, {"directions": V}, prov, {"layer": layer})
    art.save_json(snk.output.json, summary, prov)


def rome_layer(snk) -> None:
    from mechrepro.studies.subspace_illusion import rome as R

    stage.setup(snk)
    cfg = snk.config["rome"]
    layer = int(snk.wildcards.layer)
    data = _data(snk)
    lm = stage.load_model(snk)
    C = _load_sigma(snk.input.sigma, lm.model.spec.d_mlp)
    pairs = data["pairs"][:cfg["n_pairs"]]
    params = R.ValueParams(**{k: cfg[k] for k in ("method", "steps", "lr", "weight_decay", "clamp", "kl_factor",
                                                  "early_stop")})
    t = time.time()
    contexts = _contexts(cfg, lm, snk.config["seed"]) if params.method == "rome" else []
    log.info("layer %d: ROME edits (%s value step) for %d pairs, %d context prefixes: %s", layer, params.method,
             len(pairs), len(contexts), contexts)
    setup = F.RomeSetup(lm.model, layer, C, cfg["ridge"], params, contexts, lm.encode, lm.bos_id)
    frame, summary = F.rome_layer(setup, data["facts"], pairs, log=log.info)
    summary["timings"] = {"seconds": time.time() - t}
    summary["model"] = lm.name
    summary["contexts"] = contexts
    log.info("layer %d: rewrite ROME %.3f, derived %.3f, row-only %.3f, delta only %.3f, pearson %s, exact %.2f; "
             "clamp hit %.2f, |delta|/|v0| %.2f, steps %.1f, alpha_min/|delta| %s; %.1fs", layer, summary["rome"],
             summary["derived_subspace"], summary["row_only"], summary["rome_delta_only"], summary["pearson"],
             summary["exact_frac"], summary["clamp_frac"], summary["delta_rel"], summary["mean_steps"],
             summary["alpha_min_rel"], summary["timings"]["seconds"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def _contexts(cfg: dict, lm, seed: int) -> list[str]:
    """ROME's context prefixes: ``rome.contexts`` if it is a list, else sampled from the model (seeded)."""
    from mechrepro.studies.subspace_illusion import rome as R

    if isinstance(cfg["contexts"], list):
        return list(cfg["contexts"])

    def decode(ids: list[int]) -> str:
        return lm.tokenizer.decode(ids, skip_special_tokens=True)

    return R.generate_contexts(lm.model, lm.bos_id, decode, cfg["context_lengths"], seed)


def _summary(snk, key: str, fields: tuple[str, ...], extra: dict | None = None) -> None:
    from mechrepro.studies.subspace_illusion.metrics import per_layer

    stage.setup(snk)
    summaries = [(str(path), art.read_json(path)) for path in snk.input.layers]
    art.save_json(snk.output[0], {key: per_layer(summaries, fields), **(extra or {})},
                  stage.prov(snk, art.read_json(snk.input.manifest)))


def facts_summary(snk) -> None:
    from mechrepro.studies.subspace_illusion.metrics import dataset_summary

    _summary(snk, "facts", FACTS_KEYS, {"facts_dataset": dataset_summary(art.read_json(snk.input.data))})


def rome_summary(snk) -> None:
    _summary(snk, "rome", ROME_KEYS)
