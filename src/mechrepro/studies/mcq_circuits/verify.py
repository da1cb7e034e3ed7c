"""Proof that a head is a genuine correct-letter head (Study C, issue "claims that mean something").

A head's category (:func:`~mechrepro.studies.mcq_circuits.analysis.categorize`) says where it
looks; it does not say that the head *does* what the paper's correct-letter heads do. Every head
gets five checks here, each a number written to ``verify.csv`` and ``metrics.json``:

1. **Attention** (:func:`attention_checks`): at the final position the head puts at least
   ``min_correct_share`` of its label attention on the correct option's label, on ABCD *and* on
   random letters, with at least ``min_label_attention`` of its attention on the labels at all.
2. **Direct ≈ total** (:func:`direct_total_check`): patching the head's output from the
   content-permuted prompt changes LD mostly through its own path:
   ``|direct − total| ≤ max_direct_gap × |total|``, with ``|total|`` at least ``min_total_share``
   of the clean − corrupted LD (a head that does nothing is not "close"). The direct effect
   freezes the final norm's scale, as the paper's does (``direct_norm: frozen``); with
   ``direct_norm: recomputed`` the norm is recomputed on the changed residual (every later node
   still frozen). Both are in ``verify.csv``; in a small model whose few heads dominate the final
   residual the two differ (the default organism: by about a third).
3. **Label swap** (:func:`swap_prompts`, :func:`label_swap`): only the correct option's label is
   replaced by a letter outside the prompt. The model's prediction (over the options' answer
   tokens and the old letter's) must become the new letter, and the head's own direct logits
   (its output through the final norm, scale frozen, and the unembedding) must rank the new letter
   first, each on at least ``min_swap`` of the prompts.
4. **OV copies letters** (:func:`ov_copying`): the head's value at a label position, through
   ``W_O``, the final norm's weight and the unembedding of the letters' answer tokens, averaged
   per letter: the letter itself is top-1 for at least ``min_ov_letters`` of the letters seen.
5. **Keys cluster by list position** (:func:`key_position_r2`): the share of the variance of the
   head's keys at the labels (random letters; top-3 principal components) explained by the list
   position, at least ``min_key_r2``.

A head passes when every check passes (:func:`passes`). When no head passes the stages still
run; the claims that need such a head read ``low_rank.correct_letter_head`` (false) and are
untestable.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import replace

import pandas as pd
import torch
from torch import Tensor

from mechrepro.core.model import Transformer
from mechrepro.studies.mcq_circuits import analysis as ma
from mechrepro.studies.mcq_circuits.data import Prompt

Batch = dict[str, Tensor]
CHECKS = ("attention_abcd", "attention_random_letters", "direct_total", "label_swap", "ov_copy", "key_position")
RULES = {
    "attention_abcd": "label attention ≥ min_label_attention and ≥ min_correct_share of it on the correct label (ABCD)",
    "attention_random_letters": "the same with random letters",
    "direct_total": "|direct − total| ≤ max_direct_gap × |total| and |total| ≥ min_total_share × (clean − corrupted LD)",
    "label_swap": "after swapping only the correct label to a new letter, the model predicts it and the head's direct "
                  "logits rank it first, each on ≥ min_swap of the prompts",
    "ov_copy": "the head's OV output at a label, per letter, has that letter's answer token top-1 for ≥ min_ov_letters "
               "of the letters",
    "key_position": "the list position explains ≥ min_key_r2 of the keys' top-3-PC variance at the labels (random "
                    "letters)",
}


# --------------------------------------------------------------------------------------- 1. attention
def attention_checks(means: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``label_att_{set}`` and ``correct_share_{set}`` ``[L, h]`` of each label set's
    :func:`~mechrepro.studies.mcq_circuits.metrics.head_means`."""
    out = {}
    for name, m in means.items():
        out[f"label_att_{name}"] = m["label_att"]
        out[f"correct_share_{name}"] = m["correct_share"]
    return out


