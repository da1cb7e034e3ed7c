"""Rank-1 fact editing (ROME) and its equivalence with 1-D subspace patches of the MLP keys.

An MLP layer is read as a linear associative memory: its hidden activation ``k`` (the *key*,
``blocks.{l}.mlp.hook_post``, the input of the out/down projection) is mapped to the *value*
``k @ W_out`` (``W_out [f, d]``; ``+ b_out`` on GPT-2).

* **ROME** (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"):
  1. *key statistic*: ``C = E[k kᵀ]``, the uncentred second moment of the keys over a text corpus
     (:func:`key_second_moment`, :func:`key_moments`);
  2. *key*: ``k*``, the key at the subject's last token;
  3. *value*: ``v*``, an MLP output at that token that makes the model predict the new object,
     found by optimising a vector ``δ`` added to ``blocks.{l}.hook_mlp_out``: :func:`rome_value` is
     ROME's ``compute_v`` (context prefixes from :func:`generate_contexts`, the essence KL term,
     weight decay ``‖δ‖/‖v0‖²``, clamp, early stop; hyperparameters :class:`ValueParams`);
     :func:`simplified_value` the simplification kept as ``rome.method: simplified``. Runs resume
     only the positions from the subject on (:class:`SubjectRun`);
  4. *closed form* (:func:`rome_update`): the update that stores ``k* ↦ v*`` while changing the
     values of the corpus keys least in mean square (``E‖kᵀΔW‖²``) is
     ``W' = W + (C⁻¹k* / k*ᵀC⁻¹k*) ⊗ (v* − k*ᵀW)``. Keys with ``kᵀC⁻¹k* = 0`` keep their value.
* **Patch → rank-1 edit** (:func:`patch_to_rank1_edit`, Makelov et al. 2023): a 1-D subspace
  patch along unit ``v`` from ``k_src`` into ``k_base`` adds ``a · vᵀW`` to the MLP output, with
  ``a = vᵀ(k_src − k_base)``. The edit ``W' = W + b ⊗ (a · vᵀW)`` with
  ``b = C⁺k_base / (k_baseᵀC⁺k_base)`` (so ``k_baseᵀb = 1``) gives the same MLP output at
  ``k_base`` exactly. It also changes the output at every other key ``k`` by
  ``(kᵀb) · a · vᵀW``, so the two interventions agree on the whole model only where those
  other changes vanish (e.g. when the other keys of the prompt are ``C⁺``-orthogonal to
  ``k_base``).
* **Rank-1 edit → patch** (:func:`rank1_edit_to_subspace`): the converse, derived in its docstring.
* **Rewrite score** (:func:`rewrite_score`), as in Hase et al. 2023.
* **Diagnostics of an edit**: :func:`edit_geometry` (where ``δ`` lies for a key patch) and
  :func:`smallest_scale` (the α_min scan).

``W_out`` of layer ``l`` is the buffer ``blocks.{l}.W_out`` of :class:`~mechrepro.core.model.Transformer`;
functions return new weights and never modify the model, except inside :func:`edited`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from mechrepro.core import engine as E
from mechrepro.core.model import Transformer


# ------------------------------------------------------------------ key statistics
def key_second_moment(keys: Tensor) -> Tensor:
    """``Σ = keysᵀ keys / n`` for ``keys [n, f]`` (uncentred, as ROME's ``mom2``)."""
    return keys.T @ keys / keys.shape[0]


def _batches(batches: Iterable[Tensor | tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor | None]]:
    for item in batches:
        yield (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)


@torch.no_grad()
def collect_keys(model: Transformer, layers: Sequence[int], batches: Iterable[Tensor | tuple[Tensor, Tensor]],
                 ) -> dict[int, Tensor]:
    """MLP keys ``[N, f]`` per layer at every position of every batch.

    ``batches`` yields token tensors ``[b, p]`` or ``(tokens, mask)`` pairs whose bool mask
    ``[b, p]`` selects the positions to keep (e.g. not padding).
    """
    names = {l: f"blocks.{l}.mlp.hook_post" for l in layers}
    out: dict[int, list[Tensor]] = {l: [] for l in layers}
    for tokens, mask in _batches(batches):
        cache: dict[str, Tensor] = {}
        model(tokens, cache=cache, cache_names=list(names.values()), stop_layer=max(layers) + 1)
        for l, name in names.items():
            out[l].append(cache[name][mask] if mask is not None else cache[name].flatten(0, 1))
    return {l: torch.cat(v) for l, v in out.items()}


@torch.no_grad()
def key_moments(model: Transformer, layers: Sequence[int], batches: Iterable[Tensor | tuple[Tensor, Tensor]],
                ) -> tuple[dict[int, Tensor], int]:
    """Streaming :func:`key_second_moment` per layer (float64 accumulation); returns ``(Σ per layer, n keys)``."""
    sums: dict[int, Tensor] = {}
    n = 0
    for batch in batches:
        keys = collect_keys(model, layers, [batch])
        for l, k in keys.items():
            k = k.double()
            sums[l] = sums[l] + k.T @ k if l in sums else k.T @ k
        n += len(next(iter(keys.values())))
    return {l: (s / n).to(model.W_U.dtype) for l, s in sums.items()}, n


# ------------------------------------------------------------------ ROME
def _solve(C: Tensor, k: Tensor, ridge: float) -> Tensor:
    """``(C + λI)⁻¹ k`` with ``λ = ridge · mean diagonal of C``."""
    lam = ridge * C.diagonal().mean()
    return torch.linalg.solve(C + lam * torch.eye(len(C), dtype=C.dtype, device=C.device), k)


def rome_update(W: Tensor, k: Tensor, v_star: Tensor, C: Tensor | None, ridge: float = 0.0) -> Tensor:
    """ROME's closed form: ``W + (C⁻¹k / kᵀC⁻¹k) ⊗ (v* − kᵀW)`` for ``W [f, d]``, ``k [f]``, ``v* [d]``.

    ``C = None`` means the identity (the minimum-norm rank-1 update). ``ridge`` adds
    ``ridge · mean(diag C) · I`` to ``C`` when it is singular (fewer corpus keys than ``f``).
    """
    Ck = k if C is None else _solve(C, k, ridge)
    return W + torch.outer(Ck / (k @ Ck), v_star - k @ W)


# ------------------------------------------------------------------ ROME's value step (compute_v)
@dataclass(frozen=True)
class ValueParams:
    """Hyperparameters of the value optimisation (config section ``rome``; defaults: ROME's GPT2-XL values).

    ``method``: ``"rome"`` is ROME's ``compute_v`` (:func:`rome_value`); ``"simplified"`` is the
    earlier look-alike kept for comparison (:func:`simplified_value`: NLL + ``weight_decay ·
    ‖δ‖²/‖v0‖²`` on the bare prompt, no KL term, no contexts, no early stop).
    """

    method: str = "rome"
    steps: int = 20  # ROME's v_num_grad_steps: forward passes; the last one only measures
    lr: float = 0.5  # ROME's v_lr
    weight_decay: float = 0.5  # ROME's v_weight_decay
    clamp: float = 4.0  # ROME's clamp_norm_factor: ‖δ‖ ≤ clamp · ‖v0‖
    kl_factor: float = 0.0625  # ROME's kl_factor
    early_stop: float = 5e-2  # ROME stops once the total loss is below this

    def __post_init__(self):
        if self.method not in ("rome", "simplified"):
            raise ValueError(f"rome.method must be 'rome' or 'simplified', got {self.method!r}")


@dataclass
class ValueResult:
    """The optimised ``δ`` and how the optimisation went (the per-edit diagnostics)."""

    delta: Tensor  # [d], added to the MLP output at the subject's last token
    v0_norm: float  # ‖v0‖: the clean MLP output at the subject of the bare prompt
    steps: int  # optimiser steps taken
    clamp_steps: int  # steps after which ‖δ‖ was projected back onto the ball of radius clamp · ‖v0‖
    clamped: bool  # ‖δ‖ ends on that ball
    stopped_early: bool  # the loss fell below ``early_stop``
    nll: float  # the loss terms at the last forward pass
    kl: float
    wd: float
    losses: list[float]  # the total loss at every forward pass


class SubjectRun:
    """Logits of prompts with a vector added to the MLP output of ``layer`` at each row's subject token.

    One clean pass caches, for every row of ``tokens [n, p]``, the keys and values of layers
    ``layer…L−1`` and ``blocks.{layer}.hook_resid_pre`` (:func:`mechrepro.core.engine.cache_prefix`),
    with the MLP key (``keys [n, f]``) and output (``mlp_out [n, d]``) at ``subject [n]``. A call
    resumes only the positions ``subject … read`` from ``layer`` on (nothing before the subject can
    change), in groups of equal width, and returns the logits at ``read [n]`` (end of prompt or the
    subject itself). The same numbers as a full forward pass with the hook, up to float rounding.
    """

    def __init__(self, model: Transformer, layer: int, tokens: Tensor, subject: Tensor, read: Tensor):
        self.model, self.layer, self.subject, self.read = model, layer, subject, read
        names = [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"]
        cache: dict[str, Tensor] = {}
        with torch.no_grad():
            self.prefix, _ = E.cache_prefix(model, tokens, range(layer, model.spec.n_layers), [layer], cache=cache,
                                            cache_names=names)
        rows = torch.arange(len(tokens), device=tokens.device)
        self.keys, self.mlp_out = cache[names[0]][rows, subject], cache[names[1]][rows, subject]

    def __call__(self, delta: Tensor, rows: Tensor | None = None) -> Tensor:
        """Logits ``[m, vocab]`` of the cached prompts ``rows`` (default all) with ``delta`` (``[d]``, or
        ``[m, d]``: one per row) added at the subject."""
        rows = torch.arange(len(self.subject), device=self.subject.device) if rows is None else rows
        widths = self.read[rows] - self.subject[rows] + 1
        out = None
        for w in torch.unique(widths).tolist():
            sel = (widths == w).nonzero().flatten()
            add = delta if delta.dim() == 1 else delta[sel]

            def hook(x: Tensor, add: Tensor = add) -> Tensor:
                return torch.cat([x[:, :1] + add.reshape(-1, 1, x.shape[-1]), x[:, 1:]], dim=1)

            positions = self.subject[rows[sel], None] + torch.arange(int(w), device=rows.device)
            logits = E.resume(self.model, self.prefix, self.layer, positions, rows=rows[sel], trim=True,
                              hooks={f"blocks.{self.layer}.hook_mlp_out": hook})
            out = logits.new_zeros(len(rows), logits.shape[-1]) if out is None else out
            out = out.index_put((sel,), logits)
        return out


def _project(delta: Tensor, max_norm: Tensor) -> bool:
    """Clamp ``‖δ‖ ≤ max_norm`` in place (ROME's "project within L2 ball"); whether it was needed."""
    with torch.no_grad():
        norm = delta.norm()
        if norm > max_norm:
            delta.mul_(max_norm / norm)
            return True
    return False


def rome_value(run: SubjectRun, n_rewrite: int, target_id: int, hp: ValueParams) -> ValueResult:
    """ROME's ``compute_v`` (Meng et al. 2022): ``δ`` added to the MLP output at the subject's last token.

    The rows of ``run`` are ``n_rewrite`` *rewriting* prompts (the fact prompt after each context
    prefix; row 0 is the bare prompt, as ROME's first template ``"{}"``), read at their last token,
    then the *essence* prompts (``"{subject} is a"``), read at the subject's last token as in ROME's
    code. Loss = NLL + KL + weight decay:

    * NLL: ``−log p(target)`` averaged over the rewriting rows;
    * KL: ``kl_factor · KL(p_δ ‖ p_0)`` averaged over the essence rows, ``p_0`` their distribution at
      ``δ = 0`` (ROME's ``kl_div(init, cur, log_target=True)``);
    * weight decay ``weight_decay · ‖δ‖ / ‖v0‖²`` (ROME's form: ``‖δ‖``, not ``‖δ‖²``), ``v0`` the
      clean MLP output at the subject of the bare prompt.

    Adam (``lr``), ``δ`` from zero. Each of the ``steps`` iterations measures the loss and stops once
    it is below ``early_stop``; the last iteration only measures (so at most ``steps − 1`` updates);
    after every update ``‖δ‖`` is projected back to at most ``clamp · ‖v0‖``. Deterministic.
    """
    v0_norm = run.mlp_out[0].norm()
    delta = torch.zeros_like(run.mlp_out[0]).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    kl_init, steps, clamp_steps, stopped, losses = None, 0, 0, False, []
    for it in range(hp.steps):
        logp = run(delta).log_softmax(-1)
        nll = -logp[:n_rewrite, target_id].mean()
        ess = logp[n_rewrite:]
        if kl_init is None:
            kl_init = ess.detach()
        kl = hp.kl_factor * (ess.exp() * (ess - kl_init)).sum(-1).mean() if len(ess) else nll.new_zeros(())
        wd = hp.weight_decay * delta.norm() / v0_norm ** 2
        loss = nll + kl + wd
        losses.append(float(loss.detach()))
        if loss < hp.early_stop:
            stopped = True
            break
        if it == hp.steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        clamp_steps += _project(delta, hp.clamp * v0_norm)
    return _result(delta, v0_norm, hp, steps, clamp_steps, stopped, nll, kl, wd, losses)


def simplified_value(run: SubjectRun, n_rows: int, target_id: int, hp: ValueParams) -> ValueResult:
    """The simplified value step (``rome.method: simplified``): ``steps`` Adam updates of
    ``NLL + weight_decay · ‖δ‖² / ‖v0‖²`` over the first ``n_rows`` rows of ``run`` (``v0`` their mean
    clean MLP output at the subject), ``‖δ‖`` clamped to ``clamp · ‖v0‖``; no KL term, no early stop."""
    v0_norm = run.mlp_out[:n_rows].mean(0).norm()
    delta = torch.zeros_like(run.mlp_out[0]).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    rows = torch.arange(n_rows, device=delta.device)
    clamp_steps, losses = 0, []
    for _ in range(hp.steps):
        nll = -run(delta, rows).log_softmax(-1)[:, target_id].mean()
        wd = hp.weight_decay * delta.pow(2).sum() / v0_norm ** 2
        losses.append(float((nll + wd).detach()))
        opt.zero_grad()
        (nll + wd).backward()
        opt.step()
        clamp_steps += _project(delta, hp.clamp * v0_norm)
    return _result(delta, v0_norm, hp, hp.steps, clamp_steps, False, nll, nll.new_zeros(()), wd, losses)


def _result(delta, v0_norm, hp, steps, clamp_steps, stopped, nll, kl, wd, losses) -> ValueResult:
    d = delta.detach()
    return ValueResult(d, float(v0_norm), steps, clamp_steps, bool(d.norm() >= (1 - 1e-5) * hp.clamp * v0_norm),
                       stopped, float(nll.detach()), float(kl.detach()), float(wd.detach()), losses)


def compute_value(run: SubjectRun, n_rewrite: int, target_id: int, hp: ValueParams) -> ValueResult:
    """:func:`rome_value` or :func:`simplified_value`, as ``hp.method`` says (the simplified step uses
    the first row only, the bare prompt)."""
    if hp.method == "rome":
        return rome_value(run, n_rewrite, target_id, hp)
    return simplified_value(run, 1, target_id, hp)


def optimize_value(model: Transformer, layer: int, tokens: Tensor, subject_pos: Tensor, end_pos: Tensor,
                   target_id: int, *, steps: int = 25, lr: float = 0.5, weight_decay: float = 0.5,
                   clamp: float = 4.0) -> Tensor:
    """The simplified value step on the rows of ``tokens`` (contexts of one fact): ``δ [d]``
    (see :func:`simplified_value`)."""
    run = SubjectRun(model, layer, tokens, subject_pos, end_pos)
    hp = ValueParams("simplified", steps, lr, weight_decay, clamp)
    return simplified_value(run, len(tokens), target_id, hp).delta


def rome_edit(model: Transformer, layer: int, tokens: Tensor, subject_pos: Tensor, end_pos: Tensor,
              target_id: int, C: Tensor | None, *, ridge: float = 1e-4, **value_kwargs) -> Tensor:
    """The edited ``W_out [f, d]`` of ``layer`` with the simplified value step (the model is not modified).

    ``k*`` = mean key at ``subject_pos`` over the rows; ``v* = k*ᵀW + δ`` with ``δ`` from
    :func:`optimize_value` (the MLP output is affine in the key, so the edited output at ``k*`` is
    the mean original output plus ``δ``).
    """
    delta = optimize_value(model, layer, tokens, subject_pos, end_pos, target_id, **value_kwargs)
    k = collect_keys(model, [layer], [tokens])[layer].reshape(len(tokens), -1, model.spec.d_mlp)
    k = k[torch.arange(len(tokens)), subject_pos].mean(0)
    W = model.p(f"blocks.{layer}.W_out")
    return rome_update(W, k, k @ W + delta, C, ridge)


def rome_left(C: Tensor | None, k_star: Tensor, k_bare: Tensor, ridge: float) -> Tensor:
    """ROME's left vector ``u = C⁻¹k* / (k_bareᵀC⁻¹k*)``: ``k*`` the mean key over the contexts, scaled
    so that the edit ``W + u ⊗ δ`` adds exactly ``δ`` at the bare prompt's key ``k_bare`` (ROME divides
    its right vector by ``k_bareᵀu``; the product is the same). ``C = None``: the identity."""
    Ck = k_star if C is None else _solve(C, k_star, ridge)
    return Ck / (k_bare @ Ck)


# ------------------------------------------------------------------ context prefixes
@torch.no_grad()
def generate_contexts(model: Transformer, bos_id: int, decode, lengths: Sequence[Sequence[int]], seed: int,
                      top_k: int = 5) -> list[str]:
    """ROME's context prefixes: for each ``(length, count)``, ``count`` texts sampled from the model
    after BOS, ``length`` tokens in all (BOS included, as ROME's ``max_out_len``), top-``k`` sampling
    with a seeded generator. ``decode(ids) -> str`` without special tokens; as in ROME, blank lines
    become spaces and the text is NFKD-normalised. Deterministic for a seed and a model.
    """
    import unicodedata

    g = torch.Generator().manual_seed(seed)
    texts = []
    for length, count in lengths:
        ids = torch.full((count, 1), bos_id, dtype=torch.long)
        for _ in range(length - 1):
            probs = model(ids, logits_at=torch.full((count,), ids.shape[1] - 1)).float().softmax(-1).cpu()
            top = probs.topk(top_k, dim=-1)
            pick = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=g)
            ids = torch.cat([ids, top.indices.gather(1, pick).to(ids.device)], dim=1)
        texts += [unicodedata.normalize("NFKD", decode(row[1:].tolist())).replace("\n\n", " ") for row in ids]
    return texts


@contextmanager
def edited(model: Transformer, layer: int, W_new: Tensor) -> Iterator[Transformer]:
    """Temporarily replace the buffer ``blocks.{layer}.W_out`` by ``W_new``; restored on exit."""
    attr = "w__" + f"blocks.{layer}.W_out".replace(".", "__")
    old = getattr(model, attr)
    setattr(model, attr, W_new)
    try:
        yield model
    finally:
        setattr(model, attr, old)


# ------------------------------------------------------------------ patches <-> rank-1 edits
def patch_to_rank1_edit(W: Tensor, v: Tensor, k_base: Tensor, k_src: Tensor, C: Tensor | None,
                        C_pinv: Tensor | None = None) -> Tensor:
    """``W + b ⊗ (a · vᵀW)``: the edit that reproduces the 1-D patch along unit ``v`` at ``k_base``.

    ``a = vᵀ(k_src − k_base)``, ``b = C⁺k_base / (k_baseᵀC⁺k_base)`` (``C = None``: identity).
    With the edited weights, ``k_baseᵀW'`` equals the patched key's value
    ``(k_base + a v)ᵀW`` exactly; any other key ``k`` gains ``(kᵀb) · a · vᵀW``.
    ``C_pinv`` (if given, ``C`` is ignored): ``C⁺`` computed once for many edits of one layer.
    """
    a = v @ (k_src - k_base)
    if C_pinv is not None:
        Ck = C_pinv @ k_base
    else:
        Ck = k_base if C is None else torch.linalg.pinv(C, hermitian=True) @ k_base
    b = Ck / (k_base @ Ck)
    return W + torch.outer(b, a * (v @ W))


@dataclass
class Rank1Patch:
    """A 1-D patch equivalent to a rank-1 edit at one key (see :func:`rank1_edit_to_subspace`)."""

    v: Tensor  # unit direction in the hidden space
    theta: float  # angle from the row-space direction towards the null-space direction
    exact: bool  # False: no 1-D patch from this source reproduces the edit; v is the best one
    achieved: float  # fraction of the edit's output change that the patch achieves (1.0 when exact)
    z: Tensor  # the minimum-norm key change producing the edit's output change (in the row space of W)
    rho: float  # ẑᵀ(k_src − k_base): the source's difference along ẑ
    nu: float  # ‖P_null(k_src − k_base)‖: its difference in the null space of W


def rank1_edit_to_subspace(W: Tensor, u: Tensor, w: Tensor, k_base: Tensor, k_src: Tensor,
                           Q: Tensor | None = None) -> Rank1Patch:
    """A direction ``v`` whose 1-D patch from ``k_src`` into ``k_base`` changes the MLP output as the
    edit ``W' = W + u ⊗ w`` does at ``k_base``.

    Derivation. At key ``k`` the edit adds ``(kᵀu) · w``; the patch adds
    ``(vᵀΔ) · (vᵀW)`` with ``Δ = k_src − k_base``. Equality at ``k_base`` needs
    ``δ := (k_baseᵀu) w`` to be a multiple of ``vᵀW``. Let ``z = δ W⁺`` be the minimum-norm hidden
    vector with ``zᵀW = δ`` (it lies in the row space; ``δ`` must be in the span of W's rows,
    always true for ``W [f, d]`` of rank ``d``), ``ẑ = z / ‖z‖``. The row-space part of ``v`` must
    be parallel to ``ẑ``; its null-space part only changes ``vᵀΔ``, and for a given norm changes
    it most along ``n̂ = P_null Δ / ‖P_null Δ‖``. Taking ``v = cos θ ẑ + sin θ n̂`` gives
    ``vᵀW = cos θ · δ / ‖z‖`` and ``vᵀΔ = cos θ ρ + sin θ ν`` (``ρ = ẑᵀΔ``, ``ν = ‖P_null Δ‖``),
    and the condition is
    ``cos²θ ρ + sinθ cosθ ν = ‖z‖``, i.e. ``R cos(2θ − φ) = 2‖z‖ − ρ`` with
    ``R = √(ρ² + ν²)``, ``φ = atan2(ν, ρ)``. Of the two solutions the one with the larger
    ``|cos θ|`` (more row space) is returned. If ``2‖z‖ − ρ > R`` no 1-D patch from this source
    reproduces the edit; then ``θ = φ / 2`` maximises the achieved fraction ``(ρ + R) / (2‖z‖)``.

    Consequences: the null-space part of ``v`` alone does nothing, and its row-space part
    alone (``v_row ∝ ẑ``, patched from the same source) achieves the fraction ``ρ / ‖z‖``, small
    when the data hardly vary along ``ẑ`` (a dormant direction): the illusion, in a ROME edit.

    ``Q``: orthonormal row-space basis of ``W`` (default :func:`~mechrepro.core.subspace.rowspace_basis`).
    """
    from mechrepro.core.subspace import rowspace_basis

    Q = rowspace_basis(W) if Q is None else Q
    delta = (k_base @ u) * w
    z = delta @ torch.linalg.pinv(W)  # min-norm solution of zᵀW = δ (in the row space)
    m = float(z.norm())
    z_hat = z / m
    diff = k_src - k_base
    null = diff - Q @ (Q.T @ diff)
    rho, nu = float(z_hat @ diff), float(null.norm())
    n_hat = null / nu if nu > 0 else torch.zeros_like(null)
    R, phi = math.hypot(rho, nu), math.atan2(nu, rho)
    c = (2 * m - rho) / R if R > 0 else math.inf
    exact = abs(c) <= 1.0
    if exact:
        theta = max(((phi + s * math.acos(c)) / 2 for s in (1.0, -1.0)), key=lambda t: abs(math.cos(t)))
    else:
        theta = phi / 2
    ct, st = math.cos(theta), math.sin(theta)
    v = ct * z_hat + st * n_hat
    achieved = (ct * ct * rho + st * ct * nu) / m
    return Rank1Patch(v=v, theta=theta, exact=exact, achieved=achieved, z=z, rho=rho, nu=nu)


def rowspace_component(v: Tensor, Q: Tensor) -> Tensor:
    """Unit row-space part ``Q Qᵀ v / ‖Q Qᵀ v‖`` of ``v``: the rowspace-only version of a patch."""
    v_row = Q @ (Q.T @ v)
    return v_row / v_row.norm()


# ------------------------------------------------------------------ diagnostics of an edit
def edit_geometry(W: Tensor, conv: Rank1Patch, C: Tensor | None) -> dict[str, float]:
    """Where the edit's output change ``δ`` lies for a key patch (``conv`` from :func:`rank1_edit_to_subspace`).

    ``z`` (``zᵀW = δ``, minimum norm) is the key change that produces ``δ``; it lies in the row space
    of ``W`` (the hidden directions ``W`` reads, the only ones a key patch can use). Returns
    ``z_norm`` = ``‖z‖``; ``gain_rel`` = ``(‖δ‖ / ‖z‖) / σ_max(W)`` (1: ``δ`` lies along ``W``'s
    strongest direction; small: along low-gain directions, which need long key changes);
    ``z_over_rms`` = ``‖z‖ / √(ẑᵀCẑ)`` (the key change in units of the corpus keys' RMS along ``ẑ``;
    NaN without ``C``); ``row_frac`` = ``ρ / ‖z‖`` (the fraction of ``δ`` the row-space part of the
    derived patch achieves from the real source) and ``null_frac`` = ``ν / ‖z‖``.
    """
    z_norm = float(conv.z.norm())
    z_hat = conv.z / z_norm
    gain = float((conv.z @ W).norm()) / z_norm
    rms = math.nan if C is None else float((z_hat @ C @ z_hat).clamp_min(0).sqrt())
    return {"z_norm": z_norm, "gain_rel": gain / float(torch.linalg.matrix_norm(W, ord=2)),
            "z_over_rms": z_norm / rms if rms > 0 else math.nan, "row_frac": conv.rho / z_norm,
            "null_frac": conv.nu / z_norm}


def smallest_scale(rewrites: Callable[[Tensor], Tensor], hi: float, grid: int = 16, iters: int = 12) -> float:
    """The smallest ``α ∈ (0, hi]`` at which ``rewrites`` holds (NaN if it holds nowhere on the grid).

    ``rewrites(alphas [m]) -> bool [m]``. The grid ``hi · j / grid`` (``j = 1…grid``) is tested in
    one call; then ``iters`` bisection steps between the first grid point that rewrites and the one
    below it (``0`` for the first), assuming one crossing in that interval.
    """
    alphas = torch.arange(1, grid + 1, dtype=torch.float64) * hi / grid
    ok = rewrites(alphas).cpu()
    if not bool(ok.any()):
        return math.nan
    j = int(ok.int().argmax())
    lo, up = (float(alphas[j - 1]) if j > 0 else 0.0), float(alphas[j])
    for _ in range(iters):
        mid = (lo + up) / 2
        if bool(rewrites(torch.tensor([mid], dtype=torch.float64))[0]):
            up = mid
        else:
            lo = mid
    return up


# ------------------------------------------------------------------ evaluation
def rewrite_score(p_new_before: Tensor | float, p_new_after: Tensor | float) -> Tensor:
    """Rewrite score of Hase et al. 2023 ("Does Localization Inform Editing?"), which the paper uses.

    ``(p_new_after − p_new_before) / (1 − p_new_before)``: the fraction of the possible increase
    of the new object's probability that the edit achieves (1: probability 1; 0: unchanged;
    negative: decreased). Element-wise on tensors.
    """
    before, after = torch.as_tensor(p_new_before), torch.as_tensor(p_new_after)
    return (after - before) / (1 - before)


def efficacy(p_new_after: Tensor, p_old_after: Tensor) -> Tensor:
    """ROME's efficacy score: whether ``p(new object) > p(old object)`` after the edit (float 0/1)."""
    return (torch.as_tensor(p_new_after) > torch.as_tensor(p_old_after)).float()
