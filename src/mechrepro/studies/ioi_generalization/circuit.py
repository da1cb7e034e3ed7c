"""The IOI circuit: discovery by path patching, kept positions, edges, and circuit masks.

Discovery follows Wang et al.'s procedure, backwards from the logits, on base IOI prompts of the
*discovery split* (disjoint from the evaluation prompts) with their ABC prompts as the corrupted
source. Each step's effect is the relative change of the mean logit difference,
``(LD_patched - LD_clean) / LD_clean``; path patching is Wang et al.'s (every other head frozen,
MLPs recomputed: ``circuit.path_patching: wang``) or the direct path (``direct``), see
:mod:`mechrepro.core.patching`. With ``circuit.compare_path_patching`` every exactly patched
sender is also patched the other way, and the circuit records how far the two disagree.

1. **Name movers / negative name movers** — path patching head → logits at END, every head
   exactly. Most negative effects are name movers, most positive negative name movers.
2. **Backup name movers** — the name movers are knocked out (their output at END taken from the
   ABC run) and step 1 is repeated on that run: heads whose effect becomes more negative by at
   least ``thresholds.backup_name_mover`` compensate for them.
3. **S-inhibition heads** — path patching head → name movers' and backup name movers' queries at END.
4. **Induction and duplicate-token heads** — path patching head → S-inhibition heads' values,
   *position-resolved*: the sender's output and the receivers' values at each of
   :data:`EARLY_ROLES`. A head is kept at the positions where its effect passes the threshold.
   It is a duplicate-token head if its attention at S2 goes mostly to S1, an induction head if
   mostly to S1+1, and unclassified (dropped, recorded) if neither reaches ``min_attention``.
5. **Previous-token heads** — path patching head → induction heads' keys, position-resolved
   over :data:`PREV_ROLES`.

Steps 3–5 rank every candidate (head, position) node with attribution patching (one backward
pass per position) and confirm the ``confirm_top_k`` best exactly (``method: attribution``), or
patch every node exactly (``method: exact``). Each class's candidates are the heads whose exact
effect passes its threshold (strongest first, at most ``max_heads``).

**Admission** (:func:`admit`): a head found in several classes counts in the one where its effect is
largest (:func:`candidate_nodes`); the strongest candidate of every class forms the skeleton; the other
candidates join by effect, each only if it raises the circuit's base faithfulness on the held-out
validation prompts (also disjoint from the evaluation prompts) by at least ``min_gain``, until
faithfulness reaches ``target_faithfulness``. The faithfulness-vs-size curve is recorded; if the
target is not reached the best circuit is kept and the reason recorded (the target is never lowered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from mechrepro.studies.ioi_generalization.data import Batch
from mechrepro.core.model import Transformer
from mechrepro.core.patching import (
    FrozenRun, frozen_cache_names, frozen_run, logit_diff, path_patch, path_patch_attribution, path_patch_logits,
    run_end_logits, sender_deltas, stack_z,
)

CLASSES = ("name_mover", "backup_name_mover", "negative_name_mover", "s_inhibition", "induction",
           "duplicate_token", "previous_token")
KEPT_POSITIONS = {
    "name_mover": ["END"], "backup_name_mover": ["END"], "negative_name_mover": ["END"],
    "s_inhibition": ["END"], "induction": ["S2"], "duplicate_token": ["S2"], "previous_token": ["S1+1"],
}
# Edges of the circuit graph: (sender class, receiver class or "logits", receiver input).
EDGE_TYPES = [
    ("previous_token", "induction", "k"),
    ("induction", "s_inhibition", "v"),
    ("duplicate_token", "s_inhibition", "v"),
    ("s_inhibition", "name_mover", "q"),
    ("s_inhibition", "backup_name_mover", "q"),
    ("s_inhibition", "negative_name_mover", "q"),
    ("name_mover", "logits", ""),
    ("backup_name_mover", "logits", ""),
    ("negative_name_mover", "logits", ""),
]
# Positions at which position-resolved path patching tests senders (steps 4 and 5).
EARLY_ROLES = ("S1", "S1+1", "IO1", "IO1+1", "S2")
PREV_ROLES = ("S1", "S1+1", "IO1", "IO1+1")
# Positions restored by each "token" of Figure 5 for duplicate/induction and previous-token heads.
RESTORE_ROLES = {"S2": ("S2", "S1+1"), "IO2": ("IO2", "IO1+1"), "IO3": ("IO3", "IO1+1")}


def _select(effects: dict[Head, float], threshold: float, max_heads: int, sign: int) -> list[Head]:
    """Heads whose effect has ``sign`` and magnitude >= threshold, strongest first."""
    picked = [(h, e) for h, e in effects.items() if sign * e >= threshold]
    picked.sort(key=lambda he: -sign * he[1])
    return [h for h, _ in picked[:max_heads]]


Head = tuple[int, int]


@dataclass
class _Runs:
    """What every discovery step reads: the clean run (cached), the heads' clean and ABC outputs,
    the residual stream before each layer and the clean logit difference (``base``: its mean,
    kept away from zero, which the effects are relative to); ``frozen``: the clean run at each
    role for Wang et al.'s path patching (filled on demand)."""

    model: Transformer
    batch: Batch
    cfg: dict
    cache: dict[str, Tensor]
    z: Tensor
    z_abc: Tensor
    resid_pre: dict[int, Tensor]
    ld_clean: Tensor
    base: float
    all_heads: list[Head]
    progress: Callable[[str], None]
    frozen: dict[str, FrozenRun]


