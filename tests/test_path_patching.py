"""Wang et al.'s path patching (``core.patching``) against a naive reference: three full forward passes
with explicit freezing, as in Wang et al.'s appendix B and the ARENA IOI exercises.

1. clean and ABC runs cache every head's output ``z``;
2. the clean prompt runs with every head's ``z`` set to its clean value except the sender's at the
   sender position (its ABC value); the MLPs recompute (or, for the direct-path variant, are frozen
   to their clean outputs too); the receivers' inputs (the residual stream entering their layer)
   are saved at *every* position;
3. the clean prompt runs with the receivers' per-head inputs replaced by the saved ones at every
   position; the logit difference is read at END.

The engine computes step 2 at one position only and patches the receivers there; the reference
patches every position, so agreement also checks that frozen heads move nothing between positions.
"""

from __future__ import annotations

import pytest
import torch

from mechrepro.core import patching as P


def _runs(model, batch):
    names = P.z_names(model) + [f"blocks.{l}.hook_resid_pre" for l in range(model.spec.n_layers)] + \
        ["ln_final.hook_in"] + P.frozen_cache_names(model)
    logits, cache = P.run_end_logits(model, batch["tokens"], batch["end"], cache_names=names)
    _, cache_abc = P.run_end_logits(model, batch["abc"], batch["end"], cache_names=P.z_names(model))
    return cache, cache_abc


def _naive_step2(model, batch, cache, cache_abc, sender, pos, freeze_mlps, names):
    """Step 2: every head frozen to clean but the sender (ABC at ``pos``); MLPs recomputed or frozen."""
    rows = torch.arange(len(batch["tokens"]))
    L = model.spec.n_layers
    hooks = {}
    for l in range(L):
        def freeze(z, l=l):
            out = cache[f"blocks.{l}.attn.hook_z"].clone()
            if l == sender[0]:
                out[rows, pos, sender[1]] = cache_abc[f"blocks.{l}.attn.hook_z"][rows, pos, sender[1]]
            return out
        hooks[f"blocks.{l}.attn.hook_z"] = freeze
        if freeze_mlps:
            hooks[f"blocks.{l}.hook_mlp_out"] = lambda x, l=l: cache[f"blocks.{l}.hook_mlp_out"].clone()
    saved = {}
    model(batch["tokens"], hooks=hooks, cache=saved, cache_names=names)
    return saved


def _naive_path_patch(model, batch, sender, receivers, pos, freeze_mlps):
    cache, cache_abc = _runs(model, batch)
    names = [f"blocks.{l}.hook_resid_pre" for l in {r[0] for r in receivers}]
    saved = _naive_step2(model, batch, cache, cache_abc, sender, pos, freeze_mlps, names)
    hooks = {}
    for l, h, kind in receivers:
        name = f"blocks.{l}.attn.hook_{kind}_input"
        prev = hooks.get(name)

        def replace(x, l=l, h=h, prev=prev):
            x = prev(x) if prev else x.clone()
            x[:, :, h] = saved[f"blocks.{l}.hook_resid_pre"]  # every position
            return x
        hooks[name] = replace
    logits = model(batch["tokens"], hooks=hooks, logits_at=batch["end"])
    return P.logit_diff(logits, batch["io"], batch["s"])


def _naive_logits(model, batch, sender, freeze_mlps):
    cache, cache_abc = _runs(model, batch)
    saved = _naive_step2(model, batch, cache, cache_abc, sender, batch["end"], freeze_mlps, ["ln_final.hook_in"])
    rows = torch.arange(len(batch["tokens"]))
    logits = model.unembed(saved["ln_final.hook_in"][rows, batch["end"]])
    return P.logit_diff(logits, batch["io"], batch["s"])


def _engine(model, batch, senders, receivers, pos, mode):
    cache, cache_abc = _runs(model, batch)
    z, z_abc = P.stack_z(model, cache), P.stack_z(model, cache_abc)
    deltas = P.sender_deltas(model, z, z_abc, senders, pos)
    frozen = P.frozen_run(model, cache, pos) if mode == "wang" else None
    resid_pre = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(model.spec.n_layers)}
    return P.path_patch(model, batch["tokens"], batch["end"], batch["io"], batch["s"], resid_pre, deltas,
                        [l for l, _ in senders], receivers, pos, max_rows=12, frozen=frozen)


