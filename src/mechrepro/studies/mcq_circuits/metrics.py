"""Study C's results: the analyses of :mod:`~mechrepro.studies.mcq_circuits.analysis` run over
every analysis prompt, turned into the tables and summaries the stages write, and the paper's
summaries the paper's claims are tested on (the claims themselves are data:
``reference/published.yaml``, evaluated by :mod:`mechrepro.workflow.claims`).

The analyses work on one padded batch; here they run over batches of prompts (made by
:func:`~mechrepro.studies.mcq_circuits.data.to_batch`) and their per-prompt results are joined
(:func:`evaluate_batches`, :func:`dla_batches`) or averaged, weighted by batch size
(:func:`patching_means`, :func:`head_means`). Then, per analysis:

1. **Accuracy** (:func:`accuracy_table`): per item, the predicted option, correctness, LD, loss
   and P(correct); accuracy by correct position and by task.
2. **Direct logit attribution** (:func:`dla_table`, :func:`dla_summary`): per node the mean DLA,
   its standard error and its mean per correct letter; the share of |DLA| carried by the top
   ``k`` nodes.
3. **Activation patching** (:func:`patching_table`, :func:`patching_summary`): per node the total
   and direct effect; a node is flagged (its effect goes mostly through later nodes) under
   :data:`FLAG_RULE`.
4. **Head categories** (:func:`heads_table`): each head's mean attention statistics and DLA by
   letter, and its category (:func:`~mechrepro.studies.mcq_circuits.analysis.categorize`).
5. **Low rank** (:func:`pick_head`, :func:`fit_head`, :func:`low_rank_losses`,
   :func:`key_projections`, :func:`low_rank_summary`): the head is fitted on the first half of
   the prompts and evaluated on the second half, full, mean-ablated and with its q / k / v
   compressed to each rank.
6. **Mutations** (:func:`mutation_settings`, :func:`evaluate_settings`): a label set evaluated
   with the head full, low rank or mean-ablated.

:func:`study_metrics` gathers ``metrics.json``, with what the claims read: the head categories
(:func:`category_counts`), the flagged nodes, whether the low-rank head is a correct-letter head,
how its keys cluster by position (:func:`key_position_r2`) and what it keeps of the full head's
accuracy on each mutated label set where the comparison means something (:func:`low_rank_counted`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechrepro.core.model import Transformer
from mechrepro.studies.mcq_circuits import analysis as ma
from mechrepro.studies.mcq_circuits.data import Prompt

Batch = dict[str, Tensor]
Head = tuple[int, int]
FLAG_RULE = "|total| ≥ 0.5 × the largest |total| and |direct| < 0.3 × |total|"


def option_letters(n: int) -> list[str]:
    """The list positions' letters ``A``, ``B``, … of ``n`` options (table columns)."""
    return list("ABCDEFGH"[:n])


def node_name(layer: int, head: int | None) -> str:
    """``L{layer}H{head}`` for a head, ``MLP{layer}`` for an MLP (``head`` None)."""
    return f"MLP{layer}" if head is None else f"L{layer}H{head}"


# --------------------------------------------------------------------------------------- 1. accuracy
def evaluate_batches(model: Transformer, batches: Iterable[Batch], hooks=None, batch_size: int = 64
                     ) -> dict[str, Tensor]:
    """:func:`~mechrepro.studies.mcq_circuits.analysis.evaluate` of every batch, joined per prompt."""
    parts = [ma.evaluate(model, b, hooks, batch_size) for b in batches]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def accuracy_table(items: list[dict], prompts: list[Prompt], res: dict[str, Tensor], label_set: str,
                   model_name: str) -> tuple[pd.DataFrame, dict]:
    """The per-item table and the summary of one label set (``res``: :func:`evaluate_batches`)."""
    frame = pd.DataFrame({"uid": [it["uid"] for it in items], "task": [it["task"] for it in items],
                          "correct_option": [p.correct for p in prompts], "labels": [" ".join(p.labels) for p in prompts],
                          "pred": res["pred"].tolist(), "correct": res["correct"].tolist(), "ld": res["ld"].tolist(),
                          "loss": res["loss"].tolist(), "p_correct": res["p_correct"].tolist()})
    letters = option_letters(len(prompts[0].labels))
    summary = {"label_set": label_set, "model": model_name, "n": len(frame),
               "accuracy": frame.correct.mean(), "loss": frame.loss.mean(), "ld": frame.ld.mean(),
               "by_correct_position": {letters[j]: g.correct.mean() for j, g in frame.groupby("correct_option")},
               "by_task": {t: g.correct.mean() for t, g in frame.groupby("task")},
               "example": prompts[0].text}
    return frame, summary


