"""Study A analyses: does the base IOI circuit generalize to the DoubleIO / TripleIO variants?

* :func:`evaluate_variant` — model LD, circuit LD (everything outside the circuit mean-ablated over
  the variant's ABC prompts, per template), faithfulness = circuit LD / model LD, split by name
  order; the Figure 5 configurations that restore the duplicate/induction/previous-token heads at
  other tokens; per-head attention to the correct and incorrect tokens in model and circuit.
* :func:`value_paths` — Figure 6: path patching from every earlier head into the S-inhibition
  heads' values, from S2 or from IO2.
* :func:`head_patching` — activation patching of every head, exact and by attribution.
* :func:`inference_table`, :func:`study_metrics` — the tables and the study's ``metrics.json``
  (with Table 2, :func:`table2_row`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from mechrepro.studies.ioi_generalization.circuit import circuit_heads, count_edges, keep_mask
from mechrepro.studies.ioi_generalization.data import Batch
from mechrepro.core.model import Transformer
from mechrepro.core.patching import (
    ablation_hooks, frozen_cache_names, frozen_run, ioi_metrics, logit_diff, path_patch, path_patch_attribution,
    run_end_logits, sender_deltas, stack_z,
)

# Figure 5 configurations per variant: name -> tokens at which early heads are kept ("all": everywhere).
RESTORE_CONFIGS = {
    "double_io": {"s2_only": ["S2"], "io2_only": ["IO2"], "s2_io2": ["S2", "IO2"], "all": "all"},
    "triple_io": {"s2_only": ["S2"], "io2_only": ["IO2"], "io3_only": ["IO3"], "s2_io2": ["S2", "IO2"],
                  "s2_io2_io3": ["S2", "IO2", "IO3"], "all": "all"},
}
# Per class: query role, the "correct" key roles and the "incorrect" key roles (Figures 2-4).
ATTENTION_ROLES = {
    "name_mover": ("END", ["IO1", "IO2", "IO3"], ["S1", "S2"]),
    "backup_name_mover": ("END", ["IO1", "IO2", "IO3"], ["S1", "S2"]),
    "negative_name_mover": ("END", ["IO1", "IO2", "IO3"], ["S1", "S2"]),
    "s_inhibition": ("END", ["S2"], ["IO2", "IO1"]),
    "induction": ("S2", ["S1+1"], ["IO1+1"]),
    "duplicate_token": ("S2", ["S1"], ["IO1"]),
    "previous_token": ("S1+1", ["S1"], ["IO1"]),
}


def _attention(pattern: torch.Tensor, batch: Batch, q_role: str, key_roles: list[str], first_only: bool) -> torch.Tensor:
    """Attention ``[b]`` from ``q_role`` to the key roles present in each prompt (summed)."""
    rows = torch.arange(len(batch))
    q = batch.pos[q_role]
    total = torch.zeros(len(batch))
    for role in key_roles:
        k = batch.pos[role]
        ok = k >= 0
        total[ok] += pattern[rows[ok], q[ok], k[ok]]
        if first_only and ok.all():
            break
    return total


def inference_table(batch: Batch, m: dict[str, torch.Tensor], variant: str, model_name: str
                    ) -> tuple[pd.DataFrame, dict]:
    """The model's own behaviour on one variant, from its IOI metrics ``m`` (``ld``, ``correct``,
    ``p_io`` per prompt): the per-prompt table and the summary (pooled and by name order)."""
    frame = pd.DataFrame({"prompt": range(len(batch)), "order": batch.order, "template": batch.template.tolist(),
                          "ld": m["ld"].tolist(), "correct": m["correct"].tolist(), "p_io": m["p_io"].tolist()})
    summary = {"variant": variant, "model": model_name, "n": len(batch),
               "pooled": {"ld": frame.ld.mean(), "accuracy": frame.correct.mean(), "p_io": frame.p_io.mean()},
               "by_order": {o: {"ld": g.ld.mean(), "accuracy": g.correct.mean(), "p_io": g.p_io.mean(), "n": len(g)}
                            for o, g in frame.groupby("order")}}
    return frame, summary


def evaluate_variant(model: Transformer, batch: Batch, circuit: dict, variant: str, means: dict[int, torch.Tensor],
                     batch_size: int, progress: Callable[[str], None] = print
                     ) -> tuple[dict, pd.DataFrame, pd.DataFrame, dict]:
    """Model vs circuit on one variant; ``means``: template -> mean ``z`` over the variant's ABC sample.

    Returns ``(summary, per_prompt, attention, example)``: the summary dict (LDs, faithfulness,
    accuracy, by name order, restored configurations, edges), per-prompt LDs, per-prompt per-head
    attention (model and circuit), and one example attention row of the top S-inhibition head.
    """
    heads = circuit_heads(circuit)
    layers = sorted({l for l, _ in heads})
    pat_names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    end = batch.pos["END"]

    progress(f"{variant}: model run")
    logits, cache_model = run_end_logits(model, batch.tokens, end, batch_size=batch_size, cache_names=pat_names)
    m = ioi_metrics(logits, batch.io, batch.s)

    progress(f"{variant}: circuit run")
    c_logits, cache_circ = circuit_run(model, batch, circuit, means, batch_size, names=pat_names)
    c = ioi_metrics(c_logits, batch.io, batch.s)
    summary, per_prompt = _model_vs_circuit(batch, circuit, variant, m, c)
    summary["restored"] = restored_paths(model, batch, circuit, variant, means, summary["model_ld"], batch_size,
                                         progress)
    attention = attention_table(batch, heads, cache_model, cache_circ)
    example = _example_attention(batch, circuit, cache_model, cache_circ)
    return summary, per_prompt, attention, example


def circuit_run(model: Transformer, batch: Batch, circuit: dict, means: dict[int, torch.Tensor], batch_size: int,
                restore=None, names=()) -> tuple[torch.Tensor, dict]:
    """END logits (and the cached ``names``) of the circuit: every head and position outside it
    mean-ablated with ``means`` (per template), early heads kept at ``restore`` (:func:`keep_mask`)."""
    spec = model.spec
    keep = keep_mask(circuit, batch, spec.n_layers, spec.n_heads, restore)
    return run_end_logits(model, batch.tokens, batch.pos["END"], batch_size=batch_size,
                          cache_names=list(names) or None,
                          hooks_fn=lambda sl: ablation_hooks(model, keep[sl], means, batch.template[sl]))


def _model_vs_circuit(batch: Batch, circuit: dict, variant: str, m: dict, c: dict) -> tuple[dict, pd.DataFrame]:
    """The summary (LDs, faithfulness, accuracy, by name order, size) and per-prompt LDs of the model
    (metrics ``m``) and the circuit (``c``)."""
    order = pd.Series(batch.order)
    per_prompt = pd.DataFrame({
        "prompt": range(len(batch)), "order": batch.order, "template": batch.template.tolist(),
        "model_ld": m["ld"].tolist(), "circuit_ld": c["ld"].tolist(),
        "model_correct": m["correct"].tolist(), "model_p_io": m["p_io"].tolist(),
        "circuit_correct": c["correct"].tolist(),
    })
    model_ld, circuit_ld = m["ld"].mean().item(), c["ld"].mean().item()
    summary = {
        "variant": variant, "n": len(batch), "model_ld": model_ld, "circuit_ld": circuit_ld,
        "faithfulness": circuit_ld / model_ld, "accuracy": m["correct"].mean().item(),
        "p_io": m["p_io"].mean().item(), "circuit_accuracy": c["correct"].mean().item(),
        "by_order": {o: {"model_ld": per_prompt.model_ld[order == o].mean(),
                         "circuit_ld": per_prompt.circuit_ld[order == o].mean(),
                         "n": int((order == o).sum())} for o in ("ABBA", "BABA")},
        "edges": len(count_edges(circuit)), "nodes": len(circuit_heads(circuit)),
    }
    return summary, per_prompt


def restored_paths(model: Transformer, batch: Batch, circuit: dict, variant: str, means: dict[int, torch.Tensor],
                   model_ld: float, batch_size: int, progress: Callable[[str], None] = print) -> dict:
    """Figure 5: the circuit's LD, faithfulness and edges with the early heads also kept at the other
    name tokens (:data:`RESTORE_CONFIGS` of ``variant``; none for the base variant)."""
    restored = {}
    base_edges = count_edges(circuit)
    for name, tokens in RESTORE_CONFIGS.get(variant, {}).items():
        progress(f"{variant}: restored paths '{name}'")
        r_logits, _ = circuit_run(model, batch, circuit, means, batch_size, restore=tokens)
        ld = logit_diff(r_logits, batch.io, batch.s).mean().item()
        present = [t for t in ("S2", "IO2", "IO3") if bool((batch.pos[t] >= 0).all())]
        edges = count_edges(circuit, present if tokens == "all" else tokens)
        restored[name] = {"ld": ld, "faithfulness": ld / model_ld, "edges": len(edges),
                          "edge_overlap_with_base": len(edges & base_edges) / len(edges) if edges else 0.0}
    return restored


def attention_table(batch: Batch, heads: dict, cache_model: dict, cache_circ: dict) -> pd.DataFrame:
    """Per prompt and circuit head (``heads``: head → class), in the model and the circuit run: the
    attention to the correct and to the incorrect tokens of the head's class (:data:`ATTENTION_ROLES`)."""
    rows = []
    for (l, h), cls in heads.items():
        q_role, good, bad = ATTENTION_ROLES[cls]
        for run, cache in (("model", cache_model), ("circuit", cache_circ)):
            pat = cache[f"blocks.{l}.attn.hook_pattern"][:, h]
            a_good = _attention(pat, batch, q_role, good, first_only=False)
            a_bad = _attention(pat, batch, q_role, bad, first_only=True)
            for i in range(len(batch)):
                rows.append((i, batch.order[i], f"{l}.{h}", l, h, cls, run, a_good[i].item(), a_bad[i].item()))
    return pd.DataFrame(rows, columns=["prompt", "order", "head", "layer", "head_index", "class", "run",
                                       "attn_correct", "attn_incorrect"])