@pytest.mark.parametrize("arch_name,sender,receivers,kind_pos", [
    ("gpt2", (0, 2), [(2, 1, "q")], "end"),
    ("gpt2", (0, 1), [(2, 3, "v"), (1, 0, "v")], "pos"),
    ("llama", (0, 3), [(2, 1, "k")], "pos"),
    ("llama", (1, 0), [(2, 0, "q"), (2, 2, "q")], "end"),
    ("qwen2", (0, 0), [(2, 2, "v"), (2, 3, "k")], "pos"),
])
@pytest.mark.parametrize("mode", ["wang", "direct"])
def test_path_patch_equals_three_pass_reference(models, toy_batch, arch_name, sender, receivers, kind_pos, mode):
    model = models[arch_name]
    pos = toy_batch["end"] if kind_pos == "end" else toy_batch["pos"]
    ours = _engine(model, toy_batch, [sender], receivers, pos, mode)[0]
    ref = _naive_path_patch(model, toy_batch, sender, receivers, pos, freeze_mlps=mode == "direct")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_mlps_recomputed_differs_from_direct_path(models, toy_batch, arch_name):
    """With MLPs between sender and receiver the two variants must differ (and each match its reference)."""
    model = models[arch_name]
    sender, receivers, pos = (0, 1), [(2, 1, "q"), (2, 2, "v")], toy_batch["end"]
    wang = _engine(model, toy_batch, [sender], receivers, pos, "wang")[0]
    direct = _engine(model, toy_batch, [sender], receivers, pos, "direct")[0]
    assert (wang - direct).abs().max() > 1e-3
    ref_w = _naive_path_patch(model, toy_batch, sender, receivers, pos, freeze_mlps=False)
    torch.testing.assert_close(wang, ref_w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("mode", ["wang", "direct"])
def test_path_patch_logits_equals_reference(models, toy_batch, arch_name, mode):
    model = models[arch_name]
    cache, cache_abc = _runs(model, toy_batch)
    z, z_abc = P.stack_z(model, cache), P.stack_z(model, cache_abc)
    rows, end = torch.arange(6), toy_batch["end"]
    senders = [(0, 1), (1, 3), (2, 0)]
    deltas = P.sender_deltas(model, z, z_abc, senders, end)
    frozen = P.frozen_run(model, cache, end) if mode == "wang" else None
    ld = P.path_patch_logits(model, cache["ln_final.hook_in"][rows, end], deltas, [l for l, _ in senders],
                             toy_batch["io"], toy_batch["s"], frozen=frozen, chunk=2)
    for j, sender in enumerate(senders):
        ref = _naive_logits(model, toy_batch, sender, freeze_mlps=mode == "direct")
        torch.testing.assert_close(ld[j], ref, atol=1e-4, rtol=1e-4)
    if mode == "direct":  # the direct path is direct_effects
        torch.testing.assert_close(ld, P.direct_effects(model, cache["ln_final.hook_in"][rows, end], deltas,
                                                        toy_batch["io"], toy_batch["s"]), atol=1e-5, rtol=1e-5)


def test_many_senders_batched_equal_one_by_one(models, toy_batch):
    model = models["llama"]
    senders = [(0, 0), (0, 3), (1, 2), (1, 1)]
    receivers = [(2, 0, "k"), (2, 3, "v")]
    pos = toy_batch["pos"]
    together = _engine(model, toy_batch, senders, receivers, pos, "wang")
    for j, sd in enumerate(senders):
        ref = _naive_path_patch(model, toy_batch, sd, receivers, pos, freeze_mlps=False)
        torch.testing.assert_close(together[j], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["wang", "direct"])
def test_attribution_is_first_derivative(hf_models, toy_batch, mode):
    """In float64 the attribution equals the symmetric finite difference of the exact path patch."""
    from mechrepro.core.model import Transformer

    model = Transformer.from_hf(hf_models["gpt2"]).double()
    batch = dict(toy_batch)
    cache, cache_abc = _runs(model, batch)
    z, z_abc = P.stack_z(model, cache), P.stack_z(model, cache_abc)
    senders = [(0, 0), (0, 2), (1, 3)]
    receivers = [(2, 1, "v"), (2, 2, "k")]
    pos = batch["pos"]
    deltas = P.sender_deltas(model, z, z_abc, senders, pos)
    frozen = P.frozen_run(model, cache, pos) if mode == "wang" else None
    resid_pre = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(3)}
    common = (model, batch["tokens"], batch["end"], batch["io"], batch["s"], resid_pre)
    layers = [l for l, _ in senders]
    attr = P.path_patch_attribution(*common, deltas, layers, receivers, pos, frozen=frozen)
    eps = 1e-4
    up = P.path_patch(*common, eps * deltas, layers, receivers, pos, frozen=frozen).mean(1)
    down = P.path_patch(*common, -eps * deltas, layers, receivers, pos, frozen=frozen).mean(1)
    torch.testing.assert_close(attr.double(), (up - down) / (2 * eps), atol=1e-5, rtol=1e-4)
