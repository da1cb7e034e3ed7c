"""The patching engine: many activation patches per forward pass, recomputing only what changes.

Activation patching replaces one component's activation in a *base* run by its value in a
*source* run and measures a metric. Done naively that is one full forward pass per component.
This engine gets the same numbers with far less compute:

* **Cached prefix, resumed** (:class:`PrefixCache`, :func:`cache_prefix`, :func:`resume`). One
  forward pass of the base prompts caches, per layer, the keys (after rotary on llama-style
  models) and values of every position, and the residual stream ``resid_pre`` at the layers a
  later run may start from. A patch at layer ``l`` and position ``t`` cannot change layers below
  ``l`` (the residual stream flows upwards) nor positions before ``t`` (attention is causal). So
  a patched run *resumes*: it starts at layer ``l`` with the positions ``t …`` alone (e.g. END,
  or a suffix from a patched subject token to the end), from the cached residual there (or a
  given, patched one); at every layer these positions attend to the cached keys/values of the
  earlier positions of their prompt and causally to each other; a hook edits the patched site;
  and the unembedding is applied only at the position read, optionally for a few vocabulary
  ids. The result equals a full forward pass with the same hook, up to float rounding.
* **Start at the patched layer, END only.** :func:`patch_heads_end` and :func:`patch_mlps_end`
  resume the END token from the patched layer.
* **Batch the components.** The heads of one layer are patched together, each in its own copy
  of the prompts (up to ``max_rows`` rows per pass; a resumed row names the cached prompt it
  continues, so copies share one cache).
* **Logits only where read.** The unembedding is applied at the metric's position only.

:func:`attribution_heads` gives the first-order estimate of every head's effect from one forward
and one backward pass; exact patching then confirms the top candidates.

Metrics are functions of the END logits ``[rows, vocab]`` returning one value per row; effects are
``mean(metric_patched) - mean(metric_base)`` over prompts.

Shapes: ``b`` cached prompts, ``p`` their positions, ``n`` resumed rows, ``s`` resumed positions
per row, ``g`` key/value heads, ``e`` d_head, ``d`` d_model, ``v`` vocabulary (or ``len(vocab)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechrepro.core.model import Hook, Transformer

Metric = Callable[[Tensor, Tensor], Tensor]  # (logits [rows, v], prompt index [rows]) -> [rows]


# ------------------------------------------------------------------ cached prefix and resumed runs
@dataclass
class PrefixCache:
    """What a resumed run reads from a base run of ``b`` prompts of ``p`` positions.

    ``keys[l]``, ``values[l]``: ``[b, p, g, e]`` for each layer a resumed run passes through
    (keys after rotary on llama-style models); ``resid_pre[l]``: ``[b, p, d]`` for each layer a
    resumed run may start at from the cached residual (may be empty).
    """

    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    resid_pre: dict[int, Tensor]

    def past(self, start_layer: int, rows: Tensor | None = None,
             width: int | None = None) -> dict[int, tuple[Tensor, Tensor]]:
        """``layer -> (keys, values)`` ``[n, width, g, e]`` of the layers from ``start_layer`` on:
        the cached prompts ``rows`` (default all, in order), their first ``width`` positions."""
        def take(x: Tensor) -> Tensor:
            x = x if width is None else x[:, :width]
            return x if rows is None else x[rows]

        return {l: (take(k), take(self.values[l])) for l, k in self.keys.items() if l >= start_layer}

    @staticmethod
    def cat(parts: Sequence[PrefixCache]) -> PrefixCache:
        """The caches of consecutive chunks of prompts, as one (same positions in every chunk)."""
        def join(field: str) -> dict[int, Tensor]:
            return {l: torch.cat([getattr(c, field)[l] for c in parts]) for l in getattr(parts[0], field)}

        return PrefixCache(join("keys"), join("values"), join("resid_pre"))


def key_name(model: Transformer) -> str:
    """The hook holding the keys attention reads: after rotary on llama-style models."""
    return "hook_rot_k" if model.spec.arch == "llama" else "hook_k"


@torch.no_grad()
def cache_prefix(model: Transformer, tokens: Tensor, kv_layers: Iterable[int], resid_layers: Iterable[int] = (), *,
                 logits_at: Tensor | None = None, cache: dict[str, Tensor] | None = None,
                 cache_names: Iterable[str] = ()) -> tuple[PrefixCache, Tensor | None]:
    """One forward pass of ``tokens [b, p]``: its :class:`PrefixCache` and logits.

    Args:
        kv_layers: layers whose keys/values are kept (every layer a resumed run passes through).
        resid_layers: layers whose ``resid_pre`` is kept (where resumed runs start from it).
        logits_at: ``[b]`` positions whose logits ``[b, v]`` are returned; ``None``: no logits
            (the pass stops before the unembedding).
        cache, cache_names: more activations of the same pass for the caller, by name.
    """
    kv_layers, resid_layers = list(kv_layers), list(resid_layers)
    kname = key_name(model)
    names = [f"blocks.{l}.attn.{n}" for l in kv_layers for n in (kname, "hook_v")]
    names += [f"blocks.{l}.hook_resid_pre" for l in resid_layers]
    store = {} if cache is None else cache
    logits = model(tokens, cache=store, cache_names=[*names, *cache_names], logits_at=logits_at,
                   stop_layer=None if logits_at is not None else model.spec.n_layers)
    prefix = PrefixCache({l: store[f"blocks.{l}.attn.{kname}"] for l in kv_layers},
                         {l: store[f"blocks.{l}.attn.hook_v"] for l in kv_layers},
                         {l: store[f"blocks.{l}.hook_resid_pre"] for l in resid_layers})
    return prefix, logits


def resume(model: Transformer, prefix: PrefixCache, start_layer: int, positions: Tensor, *,
           resid: Tensor | None = None, rows: Tensor | None = None, hooks: Mapping[str, Hook] | None = None,
           read: Tensor | None = None, vocab: Tensor | None = None, trim: bool = False,
           stop_layer: int | None = None, cache: dict[str, Tensor] | None = None,
           cache_names: Iterable[str] | None = None) -> Tensor | None:
    """Run some positions of cached prompts from ``start_layer`` on, over the cached prefix.

    Args:
        positions: ``[n, s]`` consecutive absolute positions ``t_i … t_i + s − 1`` per row. Row
            ``i`` attends to the cached positions ``0 … t_i − 1`` of its prompt and causally to
            its own positions.
        resid: ``[n, s, d]`` the residual entering ``start_layer`` there (e.g. a patched one);
            default: the cached ``resid_pre[start_layer]`` at ``positions``.
        rows: ``[n]`` the cached prompt each row continues (default: row ``i`` continues prompt
            ``i``); a prompt may appear several times, e.g. once per patched component.
        hooks: as in :meth:`Transformer.forward`; activations are ``[n, s, …]``, attention
            scores and patterns ``[n, h, s, P + s]`` (the ``P`` cached positions first).
        read: ``[n]`` which of the ``s`` positions to unembed (default: the last, ``s − 1``).
        vocab: restrict the logits to these token ids.
        trim: drop the cached positions no row attends to (fewer keys, the same result up to
            float rounding).
        stop_layer, cache, cache_names: stop before that layer and return ``None``, collecting
            activations (as in :meth:`Transformer.forward`).
    Returns: logits ``[n, v]`` at the read positions (``None`` with ``stop_layer``).
    """
    n, s = positions.shape
    if resid is None:
        sel = torch.arange(n, device=positions.device) if rows is None else rows
        resid = prefix.resid_pre[start_layer][sel[:, None], positions]
    past_len = positions[:, 0]
    width = max(1, int(past_len.max())) if trim else None
    if read is None:
        read = torch.full((n,), s - 1, dtype=torch.long, device=positions.device)
    return model(None, start_layer=start_layer, start_resid=resid, positions=positions,
                 past=prefix.past(start_layer, rows, width), past_len=past_len, hooks=hooks, logits_at=read,
                 logit_tokens=vocab, stop_layer=stop_layer, cache=cache, cache_names=cache_names)


# ------------------------------------------------------------------ patching sweeps
@dataclass
class BaseRun(PrefixCache):
    """A :class:`PrefixCache` of every layer of the base prompts ``tokens [b, p]``, with their
    ``end [b]``, the head outputs ``z[l] [b, p, h, e]`` and the END logits ``[b, v]``."""

    tokens: Tensor
    end: Tensor
    z: list[Tensor]
    end_logits: Tensor


@torch.no_grad()
def base_run(model: Transformer, tokens: Tensor, end: Tensor) -> BaseRun:
    """Run the base prompts once and cache what the engine needs."""
    L = model.spec.n_layers
    extra: dict[str, Tensor] = {}
    prefix, logits = cache_prefix(model, tokens, range(L), range(L), logits_at=end, cache=extra,
                                  cache_names=[f"blocks.{l}.attn.hook_z" for l in range(L)])
    return BaseRun(prefix.keys, prefix.values, prefix.resid_pre, tokens, end,
                   [extra[f"blocks.{l}.attn.hook_z"] for l in range(L)], logits)


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
    Only the END token is recomputed (:func:`resume`), from the patched layer on, over the cached
    prefix; each head of a chunk patches its own copy of the prompts.
    """
    b = base.tokens.shape[0]
    rows_b = torch.arange(b)

    def run(layer: int, chunk: list[int]) -> Tensor:
        rows = rows_b.repeat(len(chunk))
        hook = _z_hook(chunk, source_z_end[:, layer], b, at_end_only=True)
        return resume(model, base, layer, base.end[rows, None], rows=rows, hooks={f"blocks.{layer}.attn.hook_z": hook})

    return sweep_heads(model, base, metric, run, heads, max_rows)


@torch.no_grad()
def patch_mlps_end(model: Transformer, base: BaseRun, source_mlp_end: Tensor, metric: Metric,
                   layers: Sequence[int] | None = None) -> Tensor:
    """Effect of replacing each MLP's output at END by ``source_mlp_end [b, L, d]``: ``[L]`` (NaN
    where not patched). Like :func:`patch_heads_end`, one END-only resumed pass per layer."""
    b, L = base.tokens.shape[0], model.spec.n_layers
    rows_b = torch.arange(b)
    layers = list(range(L)) if layers is None else list(layers)
    base_metric = metric(base.end_logits, rows_b).mean()
    out = torch.full((L,), float("nan"))
    for layer in layers:
        def hook(x: Tensor, layer: int = layer) -> Tensor:
            return source_mlp_end[:, layer][:, None]

        logits = resume(model, base, layer, base.end[:, None], hooks={f"blocks.{layer}.hook_mlp_out": hook})
        out[layer] = metric(logits, rows_b).mean() - base_metric
    return out


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
