"""Study C analyses: which nodes output the correct *label* of a multiple-choice question, and how.

Everything is measured at the final position (the ":" of ``"Answer:"``) of prompts built by
:mod:`mechrepro.studies.mcq_circuits.data`, on :class:`~mechrepro.core.model.Transformer` (GPT-2 or Llama/Qwen2 with
grouped-query attention). The score is the paper's

    LD = logit(correct answer token) − mean logit(the other options' answer tokens)

and accuracy is "the correct answer token has the highest logit among the options' tokens".

* **Direct logit attribution** (:func:`dla`): each head's output ``z @ W_O``, each MLP's output,
  the embedding and the output biases, through the final norm with its scale frozen at the clean
  run's value and through the unembedding, projected on the LD direction. The parts sum exactly
  to LD (for LayerNorm, plus the final norm's bias term).
* **Activation patching** (:func:`patch_nodes`): the corrupted prompt is the same question with the
  option contents cyclically shifted (the correct content under another letter). Each node's output
  at the final position is replaced by its corrupted value. *Total effect*: everything after it is
  recomputed — only the final token, from the patched layer on, over the cached keys and values
  of the clean prefix (:func:`mechrepro.core.engine.patch_heads_end`, :func:`~mechrepro.core.engine.patch_mlps_end`). *Direct effect*: only the node's own path to the
  logits changes (the DLA of the corrupted minus the clean output, frozen norm scale).
* **Attention statistics and head categories** (:func:`attention_stats`, :func:`categorize`): the
  final position's attention to each option's label, to the correct option's content and to the
  ``"Answer:"`` tokens, and each head's DLA split by the correct letter; the rules are in
  :data:`CATEGORY_RULES`.
* **Low-rank compression** (:func:`fit_low_rank`, :func:`low_rank_hooks`): a head's query at the
  final position and its keys / values at the label positions are collected over the fit prompts;
  each is replaced by ``mean + P_r (x − mean)`` with ``P_r`` the projection on its top-``r``
  principal directions (the mean of the discarded directions is kept). On grouped-query models the
  key/value projection is shared by several query heads: the layer is switched to per-head inputs
  (:class:`~mechrepro.core.model.Transformer`'s ``hook_k_input``), so the compressed keys / values are
  those of this query head alone and the other heads of its group are untouched.
* **Mean ablation** (:func:`mean_ablation_hooks`): the head's output at the final position is
  replaced by its mean over the normal-label fit prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mechrepro.core.engine import base_run, patch_heads_end, patch_mlps_end
from mechrepro.core.model import Transformer

Batch = dict[str, Tensor]

# Head categories (first matching rule wins). Attention is the final position's, averaged over prompts.
CATEGORY_RULES: dict[str, str] = {
    "correct-letter": "attention to the four labels ≥ 0.2 and, of it, ≥ 50 % on the correct option's label "
                      "(chance 25 %)",
    "content-gatherer": "attention to the correct option's content tokens ≥ 0.2 and ≥ 2 × the mean attention to "
                        "another option's content",
    "single-letter": "attention to the labels ≥ 0.2 and ≥ 50 % of it on one fixed list position whichever option "
                     "is correct, or ≥ 60 % of the head's summed |DLA by correct letter| from one letter",
    "uniform": "attention to the labels ≥ 0.2, spread evenly: every list position gets 15–35 % of it",
    "amplification": "attention to the 'Answer:' tokens (incl. the final position) ≥ 0.3 and positive mean DLA "
                     "(it boosts the letter already in the residual stream)",
    "other": "none of the above",
}
MIN_LABEL_ATT, CORRECT_SHARE, SINGLE_SHARE, SINGLE_DLA_SHARE = 0.2, 0.5, 0.5, 0.6
UNIFORM_BAND, MIN_CONTENT_ATT, CONTENT_RATIO, MIN_ANSWER_ATT = (0.15, 0.35), 0.2, 2.0, 0.3


# --------------------------------------------------------------------------------------- metrics
def option_logits(logits: Tensor, answer_ids: Tensor) -> Tensor:
    """``[b, n_options]`` logits of each option's answer token from END logits ``[b, v]``."""
    return logits.gather(1, answer_ids)


