"""Stage functions of Study C (multiple-choice "correct letter" circuits), one per Snakemake rule.

``R = results/mcq_circuits``. The model is ``mcq.model``: ``organism`` (trained by
:func:`mcq_model`) or a registry name (prepared like any model). Every analysis runs on the
normal-label (ABCD) items the model answers correctly (at most ``mcq.n_analysis``), so the label
step is isolated from knowledge; the accuracy table and the mutations use the evaluated items.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from mechrepro.workflow import artifacts as art
from mechrepro.studies.mcq_circuits import data as mcq
from mechrepro.studies.mcq_circuits import analysis as ma
from mechrepro.studies.mcq_circuits import metrics as M
from mechrepro.studies.mcq_circuits import verify as V
from mechrepro.workflow import stage

log = logging.getLogger("mechrepro")

ORGANISM = "organism"


# --------------------------------------------------------------------------------------- helpers
def _load_prompts(path: str, key: str = "prompts") -> tuple[dict, list[mcq.Prompt]]:
    data = art.read_json(path)
    return data, [mcq.prompt_from_dict(p) for p in data[key]]


def _correct_rows(accuracy_csv: str) -> list[int]:
    """Indices of the items answered correctly under normal labels."""
    frame = pd.read_csv(accuracy_csv)
    return frame.index[frame["correct"] > 0.5].tolist()


def _analysis_prompts(snk, lm, limit: int | None) -> tuple[list[mcq.Prompt], list[mcq.Prompt]]:
    """Clean and content-permuted prompts of the correctly answered ABCD items (at most ``limit``)."""
    data, clean = _load_prompts(snk.input.data)
    corrupt = [mcq.prompt_from_dict(p) for p in data["corrupted"]]
    keep = _correct_rows(snk.input.accuracy)
    if limit is not None:
        keep = keep[:limit]
    if len(keep) < 2:
        raise ValueError(f"only {len(keep)} normal-label items are answered correctly "
                         f"({snk.input.accuracy}); the analyses need at least 2")
    return [clean[i] for i in keep], [corrupt[i] for i in keep]


def _chunks(prompts: list[mcq.Prompt], size: int, pad: int):
    for i in range(0, len(prompts), size):
        yield mcq.to_batch(prompts[i:i + size], pad)


# --------------------------------------------------------------------------------------- stages
def mcq_model(snk) -> None:
    """Train the organism (``mcq.model: organism``) or prepare a registry model."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    out = Path(snk.output.manifest).parent
    if out.exists() and cfg["model"] == ORGANISM:
        import shutil

        shutil.rmtree(out)  # a rerun must not list the previous run's files (e.g. the old sidecar) as model files
    t = time.time()
    if cfg["model"] == ORGANISM:
        from mechrepro.studies.mcq_circuits.organism import save, train
        from mechrepro.core.registry import gpt2_tokenizer

        tok = gpt2_tokenizer()
        org, summary = train(cfg["organism"], tok, tok.bos_token_id, snk.config["seed"], progress=log.info)
        manifest = save(org, tok, out, summary)
        summary["model"] = manifest["name"]
    else:
        from mechrepro.core.registry import prepare_model

        manifest = prepare_model(cfg["model"], out, seed=snk.config["seed"])
        summary = {"model": manifest["name"], "trained": False, "description": manifest["description"]}
        stage.check_config_against_model(snk)
    summary.setdefault("timings", {})["total_seconds"] = round(time.time() - t, 1)
    log.info("%s ready in %.0fs: %s", manifest["name"], time.time() - t, manifest["description"])
    prov = stage.prov(snk, manifest)
    art.write_provenance(snk.output.manifest, prov)
    art.save_json(snk.output.training, summary, prov)


def mcq_dataset(snk) -> None:
    """The evaluated items under one label set (and, for ABCD, their content-permuted versions)."""
    from mechrepro.core.registry import load_model

    stage.setup(snk)
    cfg = snk.config["mcq"]
    seed = snk.config["seed"]
    name = snk.wildcards.labels
    lm = load_model(Path(snk.input.manifest).parent)
    items, shots, source = mcq.evaluation_items(cfg["model"] == ORGANISM, cfg["n_items"], cfg["n_shots"], seed,
                                                cfg["organism"]["tasks"])
    prompts = mcq.make_prompts(items, name, lm.tokenizer, lm.bos_id, seed, shots)
    data = {"label_set": name, "model": lm.name, "source": source, "n": len(items),
            "items": [it.to_dict() for it in items], "shots": [s.to_dict() for s in shots],
            "prompts": [asdict(p) for p in prompts]}
    if name == "abcd":
        data["corrupted"] = [asdict(p) for p in mcq.corrupted_prompts(items, lm.tokenizer, lm.bos_id, shots)]
    log.info("%s: %d items, e.g.\n%s", name, len(items), prompts[0].text)
    art.save_json(snk.output[0], data, stage.prov(snk, lm.manifest))