# --------------------------------------------------------------------------------------- 2. DLA
def dla_batches(model: Transformer, batches: Iterable[Batch]) -> tuple[dict[str, Tensor], Tensor]:
    """Per-prompt DLA of every node (:func:`~mechrepro.studies.mcq_circuits.analysis.dla`) and the
    correct option of each prompt, over all batches."""
    parts, correct = [], []
    with torch.no_grad():
        for b in batches:
            comps = ma.end_components(model, b)
            parts.append(ma.dla(model, comps, b["answer_ids"], b["correct"]))
            correct.append(b["correct"])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, torch.cat(correct)


def dla_table(dl: dict[str, Tensor], correct: Tensor, letters: list[str]) -> pd.DataFrame:
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
            row(node_name(l, h), l, h, "head", dl["heads"][:, l, h])
        row(node_name(l, None), l, -1, "mlp", dl["mlps"][:, l])
    row("embed", -1, -1, "embed", dl["embed"])
    row("bias", -1, -1, "bias", dl["bias"])
    return pd.DataFrame(rows)


def dla_summary(dl: dict[str, Tensor], frame: pd.DataFrame, top_k: int, model_name: str, n: int) -> dict:
    """LD, the parts' sum and its largest error, and the share of |DLA| of the top-``k`` heads and
    MLPs (of the total |DLA| and of LD), also for every ``k`` up to 30 (``share_by_k``)."""
    nodes = frame[frame.kind.isin(["head", "mlp"])]
    absd = nodes.dla.abs().sort_values(ascending=False)
    k = top_k
    return {"model": model_name, "n": n, "ld": dl["ld"].mean().item(), "dla_total": dl["total"].mean().item(),
            "max_abs_sum_error": (dl["total"] - dl["ld"]).abs().max().item(), "top_k": k,
            "top_k_share_abs": absd.iloc[:k].sum() / absd.sum(),
            "top_k_share_of_ld": nodes.loc[absd.index[:k], "dla"].sum() / dl["ld"].mean().item(),
            "share_by_k": {int(i): float(absd.iloc[:i].sum() / absd.sum()) for i in range(1, min(len(absd), 30) + 1)}}


# --------------------------------------------------------------------------------------- 3. patching
def patching_means(model: Transformer, batch_pairs: Iterable[tuple[Batch, Batch]], max_rows: int,
                   progress: Callable[[int], None] | None = None) -> tuple[dict[str, Tensor], int]:
    """The effects of :func:`~mechrepro.studies.mcq_circuits.analysis.patch_nodes` over every
    (clean, corrupted) batch pair, averaged over prompts (each batch weighted by its size), and the
    number of prompts. ``progress(n)`` is called after each batch with the prompts done."""
    acc: dict[str, Tensor] = {}
    n = 0
    for cb, xb in batch_pairs:
        res = ma.patch_nodes(model, cb, xb, max_rows=max_rows)
        w = len(cb["end"])
        for k, v in res.items():
            acc[k] = acc.get(k, 0) + v * w
        n += w
        if progress is not None:
            progress(n)
    return {k: v / n for k, v in acc.items()}, n


