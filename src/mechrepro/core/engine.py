"""The patching engine: many activation patches per forward pass, recomputing only what changes.

Activation patching replaces one component's activation in a *base* run by its value in a
*source* run and measures a metric. Done naively that is one full forward pass per component.
This engine gets the same numbers with far less compute:

* **Cached base run.** One forward pass of the base prompts caches each layer's residual
  stream and keys/values (:class:`BaseRun`).
* **Start at the patched layer.** A patch at layer ``l`` cannot change layers below ``l``: the run
  starts from the cached ``resid_pre`` of layer ``l``.
* **Recompute only the positions a patch can affect.** Attention is causal, so a patch at
  position ``t`` changes nothing before ``t``. A patch at END recomputes the END token alone,
  attending to the cached keys/values of the earlier positions.
* **Batch the components.** The heads of one layer are patched together, each in its own copy
  of the prompts (up to ``max_rows`` rows per pass).
* **Logits only where read.** The unembedding is applied at the metric's position only.

:func:`attribution_heads` gives the first-order estimate of every head's effect from one forward
and one backward pass; exact patching then confirms the top candidates.

Metrics are functions of the END logits ``[rows, vocab]`` returning one value per row; effects are
``mean(metric_patched) - mean(metric_base)`` over prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechrepro.core.model import Transformer

Metric = Callable[[Tensor, Tensor], Tensor]  # (logits [rows, v], prompt index [rows]) -> [rows]


@dataclass
class BaseRun:
    """Cached activations of the base prompts: per layer ``resid_pre [b, p, d]``, keys (after
    rotary) and values ``[b, p, g, e]``, and the head outputs ``z [b, p, h, e]``."""

    tokens: Tensor
    end: Tensor
    resid_pre: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    z: list[Tensor]
    end_logits: Tensor


@torch.no_grad()
def base_run(model: Transformer, tokens: Tensor, end: Tensor) -> BaseRun:
    """Run the base prompts once and cache what the engine needs."""
    L = model.spec.n_layers
    key = "hook_rot_k" if model.spec.arch == "llama" else "hook_k"
    names = [f"blocks.{l}.{n}" for l in range(L) for n in
             ("hook_resid_pre", f"attn.{key}", "attn.hook_v", "attn.hook_z")]
    cache: dict[str, Tensor] = {}
    logits = model(tokens, cache=cache, cache_names=names, logits_at=end)
    return BaseRun(tokens, end, [cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)],
                   [cache[f"blocks.{l}.attn.{key}"] for l in range(L)],
                   [cache[f"blocks.{l}.attn.hook_v"] for l in range(L)],
                   [cache[f"blocks.{l}.attn.hook_z"] for l in range(L)], logits)


def _z_hook(heads: Sequence[int], source: Tensor, b: int, at_end_only: bool):
    """Hook replacing head ``heads[i]``'s z in rows ``i*b:(i+1)*b`` by ``source`` rows."""
    def fn(z: Tensor) -> Tensor:
        z = z.clone()
        for i, h in enumerate(heads):
            rows = slice(i * b, (i + 1) * b)
            z[rows, :, h] = source[:, :, h] if not at_end_only else source[:, None, h]
        return z
    return fn


