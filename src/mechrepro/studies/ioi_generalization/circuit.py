"""The IOI circuit: discovery by path patching, kept positions, edges, and circuit masks.

Discovery follows Wang et al.'s procedure, backwards from the logits, on base IOI prompts with
their ABC prompts as the corrupted source (each step's effect is the relative change of the mean
logit difference, ``(LD_patched - LD_clean) / LD_clean``):

1. **Name movers / negative name movers** — path patching head → logits at END (direct path).
   Most negative effects are name movers, most positive negative name movers.
2. **S-inhibition heads** — path patching head → name movers' queries at END.
3. **Induction and duplicate-token heads** — path patching head → S-inhibition heads' values at
   S2; split by attention at S2: to S1+1 (induction) or to S1 (duplicate token).
4. **Previous-token heads** — path patching head → induction heads' keys at S1+1.

Steps 2–4 rank every candidate sender with attribution patching (one backward pass) and
confirm the ``confirm_top_k`` best exactly (``method: attribution``), or patch every candidate
exactly (``method: exact``). A class keeps the heads whose exact effect passes its threshold
(most important first, at most ``max_heads``). Backup name movers (heads that only act when
the name movers are knocked out) are not separated from name movers by this procedure.
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
    direct_effects, logit_diff, path_patch, path_patch_attribution, run_end_logits, sender_deltas,
    stack_z,
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
    kept away from zero, which the effects are relative to)."""

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


def discover(model: Transformer, batch: Batch, cfg: dict, progress: Callable[[str], None] = print) -> dict:
    """Find the IOI circuit of ``model`` on ``batch`` (base prompts). ``cfg`` is config['circuit']."""
    r = _clean_and_abc_runs(model, batch, cfg, progress)
    th, mx = cfg["thresholds"], cfg["max_heads"]
    scores: dict[str, list[dict]] = {}

    # 1. heads -> logits
    eff = _direct_effects(r)
    scores["logits"] = [{"layer": l, "head": h, "effect": eff[(l, h)]} for l, h in r.all_heads]
    nm = _select(eff, th["name_mover"], mx["name_mover"], -1)
    neg = _select(eff, th["negative_name_mover"], mx["negative_name_mover"], +1)
    # 2. heads -> name mover queries
    s_inh = _path_step(r, scores, "name_mover_queries", [(l, h, "q") for l, h in nm], "END", th["s_inhibition"],
                       mx["s_inhibition"])
    # 3. heads -> S-inhibition values at S2, split into induction / duplicate-token by attention
    dup_ind = _path_step(r, scores, "s_inhibition_values", [(l, h, "v") for l, h in s_inh], "S2",
                         min(th["induction"], th["duplicate_token"]), len(r.all_heads))
    induction, duplicate, attn_stats = _split_by_attention(r, dup_ind, scores["s_inhibition_values"])
    # 4. heads -> induction keys at S1+1
    prev = _path_step(r, scores, "induction_keys", [(l, h, "k") for l, h in induction], "S1+1",
                      th["previous_token"], mx["previous_token"])
    classes = {"name_mover": nm, "backup_name_mover": [], "negative_name_mover": neg,
               "s_inhibition": s_inh, "induction": induction, "duplicate_token": duplicate,
               "previous_token": prev}
    return {
        "source": "discovered", "method": cfg["method"], "n_prompts": len(batch),
        "clean_ld": r.ld_clean.mean().item(),
        "classes": {c: [list(hd) for hd in v] for c, v in classes.items()},
        "attention_at_s2": attn_stats, "scores": scores,
    }


def _clean_and_abc_runs(model: Transformer, batch: Batch, cfg: dict, progress: Callable[[str], None]) -> _Runs:
    """The clean run (head outputs, residual streams, attention patterns) and the ABC run (head outputs)."""
    spec = model.spec
    L, H = spec.n_layers, spec.n_heads
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + \
            [f"blocks.{l}.hook_resid_pre" for l in range(L)] + \
            [f"blocks.{l}.attn.hook_pattern" for l in range(L)] + ["ln_final.hook_in"]
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
    return _Runs(model, batch, cfg, cache, z, z_abc, resid_pre, ld_clean, base, all_heads, progress)


def _direct_effects(r: _Runs) -> dict[Head, float]:
    """Step 1: each head's relative effect on LD through its direct path to the logits (at END)."""
    r.progress("circuit: direct effects of all heads on the logits")
    end = r.batch.pos["END"]
    resid_final = r.cache["ln_final.hook_in"][torch.arange(len(r.batch)), end]
    deltas = sender_deltas(r.model, r.z, r.z_abc, r.all_heads, end)
    ld = direct_effects(r.model, resid_final, deltas, r.batch.io, r.batch.s)
    return {hd: (ld[i].mean().item() - r.ld_clean.mean().item()) / r.base for i, hd in enumerate(r.all_heads)}