def patching_table(res: dict[str, Tensor]) -> pd.DataFrame:
    """One row per head and MLP: total and direct effect (final-norm scale frozen; and
    ``direct_effect_norm``, the norm recomputed), and the :data:`FLAG_RULE` flag."""
    L, H = res["heads_total"].shape
    rows = [{"node": node_name(l, h), "layer": l, "head": h, "kind": "head",
             "total_effect": res["heads_total"][l, h].item(),
             "direct_effect": res["heads_direct"][l, h].item(),
             "direct_effect_norm": res["heads_direct_norm"][l, h].item()} for l in range(L) for h in range(H)]
    rows += [{"node": node_name(l, None), "layer": l, "head": -1, "kind": "mlp",
              "total_effect": res["mlps_total"][l].item(),
              "direct_effect": res["mlps_direct"][l].item(),
              "direct_effect_norm": res["mlps_direct_norm"][l].item()} for l in range(L)]
    frame = pd.DataFrame(rows)
    big = frame.total_effect.abs() >= 0.5 * frame.total_effect.abs().max()
    frame["indirect_flag"] = big & (frame.direct_effect.abs() < 0.3 * frame.total_effect.abs())
    return frame


def patching_summary(frame: pd.DataFrame, res: dict[str, Tensor], n: int, model_name: str) -> dict:
    """Clean and corrupted LD and the flagged nodes."""
    return {"model": model_name, "n": n, "clean_ld": res["clean_ld"].item(), "corrupt_ld": res["corrupt_ld"].item(),
            "flagged": frame.loc[frame.indirect_flag, "node"].tolist(), "flag_rule": FLAG_RULE}


# --------------------------------------------------------------------------------------- 4. heads
def head_means(model: Transformer, batches: Iterable[Batch]) -> tuple[dict[str, Tensor], int]:
    """Each head's attention statistics at END averaged over every prompt, and the number of prompts:
    ``label_att``, ``correct_share`` (of the label attention, on the correct label), ``position_share``
    (per list position), ``content_correct``, ``content_other``, ``answer``."""
    sums: dict[str, Tensor] = {}
    n = 0
    with torch.no_grad():
        for b in batches:
            st = ma.attention_stats(ma.end_components(model, b)["pattern"], b)
            labels = st["labels"]
            tot = labels.sum(-1)
            share = labels / tot.clamp_min(1e-9)[..., None]  # [b, L, h, n]
            correct_share = share.gather(3, b["correct"][:, None, None, None].expand(-1, *share.shape[1:3], 1))[..., 0]
            for k, v in {"label_att": tot, "correct_share": correct_share, "position_share": share,
                         "content_correct": st["content_correct"], "content_other": st["content_other"],
                         "answer": st["answer"]}.items():
                sums[k] = sums.get(k, 0) + v.sum(0)
            n += len(b["end"])
    return {k: v / n for k, v in sums.items()}, n


def heads_table(mean: dict[str, Tensor], dla: pd.DataFrame, letters: list[str]) -> pd.DataFrame:
    """One row per head: its mean statistics (:func:`head_means`), its DLA and DLA by correct letter
    (``dla``: the DLA table indexed by node) and its category."""
    L, H = mean["label_att"].shape
    rows = []
    for l in range(L):
        for h in range(H):
            node = node_name(l, h)
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
    return pd.DataFrame(rows)


def heads_summary(frame: pd.DataFrame, n: int, model_name: str) -> dict:
    """The category rules and the number of heads in each category."""
    return {"model": model_name, "n": n, "rules": ma.CATEGORY_RULES, "counts": frame.category.value_counts().to_dict()}


# --------------------------------------------------------------------------------------- 5. low rank
def pick_head(heads: pd.DataFrame, verify: pd.DataFrame | None = None) -> tuple[Head, str, bool]:
    """The head of the low-rank analysis, why, and whether it passed every check of
    :mod:`~mechrepro.studies.mcq_circuits.verify`: the verified head with the largest DLA, else the
    correct-letter-category head with the largest DLA, else the head with the largest DLA."""
    by_dla = heads.sort_values("dla", ascending=False)
    if verify is not None:
        ok = set(verify.loc[verify.passes.astype(bool), "node"])
        good = by_dla[by_dla.node.isin(ok)]
        if len(good):
            r = good.iloc[0]
            return (int(r["layer"]), int(r["head"])), "the verified correct-letter head with the largest DLA", True
    cl = by_dla[by_dla.category == "correct-letter"]
    if len(cl):
        r = cl.iloc[0]
        return ((int(r["layer"]), int(r["head"])),
                "no head passed the correct-letter checks: the correct-letter-category head with the largest DLA", False)
    r = by_dla.iloc[0]
    return (int(r["layer"]), int(r["head"])), "no head met the correct-letter rule: the head with the largest DLA", False


