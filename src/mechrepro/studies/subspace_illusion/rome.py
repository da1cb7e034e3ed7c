"""Rank-1 fact editing (ROME) and its equivalence with 1-D subspace patches of the MLP keys.

An MLP layer is read as a linear associative memory: its hidden activation ``k`` (the *key*,
``blocks.{l}.mlp.hook_post``, the input of the out/down projection) is mapped to the *value*
``k @ W_out`` (``W_out [f, d]``; ``+ b_out`` on GPT-2).

* **ROME** (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"):
  1. *key statistic*: ``C = E[k kᵀ]``, the uncentred second moment of the keys over a text corpus
     (:func:`key_second_moment`, :func:`key_moments`);
  2. *key*: ``k*``, the key at the subject's last token;
  3. *value*: ``v*``, an MLP output at that token that makes the model predict the new object,
     found by optimising a vector ``δ`` added to ``blocks.{l}.hook_mlp_out`` (:func:`optimize_value`);
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

``W_out`` of layer ``l`` is the buffer ``blocks.{l}.W_out`` of :class:`~mechrepro.core.model.Transformer`;
functions return new weights and never modify the model, except inside :func:`edited`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

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


@torch.no_grad()
def _resid_and_keys(model: Transformer, layer: int, tokens: Tensor, subject_pos: Tensor):
    cache: dict[str, Tensor] = {}
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"]
    model(tokens, cache=cache, cache_names=names, stop_layer=layer + 1)
    rows = torch.arange(len(tokens), device=tokens.device)
    return cache[names[0]], cache[names[1]][rows, subject_pos], cache[names[2]][rows, subject_pos]


def optimize_value(model: Transformer, layer: int, tokens: Tensor, subject_pos: Tensor, end_pos: Tensor,
                   target_id: int, *, steps: int = 25, lr: float = 0.5, weight_decay: float = 0.5,
                   clamp: float = 4.0) -> Tensor:
    """ROME step 2: ``δ [d]`` added to the MLP output at the subject's last token so that ``target_id``
    is predicted at ``end_pos``.

    Minimises ``−mean log p(target | END) + weight_decay · ‖δ‖² / ‖v0‖²`` with Adam for ``steps``
    steps, ``v0`` the mean MLP output at the subject. After each step ``‖δ‖`` is clamped to
    ``clamp · ‖v0‖`` (ROME's ``clamp_norm_factor``). The rows of ``tokens`` are contexts of the same
    fact (one row is enough). Runs start at layer ``layer`` from the cached residual stream.
    Deterministic (``δ`` starts at zero; no seed needed). ROME's essence-drift KL term and its
    random context prefixes are omitted.
    """
    resid, _, mlp_out = _resid_and_keys(model, layer, tokens, subject_pos)
    v0_norm = mlp_out.mean(0).norm()
    delta = torch.zeros(model.spec.d_model, dtype=resid.dtype, device=resid.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    rows = torch.arange(len(tokens), device=tokens.device)

    def add_delta(x: Tensor) -> Tensor:
        return x.index_put((rows, subject_pos), x[rows, subject_pos] + delta)

    for _ in range(steps):
        logits = model(None, start_layer=layer, start_resid=resid, logits_at=end_pos,
                       hooks={f"blocks.{layer}.hook_mlp_out": add_delta})
        nll = -logits.log_softmax(-1)[:, target_id].mean()
        loss = nll + weight_decay * delta.pow(2).sum() / v0_norm ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > clamp * v0_norm:
                delta.mul_(clamp * v0_norm / delta.norm())
    return delta.detach()


def rome_edit(model: Transformer, layer: int, tokens: Tensor, subject_pos: Tensor, end_pos: Tensor,
              target_id: int, C: Tensor | None, *, ridge: float = 1e-4, **value_kwargs) -> Tensor:
    """The ROME-edited ``W_out [f, d]`` of ``layer`` (the model is not modified).

    ``k*`` = mean key at ``subject_pos`` over the rows; ``v* = k*ᵀW + δ`` with ``δ`` from
    :func:`optimize_value` (the MLP output is affine in the key, so the edited output at ``k*`` is
    the mean original output plus ``δ``).
    """
    delta = optimize_value(model, layer, tokens, subject_pos, end_pos, target_id, **value_kwargs)
    _, keys, _ = _resid_and_keys(model, layer, tokens, subject_pos)
    k = keys.mean(0)
    W = model.p(f"blocks.{layer}.W_out")
    return rome_update(W, k, k @ W + delta, C, ridge)


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
    return Rank1Patch(v=v, theta=theta, exact=exact, achieved=achieved)


def rowspace_component(v: Tensor, Q: Tensor) -> Tensor:
    """Unit row-space part ``Q Qᵀ v / ‖Q Qᵀ v‖`` of ``v``: the rowspace-only version of a patch."""
    v_row = Q @ (Q.T @ v)
    return v_row / v_row.norm()


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