def _other(mode: str) -> str:
    return "direct" if mode == "wang" else "wang"


def _frozen(r: _Runs, role: str, mode: str, cache: dict[str, Tensor] | None = None) -> FrozenRun | None:
    """The clean run at ``role`` for ``mode`` ``wang`` (None for the direct path)."""
    if mode == "direct":
        return None
    if cache is not None:
        return frozen_run(r.model, cache, r.batch.pos[role])
    if role not in r.frozen:
        r.frozen[role] = frozen_run(r.model, r.cache, r.batch.pos[role])
    return r.frozen[role]


def discover(model: Transformer, batch: Batch, cfg: dict, progress: Callable[[str], None] = print) -> dict:
    """Candidate circuit nodes of ``model`` on ``batch`` (base prompts of the discovery split).
    ``cfg`` is config['circuit'] (plus ``batch_size``). Returns every class's candidates (heads,
    strongest first), their kept positions, the scores of every step and the agreement of the
    two path-patching variants; :func:`admit` then builds the circuit from the candidates."""
    r = _clean_and_abc_runs(model, batch, cfg, progress)
    th, mx, mode = cfg["thresholds"], cfg["max_heads"], cfg["path_patching"]
    scores: dict[str, list[dict]] = {}

    # 1. heads -> logits
    eff, eff_other = _logit_effects(r, mode), (_logit_effects(r, _other(mode)) if cfg["compare_path_patching"] else {})
    scores["logits"] = [{"layer": l, "head": h, "role": "END", "effect": eff[(l, h)],
                         "effect_other": eff_other.get((l, h))} for l, h in r.all_heads]
    nm = _select(eff, th["name_mover"], mx["name_mover"], -1)
    neg = _select(eff, th["negative_name_mover"], mx["negative_name_mover"], +1)
    # 2. backup name movers: heads whose logit effect grows when the name movers are knocked out
    backup, backup_effects = _backup_name_movers(r, nm, eff, scores)
    # 3. heads -> (backup) name mover queries at END
    movers = nm + backup
    s_inh, _ = _path_step(r, scores, "name_mover_queries", [(l, h, "q") for l, h in movers], ("END",),
                          th["s_inhibition"], mx["s_inhibition"])
    # 4. heads -> S-inhibition values, position-resolved; split into induction / duplicate-token by attention
    early, early_roles = _path_step(r, scores, "s_inhibition_values", [(l, h, "v") for l, h in s_inh], EARLY_ROLES,
                                    min(th["induction"], th["duplicate_token"]), len(r.all_heads))
    induction, duplicate, attn_stats = _split_by_attention(r, early, scores["s_inhibition_values"])
    # 5. heads -> induction keys, position-resolved
    prev, prev_roles = _path_step(r, scores, "induction_keys", [(l, h, "k") for l, h in induction], PREV_ROLES,
                                  th["previous_token"], mx["previous_token"])
    classes = {"name_mover": nm, "backup_name_mover": backup, "negative_name_mover": neg,
               "s_inhibition": s_inh, "induction": induction, "duplicate_token": duplicate,
               "previous_token": prev}
    positions = {f"{l}.{h}": roles for (l, h), roles in {**early_roles, **prev_roles}.items()
                 if (l, h) in set(induction + duplicate + prev)}
    return {
        "source": "discovered", "method": cfg["method"], "path_patching": mode, "n_prompts": len(batch),
        "clean_ld": r.ld_clean.mean().item(),
        "candidates": {c: [list(hd) for hd in v] for c, v in classes.items()},
        "candidate_effects": _candidate_effects(classes, scores, backup_effects),
        "positions": positions, "attention_at_s2": attn_stats, "scores": scores,
        "path_patching_agreement": path_patching_agreement(scores) if cfg["compare_path_patching"] else {},
    }