def fit_test_split(prompts: list[Prompt]) -> tuple[list[Prompt], list[Prompt]]:
    """The first half of the prompts to fit on, the second half to test on (the first half when
    there is no second)."""
    half = max(1, len(prompts) // 2)
    return prompts[:half], prompts[half:] or prompts[:half]


def fit_head(model: Transformer, fit_batch: Batch, head: Head) -> tuple[dict[str, dict], Tensor]:
    """The low-rank fits of the head's q / k / v (:func:`~mechrepro.studies.mcq_circuits.analysis.fit_low_rank`)
    and its mean output ``z`` at END (for mean ablation), on the fit prompts."""
    col = ma.collect_qkv(model, fit_batch, head)
    fits = {k: ma.fit_low_rank(col[k]) for k in ma.KINDS}
    with torch.no_grad():
        comps = ma.end_components(model, fit_batch)
    return fits, comps["z"][:, head[0], head[1]].mean(0)


def low_rank_losses(model: Transformer, test_batch: Batch, head: Head, fits: dict[str, dict], mean_z: Tensor,
                    ranks: Sequence[int], batch_size: int) -> dict:
    """Loss, accuracy and LD on the test prompts: ``full``, ``ablated`` (mean ablation) and
    ``by_kind[kind][rank]`` with q, k, v or all three (``qkv``) compressed to each rank (the
    configured ``ranks`` capped at ``d_head``, plus ``d_head`` itself, keyed ``full``)."""
    e = model.spec.d_head
    ranks = sorted({min(r, e) for r in ranks} | {e})

    def ev(hooks_fn) -> dict:
        res = ma.evaluate(model, test_batch, hooks_fn, batch_size)
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
    return {"ranks": ranks, "full": full, "ablated": ablated, "by_kind": by_kind}


def key_projections(model: Transformer, batch: Batch, prompts: list[Prompt], head: Head, fit_k: dict[str, Tensor],
                    label_set: str) -> list[dict]:
    """The head's keys at the label positions in their top-3 principal directions (``fit_k``), one
    row per prompt and label (the paper's key scatter)."""
    keys = ma.collect_qkv(model, batch, head)["k"]  # [b, n, e]
    V = fit_k["basis"][:3].to(keys.dtype)
    pcs = (keys - fit_k["mean"].to(keys.dtype)) @ V.T
    rows = []
    for i, p in enumerate(prompts):
        for j, lab in enumerate(p.labels):
            rows.append({"label_set": label_set, "prompt": i, "position": j + 1, "label": lab,
                         "is_correct": j == p.correct, **{f"pc{c + 1}": pcs[i, j, c].item() for c in range(pcs.shape[-1])}})
    return rows


def low_rank_summary(model_name: str, head: Head, selection: str, d_head: int, n_fit: int, n_test: int,
                     losses: dict, fits: dict[str, dict], mutation_rank: int,
                     key_r2: dict[str, float | None] | None = None) -> dict:
    """``low_rank.json``: the head and why, :func:`low_rank_losses`, the loss by rank of the q/k/v
    compression, the singular values of each fit, the rank the mutations use and how the keys
    cluster by position (``key_r2``: :func:`key_position_r2`)."""
    return {"model": model_name, "head": node_name(*head), "layer": head[0], "head_index": head[1],
            "selection": selection, "d_head": d_head, "n_fit": n_fit, "n_test": n_test, "ranks": losses["ranks"],
            "full": losses["full"], "ablated": losses["ablated"], "by_kind": losses["by_kind"],
            "loss_by_rank": {k: v["loss"] for k, v in losses["by_kind"]["qkv"].items()},
            "singular_values": {k: fits[k]["singular_values"].tolist() for k in ma.KINDS},
            "mutation_rank": min(mutation_rank, d_head), "key_position_r2": key_r2 or {}}


# --------------------------------------------------------------------------------------- 6. mutations
def mutation_settings(model: Transformer, head: Head, fits: dict[str, dict], mean_z: Tensor, rank: int
                      ) -> dict[str, Callable[[Batch], dict | None]]:
    """The head ``full``, with q / k / v at ``rank`` (``low_rank``), or mean-ablated (``ablated``):
    each a function of a batch → its hooks."""
    return {"full": lambda b: None,
            "low_rank": lambda b: ma.low_rank_hooks(model, head, fits, {k: rank for k in ma.KINDS}, b),
            "ablated": lambda b: ma.mean_ablation_hooks(head, mean_z, b)}


def evaluate_settings(model: Transformer, batches: list[Batch], settings: dict[str, Callable], batch_size: int
                      ) -> dict[str, dict[str, float]]:
    """Accuracy, loss and LD over every batch under each setting's hooks."""
    out = {}
    for name, hooks in settings.items():
        res = evaluate_batches(model, batches, hooks, batch_size)
        out[name] = {"accuracy": res["correct"].mean().item(), "loss": res["loss"].mean().item(),
                     "ld": res["ld"].mean().item()}
    return out


# --------------------------------------------------------------------------------------- metrics.json
def top_nodes(dla: pd.DataFrame, patch: pd.DataFrame, heads: pd.DataFrame, k: int) -> list[dict]:
    """The ``k`` heads and MLPs with the largest |DLA|: DLA, total and direct effect, category."""
    nodes = dla[dla.kind.isin(["head", "mlp"])]
    top = nodes.dla.abs().sort_values(ascending=False).index[:k]
    return [{"node": n, "dla": float(dla.loc[n, "dla"]), "total_effect": float(patch.loc[n, "total_effect"]),
             "direct_effect": float(patch.loc[n, "direct_effect"]),
             "category": heads.loc[n, "category"] if n in heads.index else "mlp"} for n in top]


def key_position_r2(keys: pd.DataFrame) -> dict[str, float | None]:
    """Per label set of :func:`key_projections`: the share of the keys' variance (their top-3 principal
    components) explained by the list position alone, ``1 − within-position / total`` sum of squares
    (the paper: keys cluster by position, an "Nth item" feature). None when the keys do not vary."""
    pcs = [c for c in keys.columns if c.startswith("pc")]
    out = {}
    for label_set, g in keys.groupby("label_set", sort=False):
        x = g[pcs].to_numpy(float)
        total = ((x - x.mean(0)) ** 2).sum()
        within = sum(((p[pcs].to_numpy(float) - p[pcs].to_numpy(float).mean(0)) ** 2).sum()
                     for _, p in g.groupby("position"))
        out[str(label_set)] = float(1 - within / total) if total > 0 else None
    return out


def low_rank_counted(muts: dict[str, dict], min_competence: float = 0.0,
                     min_head_effect: float = 0.0) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per mutated label set (not ``abcd``), the paper's Figure 11 comparison, on the sets where it
    can say something: ``(kept, recovered, excluded)``.

    * ``kept``: the low-rank head's accuracy as a fraction of the full head's;
    * ``recovered``: the part of what mean-ablating the head costs that the low-rank head gives back,
      (low rank − ablated) / (full − ablated);
    * ``excluded``: why a set does not count, when the full head is not competent on it (accuracy
      below ``min_competence``, or 0), or mean-ablating the head costs less than ``min_head_effect``
      of accuracy (the model does not use the head there, so low rank and full cannot differ
      because of it)."""
    kept, recovered, excluded = {}, {}, {}
    for k, m in muts.items():
        if k == "abcd":
            continue
        full, low, abl = (m[s]["accuracy"] for s in ("full", "low_rank", "ablated"))
        if full <= 0 or full < min_competence:
            excluded[k] = f"the full head's accuracy {full:.3f} is below {min_competence}"
        elif full - abl <= 0 or full - abl < min_head_effect:
            excluded[k] = f"mean-ablating the head costs {full - abl:.3f} of accuracy (needs {min_head_effect})"
        else:
            kept[k], recovered[k] = low / full, (low - abl) / (full - abl)
    return kept, recovered, excluded


def category_counts(heads: pd.DataFrame) -> dict[str, int]:
    """How many heads fall in each category of :data:`~mechrepro.studies.mcq_circuits.analysis.CATEGORY_RULES`."""
    counts = heads.category.value_counts()
    return {c: int(counts.get(c, 0)) for c in ma.CATEGORY_RULES}


def organism_summary(training: dict) -> dict:
    """The organism's training record in ``metrics.json`` (empty for a registry model)."""
    if training.get("trained") is False:
        return {}
    keys = ("heldout", "heldout_by_label_set", "steps_run", "n_parameters", "n_trained_parameters", "timings")
    return {k: training[k] for k in keys if k in training} | {"label_control": bool(training.get("label_control"))}


def verification(verify: pd.DataFrame, summary: dict, top: list[str]) -> dict:
    """What ``metrics.json`` says about the correct-letter checks: the passing heads, and every
    check's number for them and for the ``top`` heads by |DLA|."""
    show = [n for n in dict.fromkeys([*summary["heads_passing"], *top]) if n in verify.index]

    def number(x):
        return None if pd.isna(x) else (bool(x) if isinstance(x, (bool, np.bool_)) else float(x))

    return {"n_heads_passing": summary["n_heads_passing"], "heads_passing": summary["heads_passing"],
            "swap_model": summary.get("swap_model"), "thresholds": summary["thresholds"],
            "checks_passed": {c: len(v) for c, v in summary["checks_passed"].items()},
            "heads": {n: {k: number(v) for k, v in verify.loc[n].items()} for n in show}}


def study_metrics(manifest: dict, training: dict, acc: dict[str, dict], muts: dict[str, dict], dla: pd.DataFrame,
                  patch: pd.DataFrame, heads: pd.DataFrame, lr: dict, dla_summary: dict, n_items: int,
                  top_k: int, verify: pd.DataFrame, verify_summary: dict, min_competence: float,
                  min_head_effect: float) -> dict:
    """``metrics.json`` of Study C from every analysis' artifacts (tables indexed by node)."""
    n_nodes = len(dla[dla.kind.isin(["head", "mlp"])])
    k10 = max(1, round(0.1 * n_nodes))  # the top 10 % of the heads and MLPs
    top_decile_share = dla_summary["share_by_k"][str(k10)]
    return {
        "model": manifest["name"], "model_description": manifest["description"],
        "model_spec": {k: manifest["spec"][k] for k in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head")},
        "organism": organism_summary(training),
        "label_sets": list(acc), "n_items": n_items, "n_analysis": dla_summary["n"],
        "accuracy": {k: v["accuracy"] for k, v in acc.items()},
        "loss": {k: v["loss"] for k, v in acc.items()},
        "dla": {"ld": dla_summary["ld"], "top_k": top_k, "top_k_share_abs": dla_summary["top_k_share_abs"],
                "n_nodes": n_nodes, "top_decile_k": k10, "top_decile_share_abs": top_decile_share},
        "top_nodes": top_nodes(dla, patch, heads, top_k),
        "head_categories": category_counts(heads),
        "patching": {"n_flagged": int(patch.indirect_flag.sum()), "flagged": list(patch.index[patch.indirect_flag])},
        "verification": verification(verify, verify_summary, [t["node"] for t in top_nodes(dla, patch, heads, top_k)
                                                             if t["node"].startswith("L")][:3]),
        "low_rank": {"head": lr["head"], "selection": lr["selection"], "d_head": lr["d_head"],
                     "head_label_attention": float(heads.loc[lr["head"], "label_att"]),
                     "head_category": heads.loc[lr["head"], "category"],
                     # a head that passed every check of verify.py (the claims that need one read this)
                     "correct_letter_head": bool(lr.get("verified", False)),
                     "loss_by_rank": lr["loss_by_rank"], "ablated_loss": lr["ablated"]["loss"],
                     "key_position_r2": lr.get("key_position_r2")},
        "mutations": {k: {s: m[s]["accuracy"] for s in ("full", "low_rank", "ablated")} for k, m in muts.items()},
        "mutation_rank": next(iter(muts.values()))["rank"] if muts else None,
        "min_competence": min_competence, "min_head_effect": min_head_effect,
        # only the mutated sets that count (low_rank_counted); the claims read low_rank_kept
        **dict(zip(("low_rank_kept", "low_rank_recovered", "low_rank_excluded"),
                   low_rank_counted(muts, min_competence, min_head_effect))),
    }
