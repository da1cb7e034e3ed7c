"""Benchmark: the project's patching engine vs TransformerLens's patching utilities.

Same model, prompts and metric, side by side in one run on one machine. Two head sweeps:

* **END** — each head's output (``z``) patched at the END position only
  (TransformerLens: ``get_act_patch_attn_head_out_by_pos`` restricted to pos = END);
* **all positions** — each head's output patched at every position at once
  (TransformerLens: ``get_act_patch_attn_head_out_all_pos``).

Direction as in TransformerLens: the corrupted (ABC) prompts run, the clean IOI prompt's head
output is patched in; metric = logit(IO) - logit(S) at END, averaged over prompts. We print wall
times, the speed-up and the maximum absolute difference of the two effect tensors.

Usage: python benchmarks/patching_engine.py [--model-dir resources/models/smollm2-135m] [--n-prompts 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(lm, n: int, seed: int = 0):
    """``n`` base IOI prompts of one template (equal length, as TransformerLens's by-pos index needs)."""
    from mechrepro.studies.ioi_generalization.data import make_dataset, to_batch

    data = yaml.safe_load((ROOT / "config" / "ioi_data.yaml").read_text())
    data["templates"] = data["templates"][:1]
    ds = make_dataset(data, "base", n, lm.tokenizer, lm.bos_id, seed)
    return to_batch(ds, lm.bos_id)


def boot_transformer_lens(model_dir: Path):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)  # weight processing changes Llama logits
    return bridge


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# ---- shared by the benchmark scripts: model arguments, loading, one result row, the report
def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model-dir", type=Path, default=ROOT / "resources" / "models" / "smollm2-135m")
    ap.add_argument("--model", default="smollm2-135m", help="prepared into --model-dir if missing")


def load(args):
    """The model of ``--model-dir`` (prepared from ``--model`` if missing), its TransformerLens
    bridge, and the run's description (model, threads, machine, torch version)."""
    from mechrepro.core.registry import load_model, prepare_model

    torch.manual_seed(0)
    if not (args.model_dir / "manifest.json").exists():
        prepare_model(args.model, args.model_dir)
    lm = load_model(args.model_dir)
    info = {"model": lm.description(), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    return lm, boot_transformer_lens(args.model_dir), info


def sweep(t_tl: float, t_ours: float, max_abs_diff: float, **extra) -> dict:
    return {"transformer_lens_s": t_tl, "engine_s": t_ours, "speedup": t_tl / t_ours, "max_abs_diff": max_abs_diff,
            **extra}


def report(results: dict, headline: str, out: Path) -> None:
    """Print the sweeps as a table under ``headline`` and write ``results`` to ``out`` (JSON)."""
    print(headline)
    print(f"{'sweep':<16}{'TransformerLens s':>19}{'engine s':>10}{'speed-up':>10}{'max |diff|':>12}")
    for name, r in results["sweeps"].items():
        what = f"   {r['what']}" if "what" in r else ""
        print(f"{name:<16}{r['transformer_lens_s']:>19.1f}{r['engine_s']:>10.2f}{r['speedup']:>9.1f}x"
              f"{r['max_abs_diff']:>12.2e}{what}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "patching_engine.json")
    args = ap.parse_args(argv)

    from transformer_lens import patching as tlp

    from mechrepro.core import engine as E

    lm, bridge, info = load(args)
    model = lm.model
    batch = load_prompts(lm, args.n_prompts)
    clean, corrupt, io, s = batch.tokens, batch.abc, batch.io, batch.s
    b, p = clean.shape
    end = torch.full((b,), p - 1)
    L, H = model.spec.n_layers, model.spec.n_heads
    rows = torch.arange(b)

    def ours_metric(logits, r):  # END logits [rows, v]
        return logits[torch.arange(len(r)), io[r]] - logits[torch.arange(len(r)), s[r]]

    def tl_metric(logits):  # [b, p, v]
        last = logits[:, -1]
        return (last[rows, io] - last[rows, s]).mean()

    results = {**info, "n_prompts": b, "seq_len": p, "layers": L, "heads": H}

    # ---- TransformerLens
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        tl_base = tl_metric(bridge(corrupt)).item()
        index = pd.DataFrame([(l, p - 1, h) for l in range(L) for h in range(H)], columns=["layer", "pos", "head"])
        tl_end, t_tl_end = timed(lambda: tlp.get_act_patch_attn_head_out_by_pos(
            bridge, corrupt, clean_cache, tl_metric, index_axis_names=None, index_df=index))
        tl_all, t_tl_all = timed(lambda: tlp.get_act_patch_attn_head_out_all_pos(
            bridge, corrupt, clean_cache, tl_metric))
    tl_end = (torch.as_tensor(tl_end).reshape(L, H) - tl_base).float()
    tl_all = (torch.as_tensor(tl_all).reshape(L, H) - tl_base).float()

    # ---- our engine (the cached runs are part of its time)
    def ours_end():
        base, src = E.base_run(model, corrupt, end), E.base_run(model, clean, end)
        z_end = torch.stack([z[rows, end] for z in src.z], 1)
        return E.patch_heads_end(model, base, z_end, ours_metric)

    def ours_all():
        base, src = E.base_run(model, corrupt, end), E.base_run(model, clean, end)
        return E.patch_heads_all_positions(model, base, src.z, ours_metric)

    our_end, t_our_end = timed(ours_end)
    our_all, t_our_all = timed(ours_all)

    results["sweeps"] = {
        "end": sweep(t_tl_end, t_our_end, (our_end - tl_end).abs().max().item(), n_patches=L * H),
        "all_positions": sweep(t_tl_all, t_our_all, (our_all - tl_all).abs().max().item(), n_patches=L * H),
    }
    report(results, f"model {results['model']}; {b} prompts x {p} tokens; {L * H} heads; "
                    f"torch threads {results['threads']}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
