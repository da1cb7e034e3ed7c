"""Patching engine against naive reference implementations written here."""

from __future__ import annotations

import pytest
import torch

from mechrepro.core import patching as P
from mechrepro.core.model import Transformer


def _clean_and_corrupt(model, batch):
    names = P.z_names(model) + [f"blocks.{l}.hook_resid_pre" for l in range(model.spec.n_layers)] + \
        ["ln_final.hook_in"]
    logits, cache = P.run_end_logits(model, batch["tokens"], batch["end"], cache_names=names)
    _, cache_abc = P.run_end_logits(model, batch["abc"], batch["end"], cache_names=P.z_names(model))
    return logits, cache, P.stack_z(model, cache), P.stack_z(model, cache_abc)


def _ld(model, batch, hooks=None):
    logits = model(batch["tokens"], hooks=hooks, logits_at=batch["end"])
    return P.logit_diff(logits, batch["io"], batch["s"])


# ------------------------------------------------------------------ metrics
def test_logit_diff_hand_made():
    logits = torch.tensor([[1.0, 5.0, 2.0], [0.0, -1.0, 3.0]])
    ld = P.logit_diff(logits, torch.tensor([1, 0]), torch.tensor([2, 2]))
    torch.testing.assert_close(ld, torch.tensor([3.0, -3.0]))


def test_ioi_metrics_hand_made():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.2, 0.4, 0.4]]))
    io, s = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    m = P.ioi_metrics(logits, io, s)
    torch.testing.assert_close(m["ld"], torch.log(torch.tensor([2.0, 1 / 7, 1.0])))
    torch.testing.assert_close(m["correct"], torch.tensor([1.0, 0.0, 0.0]))  # a tie is not correct
    torch.testing.assert_close(m["p_io"], torch.tensor([0.5, 0.1, 0.4]))


def test_batched_slices():
    assert list(P.batched(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(P.batched(0, 3)) == []


def test_run_end_logits_batches_like_one_pass(models, toy_batch):
    model = models["llama"]
    full = model(toy_batch["tokens"], logits_at=toy_batch["end"])
    logits, cache = P.run_end_logits(model, toy_batch["tokens"], toy_batch["end"], batch_size=4,
                                     cache_names=["blocks.1.attn.hook_z"])
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    ref = {}
    model(toy_batch["tokens"], cache=ref)
    assert set(cache) == {"blocks.1.attn.hook_z"}
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], ref["blocks.1.attn.hook_z"], atol=1e-6, rtol=1e-5)
    # hooks_fn receives the row slice of each batch
    seen = []
    P.run_end_logits(model, toy_batch["tokens"], toy_batch["end"], batch_size=4,
                     hooks_fn=lambda sl: seen.append(sl) or {})
    assert seen == [slice(0, 4), slice(4, 6)]


def test_template_means(toy_batch):
    z = torch.randn(6, 10, 3, 4, 8)
    means = P.template_means(z, toy_batch["template"])
    assert set(means) == {0, 1}
    torch.testing.assert_close(means[0], z[:3].mean(0))
    torch.testing.assert_close(means[1], z[3:].mean(0))


# ------------------------------------------------------------------ mean ablation
def test_ablation_keep_all_is_clean_run(arch, models, toy_batch):
    model = models[arch]
    _, _, z, z_abc = _clean_and_corrupt(model, toy_batch)
    means = P.template_means(z_abc, toy_batch["template"])
    L, H = model.spec.n_layers, model.spec.n_heads
    keep = torch.ones(6, 10, L, H, dtype=torch.bool)
    hooks = P.ablation_hooks(model, keep, means, toy_batch["template"])
    torch.testing.assert_close(_ld(model, toy_batch, hooks), _ld(model, toy_batch), atol=1e-5, rtol=1e-5)


def test_ablation_keep_none_equals_naive_mean_replacement(arch, models, toy_batch):
    model = models[arch]
    _, _, z, z_abc = _clean_and_corrupt(model, toy_batch)
    means = P.template_means(z_abc, toy_batch["template"])
    L, H = model.spec.n_layers, model.spec.n_heads
    keep = torch.zeros(6, 10, L, H, dtype=torch.bool)
    hooks = P.ablation_hooks(model, keep, means, toy_batch["template"])

    # naive: every z of prompt i replaced by the mean over the ABC prompts of i's template
    t = toy_batch["template"]

    def naive(layer):
        def fn(zz):
            out = zz.clone()
            for i in range(zz.shape[0]):
                same = (t == t[i]).nonzero().flatten()
                out[i] = z_abc[same, :, layer].mean(0)
            return out
        return fn

    naive_hooks = {f"blocks.{l}.attn.hook_z": naive(l) for l in range(L)}
    ours, ref = _ld(model, toy_batch, hooks), _ld(model, toy_batch, naive_hooks)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ref - _ld(model, toy_batch)).abs().max() > 1e-2  # the ablation does something