def ld_from_options(opt: Tensor, correct: Tensor) -> Tensor:
    """logit(correct) − mean logit(others) per row of ``opt [b, n]``."""
    n = opt.shape[1]
    c = opt.gather(1, correct[:, None])[:, 0]
    return c - (opt.sum(1) - c) / (n - 1)


def scores(logits: Tensor, answer_ids: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """Per-prompt LD, correctness, loss (cross-entropy over the options) and predicted option."""
    opt = option_logits(logits, answer_ids)
    return {"ld": ld_from_options(opt, correct), "correct": (opt.argmax(1) == correct).float(),
            "loss": torch.nn.functional.cross_entropy(opt, correct, reduction="none"), "pred": opt.argmax(1),
            "p_correct": opt.softmax(1).gather(1, correct[:, None])[:, 0]}


def ld_metric(answer_ids: Tensor, correct: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Engine metric: LD of prompt ``idx`` (the clean prompt's correct option)."""
    return lambda logits, idx: ld_from_options(option_logits(logits, answer_ids[idx]), correct[idx])


@torch.no_grad()
def end_logits(model: Transformer, batch: Batch, hooks=None) -> Tensor:
    return model(batch["tokens"], hooks=hooks, logits_at=batch["end"])


@torch.no_grad()
def evaluate(model: Transformer, batch: Batch, hooks=None, batch_size: int = 64) -> dict[str, Tensor]:
    """:func:`scores` of every prompt, in chunks (``hooks``: a function of the chunk's rows → hooks)."""
    out: dict[str, list[Tensor]] = {}
    n = len(batch["tokens"])
    for i in range(0, n, batch_size):
        sub = slice_batch(batch, slice(i, min(n, i + batch_size)))
        h = hooks(sub) if callable(hooks) else hooks
        for k, v in scores(end_logits(model, sub, h), sub["answer_ids"], sub["correct"]).items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def slice_batch(batch: Batch, rows) -> Batch:
    """Rows of a padded batch (trailing padding trimmed)."""
    sub = {k: v[rows] for k, v in batch.items()}
    width = int(sub["end"].max()) + 1
    sub["tokens"] = sub["tokens"][:, :width]
    if "mask" in sub:
        sub["mask"] = sub["mask"][:, :width]
    return sub


# --------------------------------------------------------------------------------------- DLA
def _ld_direction(model: Transformer, answer_ids: Tensor, correct: Tensor) -> Tensor:
    """``[b, d]``: W_U(correct) − mean W_U(others)."""
    U = model.W_U[:, answer_ids].permute(1, 2, 0)  # [b, n, d]
    n = U.shape[1]
    c = U[torch.arange(len(U)), correct]
    return c - (U.sum(1) - c) / (n - 1)


def _through_norm(model: Transformer, x: Tensor, scale: Tensor) -> Tensor:
    """A component ``x [b, ..., d]`` through the final norm with a frozen ``scale`` (no bias): one per
    row ``[b]``, or one per vector ``[b, ...]``."""
    if model.spec.arch == "gpt2":
        x = x - x.mean(-1, keepdim=True)
    return x * scale.reshape(scale.shape + (1,) * (x.dim() - scale.dim())) * model.p("ln_final.w")


def norm_scale(model: Transformer, resid: Tensor) -> Tensor:
    """The final norm's scale of residual rows ``[b, d]``: 1/rms (RMSNorm) or 1/std (LayerNorm)."""
    eps = model.spec.norm_eps
    if model.spec.arch == "gpt2":
        return torch.rsqrt(resid.var(-1, unbiased=False) + eps)
    return torch.rsqrt(resid.pow(2).mean(-1) + eps)


@torch.no_grad()
def end_components(model: Transformer, batch: Batch, hooks=None) -> dict[str, Tensor]:
    """The residual stream's parts at END: ``embed [b, d]``, ``z [b, L, h, e]``, ``mlp [b, L, d]``,
    ``final [b, d]`` (the final residual), ``pattern [b, L, h, p]`` (END's attention) and logits."""
    L = model.spec.n_layers
    names = ["blocks.0.hook_resid_pre", "ln_final.hook_in"] + [
        f"blocks.{l}.{n}" for l in range(L) for n in ("attn.hook_z", "hook_mlp_out", "attn.hook_pattern")]
    cache: dict[str, Tensor] = {}
    logits = model(batch["tokens"], hooks=hooks, cache=cache, cache_names=names, logits_at=batch["end"])
    rows, end = torch.arange(len(batch["end"])), batch["end"]
    return {"embed": cache["blocks.0.hook_resid_pre"][rows, end],
            "z": torch.stack([cache[f"blocks.{l}.attn.hook_z"][rows, end] for l in range(L)], 1),
            "mlp": torch.stack([cache[f"blocks.{l}.hook_mlp_out"][rows, end] for l in range(L)], 1),
            "pattern": torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][rows, :, end] for l in range(L)], 1),
            "final": cache["ln_final.hook_in"][rows, end], "logits": logits}


