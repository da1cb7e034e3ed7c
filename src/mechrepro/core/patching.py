"""Activation patching, mean ablation and path patching on :class:`~mechrepro.core.model.Transformer`.

Techniques (all measured with a metric read at one position per prompt, usually END):

* **Mean ablation** (:func:`ablation_hooks`): replace a head's output ``z`` at chosen
  (prompt, position) cells by its mean over a reference distribution. The IOI circuit is
  evaluated by mean-ablating every (head, position) *outside* the circuit, with means over the
  ABC prompts of the same template.
* **Direct path to the logits** (:func:`direct_effects`): replace one head's output by its output on
  the corrupted (ABC) prompt, in the final residual stream only; the final norm is recomputed.
  This is path patching with the logits as receiver, computed from one cached run.
* **Path patching into head inputs** (:func:`path_patch`), as Wang et al. (2022, appendix B)
  define it: (1) clean and corrupted (ABC) runs cache every head's output; (2) the clean prompt
  is run with the sender's output taken from the ABC run at one position and *every other
  attention head frozen* to its clean output, the MLPs recomputing; the receivers' inputs are
  saved; (3) the clean prompt is run with only the receivers' inputs (query, key or value of
  chosen heads; per-head inputs, so other heads of the receiver layer are untouched, also on
  grouped-query models) replaced by the saved ones, everything downstream recomputed.
  With every head frozen, step 2 moves nothing between positions: the sender's change at
  position ``t`` reaches a receiver's input at ``t`` through the residual stream at ``t`` and the
  MLPs there, and nowhere else. Step 2 is therefore computed exactly from the clean run at ``t``
  (:class:`FrozenRun`, :func:`propagate`: the MLPs of the layers between sender and receiver
  run on one position), and step 3 adds the resulting change of each receiver layer's input.
  ``mode="direct"`` (``frozen=None``) is the *direct-path* variant: the sender's output change
  itself is added to the receivers' inputs, as if the MLPs were frozen too; it misses every path
  through an MLP. Senders are batched: one forward pass patches many senders, each in its own
  copy of the prompts, starting from the cached residual stream at the first receiver layer.
  :func:`path_patch_logits` is the same with the logits as receiver (step 3 is then the final
  norm and unembedding at END).
* **Attribution path patching** (:func:`path_patch_attribution`): the first-order estimate of the
  same quantity for all senders from one forward and one backward pass (for ``wang``, one more
  backward pass through the MLP chain of :func:`propagate`). Used to rank senders; the top ones
  are confirmed exactly.

Heads are ``(layer, head)`` tuples. Positions are per-prompt index tensors ``[b]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechrepro.core.model import Transformer

Head = tuple[int, int]


def logit_diff(logits: Tensor, io: Tensor, s: Tensor) -> Tensor:
    """``logit(IO) - logit(S)`` per row of ``logits [b, v]``."""
    rows = torch.arange(logits.shape[0])
    return logits[rows, io] - logits[rows, s]


def ioi_metrics(logits: Tensor, io: Tensor, s: Tensor) -> dict[str, Tensor]:
    """Per-prompt LD, accuracy (IO logit above S logit) and P(IO) from END logits ``[b, v]``."""
    ld = logit_diff(logits, io, s)
    probs = logits.softmax(-1)
    return {"ld": ld, "correct": (ld > 0).float(), "p_io": probs[torch.arange(len(io)), io]}


def batched(n: int, size: int):
    """Slices ``[i, i+size)`` covering ``range(n)``."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def run_end_logits(model: Transformer, tokens: Tensor, end: Tensor, hooks_fn=None,
                   batch_size: int = 64, cache_names: Sequence[str] | None = None):
    """Logits at ``end`` for every prompt, in batches; optionally cache named activations.

    ``hooks_fn(sl)`` returns the hooks for the rows ``sl`` of the batch. Returns ``(logits [b, v],
    cache)`` where cached tensors are concatenated along the batch dimension.
    """
    outs, cache_all = [], {}
    for sl in batched(len(tokens), batch_size):
        cache = {} if cache_names else None
        hooks = hooks_fn(sl) if hooks_fn else None
        outs.append(model(tokens[sl], hooks=hooks, cache=cache, cache_names=cache_names, logits_at=end[sl]))
        if cache:
            for k, v in cache.items():
                cache_all.setdefault(k, []).append(v)
    return torch.cat(outs), {k: torch.cat(v) for k, v in cache_all.items()}