def _clean_and_abc_runs(model: Transformer, batch: Batch, cfg: dict, progress: Callable[[str], None]) -> _Runs:
    """The clean run (head outputs, residual streams, MLP outputs, attention patterns) and the ABC
    run (head outputs)."""
    spec = model.spec
    L, H = spec.n_layers, spec.n_heads
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + \
            [f"blocks.{l}.hook_resid_pre" for l in range(L)] + \
            [f"blocks.{l}.attn.hook_pattern" for l in range(L)] + ["ln_final.hook_in"] + frozen_cache_names(model)
    end = batch.pos["END"]
    logits, cache = run_end_logits(model, batch.tokens, end, cache_names=names, batch_size=cfg["batch_size"])
    _, cache_abc = run_end_logits(model, batch.abc, end, cache_names=[n for n in names if "hook_z" in n],
                                  batch_size=cfg["batch_size"])
    z, z_abc = stack_z(model, cache), stack_z(model, cache_abc)
    resid_pre = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)}
    ld_clean = logit_diff(logits, batch.io, batch.s)
    base = ld_clean.mean().item()
    if abs(base) < 1e-6:
        base = 1e-6
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    return _Runs(model, batch, cfg, cache, z, z_abc, resid_pre, ld_clean, base, all_heads, progress, {})


