"""Subspace activation patching and its interpretability illusion (Makelov, Lange & Nanda 2023).

Techniques:

* **Subspace patch** (:func:`subspace_patch`): a 1-D patch along a direction ``v`` replaces the
  component of a base activation along ``v`` by that of a source activation,
  ``a' = a_base + (vᵀa_src − vᵀa_base) / ‖v‖² · v``; everything orthogonal to ``v`` keeps its base
  value. Dividing by ``‖v‖²`` makes the patch depend on the line spanned by ``v`` only.
* **Row space / null space** (:func:`rowspace_basis`, :func:`decompose`): a direction ``v`` in the
  input space of a linear map splits into ``v_row`` (in the orthogonal complement of the map's
  kernel: the part the map can see) and ``v_null`` (in the kernel: causally disconnected). The
  illusion: ``v = v_null + v_row`` can change the output "as if a feature changed" although
  ``v_null`` alone does nothing (the map ignores it) and ``v_row`` alone little (the data barely
  vary along it: a *dormant* direction). Patching ``v`` moves the activation along ``v_row`` by
  the amount the data vary along ``v_null``. For the MLP hidden activation the map is the out
  projection (:func:`mlp_rowspace`); the residual stream has no kernel, so the proxy is the name
  movers' query weights (:func:`query_rowspace`).
* **DAS for one direction** (:func:`learn_direction`): distributed alignment search with the
  rotation reduced to a single unit vector ``v = u / ‖u‖``, trained with Adam on cached
  activations at the site; ``forward_fn`` recomputes only the model downstream of the site
  (:func:`mlp_post_forward`, :func:`resid_post_forward`).
* **Metrics and baselines**: :func:`fldd`, :func:`interchange_accuracy`, :func:`v_mean`,
  :func:`v_grad` (with :func:`attn_score_diff_fn` for the name movers' attention-score difference).

Conventions: activations are row vectors; a linear map acts as ``x @ W`` (our ``W_out [f, d]``:
``mlp_out = h @ W_out``; ``W_Q[h] [d, e]``: ``q = x @ W_Q[h]``). Positions are per-row ``[n]``
index tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mechrepro.core.model import Transformer

ForwardFn = Callable[[Tensor, Tensor], Tensor]  # (patched site activations [nb, dim], row idx [nb]) -> logits


# ------------------------------------------------------------------ the patch and the decomposition
def subspace_patch(a_base: Tensor, a_src: Tensor, v: Tensor) -> Tensor:
    """Patch the component along ``v [dim]`` from ``a_src`` into ``a_base`` (both ``[..., dim]``)."""
    coef = ((a_src - a_base) @ v) / (v @ v)
    return a_base + coef[..., None] * v


def rowspace_basis(W: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis ``Q [m, r]`` of the row space of the map ``x ↦ x @ W`` (``W [m, n]``, ``x ∈ R^m``).

    "Row space" is the orthogonal complement of the map's kernel in the *input* space ``R^m``,
    i.e. the span of the columns of ``W`` (the row space of the ``[n, m]`` matrix of the map in
    the ``W x`` convention, e.g. a torch ``nn.Linear`` weight). For ``W_out [f, d]`` it is a
    ``d``-dimensional subspace of ``R^f``. Computed by SVD; singular values below
    ``rtol · s_max`` (default ``max(m, n) · eps``) count as zero.
    """
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    tol = (rtol if rtol is not None else max(W.shape) * torch.finfo(W.dtype).eps) * S.max()
    return U[:, S > tol]


def decompose(v: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """``(v_row, v_null)`` with ``v_row = Q Qᵀ v`` and ``v_null = v − v_row`` (``Q`` orthonormal)."""
    v_row = Q @ (Q.T @ v)
    return v_row, v - v_row


def unit(v: Tensor) -> Tensor:
    """``v / ‖v‖``."""
    return v / v.norm()


def mlp_rowspace(model: Transformer, layer: int, center: bool | None = None) -> Tensor:
    """Row space ``Q [f, r]`` of the MLP out projection ``h ↦ h @ W_out`` of ``layer``.

    ``center`` (default: on for GPT-2) first removes each output's mean over ``d_model``
    (TransformerLens's ``center_writing_weights``, used by the authors' code): every later
    LayerNorm discards the residual's mean direction, so hidden directions that only write along
    it are causally disconnected too, and ``r = d − 1``. RMSNorm keeps the mean, so llama models
    are not centred.
    """
    W = model.p(f"blocks.{layer}.W_out")
    if center is None:
        center = model.spec.arch == "gpt2"
    if center:
        W = W - W.mean(1, keepdim=True)
    return rowspace_basis(W)


def query_rowspace(model: Transformer, heads: Sequence[tuple[int, int]], fold_norm: bool = True) -> Tensor:
    """Proxy row space in the residual stream: the span read by the query weights of ``heads``.

    The map is ``x ↦ x @ [W_Q(l1, h1) | W_Q(l2, h2) | …]`` (``[d, k·e]``). With ``fold_norm`` the
    pre-attention norm is folded in as TransformerLens's ``fold_ln`` does in the authors' code
    (weights scaled by the norm's gain; for LayerNorm also centred, since the norm removes the
    mean direction). Returns ``Q [d, r]``.
    """
    blocks = []
    for l, h in heads:
        W = model.p(f"blocks.{l}.W_Q")[h]  # [d, e]
        if fold_norm:
            W = model.p(f"blocks.{l}.ln1.w")[:, None] * W
            if model.spec.arch == "gpt2":
                W = W - W.mean(0, keepdim=True)
        blocks.append(W)
    return rowspace_basis(torch.cat(blocks, dim=1))


# ------------------------------------------------------------------ DAS for one direction
def _loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits, target)
    if kind == "logit_diff":  # target [n, 2]: (base object, source object); minimise base − source
        rows = torch.arange(len(target), device=logits.device)
        return (logits[rows, target[:, 0]] - logits[rows, target[:, 1]]).mean()
    raise ValueError(f"loss must be 'ce' or 'logit_diff', got {kind!r}")