def z_names(model: Transformer) -> list[str]:
    return [f"blocks.{l}.attn.hook_z" for l in range(model.spec.n_layers)]


def stack_z(model: Transformer, cache: dict[str, Tensor]) -> Tensor:
    """Per-head outputs before W_O: ``[b, p, L, h, e]``."""
    return torch.stack([cache[n] for n in z_names(model)], dim=2)


def template_means(z: Tensor, template: Tensor) -> dict[int, Tensor]:
    """Mean of ``z [b, p, ...]`` over prompts of each template (positions align within a template)."""
    return {int(t): z[template == t].mean(0) for t in template.unique()}


@torch.no_grad()
def template_means_batched(model: Transformer, tokens: Tensor, template: Tensor, batch_size: int = 64
                           ) -> dict[int, Tensor]:
    """:func:`template_means` of every head's ``z`` over ``tokens [n, p]`` without holding all of them:
    per-template sums accumulated batch by batch (memory: one batch, not ``n`` prompts)."""
    names = z_names(model)
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    for sl in batched(len(tokens), batch_size):
        cache: dict[str, Tensor] = {}
        model(tokens[sl], cache=cache, cache_names=names, stop_layer=model.spec.n_layers)
        z = stack_z(model, cache)
        for t in template[sl].unique().tolist():
            sel = template[sl] == t
            part = z[sel].sum(0)
            sums[t] = part if t not in sums else sums[t] + part
            counts[t] = counts.get(t, 0) + int(sel.sum())
    return {t: sums[t] / counts[t] for t in sorted(sums)}


def ablation_hooks(model: Transformer, keep: Tensor, means: dict[int, Tensor], template: Tensor,
                   ) -> dict[str, Callable]:
    """Hooks that mean-ablate every (prompt, position, layer, head) where ``keep`` is False.

    Args:
        keep: bool ``[b, p, L, h]``.
        means: template -> mean ``z`` ``[p, L, h, e]`` (e.g. over the ABC prompts).
        template: ``[b]`` template id of each prompt.
    """
    width = keep.shape[1]
    mean_z = torch.stack([means[int(t)][:width] for t in template])  # [b, p, L, h, e]

    def make(layer: int):
        def fn(z: Tensor) -> Tensor:
            k = keep[:, : z.shape[1], layer, :, None]
            return torch.where(k, z, mean_z[:, : z.shape[1], layer])
        return fn

    return {f"blocks.{l}.attn.hook_z": make(l) for l in range(model.spec.n_layers)}


def head_out(model: Transformer, z: Tensor, layer: int, head: int) -> Tensor:
    """Contribution of one head to the residual stream: ``z[..., e] @ W_O[layer][head]``."""
    return z @ model.W_O(layer)[head]


def sender_deltas(model: Transformer, z_clean: Tensor, z_corrupt: Tensor, senders: Sequence[Head],
                  pos: Tensor) -> Tensor:
    """``[S, b, d]``: each sender's output change (corrupted - clean) at position ``pos[b]``."""
    rows = torch.arange(z_clean.shape[0])
    out = []
    for l, h in senders:
        dz = z_corrupt[rows, pos, l, h] - z_clean[rows, pos, l, h]
        out.append(head_out(model, dz, l, h))
    return torch.stack(out) if out else torch.zeros(0, z_clean.shape[0], model.spec.d_model)


@torch.no_grad()
def direct_effects(model: Transformer, resid_final: Tensor, deltas: Tensor, io: Tensor, s: Tensor) -> Tensor:
    """LD after adding each delta to the final residual stream at END.

    Args:
        resid_final: ``[b, d]`` final residual (input of the final norm) at END.
        deltas: ``[S, b, d]``.
    Returns: ``[S, b]`` patched logit differences.
    """
    direction = model.W_U[:, io] - model.W_U[:, s]  # [d, b]
    normed = model.final_norm(resid_final[None] + deltas)  # [S, b, d]
    return torch.einsum("sbd,db->sb", normed, direction)