def _example_attention(batch: Batch, circuit: dict, cache_model: dict, cache_circ: dict) -> dict:
    """END's attention of the first S-inhibition head on the first prompt, in model and circuit."""
    example = {}
    s_inh = circuit["classes"].get("s_inhibition", [])
    if s_inh:
        l, h = s_inh[0]
        q = int(batch.pos["END"][0])
        example = {"head": f"{l}.{h}", "prompt": 0, "query": "END",
                   "tokens": batch.tokens[0, : q + 1].tolist(),
                   "model": cache_model[f"blocks.{l}.attn.hook_pattern"][0, h, q, : q + 1].tolist(),
                   "circuit": cache_circ[f"blocks.{l}.attn.hook_pattern"][0, h, q, : q + 1].tolist(),
                   "positions": {r: int(batch.pos[r][0]) for r in batch.pos}}
    return example


def value_paths(model: Transformer, batch: Batch, circuit: dict, source_role: str, cfg: dict,
                progress: Callable[[str], None] = print) -> pd.DataFrame:
    """Figure 6: effect (% of clean LD) of each earlier head's path into the S-inhibition values.

    Path patching from the sender's output change (ABC - clean) at ``source_role`` (S2 or IO2) into
    the value input of the S-inhibition heads at the same position, as ``cfg["path_patching"]``
    says (``wang``, the default: every other head frozen, the MLPs in between recomputed;
    ``direct``: the change added as it is). All senders are ranked by attribution; the circuit's
    early heads and the ``confirm_top_k`` best are patched exactly.
    """
    spec = model.spec
    s_inh = [tuple(x) for x in circuit["classes"].get("s_inhibition", [])]
    if not s_inh:
        return pd.DataFrame(columns=["source", "layer", "head", "class", "attribution_pct", "effect_pct"])
    end, pos = batch.pos["END"], batch.pos[source_role]
    wang = cfg["path_patching"] == "wang"
    names = [f"blocks.{l}.attn.hook_z" for l in range(spec.n_layers)] + \
            [f"blocks.{l}.hook_resid_pre" for l in range(spec.n_layers)]
    logits, cache = run_end_logits(model, batch.tokens, end, batch_size=cfg["batch_size"],
                                   cache_names=names + (frozen_cache_names(model) if wang else []))
    frozen = frozen_run(model, cache, pos) if wang else None
    _, cache_abc = run_end_logits(model, batch.abc, end, batch_size=cfg["batch_size"],
                                  cache_names=names[: spec.n_layers])
    z, z_abc = stack_z(model, cache), stack_z(model, cache_abc)
    resid_pre = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(spec.n_layers)}
    ld0 = logit_diff(logits, batch.io, batch.s).mean().item()
    top = max(l for l, _ in s_inh)
    senders = [(l, h) for l in range(top) for h in range(spec.n_heads)]
    receivers = [(l, h, "v") for l, h in s_inh]
    d = sender_deltas(model, z, z_abc, senders, pos)
    layers = [l for l, _ in senders]
    progress(f"value paths from {source_role}: attribution over {len(senders)} senders")
    attr = path_patch_attribution(model, batch.tokens, end, batch.io, batch.s, resid_pre, d, layers, receivers, pos,
                                  frozen=frozen)
    heads = circuit_heads(circuit)
    chosen = set(attr.abs().argsort(descending=True)[: cfg["confirm_top_k"]].tolist())
    chosen |= {i for i, hd in enumerate(senders) if heads.get(hd) in ("induction", "duplicate_token", "previous_token")}
    chosen = sorted(chosen)
    progress(f"value paths from {source_role}: exact patching of {len(chosen)} senders")
    ld = path_patch(model, batch.tokens, end, batch.io, batch.s, resid_pre, d[chosen], [layers[i] for i in chosen],
                    receivers, pos, max_rows=cfg["max_rows"], frozen=frozen)
    exact = {i: 100 * (ld[j].mean().item() - ld0) / ld0 for j, i in enumerate(chosen)}
    return pd.DataFrame([
        {"source": source_role, "layer": l, "head": h, "class": heads.get((l, h), ""),
         "attribution_pct": 100 * attr[i].item() / ld0, "effect_pct": exact.get(i)}
        for i, (l, h) in enumerate(senders)
    ])


