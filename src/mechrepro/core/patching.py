"""Activation patching, mean ablation and path patching on :class:`~mechrepro.core.model.Transformer`.

Techniques (all measured with a metric read at one position per prompt, usually END):

* **Mean ablation** (:func:`ablation_hooks`): replace a head's output ``z`` at chosen
  (prompt, position) cells by its mean over a reference distribution. The IOI circuit is
  evaluated by mean-ablating every (head, position) *outside* the circuit, with means over the
  ABC prompts of the same template.
* **Direct path to the logits** (:func:`direct_effects`): replace one head's output by its output on
  the corrupted (ABC) prompt, in the final residual stream only; the final norm is recomputed.
  This is path patching with the logits as receiver, computed from one cached run.
* **Path patching into head inputs** (:func:`path_patch`): the change of a sender head's output
  (corrupted minus clean) at one position is added to the *query, key or value input* of chosen
  receiver heads only (per-head inputs, so other heads of the receiver layer are untouched, also
  on grouped-query models). Everything downstream of the receivers is recomputed. Senders are
  batched: one forward pass patches many senders, each in its own copy of the prompts, starting
  from the cached residual stream at the first receiver layer.
* **Attribution path patching** (:func:`path_patch_attribution`): the first-order estimate of the
  same quantity, ``<dMetric/d receiver_input, sender delta>``, for all senders from one forward
  and one backward pass. Used to rank senders; the top ones are confirmed exactly.

Heads are ``(layer, head)`` tuples. Positions are per-prompt index tensors ``[b]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
                 ) -> dict[str, Callable]:
    """Hooks adding ``deltas_for(layer) [B, d]`` to the per-head inputs of the receivers at ``pos``."""
    hooks = {}
    for (l, kind), heads in _group_receivers(receivers).items():
        def fn(x: Tensor, l=l, heads=heads) -> Tensor:
            rows = torch.arange(x.shape[0])
            d = deltas_for(l)
            x = x.clone()
            for h in heads:
                x[rows, pos, h] += d
            return x
        hooks[f"blocks.{l}.attn.hook_{kind}_input"] = fn
    return hooks


@torch.no_grad()
def path_patch(model: Transformer, tokens: Tensor, end: Tensor, io: Tensor, s: Tensor,
               resid_pre: dict[int, Tensor], deltas: Tensor, sender_layers: Sequence[int],
               receivers: Sequence[tuple[int, int, str]], pos: Tensor, max_rows: int = 512) -> Tensor:
    """Exact path patching of many senders into the ``receivers``' inputs.

    Args:
        tokens, end, io, s: the clean prompts ``[b, p]`` and their END / IO / S ids.
        resid_pre: layer -> cached clean ``hook_resid_pre`` ``[b, p, d]`` (at least the first
            receiver layer).
        deltas: ``[S, b, d]`` sender output changes at ``pos`` (see :func:`sender_deltas`).
        sender_layers: layer of each sender; a sender reaches only receivers in later layers.
        receivers: ``(layer, head, "q"|"k"|"v")``.
        pos: ``[b]`` position where senders write and receivers read.
    Returns: ``[S, b]`` logit differences after patching.
    """
    n_send, b = deltas.shape[0], tokens.shape[0]
    start = min(l for l, _, _ in receivers)
    per_chunk = max(1, max_rows // b)
    out = []
    for sl in batched(n_send, per_chunk):
        k = sl.stop - sl.start
        tok = tokens.repeat(k, 1)
        posk = pos.repeat(k)
        layers = torch.tensor(sender_layers[sl]).repeat_interleave(b)
        dk = deltas[sl].reshape(k * b, -1)

        def deltas_for(layer: int, dk=dk, layers=layers) -> Tensor:
            return dk * (layers < layer).float()[:, None]

        hooks = _input_hooks(receivers, posk, deltas_for)
        logits = model(tok, hooks=hooks, logits_at=end.repeat(k), start_layer=start,
                       start_resid=resid_pre[start].repeat(k, 1, 1))
        out.append(logit_diff(logits, io.repeat(k), s.repeat(k)).reshape(k, b))
    return torch.cat(out) if out else torch.zeros(0, b)


def path_patch_attribution(model: Transformer, tokens: Tensor, end: Tensor, io: Tensor, s: Tensor,
                           resid_pre: dict[int, Tensor], deltas: Tensor, sender_layers: Sequence[int],
                           receivers: Sequence[tuple[int, int, str]], pos: Tensor) -> Tensor:
    """First-order estimate of :func:`path_patch`'s mean LD change, for all senders at once.

    Returns ``[S]``: ``mean_b <d LD / d input_r, delta_s>`` summed over receivers later than the sender.
    """
    start = min(l for l, _, _ in receivers)
    b = tokens.shape[0]
    rows = torch.arange(b)
    grads: dict[tuple[int, int, str], Tensor] = {}
    leaves: dict[tuple[int, str], Tensor] = {}
    by_key = _group_receivers(receivers)

    hooks = {}
    for (l, kind) in by_key:
        def fn(x: Tensor, l=l, kind=kind) -> Tensor:
            # add a zero leaf rather than detaching x: gradients of earlier receivers must still
            # flow through this layer's inputs
            leaf = torch.zeros_like(x, requires_grad=True)
            leaves[(l, kind)] = leaf
            return x + leaf
        hooks[f"blocks.{l}.attn.hook_{kind}_input"] = fn
    with torch.enable_grad():
        logits = model(tokens, hooks=hooks, logits_at=end, start_layer=start,
                       start_resid=resid_pre[start].detach())
        logit_diff(logits, io, s).mean().backward()
    for (l, kind), heads in by_key.items():
        g = leaves[(l, kind)].grad  # [b, p, h, d]
        for h in heads:
            grads[(l, h, kind)] = g[rows, pos, h]  # [b, d]
    layers = torch.tensor(list(sender_layers))
    est = torch.zeros(deltas.shape[0])
    for (l, _h, _kind), g in grads.items():
        contrib = torch.einsum("sbd,bd->s", deltas, g)  # g is the gradient of the mean: 1/b included
        est += contrib * (layers < l).float()
    return est