def _group_receivers(receivers: Sequence[tuple[int, int, str]]) -> dict[tuple[int, str], list[int]]:
    """``(layer, input kind) -> heads`` of the receivers."""
    groups: dict[tuple[int, str], list[int]] = {}
    for l, h, kind in receivers:
        groups.setdefault((l, kind), []).append(h)
    return groups


def _input_hooks(receivers: Sequence[tuple[int, int, str]], pos: Tensor, deltas_for: Callable[[int], Tensor],
                 clean_for: Callable[[int], Tensor]) -> dict[str, Callable]:
    """Hooks *replacing* the per-head inputs of the receivers by what step 2 saved: the clean
    residual ``clean_for(layer) [B, p, d]`` at every position, plus ``deltas_for(layer) [B, d]`` at
    ``pos`` (an earlier receiver's patched output thus never reaches a later receiver's input)."""
    hooks = {}
    for (l, kind), heads in _group_receivers(receivers).items():
        def fn(x: Tensor, l=l, heads=heads) -> Tensor:
            rows = torch.arange(x.shape[0])
            d, clean = deltas_for(l), clean_for(l)
            x = x.clone()
            for h in heads:
                x[:, :, h] = clean
                x[rows, pos, h] += d
            return x
        hooks[f"blocks.{l}.attn.hook_{kind}_input"] = fn
    return hooks


PATH_MODES = ("wang", "direct")


@dataclass
class FrozenRun:
    """The clean run at one position ``t`` per prompt: what step 2 of Wang et al.'s path patching
    reads there when every attention head is frozen.

    ``resid_mid [b, L, d]``: the residual stream after each layer's attention at ``t``;
    ``mlp_out [b, L, d]``: each MLP's clean output at ``t``.
    """

    resid_mid: Tensor
    mlp_out: Tensor


def frozen_cache_names(model: Transformer) -> list[str]:
    """The activations :func:`frozen_run` reads from a clean run's cache."""
    L = model.spec.n_layers
    return [f"blocks.{l}.hook_resid_mid" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]


def frozen_run(model: Transformer, cache: dict[str, Tensor], pos: Tensor) -> FrozenRun:
    """:class:`FrozenRun` at ``pos [b]`` from a clean cache holding :func:`frozen_cache_names`."""
    rows = torch.arange(pos.shape[0])
    L = model.spec.n_layers
    return FrozenRun(torch.stack([cache[f"blocks.{l}.hook_resid_mid"][rows, pos] for l in range(L)], 1),
                     torch.stack([cache[f"blocks.{l}.hook_mlp_out"][rows, pos] for l in range(L)], 1))


def propagate(model: Transformer, deltas: Tensor, sender_layers: Sequence[int], layers: Sequence[int],
              frozen: FrozenRun | None) -> Tensor:
    """``[S, T, b, d]``: the change of the residual stream entering each of ``layers`` (``n_layers``:
    the final residual) when sender ``s`` adds ``deltas[s] [b, d]`` after the attention of
    ``sender_layers[s]`` and every attention head is frozen (Wang et al.'s step 2).

    ``frozen`` given: the MLPs from the sender's layer on recompute on the changed residual
    (:class:`FrozenRun` at the sender's position). ``frozen=None``: the direct path, the MLPs frozen
    too, so the change is ``deltas[s]`` itself at every later layer. Zero at layers up to the sender's.
    """
    n_send, T = deltas.shape[0], len(layers)
    out = deltas.new_zeros((n_send, T, *deltas.shape[1:]))
    if n_send == 0 or T == 0:
        return out
    sl = torch.as_tensor(list(sender_layers))
    if frozen is None:
        for j, t in enumerate(layers):
            out[:, j] = deltas * (sl < t).to(deltas.dtype)[:, None, None]
        return out
    change = torch.zeros_like(deltas)
    for l in range(int(sl.min()), max(layers)):
        change = change + deltas * (sl == l).to(deltas.dtype)[:, None, None]
        act = torch.nonzero(sl <= l).flatten()
        mid = frozen.resid_mid[None, :, l] + change[act]
        change[act] = change[act] + (model.mlp(l, mid) - frozen.mlp_out[None, :, l])
        for j, t in enumerate(layers):
            if t == l + 1:
                out[:, j] = change
    return out