@torch.no_grad()
def sweep_heads(model: Transformer, base: BaseRun, metric: Metric, run: Callable[[int, list[int]], Tensor],
                heads: Sequence[tuple[int, int]] | None = None, max_rows: int = 512) -> Tensor:
    """The generic head sweep: ``[L, h]`` effects (NaN where not patched).

    Heads are grouped by layer and patched in chunks of ``max_rows // b`` heads per pass;
    ``run(layer, chunk)`` returns the END logits ``[len(chunk) * b, v]`` of that pass, rows ordered
    head by head. The effect is ``mean(metric_patched) - mean(metric_base)``.
    """
    spec = model.spec
    b = base.tokens.shape[0]
    heads = heads if heads is not None else [(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads)]
    rows_b = torch.arange(b)
    effects = torch.full((spec.n_layers, spec.n_heads), float("nan"))
    base_metric = metric(base.end_logits, rows_b).mean()
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    per_pass = max(1, max_rows // b)
    for layer, hs in sorted(by_layer.items()):
        for i in range(0, len(hs), per_pass):
            chunk = hs[i:i + per_pass]
            logits = run(layer, chunk)
            effects[layer, chunk] = metric(logits, rows_b.repeat(len(chunk))).reshape(len(chunk), b).mean(1) - base_metric
    return effects


def patch_heads_end(model: Transformer, base: BaseRun, source_z_end: Tensor, metric: Metric,
                    heads: Sequence[tuple[int, int]] | None = None, max_rows: int = 2048) -> Tensor:
    """Effect of patching each head's output (``z``) at END only: ``[L, h]`` (NaN where not patched).

    Args:
        source_z_end: ``[b, L, h, e]`` the source run's ``z`` at END.
        heads: heads to patch (default all).
    Only the END token is recomputed, from the patched layer on, over the cached prefix.
    """
    b, L = base.tokens.shape[0], model.spec.n_layers
    rows_b = torch.arange(b)

    def run(layer: int, chunk: list[int]) -> Tensor:
        k = len(chunk)
        resid = base.resid_pre[layer][rows_b, base.end][:, None].repeat(k, 1, 1)  # [k*b, 1, d]
        past = {l: (base.keys[l].repeat(k, 1, 1, 1), base.values[l].repeat(k, 1, 1, 1)) for l in range(layer, L)}
        hook = _z_hook(chunk, source_z_end[:, layer], b, at_end_only=True)
        return model(None, start_layer=layer, start_resid=resid, positions=base.end.repeat(k)[:, None],
                     past=past, past_len=base.end.repeat(k), logits_at=torch.zeros(k * b, dtype=torch.long),
                     hooks={f"blocks.{layer}.attn.hook_z": hook})

    return sweep_heads(model, base, metric, run, heads, max_rows)


def patch_heads_all_positions(model: Transformer, base: BaseRun, source_z: list[Tensor], metric: Metric,
                              heads: Sequence[tuple[int, int]] | None = None, max_rows: int = 256) -> Tensor:
    """Effect of patching each head's output at every position at once: ``[L, h]``.

    Args:
        source_z: per layer, the source run's ``z`` ``[b, p, h, e]`` (aligned positions).
    Each run starts from the cached residual stream of the patched layer; logits only at END.
    """
    b = base.tokens.shape[0]

    def run(layer: int, chunk: list[int]) -> Tensor:
        k = len(chunk)
        hook = _z_hook(chunk, source_z[layer], b, at_end_only=False)
        return model(None, start_layer=layer, start_resid=base.resid_pre[layer].repeat(k, 1, 1),
                     logits_at=base.end.repeat(k), hooks={f"blocks.{layer}.attn.hook_z": hook})

    return sweep_heads(model, base, metric, run, heads, max_rows)


def attribution_heads(model: Transformer, tokens: Tensor, end: Tensor, source_z: list[Tensor], metric: Metric,
                      batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """First-order estimate of every head's patching effect: ``(all positions [L, h], END only [L, h])``.

    ``effect(l, h) ≈ sum_positions <d mean(metric) / d z[l, :, h], z_source - z_base>``, summed
    over every position and over END alone, from one forward and one backward pass of the base
    prompts. ``batch_size`` prompts go through each pass (all if None): the backward pass keeps
    every layer's activations, so the chunk bounds the memory; the sums do not depend on it.
    """
    spec = model.spec
    b = tokens.shape[0]
    size = b if batch_size is None else max(1, batch_size)
    out_all = torch.zeros(spec.n_layers, spec.n_heads)
    out_end = torch.zeros(spec.n_layers, spec.n_heads)
    for start in range(0, b, size):
        rows = torch.arange(start, min(start + size, b))
        local = torch.arange(len(rows))
        leaves: dict[int, Tensor] = {}
        zs: dict[int, Tensor] = {}

        def make(layer: int):
            def fn(z: Tensor) -> Tensor:
                zs[layer] = z.detach()
                leaf = torch.zeros_like(z, requires_grad=True)
                leaves[layer] = leaf
                return z + leaf
            return fn

        hooks = {f"blocks.{l}.attn.hook_z": make(l) for l in range(spec.n_layers)}
        with torch.enable_grad():
            logits = model(tokens[rows], hooks=hooks, logits_at=end[rows])
            (metric(logits, rows).sum() / b).backward()
        for l in range(spec.n_layers):
            delta = source_z[l][rows] - zs[l]  # [rows, p, h, e]
            grad = leaves[l].grad
            out_all[l] += torch.einsum("bphe,bphe->h", grad, delta)
            out_end[l] += torch.einsum("bhe,bhe->h", grad[local, end[rows]], delta[local, end[rows]])
    return out_all, out_end


def rank_agreement(approx: Tensor, exact: Tensor, k: int = 10) -> dict[str, float]:
    """Spearman rank correlation and top-``k`` overlap (by absolute value) of two effect maps."""
    a, e = approx.flatten(), exact.flatten()
    ok = ~(a.isnan() | e.isnan())
    a, e = a[ok], e[ok]

    def ranks(x: Tensor) -> Tensor:
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        return r

    ra, re = ranks(a), ranks(e)
    spearman = torch.corrcoef(torch.stack([ra, re]))[0, 1].item()
    top_a = set(a.abs().argsort(descending=True)[:k].tolist())
    top_e = set(e.abs().argsort(descending=True)[:k].tolist())
    return {"spearman": spearman, f"top{k}_overlap": len(top_a & top_e) / k, "n": int(ok.sum())}