def value_paths_by_variant(model: Transformer, batches: dict[str, Batch], circuit: dict, cfg: dict,
                           progress: Callable[[str], None] = print) -> pd.DataFrame:
    """:func:`value_paths` of every variant (``batches``: variant → prompts), from S2 and, for
    ``double_io``, from IO2 too; one table with a ``variant`` column."""
    frames = []
    for variant, batch in batches.items():
        for role in (["S2", "IO2"] if variant == "double_io" else ["S2"]):
            df = value_paths(model, batch, circuit, role, cfg, progress=progress)
            df.insert(0, "variant", variant)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def head_patching(model: Transformer, batch: Batch, top_k: int, max_rows: int,
                  confirm_all_positions: int | None = None, grad_batch: int | None = None
                  ) -> tuple[pd.DataFrame, dict]:
    """Activation patching of every head (clean run, ABC head output patched in) with the engine.

    Returns per head the exact effect at END and at all positions, their attribution estimates
    (one backward pass), as relative LD changes, and the agreement of attribution with exact
    patching (Spearman rank correlation, top-k overlap). Patching at END is exact for every head;
    at all positions (a pass from the patched layer over every position) only the
    ``confirm_all_positions`` heads ranked highest by attribution are patched exactly (all if None).
    ``grad_batch``: prompts per attribution forward + backward pass (memory; all if None).
    """
    import time

    from mechrepro.core import engine as E

    end, rows = batch.pos["END"], torch.arange(len(batch))

    def metric(logits, r):
        return logit_diff(logits, batch.io[r], batch.s[r])

    timings = {}
    t = time.perf_counter()
    base, source = E.base_run(model, batch.tokens, end), E.base_run(model, batch.abc, end)
    ld0 = metric(base.end_logits, rows).mean().item()
    z_end = torch.stack([z[rows, end] for z in source.z], 1)
    exact_end = E.patch_heads_end(model, base, z_end, metric, max_rows=max_rows) / ld0
    timings["exact_end_s"] = time.perf_counter() - t
    t = time.perf_counter()
    attr_all, attr_end = (a / ld0 for a in E.attribution_heads(model, batch.tokens, end, source.z, metric,
                                                               batch_size=grad_batch))
    timings["attribution_s"] = time.perf_counter() - t
    L, H = exact_end.shape
    order = attr_all.flatten().abs().argsort(descending=True).tolist()
    chosen = [(i // H, i % H) for i in order[: confirm_all_positions or len(order)]]
    t = time.perf_counter()
    exact_all = E.patch_heads_all_positions(model, base, source.z, metric, heads=chosen, max_rows=max_rows) / ld0
    timings["exact_all_positions_s"] = time.perf_counter() - t
    frame = pd.DataFrame([{"layer": l, "head": h, "exact_end": exact_end[l, h].item(), "attribution_end": attr_end[l, h].item(),
                           "exact_all": exact_all[l, h].item(), "attribution_all": attr_all[l, h].item()}
                          for l in range(L) for h in range(H)])
    summary = {"n_prompts": len(batch), "clean_ld": ld0, "top_k": top_k, "timings": timings,
               "all_positions_exact_heads": len(chosen),
               "agreement_end": E.rank_agreement(attr_end, exact_end, top_k),
               "agreement_all_positions": E.rank_agreement(attr_all, exact_all, top_k)}
    return frame, summary


# ------------------------------------------------------------------------------ the mechanism test
# Where S2 hacking says the base circuit loses the IO tokens' paths: the duplicate-token and induction
# heads at the extra IO mentions, the previous-token heads at IO1+1.
MECHANISM_ROLES = {"early": ("IO2", "IO3"), "previous_token": ("IO1+1",)}


def _ablate_cells(batch: Batch, heads: list[tuple[int, int]], roles: Sequence[str], keep: torch.Tensor) -> None:
    rows = torch.arange(len(batch))
    for role in roles:
        pos = batch.pos[role]
        ok = pos >= 0
        for l, h in heads:
            keep[rows[ok], pos[ok], l, h] = False


def mechanism_keep(batch: Batch, early: list[tuple[int, int]], previous: list[tuple[int, int]],
                   n_layers: int, n_heads: int) -> torch.Tensor:
    """``[b, p, L, h]`` keep mask of the full model with ``early`` heads ablated at IO2 and IO3 (where
    the prompt has them) and ``previous`` heads at IO1+1 (:data:`MECHANISM_ROLES`)."""
    b, p = batch.tokens.shape
    keep = torch.ones(b, p, n_layers, n_heads, dtype=torch.bool)
    _ablate_cells(batch, early, MECHANISM_ROLES["early"], keep)
    _ablate_cells(batch, previous, MECHANISM_ROLES["previous_token"], keep)
    return keep


def mechanism_test(model: Transformer, batch: Batch, circuit: dict, means: dict[int, torch.Tensor], variant: str,
                   base_ld: float, n_controls: int, seed: int, batch_size: int,
                   progress: Callable[[str], None] = print) -> tuple[dict, pd.DataFrame]:
    """S2 hacking tested in the full model, without evaluating a circuit.

    Mean-ablates (means over the variant's ABC sample, per template) only what S2 hacking says the
    base circuit loses: the circuit's duplicate-token and induction heads at IO2 (and IO3), its
    previous-token heads at IO1+1; everything else runs normally. If the mechanism exists, the
    model's LD moves toward its base LD (the extra IO mentions stop counting as duplicated). The
    control ablates as many random other heads at the same positions, ``n_controls`` draws
    (seeded). Returns the summary (LDs, change, share of the gap to the base LD closed, controls)
    and one row per run.
    """
    spec = model.spec
    classes = circuit["classes"]
    early = [tuple(x) for c in ("duplicate_token", "induction") for x in classes.get(c, [])]
    previous = [tuple(x) for x in classes.get("previous_token", [])]
    end = batch.pos["END"]

    def ld_of(early_heads, prev_heads) -> float:
        keep = mechanism_keep(batch, early_heads, prev_heads, spec.n_layers, spec.n_heads)
        hooks_fn = None if keep.all() else (lambda sl: ablation_hooks(model, keep[sl], means, batch.template[sl]))
        logits, _ = run_end_logits(model, batch.tokens, end, batch_size=batch_size, hooks_fn=hooks_fn)
        return logit_diff(logits, batch.io, batch.s).mean().item()

    progress(f"{variant}: mechanism test, model run")
    model_ld = ld_of([], [])
    rows = [{"run": "model", "draw": -1, "heads": "", "ld": model_ld}]
    summary = {"variant": variant, "n": len(batch), "model_ld": model_ld, "base_model_ld": base_ld,
               "early_heads": [list(h) for h in early], "previous_token_heads": [list(h) for h in previous]}
    if not early and not previous:
        summary.update(testable=False, reason="the circuit has no duplicate-token, induction or previous-token head")
        return summary, pd.DataFrame(rows)
    progress(f"{variant}: mechanism test, {len(early)} duplicate/induction and {len(previous)} previous-token heads")
    ablated = ld_of(early, previous)
    rows.append({"run": "mechanism", "draw": -1, "heads": _heads_text(early, previous), "ld": ablated})
    tested = set(early) | set(previous)
    others = [(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads) if (l, h) not in tested]
    gen = torch.Generator().manual_seed(seed)
    controls = []
    for i in range(n_controls):
        pick = [others[j] for j in torch.randperm(len(others), generator=gen)[: len(early) + len(previous)].tolist()]
        c_early, c_prev = pick[: len(early)], pick[len(early):]
        controls.append(ld_of(c_early, c_prev) - model_ld)
        rows.append({"run": "control", "draw": i, "heads": _heads_text(c_early, c_prev), "ld": model_ld + controls[-1]})
    gap = base_ld - model_ld
    change = ablated - model_ld
    ctrl = torch.tensor(controls) if controls else torch.zeros(0)
    summary.update(
        testable=True, ablated_ld=ablated, change=change, gap_to_base=gap,
        gap_closed=change / gap if abs(gap) > 1e-9 else float("nan"),
        control_changes=controls, control_mean=ctrl.mean().item() if controls else float("nan"),
        control_std=ctrl.std().item() if len(controls) > 1 else float("nan"),
        control_max=ctrl.max().item() if controls else float("nan"),
        share_of_controls_below=(ctrl < change).float().mean().item() if controls else float("nan"))
    return summary, pd.DataFrame(rows)


def _heads_text(early, previous) -> str:
    return " ".join([f"{l}.{h}@IO" for l, h in early] + [f"{l}.{h}@IO1+1" for l, h in previous])


# --------------------------------------------------------------------------------------- metrics
EVAL_KEYS = ("model_ld", "circuit_ld", "faithfulness", "accuracy", "p_io", "n")


MECHANISM_KEYS = ("testable", "model_ld", "base_model_ld", "ablated_ld", "change", "gap_to_base", "gap_closed",
                  "control_mean", "control_std", "control_max", "share_of_controls_below", "early_heads",
                  "previous_token_heads", "n")


def ratios(evals: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per variant: the model's LD and the circuit's faithfulness relative to the base variant's
    (the paper: 2.118 / 3.484 = 0.61 and 1.285 / 0.895 = 1.44 on DoubleIO)."""
    base = evals.get("base")
    if base is None:
        return {}
    return {v: {"model_ld_ratio": e["model_ld"] / base["model_ld"],
                "faithfulness_ratio": e["faithfulness"] / base["faithfulness"]} for v, e in evals.items()}


def study_metrics(circuit: dict, evals: dict[str, dict], manifest: dict, n_prompts: int, ablation: dict,
                  mechanism: dict | None = None) -> dict:
    """``metrics.json`` of Study A: the circuit, and per variant (``evals``: variant → the summary of
    :func:`evaluate_variant`) model vs circuit, the ratios to the base variant, the restored paths,
    the Table 2 row and the mechanism test (``mechanism``: variant → :func:`mechanism_test`'s summary)."""
    circuit_info = {"n_heads": circuit["n_heads"], "source": circuit["source"], "classes": circuit["classes"],
                    "positions": circuit.get("positions", {})}
    for key in ("admission", "path_patching", "path_patching_agreement"):
        if key in circuit:
            circuit_info[key] = circuit[key]
    return {
        "ratios": ratios(evals),
        "mechanism": {v: {k: m[k] for k in MECHANISM_KEYS if k in m} for v, m in (mechanism or {}).items()},
        "model": circuit["model"],
        "model_description": manifest["description"],
        "n_prompts": n_prompts,
        "circuit_method": circuit["method"],
        "ablation": ablation,
        "variants": {v: {k: e[k] for k in EVAL_KEYS} for v, e in evals.items()},
        "circuit": circuit_info,
        "restored": {v: {k: r["ld"] for k, r in e["restored"].items()} for v, e in evals.items() if e["restored"]},
        "restored_faithfulness": {v: {k: r["faithfulness"] for k, r in e["restored"].items()}
                                  for v, e in evals.items() if e["restored"]},
        "table2": {v: table2_row(v, e) for v, e in evals.items()},
        "by_order": {v: e["by_order"] for v, e in evals.items()},
    }


def table2_row(variant: str, e: dict) -> dict:
    """Table 2: the circuit with the IO-duplicate paths added (all name tokens restored)."""
    key = {"double_io": "s2_io2", "triple_io": "s2_io2_io3"}.get(variant)
    if key is None:
        return {"nodes": e["nodes"], "edges": e["edges"], "edge_overlap": 1.0, "model_ld": e["model_ld"],
                "circuit_ld": e["circuit_ld"], "faithfulness": e["faithfulness"]}
    r = e["restored"][key]
    return {"nodes": e["nodes"], "edges": r["edges"], "edge_overlap": r["edge_overlap_with_base"],
            "model_ld": e["model_ld"], "circuit_ld": r["ld"], "faithfulness": r["faithfulness"]}