# --------------------------------------------------------------------------------------- 3. label swap
def swap_prompts(prompts: Sequence[Prompt], letters: dict[str, tuple[int, int]], seed: int) -> list[Prompt]:
    """Each prompt with only its correct option's label replaced by a letter outside its labels.

    ``letters``: letter → (label token id, answer token id). The old answer token is kept as an
    extra candidate (``answer_ids`` gets one more entry, after the options'); ``labels`` keeps
    the options' labels with the new letter in place.
    """
    rng = random.Random(f"label-swap-{seed}")
    out = []
    for p in prompts:
        choices = sorted(x for x in letters if x not in p.labels)
        new = rng.choice(choices)
        label_id, answer_id = letters[new]
        tokens = list(p.tokens)
        tokens[p.label_pos[p.correct]] = label_id
        answers = list(p.answer_ids)
        old = answers[p.correct]
        answers[p.correct] = answer_id
        labels = list(p.labels)
        labels[p.correct] = new
        out.append(replace(p, tokens=tokens, answer_ids=answers + [old], labels=labels, text=""))
    return out


def swap_batch(prompts: Sequence[Prompt], pad_id: int) -> Batch:
    """A batch of :func:`swap_prompts` (``answer_ids`` ``[b, n + 1]``: the options', then the old letter's)."""
    from mechrepro.studies.mcq_circuits.data import to_batch

    plain = [replace(p, answer_ids=p.answer_ids[:-1]) for p in prompts]
    batch = to_batch(plain, pad_id)
    batch["answer_ids"] = torch.tensor([p.answer_ids for p in prompts])
    return batch


@torch.no_grad()
def label_swap(model: Transformer, batches: Iterable[Batch]) -> dict[str, Tensor]:
    """On swapped prompts (:func:`swap_batch`): ``model`` (share predicting the new letter) and
    ``heads [L, h]`` (share whose head's direct logits rank the new letter first)."""
    n, model_hits, head_hits = 0, 0.0, 0.0
    for b in batches:
        comps = ma.end_components(model, b)
        rows = torch.arange(len(b["end"]))
        cands = b["answer_ids"]  # [b, n + 1]
        model_hits += (comps["logits"].gather(1, cands).argmax(1) == b["correct"]).float().sum()
        scale = ma.norm_scale(model, comps["final"])
        out = ma._through_norm(model, ma.head_outputs(model, comps["z"]), scale)  # [b, L, h, d]
        U = model.W_U[:, cands].permute(1, 0, 2)  # [b, d, n + 1]
        direct = torch.einsum("blhd,bdc->blhc", out, U)
        head_hits = head_hits + (direct.argmax(-1) == b["correct"][:, None, None]).float().sum(0)
        n += len(rows)
    return {"model": torch.as_tensor(model_hits / n), "heads": head_hits / n}


# --------------------------------------------------------------------------------------- 4. OV copying
def letter_tokens(prompts: Iterable[Prompt]) -> dict[str, tuple[int, int]]:
    """letter → (label token id, answer token id), from the prompts' labels (letters only)."""
    out: dict[str, tuple[int, int]] = {}
    for p in prompts:
        for j, lab in enumerate(p.labels):
            if lab.isalpha() and j < len(p.answer_ids):
                out.setdefault(lab, (p.tokens[p.label_pos[j]], p.answer_ids[j]))
    return dict(sorted(out.items()))


@torch.no_grad()
def label_values(model: Transformer, batch: Batch) -> Tensor:
    """Every head's value at the label positions: ``[b, n, L, h, e]`` (grouped-query: the group's)."""
    L = model.spec.n_layers
    names = [f"blocks.{l}.attn.hook_v" for l in range(L)]
    cache: dict[str, Tensor] = {}
    model(batch["tokens"], cache=cache, cache_names=names, logits_at=batch["end"])
    rows = torch.arange(len(batch["end"]))[:, None]
    groups = torch.tensor([model.kv_group(h) for h in range(model.spec.n_heads)])
    vals = [cache[n][rows, batch["label_pos"]][:, :, groups] for n in names]  # [b, n, h, e] each
    return torch.stack(vals, 2)