def head_outputs(model: Transformer, z: Tensor) -> Tensor:
    """``[b, L, h, d]`` per-head outputs ``z @ W_O`` from ``z [b, L, h, e]``."""
    W_O = torch.stack([model.W_O(l) for l in range(model.spec.n_layers)])  # [L, h, e, d]
    return torch.einsum("blhe,lhed->blhd", z, W_O)


def dla(model: Transformer, comps: dict[str, Tensor], answer_ids: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """Direct logit attribution of every node to LD, per prompt.

    Returns ``heads [b, L, h]``, ``mlps [b, L]``, ``embed [b]``, ``bias [b]`` (attention output
    biases and, for LayerNorm, the final norm's bias), ``ld [b]`` (from the logits) and ``total [b]``
    (the sum of the parts; equal to ``ld`` up to float error).
    """
    scale = norm_scale(model, comps["final"])
    u = _ld_direction(model, answer_ids, correct)  # [b, d]

    def proj(x: Tensor) -> Tensor:  # [b, ..., d] -> [b, ...]
        y = _through_norm(model, x, scale)
        return torch.einsum("b...d,bd->b...", y, u)

    heads = proj(head_outputs(model, comps["z"]))
    mlps = proj(comps["mlp"])
    embed = proj(comps["embed"])
    L = model.spec.n_layers
    bias = torch.zeros(len(u))
    for l in range(L):
        if model.has(f"blocks.{l}.b_O"):
            bias = bias + proj(model.p(f"blocks.{l}.b_O").expand(len(u), -1))
    if model.has("ln_final.b"):
        bias = bias + (u * model.p("ln_final.b")).sum(-1)
    total = heads.sum((1, 2)) + mlps.sum(1) + embed + bias
    ld = ld_from_options(option_logits(comps["logits"], answer_ids), correct)
    return {"heads": heads, "mlps": mlps, "embed": embed, "bias": bias, "total": total, "ld": ld}


# --------------------------------------------------------------------------------------- patching
@torch.no_grad()
def patch_nodes(model: Transformer, clean: Batch, corrupt: Batch, max_rows: int = 2048) -> dict[str, Tensor]:
    """Total and direct effects on LD of patching every head and MLP output at END from ``corrupt``.

    Returns mean effects over prompts: ``heads_total [L, h]``, ``heads_direct [L, h]``,
    ``mlps_total [L]``, ``mlps_direct [L]``, and ``clean_ld``, ``corrupt_ld`` (means).
    The direct effect freezes every later node and the final norm's scale (the paper's). Also
    ``heads_direct_norm [L, h]`` / ``mlps_direct_norm [L]``: every later node frozen, but the final
    norm recomputed on the changed residual (the direct path with the norm's own nonlinearity).
    """
    cl, co = end_components(model, clean), end_components(model, corrupt)
    base = base_run(model, clean["tokens"], clean["end"])
    metric = ld_metric(clean["answer_ids"], clean["correct"])
    heads_total = patch_heads_end(model, base, co["z"], metric, max_rows=max_rows)
    mlps_total = patch_mlps_end(model, base, co["mlp"], metric)
    d_clean = dla(model, cl, clean["answer_ids"], clean["correct"])
    # the corrupted outputs through the clean run's frozen norm and the clean LD direction
    mixed = dict(cl, z=co["z"], mlp=co["mlp"])
    d_mixed = dla(model, mixed, clean["answer_ids"], clean["correct"])
    corrupt_ld = metric(co["logits"], torch.arange(len(co["logits"]))).mean()
    u = _ld_direction(model, clean["answer_ids"], clean["correct"])  # [b, d]
    heads_norm = direct_norm_recomputed(model, cl["final"], head_outputs(model, co["z"]) - head_outputs(model, cl["z"]), u)
    mlps_norm = direct_norm_recomputed(model, cl["final"], co["mlp"] - cl["mlp"], u)
    return {"heads_total": heads_total, "heads_direct": (d_mixed["heads"] - d_clean["heads"]).mean(0),
            "mlps_total": mlps_total, "mlps_direct": (d_mixed["mlps"] - d_clean["mlps"]).mean(0),
            "heads_direct_norm": heads_norm.mean(0), "mlps_direct_norm": mlps_norm.mean(0),
            "clean_ld": d_clean["ld"].mean(), "corrupt_ld": corrupt_ld}


def direct_norm_recomputed(model: Transformer, final: Tensor, delta: Tensor, u: Tensor) -> Tensor:
    """LD change ``[b, ...]`` of adding each node's output change ``delta [b, ..., d]`` to the clean
    final residual ``final [b, d]`` alone, with the final norm recomputed (``u [b, d]``: the LD
    direction). The norm's bias does not depend on the residual and cancels."""

    def ld(x: Tensor) -> Tensor:  # [b, ..., d] -> [b, ...]
        return torch.einsum("b...d,bd->b...", _through_norm(model, x, norm_scale(model, x)), u)

    expand = final.reshape(final.shape[0], *([1] * (delta.dim() - 2)), final.shape[1])
    return ld(expand + delta) - ld(expand)


# --------------------------------------------------------------------------------------- attention
def attention_stats(pattern: Tensor, batch: Batch) -> dict[str, Tensor]:
    """Per prompt and head, from END's attention ``pattern [b, L, h, p]``:

    ``labels [b, L, h, n]`` attention to each option's label (list order), ``correct_label``,
    ``content_correct`` (sum over the correct option's content tokens), ``content_other`` (mean
    over the other options of the sum over their content tokens), ``answer`` (sum over the
    ``"Answer:"`` tokens incl. END).
    """
    b = pattern.shape[0]
    rows = torch.arange(b)
    lp = batch["label_pos"]  # [b, n]
    labels = pattern.gather(3, lp[:, None, None, :].expand(-1, *pattern.shape[1:3], -1))
    correct_label = labels[rows, :, :, batch["correct"]]
    cmask = batch["content_mask"]  # [b, n, p] 0/1
    content = torch.einsum("blhp,bnp->blhn", pattern, cmask.to(pattern.dtype))
    n = content.shape[-1]
    content_correct = content[rows, :, :, batch["correct"]]
    content_other = (content.sum(-1) - content_correct) / (n - 1)
    answer = torch.einsum("blhp,bp->blh", pattern, batch["answer_mask"].to(pattern.dtype))
    return {"labels": labels, "correct_label": correct_label, "content_correct": content_correct,
            "content_other": content_other, "answer": answer}


def categorize(stats: dict[str, float], dla_by_letter: Sequence[float]) -> str:
    """The category of one head from its mean attention statistics (see :data:`CATEGORY_RULES`).

    ``stats``: ``label_att`` (total attention to labels), ``correct_share`` (mean share of the
    label attention on the correct label), ``position_share`` (list of the mean share per list
    position), ``content_correct``, ``content_other``, ``answer``, ``dla``.
    """
    label_att = stats["label_att"]
    shares = stats["position_share"]
    absd = [abs(x) for x in dla_by_letter]
    dla_share = max(absd) / sum(absd) if sum(absd) > 0 else 0.0
    if label_att >= MIN_LABEL_ATT and stats["correct_share"] >= CORRECT_SHARE:
        return "correct-letter"
    if stats["content_correct"] >= MIN_CONTENT_ATT and stats["content_correct"] >= CONTENT_RATIO * stats["content_other"]:
        return "content-gatherer"
    if (label_att >= MIN_LABEL_ATT and max(shares) >= SINGLE_SHARE) or dla_share >= SINGLE_DLA_SHARE:
        return "single-letter"
    if label_att >= MIN_LABEL_ATT and all(UNIFORM_BAND[0] <= s <= UNIFORM_BAND[1] for s in shares):
        return "uniform"
    if stats["answer"] >= MIN_ANSWER_ATT and stats["dla"] > 0:
        return "amplification"
    return "other"


# --------------------------------------------------------------------------------------- low rank
KINDS = ("q", "k", "v")


@torch.no_grad()
def collect_qkv(model: Transformer, batch: Batch, head: tuple[int, int]) -> dict[str, Tensor]:
    """The head's query at END ``[b, e]`` and keys / values at the label positions ``[b, n, e]``.

    Queries and keys are taken before rotary embedding (the projection commutes with nothing
    position-dependent that way); the layer runs with per-head inputs, so on grouped-query models
    the keys and values are this query head's own copy.
    """
    l, h = head
    cache: dict[str, Tensor] = {}
    names = [f"blocks.{l}.attn.hook_{k}" for k in KINDS]
    model(batch["tokens"], hooks=_per_head_inputs(l), cache=cache, cache_names=names, logits_at=batch["end"])
    rows = torch.arange(len(batch["end"]))
    lp = batch["label_pos"]
    return {"q": cache[names[0]][rows, batch["end"], h],
            "k": cache[names[1]][rows[:, None], lp, h], "v": cache[names[2]][rows[:, None], lp, h]}


def _per_head_inputs(layer: int) -> dict:
    """Identity hooks that switch ``layer`` to per-query-head key/value inputs (GQA-safe editing)."""
    return {f"blocks.{layer}.attn.hook_k_input": lambda x: None, f"blocks.{layer}.attn.hook_v_input": lambda x: None}


def fit_low_rank(x: Tensor) -> dict[str, Tensor]:
    """Mean and principal directions (rows of ``basis``, by decreasing variance) of ``x [N, e]``."""
    x = x.reshape(-1, x.shape[-1]).double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=True)
    return {"mean": mean, "basis": vh, "singular_values": s}