def _logit_effects(r: _Runs, mode: str, z: Tensor | None = None, cache: dict[str, Tensor] | None = None,
                   ld_ref: float | None = None) -> dict[Head, float]:
    """Steps 1-2: each head's relative effect on LD through its path to the logits at END (``mode``),
    in the clean run or in another run of the same prompts (``z``, ``cache``: e.g. name movers knocked out)."""
    r.progress(f"circuit: path patching of all heads -> logits ({mode})")
    end = r.batch.pos["END"]
    z = r.z if z is None else z
    src = r.cache if cache is None else cache
    resid_final = src["ln_final.hook_in"][torch.arange(len(r.batch)), end]
    deltas = sender_deltas(r.model, z, r.z_abc, r.all_heads, end)
    ld = path_patch_logits(r.model, resid_final, deltas, [l for l, _ in r.all_heads], r.batch.io, r.batch.s,
                           frozen=_frozen(r, "END", mode, cache), chunk=max(1, r.cfg["max_rows"] // 4))
    ref = r.ld_clean.mean().item() if ld_ref is None else ld_ref
    return {hd: (ld[i].mean().item() - ref) / r.base for i, hd in enumerate(r.all_heads)}


def _backup_name_movers(r: _Runs, nm: list[Head], eff: dict[Head, float], scores: dict[str, list[dict]]
                        ) -> tuple[list[Head], dict[Head, float]]:
    """Step 2: knock the name movers out (their ``z`` at END from the ABC run) and repeat step 1 on
    that run. A head whose effect becomes more negative by at least the backup threshold (it
    compensates for the missing name movers) is a backup name mover; strongest first."""
    if not nm:
        scores["backup"] = []
        return [], {}
    r.progress(f"circuit: name movers {nm} knocked out (backup name movers)")
    z_ko, cache = knock_out_run(r.model, r.batch, r.z_abc, nm, "END", r.cfg["batch_size"])
    ld_ko = logit_diff(cache.pop("logits"), r.batch.io, r.batch.s).mean().item()
    eff_ko = _logit_effects(r, r.cfg["path_patching"], z_ko, cache, ld_ko)
    growth = {hd: eff_ko[hd] - eff[hd] for hd in r.all_heads if hd not in nm}
    scores["backup"] = [{"layer": l, "head": h, "role": "END", "effect": growth.get((l, h)),
                         "effect_knocked_out": eff_ko[(l, h)], "effect_clean": eff[(l, h)]} for l, h in r.all_heads]
    picked = _select(growth, r.cfg["thresholds"]["backup_name_mover"], r.cfg["max_heads"]["backup_name_mover"], -1)
    return picked, {hd: eff_ko[hd] for hd in picked}


@torch.no_grad()
def knock_out_run(model: Transformer, batch: Batch, z_source: Tensor, heads: Sequence[Head], role: str,
                  batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The clean prompts with ``heads``' output at ``role`` taken from ``z_source [b, p, L, h, e]``
    (the ABC run): every head's ``z`` ``[b, p, L, h, e]`` and the cache path patching to the
    logits reads (final residual, :func:`frozen_cache_names`), plus the END ``logits``."""
    L = model.spec.n_layers
    pos = batch.pos[role]
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def hooks_fn(sl):
        rows = torch.arange(sl.stop - sl.start)

        def make(l):
            def fn(z):
                z = z.clone()
                for h in by_layer[l]:
                    z[rows, pos[sl], h] = z_source[sl][rows, pos[sl], l, h]
                return z
            return fn
        return {f"blocks.{l}.attn.hook_z": make(l) for l in by_layer}

    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + ["ln_final.hook_in"] + frozen_cache_names(model)
    logits, cache = run_end_logits(model, batch.tokens, batch.pos["END"], hooks_fn=hooks_fn, batch_size=batch_size,
                                   cache_names=names)
    cache["logits"] = logits
    return stack_z(model, cache), cache


def _rank_nodes(r: _Runs, senders: list[Head], receivers: list[tuple[int, int, str]], roles: Sequence[str],
                name: str) -> tuple[dict, list[tuple[int, str]]]:
    """Per role, the senders' deltas and attribution estimates; the (sender index, role) nodes to
    confirm exactly (the ``confirm_top_k`` largest by |attribution|, or all with ``method: exact``)."""
    cfg, batch, mode = r.cfg, r.batch, r.cfg["path_patching"]
    layers = [l for l, _ in senders]
    per_role = {}
    for role in roles:
        pos = batch.pos[role]
        d = sender_deltas(r.model, r.z, r.z_abc, senders, pos)
        if cfg["method"] == "attribution":
            attr = path_patch_attribution(r.model, batch.tokens, batch.pos["END"], batch.io, batch.s, r.resid_pre, d,
                                          layers, receivers, pos, frozen=_frozen(r, role, mode)) / r.base
        else:
            attr = torch.full((len(senders),), float("nan"))
        per_role[role] = (d, attr)
    nodes = [(i, role) for role in roles for i in range(len(senders))]
    if cfg["method"] == "attribution":
        r.progress(f"circuit: attribution ranking of {len(senders)} senders x {len(roles)} positions -> {name}")
        nodes.sort(key=lambda n: -abs(float(per_role[n[1]][1][n[0]])))
        nodes = nodes[: cfg["confirm_top_k"]]
    return per_role, nodes


def _exact(r: _Runs, senders: list[Head], receivers: list[tuple[int, int, str]], per_role: dict,
           nodes: list[tuple[int, str]], mode: str) -> dict[tuple[int, str], float]:
    """Exact path patching (``mode``) of the chosen (sender index, role) nodes: relative LD changes."""
    batch, layers, out = r.batch, [l for l, _ in senders], {}
    for role in dict.fromkeys(role for _, role in nodes):
        idx = [i for i, ro in nodes if ro == role]
        d = per_role[role][0]
        ld = path_patch(r.model, batch.tokens, batch.pos["END"], batch.io, batch.s, r.resid_pre, d[idx],
                        [layers[i] for i in idx], receivers, batch.pos[role], max_rows=r.cfg["max_rows"],
                        frozen=_frozen(r, role, mode))
        for j, i in enumerate(idx):
            out[(i, role)] = (ld[j].mean().item() - r.ld_clean.mean().item()) / r.base
    return out


def _path_step(r: _Runs, scores: dict[str, list[dict]], name: str, receivers: list[tuple[int, int, str]],
               roles: Sequence[str], threshold: float, k_max: int) -> tuple[list[Head], dict[Head, list[str]]]:
    """Steps 3-5: path patching from every head below the receivers into their ``q``/``k``/``v``
    input, at each of ``roles`` (the sender writes and the receivers read there); ranked by
    attribution and the best (head, role) nodes confirmed exactly (or all exact). Records the
    scores under ``scores[name]``; returns the heads with a node whose exact effect passes
    ``threshold`` (strongest first, at most ``k_max``) and each one's passing roles."""
    mode = r.cfg["path_patching"]
    top_layer = max((l for l, _, _ in receivers), default=0)
    senders = [hd for hd in r.all_heads if hd[0] < top_layer]
    if not receivers or not senders:
        scores[name] = []
        return [], {}
    per_role, nodes = _rank_nodes(r, senders, receivers, roles, name)
    r.progress(f"circuit: exact path patching ({mode}) of {len(nodes)} (sender, position) nodes -> {name}")
    exact = _exact(r, senders, receivers, per_role, nodes, mode)
    other = _exact(r, senders, receivers, per_role, nodes, _other(mode)) if r.cfg["compare_path_patching"] else {}
    scores[name] = [{"layer": l, "head": h, "role": role, "attribution": float(per_role[role][1][i]),
                     "effect": exact.get((i, role)), "effect_other": other.get((i, role))}
                    for role in roles for i, (l, h) in enumerate(senders)]
    passing: dict[Head, list[str]] = {}
    best: dict[Head, float] = {}
    for (i, role), e in sorted(exact.items(), key=lambda kv: kv[1]):
        if -e >= threshold:
            passing.setdefault(senders[i], []).append(role)
            best.setdefault(senders[i], e)
    heads = sorted(best, key=best.get)[:k_max]
    return heads, {hd: sorted(passing[hd], key=roles.index) for hd in heads}


def _split_by_attention(r: _Runs, heads: list[Head], step_scores: list[dict]
                        ) -> tuple[list[Head], list[Head], dict[str, dict[str, float]]]:
    """Step 4's heads split by their attention at S2: mostly to S1+1 (induction) or to S1 (duplicate
    token), at least ``min_attention``; a head reaching neither is unclassified (dropped, recorded).
    Each class keeps the heads passing its own threshold (at most its ``max_heads``), strongest first."""
    th, mx = r.cfg["thresholds"], r.cfg["max_heads"]
    batch, rows = r.batch, torch.arange(len(r.batch))
    induction, duplicate = [], []
    s2, s1, s1p = batch.pos["S2"], batch.pos["S1"], batch.pos["S1+1"]
    attn_stats = {}
    for l, h in heads:
        pat = r.cache[f"blocks.{l}.attn.hook_pattern"][rows, h, s2]  # [b, p]
        a_s1, a_s1p = pat[rows, s1].mean().item(), pat[rows, s1p].mean().item()
        cls = ("duplicate_token" if a_s1 >= a_s1p else "induction") if max(a_s1, a_s1p) >= r.cfg["min_attention"] \
            else "unclassified"
        attn_stats[f"{l}.{h}"] = {"S2->S1": a_s1, "S2->S1+1": a_s1p, "class": cls}
        if cls == "duplicate_token":
            duplicate.append((l, h))
        elif cls == "induction":
            induction.append((l, h))
    effect = {}
    for s in step_scores:
        if s["effect"] is not None:
            hd = (s["layer"], s["head"])
            effect[hd] = min(effect.get(hd, 0.0), s["effect"])
    induction = [hd for hd in induction if -effect[hd] >= th["induction"]][: mx["induction"]]
    duplicate = [hd for hd in duplicate if -effect[hd] >= th["duplicate_token"]][: mx["duplicate_token"]]
    return induction, duplicate, attn_stats


def _candidate_effects(classes: dict[str, list[Head]], scores: dict[str, list[dict]],
                       backup_effects: dict[Head, float]) -> dict[str, dict[str, float]]:
    """class -> head ("l.h") -> the effect that made it a candidate (its strongest node)."""
    step = {"name_mover": "logits", "negative_name_mover": "logits", "s_inhibition": "name_mover_queries",
            "induction": "s_inhibition_values", "duplicate_token": "s_inhibition_values",
            "previous_token": "induction_keys"}
    out = {}
    for cls, heads in classes.items():
        if cls == "backup_name_mover":
            out[cls] = {f"{l}.{h}": backup_effects[(l, h)] for l, h in heads}
            continue
        best: dict[str, float] = {}
        for s in scores.get(step[cls], []):
            key = f"{s['layer']}.{s['head']}"
            if s["effect"] is not None and (key not in best or abs(s["effect"]) > abs(best[key])):
                best[key] = s["effect"]
        out[cls] = {f"{l}.{h}": best[f"{l}.{h}"] for l, h in heads}
    return out


def path_patching_agreement(scores: dict[str, list[dict]]) -> dict[str, dict]:
    """Per discovery step, how far the two path-patching variants disagree on the nodes patched
    exactly both ways: the largest and mean absolute difference of the relative effects, the
    Spearman rank correlation, and the top-5 overlap (by absolute effect)."""
    out = {}
    for step, rows in scores.items():
        pairs = [(s["effect"], s["effect_other"]) for s in rows
                 if s.get("effect") is not None and s.get("effect_other") is not None]
        if len(pairs) < 2:
            continue
        a, b = torch.tensor(pairs, dtype=torch.float64).T
        diff = (a - b).abs()

        def ranks(x):
            out_ = torch.empty_like(x)
            out_[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
            return out_

        k = min(5, len(a))
        top_a, top_b = set(a.abs().argsort(descending=True)[:k].tolist()), set(b.abs().argsort(descending=True)[:k].tolist())
        out[step] = {"n": len(pairs), "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                     "spearman": torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item(),
                     f"top{k}_overlap": len(top_a & top_b) / k}
    return out


# ------------------------------------------------------------------ faithfulness-driven admission
def candidate_nodes(found: dict) -> list[dict]:
    """The candidates of :func:`discover` as nodes ``{class, head, roles, effect}``, in class order
    and strongest first within a class. A head found in several classes is a node of the class where
    its effect is largest in absolute value (ties: the earlier class): e.g. a head whose path into
    the name movers' queries moves the LD by 50% and whose direct path to the logits moves it by 4%
    is an S-inhibition head, not a weak name mover."""
    def size(cls: str, head: list[int]) -> float:
        return abs(found["candidate_effects"][cls][f"{head[0]}.{head[1]}"])

    home: dict[tuple[int, int], str] = {}  # head -> its class (the first class wins ties)
    for cls in CLASSES:
        for head in found["candidates"].get(cls, []):
            if tuple(head) not in home or size(cls, head) > size(home[tuple(head)], head):
                home[tuple(head)] = cls
    nodes = [{"class": cls, "head": [l, h], "roles": found["positions"].get(f"{l}.{h}", KEPT_POSITIONS[cls]),
              "effect": found["candidate_effects"][cls][f"{l}.{h}"]}
             for cls in CLASSES for l, h in found["candidates"].get(cls, []) if home[(l, h)] == cls]
    return nodes


def nodes_to_circuit(nodes: Sequence[dict]) -> dict:
    """A circuit (``classes``, ``positions``) from admitted nodes."""
    classes: dict[str, list[list[int]]] = {c: [] for c in CLASSES}
    positions = {}
    for n in nodes:
        classes[n["class"]].append(list(n["head"]))
        if n["roles"] != KEPT_POSITIONS[n["class"]]:
            positions[f"{n['head'][0]}.{n['head'][1]}"] = list(n["roles"])
    return {"classes": classes, "positions": positions}


def admit(nodes: Sequence[dict], faithfulness: Callable[[dict], float], target: float, min_gain: float,
          progress: Callable[[str], None] = print) -> dict:
    """Faithfulness-driven admission of candidate ``nodes`` (:func:`candidate_nodes`).

    The skeleton (the first, i.e. strongest, node of every class) is admitted first; then the other
    nodes by absolute effect, each only if ``faithfulness(circuit)`` rises by at least ``min_gain``.
    Admission stops as soon as faithfulness reaches ``target``. Returns the admitted nodes, the
    curve (one row per tried node: size, faithfulness, admitted), whether the target was reached,
    and, if not, why.
    """
    skeleton, seen = [], set()
    for n in nodes:
        if n["class"] not in seen:
            seen.add(n["class"])
            skeleton.append(n)
    rest = sorted((n for n in nodes if n not in skeleton), key=lambda n: -abs(n["effect"]))
    admitted: list[dict] = []
    f = faithfulness(nodes_to_circuit([]))
    curve = [{"step": 0, "node": "", "class": "", "size": 0, "faithfulness": f, "gain": 0.0, "admitted": True,
              "stage": "empty"}]

    def row(n, f_new, ok, stage):
        curve.append({"step": len(curve), "node": f"{n['head'][0]}.{n['head'][1]}@{'+'.join(n['roles'])}",
                      "class": n["class"], "size": len(admitted), "faithfulness": f_new, "gain": f_new - f,
                      "admitted": ok, "stage": stage})

    for n in skeleton:
        admitted.append(n)
        f_new = faithfulness(nodes_to_circuit(admitted))
        row(n, f_new, True, "skeleton")
        f = f_new
    for n in rest:
        if f >= target:
            break
        f_new = faithfulness(nodes_to_circuit([*admitted, n]))
        ok = f_new - f >= min_gain
        if ok:
            admitted.append(n)
        row(n, f_new, ok, "admission")
        if ok:
            f = f_new
        progress(f"circuit: admission {curve[-1]['node']} ({n['class']}): faithfulness {f_new:.3f}"
                 f"{'' if ok else ' (rejected)'}")
    reached = f >= target
    reason = "" if reached else (
        f"faithfulness {f:.3f} < target {target}: no remaining candidate raised it by {min_gain} or more "
        f"({len(rest)} candidates beyond the skeleton tried); the best circuit found is kept")
    return {"nodes": admitted, "curve": curve, "faithfulness": f, "target": target, "reached": reached,
            "reason": reason}


def build_circuit(model: Transformer, batch: Batch, validation: Batch, means: dict[int, Tensor], cfg: dict,
                  progress: Callable[[str], None] = print) -> tuple[dict, pd.DataFrame]:
    """Discovery on ``batch`` (:func:`discover`) then faithfulness-driven admission (:func:`admit`)
    on the held-out ``validation`` prompts, every node outside the circuit mean-ablated with
    ``means`` (template -> mean ``z``, from the ABC sample). Returns the circuit (before
    :func:`finish_circuit`) and the faithfulness-vs-size curve."""
    from mechrepro.studies.ioi_generalization.analysis import circuit_run

    found = discover(model, batch, cfg, progress)
    model_logits, _ = run_end_logits(model, validation.tokens, validation.pos["END"], batch_size=cfg["batch_size"])
    model_ld = logit_diff(model_logits, validation.io, validation.s).mean().item()

    def faithfulness(circuit: dict) -> float:
        logits, _ = circuit_run(model, validation, circuit, means, cfg["batch_size"])
        return logit_diff(logits, validation.io, validation.s).mean().item() / model_ld

    result = admit(candidate_nodes(found), faithfulness, cfg["target_faithfulness"], cfg["min_gain"], progress)
    circuit = {**found, **nodes_to_circuit(result["nodes"]),
               "admission": {k: result[k] for k in ("faithfulness", "target", "reached", "reason")}
               | {"n_validation": len(validation), "validation_model_ld": model_ld, "min_gain": cfg["min_gain"]}}
    return circuit, pd.DataFrame(result["curve"])


def circuit_source(setting: str, model_name: str) -> str:
    """``circuit.source``: ``auto`` is Wang et al.'s reference circuit for ``gpt2``, discovery otherwise."""
    if setting == "auto":
        return "reference" if model_name == "gpt2" else "discover"
    return setting


def reference_circuit(classes: dict, model_name: str) -> dict:
    """Wang et al.'s GPT-2 small circuit (``classes``: class → heads, from ``reference/published.yaml``)."""
    if model_name != "gpt2":
        raise ValueError("circuit.source 'reference' is Wang et al.'s GPT-2 small circuit; it needs model.name gpt2")
    return {"source": "reference", "method": "Wang et al. 2022", "classes": classes, "scores": {}}


def finish_circuit(circuit: dict, model_name: str) -> tuple[dict, pd.DataFrame]:
    """The circuit artifact (every class of :data:`CLASSES`, the model, the number of distinct heads)
    and the table of its discovery scores (one row per step and head), taken out of ``circuit``."""
    circuit["model"] = model_name
    circuit["classes"] = {c: circuit["classes"].get(c, []) for c in CLASSES}
    circuit.setdefault("positions", {})
    circuit["n_heads"] = len({tuple(h) for v in circuit["classes"].values() for h in v})
    rows = [dict(step=step, **r) for step, lst in circuit.pop("scores").items() for r in lst]
    return circuit, pd.DataFrame(rows, columns=SCORE_COLUMNS)


# Columns of circuit_scores.csv: the step, the sender and the position it was patched at, its exact
# effect (relative LD change; empty where only ranked), the other path-patching variant's effect,
# the attribution estimate, and for the backup step the logit effects with and without the name movers.
CURVE_COLUMNS = ["step", "node", "class", "size", "faithfulness", "gain", "admitted", "stage"]
SCORE_COLUMNS = ["step", "layer", "head", "role", "effect", "effect_other", "attribution", "effect_knocked_out",
                 "effect_clean"]


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


def circuit_heads(circuit: dict) -> dict[Head, str]:
    """head -> class (a head listed in two classes keeps the first)."""
    out: dict[Head, str] = {}
    for cls in CLASSES:
        for l, h in circuit["classes"].get(cls, []):
            out.setdefault((l, h), cls)
    return out


def kept_roles(circuit: dict, head: Head, cls: str) -> list[str]:
    """Where a circuit head runs normally: its measured positions (``circuit['positions']``, from
    position-resolved discovery) or its class's (:data:`KEPT_POSITIONS`)."""
    return list(circuit.get("positions", {}).get(f"{head[0]}.{head[1]}") or KEPT_POSITIONS[cls])


def keep_mask(circuit: dict, batch: Batch, n_layers: int, n_heads: int,
              restore: Sequence[str] | str | None = None) -> Tensor:
    """``[b, p, L, h]``: True where a head runs normally in the circuit, False where it is ablated.

    Each circuit head is kept at its positions (:func:`kept_roles`). ``restore``
    changes where duplicate-token / induction / previous-token heads are kept: a list of tokens from
    ``S2``, ``IO2``, ``IO3`` (see :data:`RESTORE_ROLES`), or ``"all"`` for every position.
    """
    b, p = batch.tokens.shape
    keep = torch.zeros(b, p, n_layers, n_heads, dtype=torch.bool)
    rows = torch.arange(b)
    early = ("induction", "duplicate_token", "previous_token")
    for (l, h), cls in circuit_heads(circuit).items():
        if restore is not None and cls in early:
            if restore == "all":
                keep[:, :, l, h] = True
                continue
            roles = [RESTORE_ROLES[t][1 if cls == "previous_token" else 0] for t in restore]
        else:
            roles = kept_roles(circuit, (l, h), cls)
        for role in roles:
            pos = batch.pos[role]
            ok = pos >= 0
            keep[rows[ok], pos[ok], l, h] = True
    return keep


def count_edges(circuit: dict, restore: Sequence[str] | str | None = None) -> set[tuple]:
    """Edges of the circuit graph: ``(sender head, sender position, receiver head or 'logits', input)``.

    An edge joins every sender head at each of its kept positions (:func:`kept_roles`) to every receiver head of the
    class it feeds (:data:`EDGE_TYPES`). Restoring the IO tokens adds the edges of the duplicate,
    induction and previous-token heads at the IO positions (``restore``: tokens from S2, IO2, IO3;
    "all positions" is counted as all three name tokens present in the prompt).
    """
    classes = {c: [tuple(hd) for hd in circuit["classes"].get(c, [])] for c in CLASSES}
    edges = set()
    for src, dst, kind in EDGE_TYPES:
        restored = restore is not None and src in ("induction", "duplicate_token", "previous_token")
        if restored:
            tokens = list(RESTORE_ROLES) if restore == "all" else restore
            restored_positions = sorted({RESTORE_ROLES[t][1 if src == "previous_token" else 0] for t in tokens})
        receivers = ["logits"] if dst == "logits" else classes[dst]
        for hd in classes[src]:
            for pos in (restored_positions if restored else kept_roles(circuit, hd, src)):
                for r in receivers:
                    edges.add((hd, pos, r, kind))
    return edges