@torch.no_grad()
def ov_copying(model: Transformer, batches: Iterable[Batch], letters: dict[str, tuple[int, int]]) -> dict:
    """Per head, the share of letters whose mean OV output at their labels has their own answer
    token top-1 among the letters' answer tokens: ``share [L, h]``, ``letters`` (those seen)."""
    names = list(letters)
    label_to_idx = {tid: i for i, (tid, _) in enumerate(letters.values())}
    answer = torch.tensor([a for _, a in letters.values()])
    W_O = torch.stack([model.W_O(l) for l in range(model.spec.n_layers)])  # [L, h, e, d]
    sums, counts = None, torch.zeros(len(names))
    for b in batches:
        v = label_values(model, b)  # [b, n, L, h, e]
        lab = b["tokens"].gather(1, b["label_pos"])  # [b, n]
        idx = torch.tensor([label_to_idx.get(int(t), -1) for t in lab.flatten()]).reshape(lab.shape)
        if sums is None:
            sums = torch.zeros(len(names), *v.shape[2:])
        for i in range(len(names)):
            sel = idx == i
            if sel.any():
                sums[i] += v[sel].sum(0)
                counts[i] += sel.sum()
    seen = counts > 0
    # the mean value per letter through W_O (linear: the mean of the outputs)
    mean = torch.einsum("xlhe,lhed->xlhd", sums[seen] / counts[seen][:, None, None, None], W_O)
    normed = ma._through_norm(model, mean, torch.ones(len(mean)))
    logits = torch.einsum("xlhd,dy->xlhy", normed, model.W_U[:, answer[seen]])  # [letters, L, h, letters]
    top = logits.argmax(-1)
    hit = (top == torch.arange(len(mean))[:, None, None]).float()
    return {"share": hit.mean(0), "letters": [n for n, s in zip(names, seen) if s]}


# --------------------------------------------------------------------------------------- 5. keys
@torch.no_grad()
def label_keys(model: Transformer, batch: Batch) -> Tensor:
    """Every head's key (before rotary) at the label positions: ``[b, n, L, h, e]``."""
    L = model.spec.n_layers
    names = [f"blocks.{l}.attn.hook_k" for l in range(L)]
    cache: dict[str, Tensor] = {}
    model(batch["tokens"], cache=cache, cache_names=names, logits_at=batch["end"])
    rows = torch.arange(len(batch["end"]))[:, None]
    groups = torch.tensor([model.kv_group(h) for h in range(model.spec.n_heads)])
    return torch.stack([cache[n][rows, batch["label_pos"]][:, :, groups] for n in names], 2)


def position_r2(keys: Tensor, k: int = 3) -> float | None:
    """``keys [N, n, e]`` (N prompts, n list positions): the share of the variance of their top-``k``
    principal components explained by the list position (1 − within / total); None if constant."""
    N, n, e = keys.shape
    x = keys.reshape(N * n, e).double()
    x = x - x.mean(0)
    if x.pow(2).sum() == 0:
        return None
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    pcs = (x @ vh[:k].T).reshape(N, n, -1)
    total = (pcs - pcs.reshape(N * n, -1).mean(0)).pow(2).sum()
    within = (pcs - pcs.mean(0, keepdim=True)).pow(2).sum()
    return float(1 - within / total) if total > 0 else None


def key_position_r2(keys: Tensor) -> Tensor:
    """``keys [N, n, L, h, e]`` → ``[L, h]`` :func:`position_r2` per head (NaN if constant)."""
    L, H = keys.shape[2:4]
    out = torch.full((L, H), float("nan"))
    for l in range(L):
        for h in range(H):
            r = position_r2(keys[:, :, l, h])
            out[l, h] = float("nan") if r is None else r
    return out


