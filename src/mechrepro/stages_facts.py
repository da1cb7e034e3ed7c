"""Stage functions of Study B's factual-recall and fact-editing rules (``workflow/rules/facts.smk``).

Rules: ``facts_dataset`` (facts the model knows, pairs), ``facts_key_stats`` (ROME's key second
moment per layer, safetensors), ``facts_layer`` (one job per layer: 1-D patches vs full-MLP,
row-/null-space and rank-1-edit interventions), ``rome_layer`` (one job per layer: ROME vs its
subspace intervention), ``facts_summary`` / ``rome_summary`` (the ``facts.json`` / ``rome.json``
parts of Study B's metrics). See :mod:`mechrepro.facts`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import artifacts as art
from . import facts as F
from .stages import _model, _prov, _save_table_and_summary, _setup

log = logging.getLogger("mechrepro")


def _data(snk) -> dict:
    data = art.read_json(snk.input.data)
    for key in ("facts", "pairs"):
        if key not in data:
            raise ValueError(f"{snk.input.data}: no '{key}'; rebuild it with 'snakemake --forcerun facts_dataset'")
    return data


def _save_tensors(path: str, tensors: dict, prov: dict, metadata: dict | None = None) -> None:
    from .stages_subspace import save_safetensors

    save_safetensors(path, tensors, prov, {k: str(v) for k, v in (metadata or {}).items()})


def _load_sigma(path: str, layer: int, d_mlp: int) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        C = load_file(path)["sigma"]
    except (SafetensorError, KeyError, OSError) as err:
        raise ValueError(f"{path}: not a key-statistics file ({err}); rebuild it with "
                         "'snakemake --forcerun facts_key_stats'") from err
    if C.shape != (d_mlp, d_mlp):
        raise ValueError(f"{path}: Σ of shape {tuple(C.shape)}, expected ({d_mlp}, {d_mlp}) for layer {layer}; "
                         "rebuild it with 'snakemake --forcerun facts_key_stats'")
    return C.to(torch.get_default_device(), torch.get_default_dtype())


def facts_dataset(snk) -> None:
    _setup(snk)
    cfg = snk.config["facts"]
    lm = _model(snk)
    relations = F.load_facts_data(snk.input.facts_data)
    if cfg["counterfact_file"]:
        relations = {**relations, **F.load_counterfact(cfg["counterfact_file"])}
    facts = F.build_facts(relations, lm.encode, lm.bos_id)
    facts = F.answer_facts(lm.model, facts, snk.config["model"]["batch_size"])
    n_correct = sum(f["correct"] for f in facts)
    by_rel = {}
    for f in facts:
        r = by_rel.setdefault(f["relation"], {"n": 0, "correct": 0})
        r["n"] += 1
        r["correct"] += int(f["correct"])
    log.info("%d facts, %d answered correctly (top-1): %s", len(facts), n_correct,
             {k: f"{v['correct']}/{v['n']}" for k, v in by_rel.items()})
    pairs = F.make_pairs(facts, cfg["n_pairs"], snk.config["seed"], cfg["require_correct"])
    F.check_pairs(pairs, facts, cfg["min_pairs"], lm.name, snk.input.facts_data)
    log.info("%d pairs over %d relations", len(pairs), len({p["relation"] for p in pairs}))
    out = {"model": lm.name, "model_description": lm.description(), "require_correct": cfg["require_correct"],
           "n_facts": len(facts), "n_correct": n_correct, "by_relation": by_rel, "facts": facts, "pairs": pairs}
    art.save_json(snk.output[0], out, _prov(snk, lm.manifest))


def facts_key_stats(snk) -> None:
    from . import rome as R

    _setup(snk)
    cfg = snk.config["rome"]
    lm = _model(snk)
    layers = [int(Path(p).stem.removeprefix("layer")) for p in snk.output]
    t = time.time()
    texts = F.corpus_texts(cfg["corpus"])
    log.info("corpus %s: %d paragraphs; keys of %d tokens for layers %s", cfg["corpus"], len(texts),
             cfg["corpus_tokens"], layers)
    batches = F.corpus_batches(texts, lm.encode, lm.bos_id, cfg["corpus_tokens"], cfg["chunk_tokens"],
                               snk.config["model"]["batch_size"])
    sigmas, n = R.key_moments(lm.model, layers, batches)
    log.info("Σ from %d keys in %.1fs", n, time.time() - t)
    prov = _prov(snk, lm.manifest)
    for path, layer in zip(snk.output, layers):
        C = sigmas[layer]
        _save_tensors(path, {"sigma": C}, prov, {"layer": layer, "n_keys": n, "corpus": cfg["corpus"]})


def facts_layer(snk) -> None:
    _setup(snk)
    cfg = snk.config["facts"]
    layer = int(snk.wildcards.layer)
    data = _data(snk)
    lm = _model(snk)
    if not 0 <= layer < lm.model.spec.n_layers:
        raise ValueError(f"facts.layers has {layer}, outside the model's layers 0-{lm.model.spec.n_layers - 1}")
    C = _load_sigma(snk.input.sigma, layer, lm.model.spec.d_mlp)
    t = time.time()
    log.info("layer %d: learning %d directions (%d steps, lrs %s)", layer, len(data["pairs"]), cfg["steps"], cfg["lrs"])
    frame, summary, V = F.sweep_layer(lm.model, layer, data["facts"], data["pairs"], C, steps=cfg["steps"],
                                      lrs=cfg["lrs"], seed=snk.config["seed"], log=log.info)
    summary["timings"] = {"seconds": time.time() - t}
    summary["model"] = lm.name
    log.info("layer %d: flips 1-D %.3f, full MLP %.3f, row %.3f, null %.3f, rank-1 edit %.3f (agrees %.3f); "
             "null norm %.3f (random %.3f); %.1fs", layer, summary["flip_frac_1d"], summary["flip_frac_full_mlp"],
             summary["flip_frac_row"], summary["flip_frac_null"], summary["flip_frac_rank1_edit"],
             summary["rank1_agrees_1d"], summary["null_norm"], summary["random_null_norm"], summary["timings"]["seconds"])
    prov = _prov(snk, lm.manifest)
    art.save_csv(snk.output.csv, frame, prov)
    _save_tensors(snk.output.directions, {"directions": V}, prov, {"layer": layer})
    art.save_json(snk.output.json, summary, prov)


def rome_layer(snk) -> None:
    _setup(snk)
    cfg = snk.config["rome"]
    layer = int(snk.wildcards.layer)
    data = _data(snk)
    lm = _model(snk)
    C = _load_sigma(snk.input.sigma, layer, lm.model.spec.d_mlp)
    pairs = data["pairs"][:cfg["n_pairs"]]
    t = time.time()
    log.info("layer %d: ROME edits for %d pairs", layer, len(pairs))
    value_kwargs = {k: cfg[k] for k in ("steps", "lr", "weight_decay", "clamp")}
    frame, summary = F.rome_layer(lm.model, layer, data["facts"], pairs, C, ridge=cfg["ridge"],
                                  value_kwargs=value_kwargs, log=log.info)
    summary["timings"] = {"seconds": time.time() - t}
    summary["model"] = lm.name
    log.info("layer %d: rewrite ROME %.3f, derived %.3f, row-only %.3f, pearson %s; %.1fs", layer,
             summary["rome"], summary["derived_subspace"], summary["row_only"], summary["pearson"], summary["timings"]["seconds"])
    _save_table_and_summary(snk, frame, summary, lm.manifest)


FACTS_KEYS = ("n_pairs", "flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row", "flip_frac_null",
              "flip_frac_rank1_edit", "rank1_agrees_1d", "rank1_key_max_err", "ld_clean", "ld_rel_1d",
              "ld_rel_full_mlp", "ld_rel_row", "ld_rel_null", "ld_rel_rank1_edit", "null_norm", "random_null_norm")
ROME_KEYS = ("n_pairs", "rome", "derived_subspace", "row_only", "pearson", "exact_frac")


def _summary(snk, key: str, fields: tuple[str, ...]) -> None:
    _setup(snk)
    per_layer = {}
    for path in snk.input.layers:
        s = art.read_json(path)
        missing = [k for k in fields if k not in s]
        if missing:
            raise ValueError(f"{path}: missing {missing}; rebuild it (snakemake --forcerun)")
        per_layer[str(s["layer"])] = {k: s[k] for k in fields}
    per_layer = dict(sorted(per_layer.items(), key=lambda kv: int(kv[0])))
    art.save_json(snk.output[0], {key: per_layer}, _prov(snk, art.read_json(snk.input.manifest)))


def facts_summary(snk) -> None:
    _summary(snk, "facts", FACTS_KEYS)


def rome_summary(snk) -> None:
    _summary(snk, "rome", ROME_KEYS)