def learn_direction(acts_base: Tensor, acts_src: Tensor, forward_fn: ForwardFn, target: Tensor, *,
                    epochs: int = 30, lr: float = 0.01, batch: int = 20, seed: int = 0, loss: str = "ce",
                    history: list[float] | None = None) -> Tensor:
    """Learn a unit direction ``v`` whose subspace patch makes the model produce ``target``.

    Args:
        acts_base, acts_src: ``[n, dim]`` cached activations at the site (row ``i`` of the source
            is patched into row ``i`` of the base).
        forward_fn: ``(patched [nb, dim], idx [nb]) -> logits [nb, vocab]``, the model run from the
            site on the rows ``idx``.
        target: ``[n]`` expected token ids (``loss="ce"``: cross-entropy, the paper's IOI
            objective) or ``[n, 2]`` (base object, source object) for ``loss="logit_diff"``, the
            paper's facts objective ``logit(base) − logit(source)``.
        epochs, lr, batch, seed: Adam over shuffled minibatches; ``seed`` fixes the initial
            direction and the order. ``history`` (if given) receives the loss of every step.
    Returns: the unit direction ``[dim]`` (detached).
    """
    g = torch.Generator().manual_seed(seed)
    n, dim = acts_base.shape
    u = torch.randn(dim, generator=g, dtype=acts_base.dtype).to(acts_base.device).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(acts_base.device)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            v = u / u.norm()
            logits = forward_fn(subspace_patch(acts_base[idx], acts_src[idx], v), idx)
            value = _loss(logits, target[idx], loss)
            opt.zero_grad()
            value.backward()
            opt.step()
            if history is not None:
                history.append(float(value.detach()))
    return unit(u.detach())


@torch.no_grad()
def patched_logits(acts_base: Tensor, acts_src: Tensor, forward_fn: ForwardFn, v: Tensor | None,
                   batch: int = 64) -> Tensor:
    """Logits ``[n, vocab]`` after patching along ``v`` (``None``: the full activation)."""
    outs = []
    for i in range(0, len(acts_base), batch):
        idx = torch.arange(i, min(i + batch, len(acts_base)), device=acts_base.device)
        a = acts_src[idx] if v is None else subspace_patch(acts_base[idx], acts_src[idx], v)
        outs.append(forward_fn(a, idx))
    return torch.cat(outs)


@torch.no_grad()
def site_activations(model: Transformer, name: str, tokens: Tensor, pos: Tensor, batch: int = 64) -> Tensor:
    """Activation ``name`` (e.g. ``blocks.8.mlp.hook_post``) at position ``pos[i]`` of each row: ``[n, dim]``."""
    layer = int(name.split(".")[1])
    outs = []
    for i in range(0, len(tokens), batch):
        cache: dict[str, Tensor] = {}
        model(tokens[i:i + batch], cache=cache, cache_names=[name], stop_layer=layer + 1)
        outs.append(cache[name][torch.arange(len(cache[name])), pos[i:i + batch]])
    return torch.cat(outs)


def _write_rows(x: Tensor, pos: Tensor, rows_value: Tensor) -> Tensor:
    """``x [b, p, dim]`` with ``x[i, pos[i]] = rows_value[i]`` (out of place, differentiable)."""
    rows = torch.arange(len(x), device=x.device)
    return x.index_put((rows, pos), rows_value)


def mlp_post_forward(model: Transformer, layer: int, tokens: Tensor, pos: Tensor, end: Tensor) -> ForwardFn:
    """``forward_fn`` for the MLP hidden activation ``blocks.{layer}.mlp.hook_post`` at ``pos``.

    Runs from the cached ``blocks.{layer}.hook_resid_pre`` (the MLP input is computed inside
    layer ``layer``), writes the patched rows at ``pos`` and returns the logits at ``end``.
    """
    resid = _cached(model, tokens, f"blocks.{layer}.hook_resid_pre", layer)
    name = f"blocks.{layer}.mlp.hook_post"

    def forward_fn(patched: Tensor, idx: Tensor) -> Tensor:
        hooks = {name: lambda x: _write_rows(x, pos[idx], patched)}
        return model(None, start_layer=layer, start_resid=resid[idx], hooks=hooks, logits_at=end[idx])

    return forward_fn