# --------------------------------------------------------------------------------------- table and verdict
def direct_total_check(patch: pd.DataFrame, clean_ld: float, corrupt_ld: float, th: dict) -> pd.Series:
    """Per head (``patch`` indexed by node): whether its direct effect is close to its total effect.
    ``th["direct_norm"]``: ``frozen`` compares the paper's direct effect (final-norm scale frozen),
    ``recomputed`` the direct path with the final norm recomputed (``direct_effect_norm``)."""
    heads = patch[patch.kind == "head"]
    direct = heads.direct_effect_norm if th["direct_norm"] == "recomputed" else heads.direct_effect
    gap = (direct - heads.total_effect).abs()
    big = heads.total_effect.abs() >= th["min_total_share"] * abs(clean_ld - corrupt_ld)
    return big & (gap <= th["max_direct_gap"] * heads.total_effect.abs())


def verify_table(names: list[str], att: dict[str, Tensor], patch: pd.DataFrame, patch_summary: dict,
                 swap: dict[str, Tensor] | None, ov: dict | None, key_r2: Tensor | None, th: dict) -> pd.DataFrame:
    """One row per head (``names`` in layer-major order): every check's number and whether it passes.
    A check whose data is missing (e.g. no random-letter prompts) is NaN and fails."""
    nan = float("nan")
    rows = []
    close = direct_total_check(patch, patch_summary["clean_ld"], patch_summary["corrupt_ld"], th)
    flat = {k: v.flatten().tolist() for k, v in att.items()}
    for i, node in enumerate(names):
        row = {"node": node}
        for s in ("abcd", "random_letters"):
            la, cs = flat.get(f"label_att_{s}", [nan] * len(names))[i], flat.get(f"correct_share_{s}", [nan] * len(names))[i]
            row[f"label_att_{s}"], row[f"correct_share_{s}"] = la, cs
            row[f"pass_attention_{s}"] = bool(la >= th["min_label_attention"] and cs >= th["min_correct_share"])
        row["total_effect"] = float(patch.loc[node, "total_effect"])
        row["direct_effect"] = float(patch.loc[node, "direct_effect"])
        row["direct_effect_norm"] = float(patch.loc[node, "direct_effect_norm"])
        row["pass_direct_total"] = bool(close.get(node, False))
        row["swap_model"] = float(swap["model"]) if swap else nan
        row["swap_head"] = swap["heads"].flatten()[i].item() if swap else nan
        row["pass_label_swap"] = bool(swap is not None and row["swap_model"] >= th["min_swap"]
                                      and row["swap_head"] >= th["min_swap"])
        row["ov_letters"] = ov["share"].flatten()[i].item() if ov else nan
        row["pass_ov_copy"] = bool(ov is not None and row["ov_letters"] >= th["min_ov_letters"])
        row["key_position_r2"] = key_r2.flatten()[i].item() if key_r2 is not None else nan
        row["pass_key_position"] = bool(row["key_position_r2"] >= th["min_key_r2"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["passes"] = passes(frame)
    return frame


def passes(frame: pd.DataFrame) -> pd.Series:
    """Every check passes."""
    return frame[[f"pass_{c}" for c in CHECKS]].all(axis=1)


def verify_summary(frame: pd.DataFrame, th: dict, n: dict[str, int], letters: list[str], model_name: str) -> dict:
    """``verify.json``: the rules and thresholds, the passing heads and every check's number for them."""
    ok = frame[frame.passes]
    return {"model": model_name, "n": n, "rules": RULES, "thresholds": th, "letters_seen": letters,
            "n_heads_passing": int(len(ok)), "heads_passing": ok.node.tolist(),
            "checks_passed": {c: frame.loc[frame[f"pass_{c}"], "node"].tolist() for c in CHECKS}}
