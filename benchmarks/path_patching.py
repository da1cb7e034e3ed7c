"""Benchmark: the engine's Wang-style path patching vs a naive TransformerLens implementation.

Same model, prompts, senders and receivers, side by side in one run. Path patching as Wang et al.
(appendix B) and the ARENA IOI exercises define it, sender -> the receivers' queries at END:

* **naive (TransformerLens hooks)** — per sender three forward passes of the bridge: (1) the clean
  and ABC runs are cached once; (2) the clean prompts run with every head's ``hook_z`` frozen to
  its clean value except the sender's at END (its ABC value), the MLPs recomputing, and the
  receivers' ``hook_q`` are cached; (3) the clean prompts run with the receivers' ``hook_q``
  replaced by those (every position) and the logit difference is read at END;
* **engine** — :func:`mechrepro.core.patching.path_patch` with a :class:`FrozenRun` at END (the
  frozen-heads run computed at END alone, every sender batched), the clean run included in its time.

The metric is the mean logit difference logit(IO) - logit(S) at END. We print both wall times, the
speed-up and the largest absolute difference of the per-sender results (goal: <= 1e-4, >= 5x).

Usage: python benchmarks/path_patching.py [--n-prompts 20] [--n-senders 40] [--receiver-layer 24]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patching_engine import ROOT, add_model_args, load, load_prompts, report, sweep, timed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--n-senders", type=int, default=40, help="the last n heads below the receiver layer")
    ap.add_argument("--receiver-layer", type=int, default=None, help="default: 4 layers below the top")
    ap.add_argument("--receivers", type=int, default=3, help="query heads 0..n-1 of the receiver layer")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "path_patching.json")
    args = ap.parse_args(argv)

    from mechrepro.core import patching as P

    lm, bridge, info = load(args)
    model = lm.model
    batch = load_prompts(lm, args.n_prompts)
    clean, corrupt, io, s = batch.tokens, batch.abc, batch.io, batch.s
    b, p = clean.shape
    end = torch.full((b,), p - 1)
    L, H = model.spec.n_layers, model.spec.n_heads
    rl = args.receiver_layer if args.receiver_layer is not None else L - 4
    receivers = [(rl, h, "q") for h in range(args.receivers)]
    senders = [(l, h) for l in range(rl) for h in range(H)][-args.n_senders:]
    rows = torch.arange(b)

    def ld(logits):  # [b, p, v] or [b, v]
        last = logits[:, -1] if logits.dim() == 3 else logits
        return (last[rows, io] - last[rows, s]).mean().item()

    # ---- naive: TransformerLens hooks, three passes per sender (the caches of pass 1 shared)
    def naive():
        with torch.no_grad():
            _, cc = bridge.run_with_cache(clean)
            _, ca = bridge.run_with_cache(corrupt)
            out = []
            for sl, sh in senders:
                def freeze(z, hook, layer):
                    z = cc[hook.name].clone()
                    if layer == sl:
                        z[:, -1, sh] = ca[hook.name][:, -1, sh]
                    return z
                fwd = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: freeze(z, hook, l)) for l in range(L)]
                saved = {}

                def keep(q, hook):
                    saved[hook.name] = q.clone()
                bridge.run_with_hooks(clean, fwd_hooks=fwd + [(f"blocks.{rl}.attn.hook_q", keep)])

                def patch(q, hook):
                    q = q.clone()
                    for _, h, _k in receivers:
                        q[:, :, h] = saved[hook.name][:, :, h]
                    return q
                out.append(ld(bridge.run_with_hooks(clean, fwd_hooks=[(f"blocks.{rl}.attn.hook_q", patch)])))
            return torch.tensor(out)

    # ---- the engine
    def engine():
        with torch.no_grad():
            names = P.z_names(model) + [f"blocks.{l}.hook_resid_pre" for l in range(L)] + P.frozen_cache_names(model)
            _, cache = P.run_end_logits(model, clean, end, cache_names=names)
            _, cache_abc = P.run_end_logits(model, corrupt, end, cache_names=P.z_names(model))
            z, z_abc = P.stack_z(model, cache), P.stack_z(model, cache_abc)
            d = P.sender_deltas(model, z, z_abc, senders, end)
            resid = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)}
            out = P.path_patch(model, clean, end, io, s, resid, d, [l for l, _ in senders], receivers, end,
                               max_rows=256, frozen=P.frozen_run(model, cache, end))
            return out.mean(1)

    tl, t_tl = timed(naive)
    ours, t_ours = timed(engine)
    results = {**info, "n_prompts": b, "seq_len": p, "receivers": [list(r) for r in receivers],
               "senders": [list(x) for x in senders]}
    results["sweeps"] = {"wang_path_patching": sweep(
        t_tl, t_ours, (ours - tl).abs().max().item(), n_senders=len(senders),
        what=f"{len(senders)} senders -> queries of {len(receivers)} heads of layer {rl} at END")}
    report(results, f"model {results['model']}; {b} prompts x {p} tokens; torch threads {results['threads']}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