def resid_post_forward(model: Transformer, layer: int, tokens: Tensor, pos: Tensor, end: Tensor) -> ForwardFn:
    """``forward_fn`` for the residual stream ``blocks.{layer}.hook_resid_post`` at ``pos``.

    The patched residual is the start of layer ``layer + 1``; only the layers above are run.
    """
    resid = _cached(model, tokens, f"blocks.{layer}.hook_resid_post", layer)

    def forward_fn(patched: Tensor, idx: Tensor) -> Tensor:
        start = _write_rows(resid[idx], pos[idx], patched)
        return model(None, start_layer=layer + 1, start_resid=start, logits_at=end[idx])

    return forward_fn


@torch.no_grad()
def _cached(model: Transformer, tokens: Tensor, name: str, layer: int, batch: int = 64) -> Tensor:
    outs = []
    for i in range(0, len(tokens), batch):
        cache: dict[str, Tensor] = {}
        model(tokens[i:i + batch], cache=cache, cache_names=[name], stop_layer=layer + 1)
        outs.append(cache[name])
    return torch.cat(outs)


# ------------------------------------------------------------------ metrics
def fldd(ld_patched: Tensor, ld_clean: Tensor) -> float:
    """Fractional logit-difference decrease, in percent: ``100 · (1 − mean LD_patched / mean LD_clean)``.

    100 erases the clean preference, above 100 flips it, below 0 strengthens it.
    """
    return float(100.0 * (1.0 - ld_patched.mean() / ld_clean.mean()))


def fraction(mask: Tensor) -> float:
    """The fraction of ``True`` in ``mask``, exactly ``k / n`` (float64: in float32, 38 of 40 reads 0.94999999,
    below a claim's threshold of 0.95)."""
    return float(mask.double().mean())


def interchange_accuracy(logits: Tensor, expected: Tensor) -> float:
    """Fraction of rows whose argmax over the whole vocabulary is the ``expected`` token."""
    return fraction(logits.argmax(-1) == expected)


# ------------------------------------------------------------------ baselines
def v_mean(acts_a: Tensor, acts_b: Tensor) -> Tensor:
    """Normalised difference of means ``mean(acts_a) − mean(acts_b)`` (rows are examples)."""
    return unit(acts_a.mean(0) - acts_b.mean(0))


def v_grad(fn: Callable[[Tensor], Tensor], acts: Tensor) -> Tensor:
    """Normalised mean gradient of ``fn`` (per-row values ``[n]``, or a scalar) at ``acts [n, dim]``."""
    x = acts.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return unit(grad.mean(0))


def attn_score_diff_fn(model: Transformer, layer: int, tokens: Tensor, end: Tensor,
                       heads: Sequence[tuple[int, int]], pos_a: Tensor, pos_b: Tensor) -> Callable[[Tensor], Tensor]:
    """``fn(resid [n, d]) -> [n]``: mean over ``heads`` of the attention score END→``pos_a`` minus END→``pos_b``.

    ``resid`` replaces ``blocks.{layer}.hook_resid_post`` at END; the run starts at layer
    ``layer + 1`` and stops after the last head's layer. Scores are pre-softmax (scaled dot
    products). For :func:`v_grad` (the paper: name movers, positions of the two names).
    """
    assert all(l > layer for l, _ in heads), "heads must read the residual after the site"
    resid = _cached(model, tokens, f"blocks.{layer}.hook_resid_post", layer)
    names = sorted({f"blocks.{l}.attn.hook_attn_scores" for l, _ in heads})
    rows = torch.arange(len(tokens), device=tokens.device)

    def fn(x: Tensor) -> Tensor:
        cache: dict[str, Tensor] = {}
        model(None, start_layer=layer + 1, start_resid=_write_rows(resid, end, x), cache=cache,
              cache_names=names, stop_layer=max(l for l, _ in heads) + 1)
        diffs = [cache[f"blocks.{l}.attn.hook_attn_scores"][rows, h, end, pos_a]
                 - cache[f"blocks.{l}.attn.hook_attn_scores"][rows, h, end, pos_b] for l, h in heads]
        return torch.stack(diffs).mean(0)

    return fn


def random_null_norm(f: int, r: int) -> float:
    """Expected-norm proxy of the null part of a random unit vector in ``R^f`` with an ``r``-dim row space.

    ``sqrt((f − r) / f)`` (e.g. GPT-2 MLP: ``sqrt(2304 / 3072) ≈ 0.87``), the reference the paper
    compares learned directions' null-space norms with.
    """
    return math.sqrt((f - r) / f)