def mcq_accuracy(snk) -> None:
    """Accuracy, loss and LD of the model on one label set (Analysis 1)."""
    stage.setup(snk)
    lm = stage.load_model(snk)
    data, prompts = _load_prompts(snk.input.data)
    bs = snk.config["mcq"]["batch_size"]
    res = M.evaluate_batches(lm.model, _chunks(prompts, bs, lm.bos_id), batch_size=bs)
    frame, summary = M.accuracy_table(data["items"], prompts, res, data["label_set"], lm.name)
    log.info("%s: accuracy %.3f, loss %.3f, LD %.3f", data["label_set"], summary["accuracy"], summary["loss"],
             summary["ld"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_dla(snk) -> None:
    """Direct logit attribution of every head and MLP at the final position (Analysis 2)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    clean, _ = _analysis_prompts(snk, lm, cfg["n_analysis"])
    dl, correct = M.dla_batches(lm.model, _chunks(clean, cfg["batch_size"], lm.bos_id))
    frame = M.dla_table(dl, correct, M.option_letters(len(clean[0].labels)))
    summary = M.dla_summary(dl, frame, cfg["top_k"], lm.name, len(clean))
    log.info("DLA on %d prompts: LD %.3f, parts sum to %.3f (max error %.2e); top-%d nodes carry %.1f%% of |DLA|",
             len(clean), summary["ld"], summary["dla_total"], summary["max_abs_sum_error"], summary["top_k"],
             100 * summary["top_k_share_abs"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_patching(snk) -> None:
    """Total and direct effects of patching each node from the content-permuted prompt (Analysis 3)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    clean, corrupt = _analysis_prompts(snk, lm, cfg["n_analysis"])
    bs = cfg["batch_size"]
    t = time.time()
    res, n = M.patching_means(lm.model, zip(_chunks(clean, bs, lm.bos_id), _chunks(corrupt, bs, lm.bos_id)),
                              cfg["max_rows"],
                              progress=lambda n: log.info("patched %d/%d prompts (%.0fs)", n, len(clean), time.time() - t))
    frame = M.patching_table(res)
    summary = M.patching_summary(frame, res, n, lm.name)
    summary["timings"] = {"patching_seconds": round(time.time() - t, 1)}
    log.info("patching: clean LD %.3f, corrupted LD %.3f; flagged (large total, small direct): %s",
             summary["clean_ld"], summary["corrupt_ld"], summary["flagged"])
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_heads(snk) -> None:
    """Attention statistics and categories of every head (Analysis 4)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    clean, _ = _analysis_prompts(snk, lm, cfg["n_analysis"])
    mean, n = M.head_means(lm.model, _chunks(clean, cfg["batch_size"], lm.bos_id))
    dla = pd.read_csv(snk.input.dla).set_index("node")
    frame = M.heads_table(mean, dla, M.option_letters(len(clean[0].labels)))
    log.info("head categories: %s", frame.category.value_counts().to_dict())
    stage.save_table_and_summary(snk, frame, M.heads_summary(frame, n, lm.name), lm.manifest)


def mcq_verify(snk) -> None:
    """The checks of a genuine correct-letter head, for every head (:mod:`~mechrepro.studies.mcq_circuits.verify`)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    th = dict(cfg["verify"])
    lm = stage.load_model(snk)
    model, bs, pad = lm.model, cfg["batch_size"], lm.bos_id
    clean, _ = _analysis_prompts(snk, lm, th["n_prompts"])
    keep = _correct_rows(snk.input.accuracy)[:th["n_prompts"]]
    sets = {"abcd": clean}
    if snk.input.random_letters:
        _, rl = _load_prompts(snk.input.random_letters[0])
        sets["random_letters"] = [rl[i] for i in keep]
    means = {s: M.head_means(model, _chunks(ps, bs, pad))[0] for s, ps in sets.items()}
    letters = V.letter_tokens([p for ps in sets.values() for p in ps])
    swapped = V.swap_prompts(clean, letters, snk.config["seed"])
    swap = V.label_swap(model, (V.swap_batch(swapped[i:i + bs], pad) for i in range(0, len(swapped), bs)))
    every = [p for ps in sets.values() for p in ps]
    ov = V.ov_copying(model, _chunks(every, bs, pad), letters)
    key_r2 = None
    if "random_letters" in sets:
        keys = torch.cat([V.label_keys(model, b) for b in _chunks(sets["random_letters"], bs, pad)])
        key_r2 = V.key_position_r2(keys)
    patch = pd.read_csv(snk.input.patching).set_index("node")
    L, H = model.spec.n_layers, model.spec.n_heads
    names = [M.node_name(l, h) for l in range(L) for h in range(H)]
    frame = V.verify_table(names, V.attention_checks(means), patch, art.read_json(snk.input.patching_json), swap, ov,
                           key_r2, th)
    summary = V.verify_summary(frame, th, {s: len(ps) for s, ps in sets.items()}, ov["letters"], lm.name)
    summary["swap_model"] = float(swap["model"])
    log.info("label swap: the model follows the new letter on %.3f of prompts; heads passing every check: %s",
             summary["swap_model"], summary["heads_passing"] or "none")
    stage.save_table_and_summary(snk, frame, summary, lm.manifest)


def mcq_low_rank(snk) -> None:
    """Low-rank compression of the top correct-letter head's q/k/v (Analysis 5)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    model = lm.model
    clean, _ = _analysis_prompts(snk, lm, cfg["n_analysis"])
    head, why, verified = M.pick_head(pd.read_csv(snk.input.heads), pd.read_csv(snk.input.verify))
    fit_p, test_p = M.fit_test_split(clean)
    fit_b, test_b = mcq.to_batch(fit_p, lm.bos_id), mcq.to_batch(test_p, lm.bos_id)
    fits, mean_z = M.fit_head(model, fit_b, head)
    losses = M.low_rank_losses(model, test_b, head, fits, mean_z, cfg["low_rank"]["ranks"], cfg["batch_size"])
    full, ablated = losses["full"], losses["ablated"]
    log.info("low rank of L%dH%d (%s): loss full %.4f, ablated %.4f, q/k/v at rank r: %s", head[0], head[1], why,
             full["loss"], ablated["loss"], {r: round(v["loss"], 4) for r, v in losses["by_kind"]["qkv"].items()})
    # keys at the label positions in the top-3 key directions, for normal and random-letter labels
    rows = []
    for path in snk.input.keys_data:
        data, prompts = _load_prompts(path)
        prompts = prompts[:len(clean)]
        rows += M.key_projections(model, mcq.to_batch(prompts, lm.bos_id), prompts, head, fits["k"], data["label_set"])
    keys = pd.DataFrame(rows)
    summary = M.low_rank_summary(lm.name, head, why, model.spec.d_head, len(fit_p), len(test_p), losses, fits,
                                 cfg["low_rank"]["mutation_rank"], M.key_position_r2(keys))
    summary["verified"] = verified
    prov = stage.prov(snk, lm.manifest)
    art.save_json(snk.output.json, summary, prov)
    art.save_csv(snk.output.key_scatter, keys, prov)
    tensors = {f"{k}_{part}": fits[k][part].float().contiguous().cpu() for k in ma.KINDS for part in ("mean", "basis")}
    tensors["mean_z"] = mean_z.float().contiguous().cpu()
    art.save_safetensors(snk.output.basis, tensors, prov)


def mcq_mutations(snk) -> None:
    """One label set with the head full, low-rank, or mean-ablated (Analysis 6, the paper's Figure 11)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    lm = stage.load_model(snk)
    model = lm.model
    lr = art.read_json(snk.input.low_rank)
    head = (lr["layer"], lr["head_index"])
    keys = [f"{k}_{part}" for k in ma.KINDS for part in ("mean", "basis")] + ["mean_z"]
    t, _ = art.load_safetensors(snk.input.basis, keys=keys, rule="mcq_low_rank")
    dev = torch.get_default_device()
    fits = {k: {"mean": t[f"{k}_mean"].to(dev), "basis": t[f"{k}_basis"].to(dev)} for k in ma.KINDS}
    data, prompts = _load_prompts(snk.input.data)
    keep = _correct_rows(snk.input.accuracy)
    prompts = [prompts[i] for i in keep]
    r = lr["mutation_rank"]
    bs = cfg["batch_size"]
    settings = M.mutation_settings(model, head, fits, t["mean_z"].to(dev), r)
    out = {"label_set": data["label_set"], "model": lm.name, "head": lr["head"], "rank": r, "n": len(prompts),
           **M.evaluate_settings(model, list(_chunks(prompts, bs, lm.bos_id)), settings, bs)}
    log.info("%s (%d items correct on ABCD): %s", data["label_set"], len(prompts),
             {k: round(out[k]["accuracy"], 3) for k in settings})
    art.save_json(snk.output[0], out, stage.prov(snk, lm.manifest))


def mcq_metrics(snk) -> None:
    """``results/mcq_circuits/metrics.json``: the study's contract (what the paper's claims are tested on)."""
    stage.setup(snk)
    cfg = snk.config["mcq"]
    manifest = art.read_json(snk.input.manifest)
    training = art.read_json(snk.input.training)
    acc = {Path(p).stem: art.read_json(p) for p in snk.input.accuracy}
    muts = {Path(p).stem: art.read_json(p) for p in snk.input.mutations}
    dla = pd.read_csv(snk.input.dla).set_index("node")
    patch = pd.read_csv(snk.input.patching).set_index("node")
    heads = pd.read_csv(snk.input.heads).set_index("node")
    lr = art.read_json(snk.input.low_rank)
    dla_summary = art.read_json(snk.input.dla_json)
    verify = pd.read_csv(snk.input.verify).set_index("node")
    metrics = M.study_metrics(manifest, training, acc, muts, dla, patch, heads, lr, dla_summary, cfg["n_items"],
                              cfg["top_k"], verify, art.read_json(snk.input.verify_json), cfg["min_competence"],
                              cfg["min_head_effect"])
    art.save_json(snk.output[0], metrics, stage.prov(snk, manifest))
