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

The library: :mod:`mechrepro.core.subspace` and this study's ``ioi``, ``facts`` and ``rome`` modules.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from mechrepro.workflow import artifacts as art
from mechrepro.core import subspace as S
from mechrepro.studies.subspace_illusion import facts as F
from mechrepro.workflow import stage
from mechrepro.studies.ioi_generalization.stages import _circuit

log = logging.getLogger("mechrepro")


# ------------------------------------------------------------------ helpers
def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], prov: dict,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors (an open format), atomically, with a provenance sidecar.

    ``metadata`` is stored as one JSON string under the key ``mechrepro`` (sorted keys): safetensors
    writes several metadata entries in an arbitrary order, which would make equal files differ.
    """
    import json

    from safetensors.torch import save_file

    meta = {"mechrepro": json.dumps(metadata or {}, sort_keys=True)}
    with art.atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    art.write_provenance(path, prov)
    return Path(path)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors artifact; a corrupt file raises :class:`ArtifactError`."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta.get("mechrepro", "{}"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise art.ArtifactError(f"{path} is corrupt ({exc}); delete it and rerun 'snakemake {path}'") from exc


@contextlib.contextmanager
def one_thread():
    """Run gradient computations, reductions and decompositions (SVD) on one thread, so that their
    sums are added in the same order whatever number of cores Snakemake gives the job (results are
    then identical; the forward passes do not depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _site(snk) -> tuple[dict, dict]:
    """The circuit (checked against the model's shape) and the resolved site layer."""
    from mechrepro.studies.subspace_illusion.ioi import resolve_layer

    circuit = _circuit(snk)
    spec = art.read_json(snk.input.manifest)["spec"]
    site = resolve_layer(snk.config["subspace"]["layer"], circuit, spec["n_layers"])
    return circuit, site


def _pairs(snk, lm, split: str):
    from mechrepro.studies.subspace_illusion.ioi import to_batch

    data = art.read_json(snk.input.data)
    if split not in data or "pairs" not in data[split]:
        raise art.ArtifactError(f"{snk.input.data} has no '{split}' pairs; rerun 'snakemake --forcerun "
                                f"subspace_ioi_dataset'")
    return to_batch(data[split]["pairs"], lm.bos_id)


def _float(x) -> float:
    return float(x)


# ------------------------------------------------------------------ stages
def subspace_toy(snk) -> None:
    """The paper's Section 3 toy network: patch effects and the hidden states behind them."""
    stage.setup(snk)
    m = S.ToyModel()
    effects = S.toy_example(m)
    eye = torch.eye(3, dtype=torch.float64)
    v = S.unit(eye[0] + eye[1])
    v_row, v_null = S.decompose(v, S.rowspace_basis(m.W_out))
    h_b, h_s = m.hidden(torch.tensor(1.0, dtype=torch.float64)), m.hidden(torch.tensor(-1.0, dtype=torch.float64))
    dirs = {"e3": eye[2], "v": v, "v_null": S.unit(v_null), "v_row": S.unit(v_row)}
    toy = {**effects,
           "weights": {"w_in": m.w_in.tolist(), "W_out": m.W_out.tolist(), "r": m.r.tolist(),
                       "readout_w": (m.W_out @ m.r).tolist()},
           "x_base": 1.0, "x_src": -1.0, "h_base": h_b.tolist(), "h_src": h_s.tolist(),
           "directions": {k: d.tolist() for k, d in dirs.items()},
           "h_patched": {k: S.subspace_patch(h_b, h_s, d).tolist() for k, d in dirs.items()}}
    log.info("toy: full %.3f, e3 %.3f, v %.3f, v_null %.3f, v_row %.3f", effects["full"], effects["e3"],
             effects["v"], effects["v_null"], effects["v_row"])
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
    from mechrepro.studies.subspace_illusion.ioi import cache_site, learn, patched, site_pair

    stage.setup(snk)
    site_name = snk.wildcards.site
    _, site = _site(snk)
    layer = site["layer"]
    cfg = snk.config["subspace_ioi"]
    lm = stage.load_model(snk)
    batch = _pairs(snk, lm, "train")
    bs = snk.config["model"]["batch_size"]
    t0 = time.time()
    cache = cache_site(lm.model, batch, layer, bs, progress=log.info)
    t_cache = time.time() - t0
    history: list[float] = []
    t0 = time.time()
    with one_thread():
        v = learn(lm.model, cache, batch, site_name, epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch"],
                  seed=snk.config["seed"], history=history)
    t_train = time.time() - t0
    ld, top = patched(lm.model, cache, batch, site_name, v, bs)
    summary = {
        "site": site_name, "layer": layer, "layer_rule": site["rule"], "model": lm.name,
        "hook": f"blocks.{layer}.mlp.hook_post" if site_name == "mlp" else f"blocks.{layer}.hook_resid_post",
        "dim": int(site_pair(cache, site_name)[0].shape[1]), "n_train": len(batch),
        "lr": cfg["lr"], "epochs": cfg["epochs"], "batch": cfg["batch"], "steps": len(history),
        "loss_first": history[0], "loss_last": history[-1], "loss": history,
        "train_fldd": S.fldd(ld, cache.clean_ld),
        "train_interchange_acc": float((top == batch.expected).float().mean()),
        "timings": {"cache_s": t_cache, "train_s": t_train},
    }
    log.info("DAS %s at layer %d: loss %.3f -> %.3f in %d steps (%.1fs); train FLDD %.1f%%, interchange acc %.3f",
             site_name, layer, history[0], history[-1], len(history), t_train, summary["train_fldd"],
             summary["train_interchange_acc"])
    prov = stage.prov(snk, lm.manifest)
    save_safetensors(snk.output.direction, {"v": v}, prov, {"site": site_name, "layer": str(layer), "model": lm.name})
    art.save_json(snk.output.json, summary, prov)


def subspace_ioi_eval(snk) -> None:
    """Baselines, decompositions, Table 1 on the test pairs, and the histogram tables."""
    import torch.nn.functional as F

    from mechrepro.studies.subspace_illusion.ioi import (TABLE1_ROWS, cache_site, decompose_all, dormant_pathway, grad_direction,
                               mean_direction, null_norm, projections, table1)

    stage.setup(snk)
    _, site = _site(snk)
    layer = site["layer"]
    name_movers = [tuple(h) for h in site["name_movers"]]
    learned = {}
    for path in snk.input.das:
        tensors, meta = load_safetensors(path)
        if meta.get("layer") != str(layer) or "v" not in tensors:
            raise art.ArtifactError(f"{path} was learned at layer {meta.get('layer')}, not at the site layer {layer}; "
                                    f"rerun 'snakemake --forcerun subspace_ioi_das'")
        learned[f"v_{meta['site']}"] = tensors["v"]
    lm = stage.load_model(snk)
    model, bs = lm.model, snk.config["model"]["batch_size"]
    dtype = next(iter(model.buffers())).dtype
    learned = {k: v.to(dtype=dtype, device=next(iter(model.buffers())).device) for k, v in learned.items()}
    train, test = _pairs(snk, lm, "train"), _pairs(snk, lm, "test")
    t = {}
    t0 = time.time()
    c_train = cache_site(model, train, layer, bs, progress=log.info)
    with one_thread():  # gradients, means and SVDs add in a thread-dependent order otherwise
        v_grad = grad_direction(model, c_train, train, name_movers, bs)
        v_mean = mean_direction(c_train, train)
    del c_train
    t["baselines_s"] = time.time() - t0
    t0 = time.time()
    cache = cache_site(model, test, layer, bs, progress=log.info)
    t["cache_test_s"] = time.time() - t0
    with one_thread():
        parts = decompose_all(model, layer, learned["v_mlp"], learned["v_resid"], name_movers)
    dirs = {"v_mlp": learned["v_mlp"], "v_resid": learned["v_resid"], **parts["dirs"], "v_grad": v_grad,
            "v_mean": v_mean}
    t0 = time.time()
    rows, frame = table1(model, cache, test, dirs, bs)
    t["table1_s"] = time.time() - t0
    for row, r in rows.items():
        log.info("%-13s FLDD %8.2f%%  interchange acc %.3f", row, r["fldd"], r["interchange_acc"])
    Q_res = parts["Q"]["resid"]
    dim, rdim = parts["dim"], parts["rowspace_dim"]
    clean_correct = (cache.clean_top == test.io).float()
    details = {
        "model": lm.name, "model_description": lm.description(),
        "layer": layer, "layer_rule": site["rule"], "s_inhibition": site["s_inhibition"],
        "name_movers": site["name_movers"], "n_train": len(train), "n_test": len(test),
        "sites": {"mlp": f"blocks.{layer}.mlp.hook_post", "resid": f"blocks.{layer}.hook_resid_post"},
        "clean_ld": _float(cache.clean_ld.mean()), "clean_acc": _float(clean_correct.mean()),
        "clean_ld_by_order": {o: _float(cache.clean_ld[test.is_abb == (o == "ABB")].mean()) for o in ("ABB", "BAB")},
        # |cos|: a direction and its negative give the same patch, so the sign carries no meaning
        "cos": {"v_resid_v_grad": abs(_float(F.cosine_similarity(dirs["v_resid"], v_grad, dim=0))),
                "v_resid_v_mean": abs(_float(F.cosine_similarity(dirs["v_resid"], v_mean, dim=0))),
                "v_grad_v_mean": abs(_float(F.cosine_similarity(v_grad, v_mean, dim=0)))},
        "null_norm": {**parts["null_norm"], "v_grad": null_norm(v_grad, Q_res), "v_mean": null_norm(v_mean, Q_res)},
        "random_null_norm": {"mlp": S.random_null_norm(dim["mlp"], rdim["mlp"]),
                             "resid": S.random_null_norm(dim["resid"], rdim["resid"])},
        "dim": dim, "rowspace_dim": rdim,
        "rows": {row: {"site": s, "direction": k or "full"} for row, (s, k) in TABLE1_ROWS.items()},
        "timings": t,
    }
    log.info("clean LD %.3f, clean accuracy %.3f; cos(v_resid, v_grad) %.3f; null norms %s (random: %s)",
             details["clean_ld"], details["clean_acc"], details["cos"]["v_resid_v_grad"], details["null_norm"],
             details["random_null_norm"])
    prov = stage.prov(snk, lm.manifest)
    art.save_csv(snk.output.pairs, frame, prov)
    art.save_csv(snk.output.projections, projections(cache, test, dirs), prov)
    art.save_csv(snk.output.dormant, dormant_pathway(model, cache, test, dirs, v_grad), prov)
    save_safetensors(snk.output.directions, dirs, prov, {"layer": str(layer), "model": lm.name})
    art.save_json(snk.output.ioi, {"ioi_table1": rows, "ioi": details}, prov)


def subspace_metrics(snk) -> None:
    """``metrics.json``: the model, then the top-level keys of every part file, copied in.

    Parts are listed in ``SUBSPACE_PARTS`` of ``workflow/rules/subspace_illusion.smk`` (toy, IOI, and the facts and
    ROME parts of the other Study B rules); a key found in two parts is an error (it would be lost).
    """
    stage.setup(snk)
    manifest = art.read_json(snk.input.manifest)
    metrics: dict = {"model": manifest["name"], "model_description": manifest["description"]}
    origin: dict[str, str] = {}
    for path in snk.input.parts:
        part = art.read_json(path)
        if not isinstance(part, dict):
            raise art.ArtifactError(f"{path}: a metrics part must be a JSON object; rerun the rule that makes it")
        for key, value in part.items():
            if key in metrics:
                raise ValueError(f"metrics part {path} has the key '{key}', which "
                                 f"{origin.get(key, 'the model description')} already gives; rename one of them")
            metrics[key] = value
            origin[key] = str(path)
        model = part.get("ioi", {}).get("model") if isinstance(part.get("ioi"), dict) else None
        if model is not None and model != manifest["name"]:
            raise art.ArtifactError(f"{path} was made with model {model!r}, not {manifest['name']!r}; rerun it")
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


def _save_tensors(path: str, tensors: dict, prov: dict, metadata: dict | None = None) -> None:
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
    stage.setup(snk)
    cfg = snk.config["facts"]
    lm = stage.load_model(snk)
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
        _save_tensors(path, {"sigma": C}, prov, {"layer": layer, "n_keys": n, "corpus": cfg["corpus"]})


def facts_layer(snk) -> None:
    stage.setup(snk)
    cfg = snk.config["facts"]
    layer = int(snk.wildcards.layer)
    data = _data(snk)
    lm = stage.load_model(snk)
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
    prov = stage.prov(snk, lm.manifest)
    art.save_csv(snk.output.csv, frame, prov)
    _save_tensors(snk.output.directions, {"directions": V}, prov, {"layer": layer})
    art.save_json(snk.output.json, summary, prov)


def rome_layer(snk) -> None:
    stage.setup(snk)
    cfg = snk.config["rome"]
    layer = int(snk.wildcards.layer)
    data = _data(snk)
    lm = stage.load_model(snk)
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
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


FACTS_KEYS = ("n_pairs", "flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row", "flip_frac_null",
              "flip_frac_rank1_edit", "rank1_agrees_1d", "rank1_key_max_err", "ld_clean", "ld_rel_1d",
              "ld_rel_full_mlp", "ld_rel_row", "ld_rel_null", "ld_rel_rank1_edit", "null_norm", "random_null_norm")
ROME_KEYS = ("n_pairs", "rome", "derived_subspace", "row_only", "pearson", "exact_frac")


def _summary(snk, key: str, fields: tuple[str, ...]) -> None:
    stage.setup(snk)
    per_layer = {}
    for path in snk.input.layers:
        s = art.read_json(path)
        missing = [k for k in fields if k not in s]
        if missing:
            raise ValueError(f"{path}: missing {missing}; rebuild it (snakemake --forcerun)")
        per_layer[str(s["layer"])] = {k: s[k] for k in fields}
    per_layer = dict(sorted(per_layer.items(), key=lambda kv: int(kv[0])))
    art.save_json(snk.output[0], {key: per_layer}, stage.prov(snk, art.read_json(snk.input.manifest)))


def facts_summary(snk) -> None:
    _summary(snk, "facts", FACTS_KEYS)


def rome_summary(snk) -> None:
    _summary(snk, "rome", ROME_KEYS)