@torch.no_grad()
def path_patch_logits(model: Transformer, resid_final: Tensor, deltas: Tensor, sender_layers: Sequence[int],
                      io: Tensor, s: Tensor, frozen: FrozenRun | None = None, chunk: int = 64) -> Tensor:
    """Path patching sender -> logits: ``[S, b]`` logit differences at END.

    ``resid_final [b, d]``: the clean final residual at END; ``deltas [S, b, d]``: the senders' output
    changes at END; ``frozen`` at END (Wang et al.) or ``None`` (direct path: :func:`direct_effects`).
    """
    L = model.spec.n_layers
    out = []
    for sl in batched(deltas.shape[0], chunk):
        prop = propagate(model, deltas[sl], list(sender_layers)[sl], [L], frozen)[:, 0]
        out.append(direct_effects(model, resid_final, prop, io, s))
    return torch.cat(out) if out else torch.zeros(0, resid_final.shape[0])


@torch.no_grad()
def path_patch(model: Transformer, tokens: Tensor, end: Tensor, io: Tensor, s: Tensor,
               resid_pre: dict[int, Tensor], deltas: Tensor, sender_layers: Sequence[int],
               receivers: Sequence[tuple[int, int, str]], pos: Tensor, max_rows: int = 512,
               frozen: FrozenRun | None = None) -> Tensor:
    """Exact path patching of many senders into the ``receivers``' inputs.

    Args:
        tokens, end, io, s: the clean prompts ``[b, p]`` and their END / IO / S ids.
        resid_pre: layer -> cached clean ``hook_resid_pre`` ``[b, p, d]`` (every receiver layer).
        deltas: ``[S, b, d]`` sender output changes at ``pos`` (see :func:`sender_deltas`).
        sender_layers: layer of each sender; a sender reaches only receivers in later layers.
        receivers: ``(layer, head, "q"|"k"|"v")``. Their inputs are replaced (Wang et al.'s step 3):
            with receivers in several layers, an earlier receiver's change does not reach a later one.
        pos: ``[b]`` position where senders write and receivers read.
        frozen: the clean run at ``pos`` (:func:`frozen_run`): Wang et al.'s path patching, the
            MLPs between sender and receiver recomputed. ``None``: the direct path.
    Returns: ``[S, b]`` logit differences after patching.
    """
    n_send, b = deltas.shape[0], tokens.shape[0]
    start = min(l for l, _, _ in receivers)
    r_layers = sorted({l for l, _, _ in receivers})
    per_chunk = max(1, max_rows // b)
    out = []
    for sl in batched(n_send, per_chunk):
        k = sl.stop - sl.start
        tok = tokens.repeat(k, 1)
        posk = pos.repeat(k)
        prop = propagate(model, deltas[sl], list(sender_layers)[sl], r_layers, frozen)  # [k, T, b, d]

        def deltas_for(layer: int, prop=prop, k=k) -> Tensor:
            return prop[:, r_layers.index(layer)].reshape(k * b, -1)

        hooks = _input_hooks(receivers, posk, deltas_for, lambda layer, k=k: resid_pre[layer].repeat(k, 1, 1))
        logits = model(tok, hooks=hooks, logits_at=end.repeat(k), start_layer=start,
                       start_resid=resid_pre[start].repeat(k, 1, 1))
        out.append(logit_diff(logits, io.repeat(k), s.repeat(k)).reshape(k, b))
    return torch.cat(out) if out else torch.zeros(0, b)


def path_patch_attribution(model: Transformer, tokens: Tensor, end: Tensor, io: Tensor, s: Tensor,
                           resid_pre: dict[int, Tensor], deltas: Tensor, sender_layers: Sequence[int],
                           receivers: Sequence[tuple[int, int, str]], pos: Tensor,
                           frozen: FrozenRun | None = None) -> Tensor:
    """First-order estimate of :func:`path_patch`'s mean LD change, for all senders at once.

    Returns ``[S]``: ``mean_b <d LD / d input_r, change_s(l_r)>`` summed over receivers later than
    the sender, where ``change_s`` is :func:`propagate`'s (linearised through the MLPs when
    ``frozen`` is given, :func:`_frozen_vjp`; ``deltas[s]`` itself for the direct path).
    """
    start = min(l for l, _, _ in receivers)
    b = tokens.shape[0]
    rows = torch.arange(b)
    grads: dict[tuple[int, int, str], Tensor] = {}
    leaves: dict[tuple[int, str], Tensor] = {}
    by_key = _group_receivers(receivers)

    hooks = {}
    for (l, kind), heads in by_key.items():
        def fn(x: Tensor, l=l, kind=kind, heads=heads) -> Tensor:
            # the receivers' inputs are replaced in path_patch (detached here); the other heads of the
            # layer keep their gradient path to earlier receivers
            leaf = torch.zeros_like(x, requires_grad=True)
            leaves[(l, kind)] = leaf
            is_receiver = torch.zeros(x.shape[2], dtype=torch.bool, device=x.device)
            is_receiver[heads] = True
            return torch.where(is_receiver[None, None, :, None], x.detach(), x) + leaf
        hooks[f"blocks.{l}.attn.hook_{kind}_input"] = fn
    with torch.enable_grad():
        logits = model(tokens, hooks=hooks, logits_at=end, start_layer=start,
                       start_resid=resid_pre[start].detach())
        logit_diff(logits, io, s).mean().backward()
    for (l, kind), heads in by_key.items():
        g = leaves[(l, kind)].grad  # [b, p, h, d]
        for h in heads:
            grads[(l, h, kind)] = g[rows, pos, h]  # [b, d]
    per_layer: dict[int, Tensor] = {}  # receiver layer -> summed gradient [b, d] (of the mean: 1/b included)
    for (l, _h, _kind), g in grads.items():
        per_layer[l] = per_layer.get(l, 0) + g
    layers = list(sender_layers)
    if frozen is None:
        at_sender = {ls: sum((g for l, g in per_layer.items() if l > ls), torch.zeros_like(deltas[0]))
                     for ls in set(layers)}
    else:
        at_sender = _frozen_vjp(model, frozen, per_layer, min(layers) if layers else 0)
    est = torch.zeros(deltas.shape[0])
    for i, ls in enumerate(layers):
        est[i] = (deltas[i] * at_sender[ls]).sum()
    return est


def _frozen_vjp(model: Transformer, frozen: FrozenRun, grads: dict[int, Tensor], first: int) -> dict[int, Tensor]:
    """``layer -> [b, d]``: the gradient of ``sum_l <grads[l], change(l)>`` with respect to a change
    added after the attention of each layer from ``first`` on, through :func:`propagate`'s frozen-heads
    MLP chain at zero change (one backward pass). Layers at or above every receiver get zeros."""
    top = max(grads)
    leaves = {l: torch.zeros_like(frozen.resid_mid[:, l], requires_grad=True) for l in range(first, top)}
    with torch.enable_grad():
        change = torch.zeros_like(frozen.resid_mid[:, 0])
        objective = torch.zeros(())
        for l in range(first, top):
            change = change + leaves[l]
            change = change + model.mlp(l, frozen.resid_mid[:, l] + change) - frozen.mlp_out[:, l]
            if l + 1 in grads:
                objective = objective + (grads[l + 1].detach() * change).sum()
        if leaves:
            objective.backward()
    zero = torch.zeros_like(frozen.resid_mid[:, 0])
    return {l: (leaves[l].grad if l in leaves and leaves[l].grad is not None else zero)
            for l in range(first, model.spec.n_layers + 1)}