def project(x: Tensor, fit: dict[str, Tensor], r: int) -> Tensor:
    """``mean + P_r (x − mean)``: the top-``r`` directions kept, the others set to their mean."""
    V = fit["basis"][:r].to(x.dtype)  # [r, e]
    mean = fit["mean"].to(x.dtype)
    return mean + ((x - mean) @ V.T) @ V


def low_rank_hooks(model: Transformer, head: tuple[int, int], fits: dict[str, dict], ranks: dict[str, int],
                   batch: Batch) -> dict:
    """Hooks replacing the head's query at END and keys / values at the label positions by their
    rank-``ranks[kind]`` projections (kinds absent from ``ranks`` are left alone)."""
    l, h = head
    rows = torch.arange(len(batch["end"]))
    lp = batch["label_pos"]
    hooks = dict(_per_head_inputs(l))

    def make(kind: str):
        def fn(x: Tensor) -> Tensor:
            x = x.clone()
            if kind == "q":
                x[rows, batch["end"], h] = project(x[rows, batch["end"], h], fits[kind], ranks[kind])
            else:
                x[rows[:, None], lp, h] = project(x[rows[:, None], lp, h], fits[kind], ranks[kind])
            return x
        return fn

    for kind in ranks:
        hooks[f"blocks.{l}.attn.hook_{kind}"] = make(kind)
    return hooks


def mean_ablation_hooks(head: tuple[int, int], mean_z: Tensor, batch: Batch) -> dict:
    """Hook replacing the head's output ``z`` at END by ``mean_z [e]``."""
    l, h = head
    rows = torch.arange(len(batch["end"]))

    def fn(z: Tensor) -> Tensor:
        z = z.clone()
        z[rows, batch["end"], h] = mean_z.to(z.dtype)
        return z

    return {f"blocks.{l}.attn.hook_z": fn}