def test_ablation_mixed_mask_matches_naive(models, toy_batch):
    """Keep one head at one (per-prompt) position only; ablate everything else."""
    model = models["llama"]
    _, _, z, z_abc = _clean_and_corrupt(model, toy_batch)
    means = P.template_means(z_abc, toy_batch["template"])
    L, H = model.spec.n_layers, model.spec.n_heads
    keep = torch.zeros(6, 10, L, H, dtype=torch.bool)
    rows, pos = torch.arange(6), toy_batch["pos"]
    keep[rows, pos, 1, 2] = True
    keep[:, :, 0, 3] = True
    hooks = P.ablation_hooks(model, keep, means, toy_batch["template"])
    t = toy_batch["template"]

    def naive(layer):
        def fn(zz):
            out = zz.clone()
            for i in range(6):
                mean = z_abc[t == t[i], :, layer].mean(0)  # [p, h, e]
                for p_ in range(zz.shape[1]):
                    for h in range(H):
                        if not ((layer == 1 and h == 2 and p_ == pos[i]) or (layer == 0 and h == 3)):
                            out[i, p_, h] = mean[p_, h]
            return out
        return fn

    ref = _ld(model, toy_batch, {f"blocks.{l}.attn.hook_z": naive(l) for l in range(L)})
    torch.testing.assert_close(_ld(model, toy_batch, hooks), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ sender deltas and direct effects
def test_sender_deltas_naive(models, toy_batch):
    model = models["gpt2"]
    _, _, z, z_abc = _clean_and_corrupt(model, toy_batch)
    senders = [(0, 1), (2, 3)]
    d = P.sender_deltas(model, z, z_abc, senders, toy_batch["pos"])
    assert d.shape == (2, 6, 32)
    for j, (l, h) in enumerate(senders):
        for i in range(6):
            p_ = toy_batch["pos"][i]
            ref = (z_abc[i, p_, l, h] - z[i, p_, l, h]) @ model.p(f"blocks.{l}.W_O")[h]
            torch.testing.assert_close(d[j, i], ref, atol=1e-6, rtol=1e-5)
    assert P.sender_deltas(model, z, z_abc, [], toy_batch["pos"]).shape == (0, 6, 32)


def test_direct_effects_equal_naive(arch, models, toy_batch):
    model = models[arch]
    _, cache, z, z_abc = _clean_and_corrupt(model, toy_batch)
    rows, end = torch.arange(6), toy_batch["end"]
    resid_final = cache["ln_final.hook_in"][rows, end]
    senders = [(l, h) for l in range(model.spec.n_layers) for h in range(model.spec.n_heads)]
    deltas = P.sender_deltas(model, z, z_abc, senders, end)
    ld = P.direct_effects(model, resid_final, deltas, toy_batch["io"], toy_batch["s"])
    assert ld.shape == (len(senders), 6)
    for j in (0, 5, len(senders) - 1):
        # naive 1: final norm + full unembedding of the patched final residual
        logits = model.final_norm(resid_final + deltas[j]) @ model.W_U
        torch.testing.assert_close(ld[j], P.logit_diff(logits, toy_batch["io"], toy_batch["s"]),
                                   atol=1e-4, rtol=1e-4)

        # naive 2: a full model run adding the delta to the final residual at END only
        def add(x, j=j):
            x = x.clone()
            x[rows, end] += deltas[j]
            return x

        ref = _ld(model, toy_batch, {"ln_final.hook_in": add})
        torch.testing.assert_close(ld[j], ref, atol=1e-4, rtol=1e-4)
    # zero delta = clean LD
    ld0 = P.direct_effects(model, resid_final, torch.zeros(1, 6, 32), toy_batch["io"], toy_batch["s"])
    torch.testing.assert_close(ld0[0], _ld(model, toy_batch), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ path patching
# Senders write and receivers read at one position per prompt: END for query receivers (as for the
# name movers' queries), an earlier position for key / value receivers (as S2, S1+1).
def _pos(batch, kind):
    return batch["end"] if kind == "q" else batch["pos"]


def _resid_pre(model, cache):
    return {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(model.spec.n_layers)}


def _naive_path_patch(model, batch, delta, sender_layer, receivers, pos):
    """Full run from layer 0 with each receiver head's own input replaced by the clean residual, plus
    the delta at ``pos`` when the receiver lies above the sender (the direct path, step 3 replacing)."""
    rows = torch.arange(len(batch["tokens"]))
    clean = {}
    model(batch["tokens"], cache=clean, cache_names=[f"blocks.{l}.hook_resid_pre" for l, _, _ in receivers])
    by_key = {}
    for l, h, kind in receivers:
        by_key.setdefault((l, kind), []).append(h)
    hooks = {}
    for (l, kind), heads in by_key.items():
        def fn(x, l=l, heads=heads):
            x = x.clone()
            for h in heads:
                x[:, :, h] = clean[f"blocks.{l}.hook_resid_pre"]
                if l > sender_layer:
                    x[rows, pos, h] = x[rows, pos, h] + delta
            return x
        hooks[f"blocks.{l}.attn.hook_{kind}_input"] = fn
    return _ld(model, batch, hooks)


def _activation_path_patch(model, batch, delta, layer, head, kind, pos):
    """Independent of per-head inputs: run once with the delta added to the whole residual at
    ``pos``, read the receiver's q/k/v there, and write only that head's copy into a clean run
    (k/v are expanded to one copy per query head so a GQA group partner is not affected)."""
    rows = torch.arange(len(batch["tokens"]))
    H = model.spec.n_heads
    rep = H // model.spec.n_kv_heads

    def add(x):
        x = x.clone()
        x[rows, pos] += delta
        return x

    name = f"blocks.{layer}.attn.hook_{kind}"
    patched = {}
    model(batch["tokens"], hooks={f"blocks.{layer}.hook_resid_pre": add}, cache=patched, cache_names=[name])
    src = patched[name]
    if src.shape[2] != H:
        src = src.repeat_interleave(rep, dim=2)

    def write(x):
        if x.shape[2] != H:
            x = x.repeat_interleave(rep, dim=2)
        x = x.clone()
        x[rows, pos, head] = src[rows, pos, head]
        return x

    return _ld(model, batch, {name: write})


@pytest.mark.parametrize("arch_name,receiver", [
    ("gpt2", (2, 1, "q")),
    ("gpt2", (1, 0, "v")),
    ("gpt2", (2, 3, "k")),
    ("llama", (2, 1, "k")),
    ("llama", (1, 3, "v")),
    ("llama", (2, 0, "q")),
    ("qwen2", (2, 2, "k")),
    ("qwen2", (1, 1, "v")),
])
def test_path_patch_single_receiver_equals_naive(models, toy_batch, arch_name, receiver):
    model = models[arch_name]
    _, cache, z, z_abc = _clean_and_corrupt(model, toy_batch)
    l, h, kind = receiver
    pos = _pos(toy_batch, kind)
    sender = (0, 2)
    deltas = P.sender_deltas(model, z, z_abc, [sender], pos)
    ld = P.path_patch(model, toy_batch["tokens"], toy_batch["end"], toy_batch["io"], toy_batch["s"],
                      _resid_pre(model, cache), deltas, [sender[0]], [receiver], pos)
    assert ld.shape == (1, 6)
    naive = _naive_path_patch(model, toy_batch, deltas[0], sender[0], [receiver], pos)
    torch.testing.assert_close(ld[0], naive, atol=1e-4, rtol=1e-4)
    act = _activation_path_patch(model, toy_batch, deltas[0], l, h, kind, pos)
    torch.testing.assert_close(ld[0], act, atol=1e-4, rtol=1e-4)
    assert (ld[0] - _ld(model, toy_batch)).abs().max() > 1e-3  # the patch has an effect


@pytest.mark.parametrize("kind", ["k", "v"])
def test_gqa_path_patch_does_not_touch_group_partner(models, toy_batch, kind):
    """Head 1 shares its key/value head with head 0: patching head 1's input must differ from
    patching the shared key/value (which would also change head 0)."""
    model = models["llama"]
    assert model.kv_group(0) == model.kv_group(1)
    _, cache, z, z_abc = _clean_and_corrupt(model, toy_batch)
    pos = toy_batch["pos"]
    deltas = P.sender_deltas(model, z, z_abc, [(0, 2)], pos)
    common = (model, toy_batch["tokens"], toy_batch["end"], toy_batch["io"], toy_batch["s"],
              _resid_pre(model, cache), deltas, [0])
    ld_1 = P.path_patch(*common, [(2, 1, kind)], pos)[0]
    ld_01 = P.path_patch(*common, [(2, 0, kind), (2, 1, kind)], pos)[0]
    assert (ld_1 - ld_01).abs().max() > 1e-4
    naive = _naive_path_patch(model, toy_batch, deltas[0], 0, [(2, 0, kind), (2, 1, kind)], pos)
    torch.testing.assert_close(ld_01, naive, atol=1e-4, rtol=1e-4)


def test_path_patch_many_senders_chunked(models, toy_batch):
    """Several senders in different layers, several receivers, forced into chunks of one sender."""
    model = models["llama"]
    _, cache, z, z_abc = _clean_and_corrupt(model, toy_batch)
    pos = toy_batch["pos"]
    senders = [(0, 0), (0, 3), (1, 1), (2, 2)]
    receivers = [(1, 0, "v"), (1, 1, "v"), (2, 3, "k"), (2, 1, "v")]
    deltas = P.sender_deltas(model, z, z_abc, senders, pos)
    layers = [l for l, _ in senders]
    args = (model, toy_batch["tokens"], toy_batch["end"], toy_batch["io"], toy_batch["s"],
            _resid_pre(model, cache), deltas, layers, receivers, pos)
    ld_one = P.path_patch(*args, max_rows=6)  # one sender per forward pass
    ld_all = P.path_patch(*args, max_rows=512)
    assert ld_all.shape == (4, 6)
    torch.testing.assert_close(ld_one, ld_all, atol=1e-5, rtol=1e-5)
    clean = _ld(model, toy_batch)
    for j, (l, _h) in enumerate(senders):
        naive = _naive_path_patch(model, toy_batch, deltas[j], l, receivers, pos)
        torch.testing.assert_close(ld_all[j], naive, atol=1e-4, rtol=1e-4)
    # a sender in the last layer reaches no receiver: clean LD
    torch.testing.assert_close(ld_all[3], clean, atol=1e-5, rtol=1e-5)
    # a layer-1 sender reaches only layer-2 receivers: differs from adding it everywhere
    everywhere = _naive_path_patch(model, toy_batch, deltas[2], -1, receivers, pos)
    assert (everywhere - ld_all[2]).abs().max() > 1e-4


def _attribution_vs_finite_difference(model, batch, receivers, pos):
    _, cache, z, z_abc = _clean_and_corrupt(model, batch)
    senders = [(0, 0), (0, 2), (1, 1), (2, 0)]
    deltas = P.sender_deltas(model, z, z_abc, senders, pos)
    layers = [l for l, _ in senders]
    common = (model, batch["tokens"], batch["end"], batch["io"], batch["s"], _resid_pre(model, cache))
    attr = P.path_patch_attribution(*common, deltas, layers, receivers, pos)
    assert attr.shape == (4,)
    eps = 1e-3
    up = P.path_patch(*common, eps * deltas, layers, receivers, pos).mean(1)
    down = P.path_patch(*common, -eps * deltas, layers, receivers, pos).mean(1)
    clean = _ld(model, batch).mean()
    return attr.double(), (up - clean) / eps, (up - down) / (2 * eps)


@pytest.mark.parametrize("arch_name,receivers,role", [
    ("gpt2", [(2, 1, "q"), (2, 3, "q")], "end"),
    ("gpt2", [(1, 2, "v"), (1, 0, "k")], "pos"),
    ("llama", [(2, 1, "k"), (2, 0, "v")], "pos"),
    ("qwen2", [(2, 1, "q")], "end"),
])
def test_path_patch_attribution_is_first_derivative(hf_models, toy_batch, arch_name, receivers, role):
    """Receivers in one layer: the attribution equals the derivative of path_patch (float64)."""
    model = Transformer.from_hf(hf_models[arch_name]).double()
    attr, fd_forward, fd_central = _attribution_vs_finite_difference(model, toy_batch, receivers,
                                                                     toy_batch[role])
    torch.testing.assert_close(attr, fd_central, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(attr, fd_forward, rtol=1e-3, atol=1e-5)
    reach = [i for i, l in enumerate([0, 0, 1, 2]) if l < receivers[0][0]]
    assert attr[reach].abs().min() > 1e-4  # non-trivial for senders that reach a receiver
    assert attr[3] == 0  # a last-layer sender reaches no receiver


@pytest.mark.parametrize("arch_name,receivers,role", [
    ("gpt2", [(1, 2, "q"), (2, 1, "q")], "end"),
    ("llama", [(1, 2, "v"), (2, 1, "k")], "pos"),
])
def test_path_patch_attribution_receivers_in_several_layers(hf_models, toy_batch, arch_name, receivers,
                                                             role):
    model = Transformer.from_hf(hf_models[arch_name]).double()
    attr, _, fd_central = _attribution_vs_finite_difference(model, toy_batch, receivers, toy_batch[role])
    torch.testing.assert_close(attr, fd_central, rtol=1e-4, atol=1e-7)
