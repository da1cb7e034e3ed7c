"""Benchmark: Study B's and Study C's patching sweeps, the engine vs TransformerLens.

Same model, prompts and metric, side by side in one run on one machine, as in
``benchmarks/patching_engine.py`` (which covers Study A's head sweeps).

* **Study B, Table 1 evaluation** — the 1-D subspace patch of ``subspace_ioi.patched``: for each
  held-out ABB↔BAB pair, the site activation at END (MLP hidden ``mlp.hook_post`` or
  ``hook_resid_post`` at the site layer) is patched from the source prompt into the base prompt,
  whole or along a unit direction ``v``, and the LD = logit(IO) − logit(S) is read at END. The
  engine caches the site once and recomputes only the END token above the site over cached
  keys/values; TransformerLens runs the base prompts with a hook that applies the same patch (one
  full forward per batch and row). Directions are random unit vectors (seeded): the work is the
  same for learned ones.
* **Study C, node sweep** — every head's output (``attn.hook_z``) and every MLP's output at the
  final position of a multiple-choice prompt replaced by its value on the content-permuted prompt
  (``mcq_analysis.patch_nodes``, which also computes the direct effects). TransformerLens:
  ``get_act_patch_attn_head_out_by_pos`` and ``get_act_patch_mlp_out`` restricted to the final
  position. Its by-position index needs prompts of one length, so the synthetic items are those
  of the most common token length.

Prints wall times, speed-ups and the largest difference of the results; writes
``benchmarks/results/study_sweeps.json``.

Usage: python benchmarks/study_sweeps.py [--model-dir resources/models/smollm2-135m]
       [--n-pairs 1000] [--layer 22] [--n-mcq 16] [--studies b c]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patching_engine import ROOT, add_model_args, load, report, sweep, timed  # noqa: E402


def study_b(lm, bridge, n_pairs: int, layer: int, batch_size: int) -> dict:
    """Table 1 style evaluation: full and 1-D patches at the MLP and residual sites."""
    from mechrepro.core import subspace as S
    from mechrepro.studies.subspace_illusion import ioi as SI

    templates = SI.load_data(ROOT / "config" / "subspace_ioi_data.yaml")
    lists = yaml.safe_load((ROOT / "config" / "ioi_data.yaml").read_text())
    data = SI.make_pairs(templates, lists, 2, n_pairs, lm.tokenizer, lm.bos_id, seed=0)
    batch = SI.to_batch(data["test"]["pairs"], lm.bos_id)
    model = lm.model
    gen = torch.Generator().manual_seed(0)
    d_mlp = model.p(f"blocks.{layer}.W_out").shape[0]
    dims = {"mlp": d_mlp, "resid": model.spec.d_model}
    # Table 1's ten patches: the full activation and 3 directions at the MLP (v, row, null), the
    # full activation and 5 directions in the residual stream (v, row, null, v_grad, v_mean)
    n_dirs = {"mlp": 3, "resid": 5}
    dirs = {(site, i): torch.randn(dims[site], generator=gen) for site in n_dirs for i in range(n_dirs[site])}
    dirs = {k: v / v.norm() for k, v in dirs.items()}
    rows = [(site, None) for site in n_dirs] + list(dirs)
    hook_of = {"mlp": f"blocks.{layer}.mlp.hook_post", "resid": f"blocks.{layer}.hook_resid_post"}

    def ours():
        cache = SI.cache_site(model, batch, layer, batch_size)
        return [SI.patched(model, cache, batch, site, None if v is None else dirs[(site, v)], batch_size)[0]
                for site, v in rows]

    def tl():
        n = len(batch)
        src = {site: [] for site in hook_of}
        for i in range(0, n, batch_size):
            sl = slice(i, min(i + batch_size, n))
            r = torch.arange(sl.stop - sl.start)
            _, cache = bridge.run_with_cache(batch.src[sl], names_filter=list(hook_of.values()))
            for site, name in hook_of.items():
                src[site].append(cache[name][r, batch.end[sl]])
        src = {k: torch.cat(v) for k, v in src.items()}
        out = []
        for site, v in rows:
            lds = []
            for i in range(0, n, batch_size):
                idx = torch.arange(i, min(i + batch_size, n))
                r, end = torch.arange(len(idx)), batch.end[idx]

                def hook(act, hook=None, idx=idx, r=r, end=end, site=site, v=v):
                    act = act.clone()
                    new = src[site][idx] if v is None else S.subspace_patch(act[r, end], src[site][idx], dirs[(site, v)])
                    act[r, end] = new.to(act.dtype)
                    return act

                logits = bridge.run_with_hooks(batch.tokens[idx], fwd_hooks=[(hook_of[site], hook)])[r, end]
                lds.append(logits[r, batch.io[idx]] - logits[r, batch.s[idx]])
            out.append(torch.cat(lds))
        return out

    with torch.no_grad():
        tl_lds, t_tl = timed(tl)
        our_lds, t_ours = timed(ours)
    diff = max((a - b).abs().max().item() for a, b in zip(our_lds, tl_lds))
    return sweep(t_tl, t_ours, diff, n_pairs=len(batch), layer=layer,
                 what=f"Table 1 evaluation at layer {layer}: {len(rows)} patches (full + 3 directions at the MLP, "
                      f"full + 5 in the residual stream) on {len(batch)} pairs")


def mcq_prompts(lm, n: int, seed: int = 0):
    """``n`` synthetic ABCD prompts of one token length and their content-permuted versions."""
    from mechrepro.studies.mcq_circuits import data as mcq

    items = mcq.synthetic_items(40 * n, seed, prefix="bench")
    clean = mcq.make_prompts(items, "abcd", lm.tokenizer, lm.bos_id, seed)
    length, count = Counter(len(p.tokens) for p in clean).most_common(1)[0]
    if count < n:
        raise SystemExit(f"only {count} synthetic prompts share a token length; lower --n-mcq")
    keep = [i for i, p in enumerate(clean) if len(p.tokens) == length][:n]
    corrupt = [mcq.tokenize(mcq.content_permuted(items[i], 1 + k % 3), mcq.label_set("abcd", 4, random.Random(0)),
                            lm.tokenizer, lm.bos_id) for k, i in enumerate(keep)]
    return [clean[i] for i in keep], corrupt


def study_c(lm, bridge, n: int) -> dict:
    """Total effects of every head and MLP at the final position, content-permuted source."""
    from transformer_lens import patching as tlp

    from mechrepro.studies.mcq_circuits import data as mcq
    from mechrepro.studies.mcq_circuits import analysis as ma

    clean, corrupt = mcq_prompts(lm, n)
    cb, xb = mcq.to_batch(clean, lm.bos_id), mcq.to_batch(corrupt, lm.bos_id)
    if not torch.equal(cb["end"], xb["end"]):
        raise SystemExit("a content-permuted prompt changed length")
    model = lm.model
    L, H = model.spec.n_layers, model.spec.n_heads
    p = cb["tokens"].shape[1]

    def tl_metric(logits):
        opt = ma.option_logits(logits[:, -1], cb["answer_ids"])
        return ma.ld_from_options(opt, cb["correct"]).mean()

    def tl():
        _, src_cache = bridge.run_with_cache(xb["tokens"])
        base = tl_metric(bridge(cb["tokens"]))
        heads_idx = pd.DataFrame([(l, p - 1, h) for l in range(L) for h in range(H)], columns=["layer", "pos", "head"])
        heads = tlp.get_act_patch_attn_head_out_by_pos(bridge, cb["tokens"], src_cache, tl_metric,
                                                       index_axis_names=None, index_df=heads_idx)
        mlp_idx = pd.DataFrame([(l, p - 1) for l in range(L)], columns=["layer", "pos"])
        mlps = tlp.get_act_patch_mlp_out(bridge, cb["tokens"], src_cache, tl_metric, index_axis_names=None,
                                         index_df=mlp_idx)
        return torch.as_tensor(heads).reshape(L, H) - base, torch.as_tensor(mlps).reshape(L) - base

    with torch.no_grad():
        (tl_heads, tl_mlps), t_tl = timed(tl)
    res, t_ours = timed(lambda: ma.patch_nodes(model, cb, xb))
    diff = max((res["heads_total"] - tl_heads).abs().max().item(), (res["mlps_total"] - tl_mlps).abs().max().item())
    return sweep(t_tl, t_ours, diff, n_prompts=n, seq_len=p,
                 what=f"total effect of {L * H} heads and {L} MLPs at the final position on {n} prompts of {p} tokens "
                      "(the engine also computes the direct effects)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--n-pairs", type=int, default=1000, help="Study B: held-out pairs (the stage: 1000)")
    ap.add_argument("--layer", type=int, default=22, help="Study B: site layer (22 = SmolLM2's, from its circuit)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--n-mcq", type=int, default=16, help="Study C: prompts")
    ap.add_argument("--studies", nargs="+", choices=["b", "c"], default=["b", "c"], help="which sweeps to run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_sweeps.json")
    args = ap.parse_args(argv)

    lm, bridge, info = load(args)
    results = {**info, "sweeps": {}}
    if "b" in args.studies:
        results["sweeps"]["study_b_table1"] = study_b(lm, bridge, args.n_pairs, args.layer, args.batch_size)
    if "c" in args.studies:
        results["sweeps"]["study_c_nodes"] = study_c(lm, bridge, args.n_mcq)
    report(results, f"model {results['model']}; torch threads {results['threads']}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