def _path_step(r: _Runs, scores: dict[str, list[dict]], name: str, receivers: list[tuple[int, int, str]],
               role: str, threshold: float, k_max: int) -> list[Head]:
    """Steps 2-4: path patching from every head below the receivers into their ``q``/``k``/``v`` input
    at ``role``; ranked by attribution and the best confirmed exactly (or all exact). Records the
    scores under ``scores[name]`` and returns the heads whose exact effect passes ``threshold``."""
    cfg, batch, end = r.cfg, r.batch, r.batch.pos["END"]
    if not receivers:
        scores[name] = []
        return []
    top_layer = max(l for l, _, _ in receivers)
    senders = [hd for hd in r.all_heads if hd[0] < top_layer]
    if not senders:
        scores[name] = []
        return []
    pos = batch.pos[role]
    d = sender_deltas(r.model, r.z, r.z_abc, senders, pos)
    layers = [l for l, _ in senders]
    if cfg["method"] == "attribution":
        r.progress(f"circuit: attribution ranking of {len(senders)} senders -> {name}")
        attr = path_patch_attribution(r.model, batch.tokens, end, batch.io, batch.s, r.resid_pre, d, layers,
                                      receivers, pos) / r.base
        order = attr.abs().argsort(descending=True)[: cfg["confirm_top_k"]].tolist()
    else:
        attr = torch.full((len(senders),), float("nan"))
        order = list(range(len(senders)))
    r.progress(f"circuit: exact path patching of {len(order)} senders -> {name}")
    ld_p = path_patch(r.model, batch.tokens, end, batch.io, batch.s, r.resid_pre, d[order],
                      [layers[i] for i in order], receivers, pos, max_rows=cfg["max_rows"])
    exact = {senders[i]: (ld_p[j].mean().item() - r.ld_clean.mean().item()) / r.base for j, i in enumerate(order)}
    scores[name] = [{"layer": l, "head": h, "attribution": float(attr[i]),
                     "effect": exact.get((l, h))} for i, (l, h) in enumerate(senders)]
    return _select(exact, threshold, k_max, -1)


def _split_by_attention(r: _Runs, heads: list[Head], step_scores: list[dict]
                        ) -> tuple[list[Head], list[Head], dict[str, dict[str, float]]]:
    """Step 3's heads split by their attention at S2: to S1+1 (induction) or to S1 (duplicate token);
    each class keeps the heads passing its own threshold (at most its ``max_heads``)."""
    th, mx = r.cfg["thresholds"], r.cfg["max_heads"]
    batch, rows = r.batch, torch.arange(len(r.batch))
    induction, duplicate = [], []
    s2, s1, s1p = batch.pos["S2"], batch.pos["S1"], batch.pos["S1+1"]
    attn_stats = {}
    for l, h in heads:
        pat = r.cache[f"blocks.{l}.attn.hook_pattern"][rows, h, s2]  # [b, p]
        a_s1, a_s1p = pat[rows, s1].mean().item(), pat[rows, s1p].mean().item()
        attn_stats[f"{l}.{h}"] = {"S2->S1": a_s1, "S2->S1+1": a_s1p}
        (duplicate if a_s1 >= a_s1p else induction).append((l, h))
    effect3 = {(s["layer"], s["head"]): s["effect"] for s in step_scores}
    induction = [hd for hd in induction if -effect3[hd] >= th["induction"]][: mx["induction"]]
    duplicate = [hd for hd in duplicate if -effect3[hd] >= th["duplicate_token"]][: mx["duplicate_token"]]
    return induction, duplicate, attn_stats


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
    circuit["n_heads"] = len({tuple(h) for v in circuit["classes"].values() for h in v})
    rows = [dict(step=step, **r) for step, lst in circuit.pop("scores").items() for r in lst]
    return circuit, pd.DataFrame(rows, columns=["step", "layer", "head", "effect", "attribution"])


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


def keep_mask(circuit: dict, batch: Batch, n_layers: int, n_heads: int,
              restore: Sequence[str] | str | None = None) -> Tensor:
    """``[b, p, L, h]``: True where a head runs normally in the circuit, False where it is ablated.

    Each circuit head is kept at its class's positions (:data:`KEPT_POSITIONS`). ``restore``
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
            roles = KEPT_POSITIONS[cls]
        for role in roles:
            pos = batch.pos[role]
            ok = pos >= 0
            keep[rows[ok], pos[ok], l, h] = True
    return keep


def count_edges(circuit: dict, restore: Sequence[str] | str | None = None) -> set[tuple]:
    """Edges of the circuit graph: ``(sender head, sender position, receiver head or 'logits', input)``.

    An edge joins every sender head at each of its kept positions to every receiver head of the
    class it feeds (:data:`EDGE_TYPES`). Restoring the IO tokens adds the edges of the duplicate,
    induction and previous-token heads at the IO positions (``restore``: tokens from S2, IO2, IO3;
    "all positions" is counted as all three name tokens present in the prompt).
    """
    classes = {c: [tuple(hd) for hd in circuit["classes"].get(c, [])] for c in CLASSES}
    edges = set()
    for src, dst, kind in EDGE_TYPES:
        if restore is not None and src in ("induction", "duplicate_token", "previous_token"):
            tokens = list(RESTORE_ROLES) if restore == "all" else restore
            positions = sorted({RESTORE_ROLES[t][1 if src == "previous_token" else 0] for t in tokens})
        else:
            positions = KEPT_POSITIONS[src]
        receivers = ["logits"] if dst == "logits" else classes[dst]
        for hd in classes[src]:
            for pos in positions:
                for r in receivers:
                    edges.add((hd, pos, r, kind))
    return edges
