"""Study B, IOI part: subspace patching of the name-position feature and its illusion (Table 1).

Makelov, Lange & Nanda (2023, Section 4) patch one direction of GPT-2 small at the END token of
IOI prompts, at layer 8: the layer after the S-inhibition heads have written which name position
holds the subject, and before the name movers read it.

**Data** (:func:`make_pairs`). Templates T0–T2 (``config/subspace_ioi_data.yaml``), all starting
"Then, {N1} and {N2} …, {S} … to". A prompt is *ABB* (IO named first: "Then, A and B …, B … to")
or *BAB* (subject first). The source of each base prompt is the same sentence with the two first
names swapped (ABB ↔ BAB): same IO, same S, only the *position* of the subject changes. The
model answers the IO in both. A patch that carries the position feature from the source into the
base makes the name movers attend to the other name, so the **expected answer after the patch is
the base prompt's S name**. Training pairs use T0–T1, test pairs T2; names, places and objects
are split in half between the two (disjoint), so the test measures generalisation.

**Site** (:func:`resolve_layer`). ``subspace.layer: auto`` picks the last layer that holds an
S-inhibition head of Study A's circuit, provided every name mover sits above it (GPT-2's
reference circuit: S-inhibition heads in layers 7–8, name movers in 9–10 → layer 8). An
integer sets the layer directly; the name movers used below are those above it.

**Directions**, all 1-D and at END:

* ``v_mlp`` — DAS in the MLP hidden activation (``blocks.L.mlp.hook_post``; for a gated MLP the
  input of the down projection); ``v_resid`` — DAS in ``blocks.L.hook_resid_post``. DAS is
  :func:`mechrepro.core.subspace.learn_direction` on cached activations: cross-entropy of the patched
  logits against the expected name.
* ``v_grad`` — the mean over training prompts and name movers of the gradient, w.r.t. the
  residual stream at the site, of the attention-score difference END→pos(N1) − END→pos(N2).
* ``v_mean`` — mean residual of ABB prompts minus that of BAB prompts (training prompts).
* Row / null parts: ``v_mlp`` against the MLP's out (down) projection
  (:func:`mechrepro.core.subspace.mlp_rowspace`), ``v_resid`` against the span of the name movers'
  query weights (:func:`mechrepro.core.subspace.query_rowspace`; with grouped-query attention, the
  query heads' own weights). Each part is re-normalised before patching.

**Speed.** A patch at END changes nothing at earlier positions (attention is causal), so every
patched run recomputes only the END token, from the site upwards, attending to the base run's
cached keys and values (:class:`SiteCache`, :func:`resid_forward`, :func:`mlp_forward`, all
resumed runs of :func:`mechrepro.core.engine.resume`). DAS,
``v_grad`` and the evaluation all use these END-only runs.

**Metrics** on the held-out test pairs: LD = logit(IO) − logit(S) of the base prompt at END;
FLDD = 100 · (1 − mean LD_patched / mean LD_clean) (100 erases the preference for the IO, > 100
flips it); interchange accuracy = share of pairs whose top token over the whole vocabulary is the
expected name (:func:`table1`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechrepro.core import engine as E
from mechrepro.core import subspace as S
from mechrepro.core.threads import one_thread
from mechrepro.core.tokens import pad
from mechrepro.workflow.config import read_yaml
from mechrepro.studies.ioi_generalization.data import DatasetError, render, single_token_words, tokenize
from mechrepro.core.model import Transformer

# Table 1 rows: name -> (site, direction key; None = the full activation).
TABLE1_ROWS: dict[str, tuple[str, str | None]] = {
    "full_mlp": ("mlp", None),
    "v_mlp": ("mlp", "v_mlp"),
    "v_mlp_row": ("mlp", "v_mlp_row"),
    "v_mlp_null": ("mlp", "v_mlp_null"),
    "full_resid": ("resid", None),
    "v_resid": ("resid", "v_resid"),
    "v_resid_row": ("resid", "v_resid_row"),
    "v_resid_null": ("resid", "v_resid_null"),
    "v_grad": ("resid", "v_grad"),
    "v_mean": ("resid", "v_mean"),
}
SITES = ("mlp", "resid")
ORDERS = ("ABB", "BAB")
SLOTS = ("{N1}", "{N2}", "{S}")


# ------------------------------------------------------------------ data
def load_data(path: str | Path) -> dict:
    """Read and check the Study B template file: ``templates`` (id -> text), ``train_templates``,
    ``test_templates``. Raises :class:`DatasetError` naming the file and what to fix."""
    data = read_yaml(path, DatasetError(f"config key 'subspace_ioi.data_file': {path} does not exist; the default is "
                                        "config/subspace_ioi_data.yaml"), DatasetError)
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict) or not data["templates"]:
        raise DatasetError(f"{path}: 'templates' must map template ids to template texts")
    for split in ("train_templates", "test_templates"):
        ids = data.get(split)
        if not isinstance(ids, list) or not ids:
            raise DatasetError(f"{path}: '{split}' must list at least one template id")
        unknown = [t for t in ids if t not in data["templates"]]
        if unknown:
            raise DatasetError(f"{path}: '{split}' names unknown templates {unknown}; known: "
                               f"{', '.join(data['templates'])}")
    overlap = set(data["train_templates"]) & set(data["test_templates"])
    if overlap:
        raise DatasetError(f"{path}: templates {sorted(overlap)} are in both train_templates and test_templates")
    for tid, text in data["templates"].items():
        check_template(text, tid, path)
    return data


def check_template(text: str, tid: str, where: str | Path = "template") -> None:
    """Each of {N1}, {N2}, {S} exactly once and in that order; only {PLACE}/{OBJECT} besides."""
    bad = [p for p in SLOTS if text.count(p) != 1]
    if bad:
        raise DatasetError(f"{where}: template {tid} ('{text}') must contain each of {', '.join(SLOTS)} exactly "
                           f"once; problem with {', '.join(bad)}")
    if not text.index("{N1}") < text.index("{N2}") < text.index("{S}"):
        raise DatasetError(f"{where}: template {tid} ('{text}'): the order must be {{N1}} ... {{N2}} ... {{S}}")
    unknown = set(re.findall(r"\{[^}]*\}", text)) - {*SLOTS, "{PLACE}", "{OBJECT}"}
    if unknown:
        raise DatasetError(f"{where}: template {tid} has unknown placeholders {sorted(unknown)}; allowed: "
                           "{N1} {N2} {S} {PLACE} {OBJECT}")


def split_half(words: Sequence[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Shuffle ``words`` and cut them in two disjoint halves (train gets the extra one if odd)."""
    order = rng.permutation(len(words))
    cut = (len(words) + 1) // 2
    return [words[i] for i in order[:cut]], [words[i] for i in order[cut:]]


def make_pairs(templates: dict, lists: dict, n_train: int, n_test: int, tokenizer, bos_id: int,
               seed: int) -> dict:
    """The ABB ↔ BAB pairs of both splits.

    Args:
        templates: the template file (:func:`load_data`).
        lists: ``names``, ``places``, ``objects`` (e.g. Study A's IOI data file); filtered to
            single tokens (after a space) for ``tokenizer``, then split in half.
        n_train, n_test: pairs per split; base orders alternate ABB/BAB and templates cycle, so
            both are balanced.
    Returns a JSON-able dict: the split word lists and, per split, the pairs (base and source
    texts and tokens, IO / S names and tokens, ``expected_token`` = the S token, positions of
    N1, N2, S2 and END).
    """
    words = {k: single_token_words(list(lists[k]), tokenizer) for k in ("names", "places", "objects")}
    rng = np.random.default_rng([seed, 101])
    halves = {k: split_half(v, rng) for k, v in words.items()}
    need = {"names": 2, "places": 1, "objects": 1}
    for k, (tr, te) in halves.items():
        if min(len(tr), len(te)) < need[k]:
            raise DatasetError(
                f"only {len(words[k])} single-token {k} for this tokenizer; each half (train/test) needs at least "
                f"{need[k]}: add more to '{k}' in the IOI data file (config key ioi.data_file)")
    splits = {}
    for i, split in enumerate(("train", "test")):
        ids = templates[f"{split}_templates"]
        n = n_train if split == "train" else n_test
        names, places, objects = (halves[k][i] for k in ("names", "places", "objects"))
        splits[split] = {"templates": list(ids), "names": names, "places": places, "objects": objects,
                         "pairs": _pairs(templates["templates"], ids, names, places, objects, n, tokenizer, bos_id,
                                         np.random.default_rng([seed, 202 + i]))}
    return {"seed": seed, "templates": dict(templates["templates"]), **splits}


def _pairs(texts: dict, ids: list[str], names, places, objects, n: int, tokenizer, bos_id: int,
           rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(n):
        tid = ids[(i // 2) % len(ids)]
        order = ORDERS[i % 2]
        a, b = rng.choice(len(names), size=2, replace=False)
        io, s = names[a], names[b]
        place, obj = places[rng.integers(len(places))], objects[rng.integers(len(objects))]
        first = {"ABB": (io, s), "BAB": (s, io)}
        base = render(texts[tid], {"N1": first[order][0], "N2": first[order][1], "S": s}, place, obj)
        other = "BAB" if order == "ABB" else "ABB"
        src = render(texts[tid], {"N1": first[other][0], "N2": first[other][1], "S": s}, place, obj)
        ids_b, pos_b = tokenize(base, tokenizer, bos_id)
        ids_s, pos_s = tokenize(src, tokenizer, bos_id)
        if len(ids_b) != len(ids_s) or pos_b != pos_s:
            raise DatasetError(f"the swapped prompt of '{base.text}' does not align with it token by token")
        io_tok = tokenizer(" " + io, add_special_tokens=False)["input_ids"][0]
        s_tok = tokenizer(" " + s, add_special_tokens=False)["input_ids"][0]
        out.append({"id": i, "template": tid, "order": order, "text": base.text, "src_text": src.text,
                    "io": io, "s": s, "place": place, "object": obj, "tokens": ids_b, "src_tokens": ids_s,
                    "io_token": io_tok, "s_token": s_tok, "expected_token": s_tok,
                    "positions": {"N1": pos_b["N1"], "N2": pos_b["N2"], "S2": pos_b["S"], "END": len(ids_b) - 1}})
    return out


@dataclass
class PairBatch:
    """Tensors of one split: ``tokens`` / ``src`` ``[n, p]`` (right-padded), per-row positions
    ``end``, ``n1``, ``n2`` ``[n]``, ``io``, ``s``, ``expected`` token ids ``[n]``, base ``order``."""

    tokens: Tensor
    src: Tensor
    end: Tensor
    n1: Tensor
    n2: Tensor
    io: Tensor
    s: Tensor
    expected: Tensor
    order: list[str]
    template: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def is_abb(self) -> Tensor:
        return torch.tensor([o == "ABB" for o in self.order])


def to_batch(pairs: list[dict], pad_id: int) -> PairBatch:
    """Stack the pairs of one split (every row padded to the split's longest prompt)."""
    if not pairs:
        raise DatasetError("no pairs in this split (subspace_ioi.n_train / n_test must be at least 2)")
    tok = pad([p["tokens"] for p in pairs], pad_id)
    src = pad([p["src_tokens"] for p in pairs], pad_id, width=tok.shape[1])

    def col(key, sub=None):
        return torch.tensor([p[key][sub] if sub else p[key] for p in pairs])

    return PairBatch(tok, src, col("positions", "END"), col("positions", "N1"), col("positions", "N2"),
                     col("io_token"), col("s_token"), col("expected_token"), [p["order"] for p in pairs],
                     [p["template"] for p in pairs])


# ------------------------------------------------------------------ the site layer
class SiteError(ValueError):
    """The site layer cannot be derived from the circuit (or the configured one does not fit)."""


def resolve_layer(setting: str | int, circuit: dict, n_layers: int) -> dict:
    """The site layer and the name movers that read it.

    ``setting`` ``"auto"``: the last layer holding an S-inhibition head of ``circuit`` (Study A's
    ``circuit.json``), which must lie below the first layer holding a name mover — the layer after
    the S-inhibition heads write and before the name movers read. An integer: that layer.
    Returns ``{"layer", "rule", "s_inhibition", "name_movers"}`` (the name movers above the layer,
    used for ``v_grad`` and the residual row space).
    """
    classes = circuit.get("classes", {}) if isinstance(circuit, dict) else {}
    sinh = [tuple(h) for h in classes.get("s_inhibition") or []]
    nms = [tuple(h) for h in classes.get("name_mover") or []]
    fix = "set config key subspace.layer to an integer layer (below the name movers' layers)"
    if not nms:
        raise SiteError("the circuit has no name-mover heads; Study B needs them (v_grad and the residual row "
                        "space read their queries). Rebuild the circuit (snakemake --forcerun ioi_circuit) or use a "
                        "model whose circuit has name movers")
    if setting == "auto":
        if not sinh:
            raise SiteError(f"subspace.layer is 'auto' but the circuit has no S-inhibition heads, so the rule "
                            f"'last S-inhibition layer, below the first name-mover layer' has no answer; {fix}")
        layer = max(l for l, _ in sinh)
        first_nm = min(l for l, _ in nms)
        if layer >= first_nm:
            raise SiteError(
                f"subspace.layer is 'auto' but the circuit's layers are inconsistent with the rule: the last "
                f"S-inhibition head is in layer {layer} and the first name mover in layer {first_nm} (the site must "
                f"lie after the S-inhibition heads and before the name movers); {fix}")
        rule = "auto: last S-inhibition layer, below the first name-mover layer"
    else:
        layer = int(setting)
        rule = "config: subspace.layer"
        if not 0 <= layer < n_layers:
            raise SiteError(f"subspace.layer is {layer} but the model has layers 0-{n_layers - 1}")
    above = sorted(h for h in nms if h[0] > layer)
    if not above:
        raise SiteError(f"no name mover lies above layer {layer} (name movers: "
                        f"{', '.join(f'{l}.{h}' for l, h in sorted(nms))}); {fix}")
    return {"layer": layer, "rule": rule, "s_inhibition": [list(h) for h in sorted(sinh)],
            "name_movers": [list(h) for h in above]}


# ------------------------------------------------------------------ cached runs and END-only forwards
@dataclass
class SiteCache:
    """What the END-only runs of one split need, at site layer ``layer``.

    ``prefix``: keys (after rotary) and values of the base prompts for the layers above the site
    (:class:`mechrepro.core.engine.PrefixCache`); ``resid_mid``: the base residual after layer
    ``layer``'s attention, at END; ``post`` / ``post_src``: MLP hidden activation at END (base /
    source); ``resid`` / ``resid_src``: ``hook_resid_post`` at END; ``clean_ld``, ``clean_top``: the
    base run's LD (IO − S) and top token at END.
    """

    layer: int
    end: Tensor
    prefix: E.PrefixCache
    resid_mid: Tensor
    post: Tensor
    post_src: Tensor
    resid: Tensor
    resid_src: Tensor
    clean_ld: Tensor
    clean_top: Tensor


@torch.no_grad()
def cache_site(model: Transformer, batch: PairBatch, layer: int, batch_size: int = 64,
               progress: Callable[[str], None] | None = None) -> SiteCache:
    """One base run (all layers) and one source run (up to the site) of every pair."""
    if layer >= model.spec.n_layers - 1:
        raise SiteError(f"site layer {layer} has no layer above it (the model has {model.spec.n_layers})")
    above = range(layer + 1, model.spec.n_layers)
    pre = f"blocks.{layer}"
    site_names = [f"{pre}.hook_resid_mid", f"{pre}.mlp.hook_post", f"{pre}.hook_resid_post"]
    prefixes: list[E.PrefixCache] = []
    acts: dict[str, list[Tensor]] = {n: [] for n in ("mid", "post", "resid", "post_src", "resid_src")}
    lds, tops = [], []
    n = len(batch)
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        rows, end = torch.arange(sl.stop - sl.start), batch.end[sl]
        cache: dict[str, Tensor] = {}
        prefix, logits = E.cache_prefix(model, batch.tokens[sl], above, logits_at=end, cache=cache,
                                        cache_names=site_names)
        prefixes.append(prefix)
        rows_io, rows_s = logits[rows, batch.io[sl]], logits[rows, batch.s[sl]]
        lds.append(rows_io - rows_s)
        tops.append(logits.argmax(-1))
        for short, name in zip(("mid", "post", "resid"), site_names):
            acts[short].append(cache[name][rows, end])
        cache = {}
        model(batch.src[sl], cache=cache, cache_names=site_names[1:], stop_layer=layer + 1)
        acts["post_src"].append(cache[site_names[1]][rows, end])
        acts["resid_src"].append(cache[site_names[2]][rows, end])
        if progress and (i // batch_size) % 10 == 0:
            progress(f"cached {sl.stop}/{n} pairs at layer {layer}")
    cat = {k: torch.cat(v) for k, v in acts.items()}
    return SiteCache(layer, batch.end, E.PrefixCache.cat(prefixes), cat["mid"], cat["post"], cat["post_src"],
                     cat["resid"], cat["resid_src"], torch.cat(lds), torch.cat(tops))


def _run_from_resid(model: Transformer, site: SiteCache, resid_end: Tensor, idx: Tensor, **kw):
    """The END token alone from the layer above the site, over the cached keys/values (``kw``:
    more arguments of :func:`mechrepro.core.engine.resume`, e.g. ``stop_layer``, ``cache``)."""
    return E.resume(model, site.prefix, site.layer + 1, site.end[idx, None], resid=resid_end[:, None], rows=idx,
                    **kw)


def resid_forward(model: Transformer, cache: SiteCache) -> S.ForwardFn:
    """``forward_fn`` for the residual stream at END (``hook_resid_post`` of the site layer):
    ``(resid_end [nb, d], idx [nb]) -> logits [nb, vocab]`` at END, END token alone."""
    def fn(resid_end: Tensor, idx: Tensor) -> Tensor:
        return _run_from_resid(model, cache, resid_end, idx)

    return fn


def mlp_out(model: Transformer, layer: int, post: Tensor) -> Tensor:
    """The MLP's output (``hook_mlp_out``) for hidden activations ``post [..., f]``."""
    out = post @ model.p(f"blocks.{layer}.W_out")
    bias = f"blocks.{layer}.b_out"
    return out + model.p(bias) if model.has(bias) else out


def mlp_forward(model: Transformer, cache: SiteCache) -> S.ForwardFn:
    """``forward_fn`` for the MLP hidden activation at END: the MLP output is added to the cached
    ``resid_mid`` and the run continues from the layer above, END token alone."""
    def fn(post: Tensor, idx: Tensor) -> Tensor:
        return _run_from_resid(model, cache, cache.resid_mid[idx] + mlp_out(model, cache.layer, post), idx)

    return fn


def site_pair(cache: SiteCache, site: str) -> tuple[Tensor, Tensor]:
    """(base, source) activations at END of ``site`` (``mlp`` or ``resid``)."""
    if site == "mlp":
        return cache.post, cache.post_src
    if site == "resid":
        return cache.resid, cache.resid_src
    raise ValueError(f"site must be 'mlp' or 'resid', got {site!r}")


def forward_for(model: Transformer, cache: SiteCache, site: str) -> S.ForwardFn:
    return mlp_forward(model, cache) if site == "mlp" else resid_forward(model, cache)


def learn(model: Transformer, cache: SiteCache, batch: PairBatch, site: str, *, epochs: int, lr: float,
          batch_size: int, seed: int, history: list[float] | None = None) -> Tensor:
    """DAS at ``site``: the unit direction whose patch (source → base) makes the model say the
    expected name (cross-entropy over the whole vocabulary)."""
    base, src = site_pair(cache, site)
    return S.learn_direction(base, src, forward_for(model, cache, site), batch.expected, epochs=epochs, lr=lr,
                             batch=batch_size, seed=seed, history=history)


# ------------------------------------------------------------------ baselines
def score_diff_fn(model: Transformer, cache: SiteCache, heads: Sequence[tuple[int, int]], pos_a: Tensor,
                  pos_b: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(resid_end [nb, d], idx) -> [nb]``: mean over ``heads`` of the pre-softmax attention score
    END→``pos_a`` minus END→``pos_b``, with ``resid_end`` as the site's residual at END (END-only
    run up to the last head's layer; the keys of earlier positions are the base run's)."""
    layers = sorted({l for l, _ in heads})
    assert layers[0] > cache.layer, "heads must read the residual after the site"
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in layers]

    def fn(resid_end: Tensor, idx: Tensor) -> Tensor:
        store: dict[str, Tensor] = {}
        _run_from_resid(model, cache, resid_end, idx, stop_layer=layers[-1] + 1, cache=store, cache_names=names)
        rows = torch.arange(len(idx))
        diffs = [store[f"blocks.{l}.attn.hook_attn_scores"][rows, h, 0, pos_a[idx]]
                 - store[f"blocks.{l}.attn.hook_attn_scores"][rows, h, 0, pos_b[idx]] for l, h in heads]
        return torch.stack(diffs).mean(0)

    return fn


def grad_direction(model: Transformer, cache: SiteCache, batch: PairBatch, heads: Sequence[tuple[int, int]],
                   batch_size: int = 64) -> Tensor:
    """``v_grad``: the normalised mean gradient of the name movers' score difference
    END→pos(N1) − END→pos(N2) w.r.t. the residual at the site, over the pairs' base prompts."""
    fn = score_diff_fn(model, cache, heads, batch.n1, batch.n2)
    total = torch.zeros_like(cache.resid[0])
    for i in range(0, len(batch), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(batch)))
        x = cache.resid[idx].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, idx).sum(), x)
        total += g.sum(0)
    return S.unit(total / len(batch))


def mean_direction(cache: SiteCache, batch: PairBatch) -> Tensor:
    """``v_mean``: mean residual at the site of ABB base prompts minus that of BAB ones."""
    abb = batch.is_abb
    return S.v_mean(cache.resid[abb], cache.resid[~abb])


def decompose_all(model: Transformer, layer: int, v_mlp: Tensor, v_resid: Tensor,
                  name_movers: Sequence[tuple[int, int]]) -> dict:
    """Row / null parts of the two DAS directions; returns the unit directions of each part and
    the norms and row-space dimensions."""
    Q_mlp = S.mlp_rowspace(model, layer)
    Q_res = S.query_rowspace(model, [tuple(h) for h in name_movers])
    out: dict = {"dirs": {}, "null_norm": {}, "rowspace_dim": {"mlp": Q_mlp.shape[1], "resid": Q_res.shape[1]},
                 "dim": {"mlp": Q_mlp.shape[0], "resid": Q_res.shape[0]}, "Q": {"mlp": Q_mlp, "resid": Q_res}}
    for name, v, Q in (("v_mlp", v_mlp, Q_mlp), ("v_resid", v_resid, Q_res)):
        row, null = S.decompose(v, Q)
        out["dirs"][f"{name}_row"] = S.unit(row)
        out["dirs"][f"{name}_null"] = S.unit(null)
        out["null_norm"][name] = float(null.norm() / v.norm())
    return out


def null_norm(v: Tensor, Q: Tensor) -> float:
    """``‖v_null‖ / ‖v‖`` against the row space ``Q``."""
    return float(S.decompose(v, Q)[1].norm() / v.norm())


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def patched(model: Transformer, cache: SiteCache, batch: PairBatch, site: str, v: Tensor | None,
            batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Per pair: (LD = logit(IO) − logit(S), top token) at END after patching ``site`` along ``v``
    (``None``: the whole activation) from the source into the base."""
    base, src = site_pair(cache, site)
    fwd = forward_for(model, cache, site)
    lds, tops = [], []
    for i in range(0, len(batch), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(batch)))
        a = src[idx] if v is None else S.subspace_patch(base[idx], src[idx], v)
        logits = fwd(a, idx)
        rows = torch.arange(len(idx))
        lds.append(logits[rows, batch.io[idx]] - logits[rows, batch.s[idx]])
        tops.append(logits.argmax(-1))
    return torch.cat(lds), torch.cat(tops)


def table1(model: Transformer, cache: SiteCache, batch: PairBatch, dirs: dict[str, Tensor],
           batch_size: int = 64) -> tuple[dict, pd.DataFrame]:
    """Every row of :data:`TABLE1_ROWS` on the pairs of ``cache``: ``{row: {"fldd",
    "interchange_acc", "ld"}}`` and the per-pair frame (clean and patched LD, hit = top token is
    the expected name)."""
    frame = pd.DataFrame({"pair": range(len(batch)), "template": batch.template, "order": batch.order,
                          "clean_ld": cache.clean_ld.cpu().numpy(),
                          "clean_correct": (cache.clean_top == batch.io).cpu().numpy()})
    rows = {}
    for row, (site, key) in TABLE1_ROWS.items():
        ld, top = patched(model, cache, batch, site, None if key is None else dirs[key], batch_size)
        hit = top == batch.expected
        rows[row] = {"fldd": S.fldd(ld, cache.clean_ld), "interchange_acc": S.fraction(hit),
                     "ld": float(ld.mean())}
        frame[f"ld_{row}"] = ld.cpu().numpy()
        frame[f"hit_{row}"] = hit.cpu().numpy()
    return rows, frame


def projections(cache: SiteCache, batch: PairBatch, dirs: dict[str, Tensor]) -> pd.DataFrame:
    """Clean base activations at END projected on each direction (``v · a``), long format:
    ``pair, order, template, site, direction, value``."""
    frames = []
    for key, v in dirs.items():
        site = "mlp" if key.startswith("v_mlp") else "resid"
        base, _ = site_pair(cache, site)
        frames.append(pd.DataFrame({"pair": range(len(batch)), "order": batch.order, "template": batch.template,
                                    "site": site, "direction": key, "value": (base @ v).cpu().numpy()}))
    return pd.concat(frames, ignore_index=True)


def dormant_pathway(model: Transformer, cache: SiteCache, batch: PairBatch, dirs: dict[str, Tensor],
                    direction: Tensor) -> pd.DataFrame:
    """The MLP's output at END projected on ``direction`` (``v_grad``), clean and after each MLP
    patch (``full_mlp``, ``v_mlp``, its row and null parts): ``pair, order, condition, value``."""
    conds = {"clean": cache.post, "full_mlp": cache.post_src}
    for key in ("v_mlp", "v_mlp_row", "v_mlp_null"):
        conds[key] = S.subspace_patch(cache.post, cache.post_src, dirs[key])
    frames = [pd.DataFrame({"pair": range(len(batch)), "order": batch.order, "condition": c,
                            "value": (mlp_out(model, cache.layer, post) @ direction).cpu().numpy()})
              for c, post in conds.items()]
    return pd.concat(frames, ignore_index=True)


def dormant_stats(dormant: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Per condition of :func:`dormant_pathway` (the MLP output projected on ``v_grad``): its mean, the
    fraction of pairs outside the range of the clean values (``outside_clean_frac``) and how far its
    mean lies from the clean mean in clean standard deviations (``shift_clean_sd``; None when the
    clean values do not vary). The paper's dormant pathway: the ``v_mlp`` patch far outside."""
    clean = dormant.loc[dormant.condition == "clean", "value"].to_numpy(float)
    lo, hi, mu, sd = clean.min(), clean.max(), clean.mean(), clean.std()
    out = {}
    for cond, group in dormant.groupby("condition", sort=False):
        v = group.value.to_numpy(float)
        out[str(cond)] = {"mean": float(v.mean()), "outside_clean_frac": float(((v < lo) | (v > hi)).mean()),
                          "shift_clean_sd": float(abs(v.mean() - mu) / sd) if sd > 0 else None}
    return out


def separation(proj: pd.DataFrame) -> dict[str, float | None]:
    """Per direction of :func:`projections`: how well its projection separates ABB from BAB prompts,
    ``|mean ABB − mean BAB| / pooled standard deviation`` (None when neither order varies)."""
    out = {}
    for key, group in proj.groupby("direction", sort=False):
        a = group.loc[group.order == "ABB", "value"].to_numpy(float)
        b = group.loc[group.order == "BAB", "value"].to_numpy(float)
        pooled = np.sqrt((a.var() + b.var()) / 2) if len(a) and len(b) else 0.0
        out[str(key)] = float(abs(a.mean() - b.mean()) / pooled) if pooled > 0 else None
    return out


# ------------------------------------------------------------------ the summaries
def das_summary(site_name: str, site: dict, model_name: str, cfg: dict, cache: SiteCache, batch: PairBatch,
                history: list[float], ld: Tensor, top: Tensor, timings: dict) -> dict:
    """The record of one DAS run (``das/{site}.json``): the site, the training settings (``cfg``:
    ``subspace_ioi``) and loss curve, and the learned direction's FLDD and interchange accuracy on
    the training pairs (``ld``, ``top``: :func:`patched` along it)."""
    layer = site["layer"]
    return {
        "site": site_name, "layer": layer, "layer_rule": site["rule"], "model": model_name,
        "hook": f"blocks.{layer}.mlp.hook_post" if site_name == "mlp" else f"blocks.{layer}.hook_resid_post",
        "dim": int(site_pair(cache, site_name)[0].shape[1]), "n_train": len(batch),
        "lr": cfg["lr"], "epochs": cfg["epochs"], "batch": cfg["batch"], "steps": len(history),
        "loss_first": history[0], "loss_last": history[-1], "loss": history,
        "train_fldd": S.fldd(ld, cache.clean_ld),
        "train_interchange_acc": S.fraction(top == batch.expected),
        "timings": timings,
    }


def eval_summary(model_name: str, model_description: str, site: dict, n_train: int, cache: SiteCache,
                 test: PairBatch, dirs: dict[str, Tensor], parts: dict, timings: dict) -> dict:
    """``ioi.json``'s ``ioi``: the site, the clean run on the test pairs, the directions' agreement
    (``|cos|``: a direction and its negative give the same patch) and null-space norms (``parts``:
    :func:`decompose_all`) against a random direction's, the dimensions and the Table 1 rows."""
    import torch.nn.functional as F

    layer = site["layer"]
    v_grad, v_mean = dirs["v_grad"], dirs["v_mean"]
    Q_res = parts["Q"]["resid"]
    dim, rdim = parts["dim"], parts["rowspace_dim"]
    clean_correct = (cache.clean_top == test.io).float()
    return {
        "model": model_name, "model_description": model_description,
        "layer": layer, "layer_rule": site["rule"], "s_inhibition": site["s_inhibition"],
        "name_movers": site["name_movers"], "n_train": n_train, "n_test": len(test),
        "sites": {"mlp": f"blocks.{layer}.mlp.hook_post", "resid": f"blocks.{layer}.hook_resid_post"},
        "clean_ld": float(cache.clean_ld.mean()), "clean_acc": float(clean_correct.mean()),
        "clean_ld_by_order": {o: float(cache.clean_ld[test.is_abb == (o == "ABB")].mean()) for o in ORDERS},
        "cos": {"v_resid_v_grad": abs(float(F.cosine_similarity(dirs["v_resid"], v_grad, dim=0))),
                "v_resid_v_mean": abs(float(F.cosine_similarity(dirs["v_resid"], v_mean, dim=0))),
                "v_grad_v_mean": abs(float(F.cosine_similarity(v_grad, v_mean, dim=0)))},
        "null_norm": {**parts["null_norm"], "v_grad": null_norm(v_grad, Q_res), "v_mean": null_norm(v_mean, Q_res)},
        "random_null_norm": {"mlp": S.random_null_norm(dim["mlp"], rdim["mlp"]),
                             "resid": S.random_null_norm(dim["resid"], rdim["resid"])},
        "dim": dim, "rowspace_dim": rdim,
        "rows": {row: {"site": s, "direction": k or "full"} for row, (s, k) in TABLE1_ROWS.items()},
        "timings": timings,
    }


def train_das(model: Transformer, batch: PairBatch, site: dict, site_name: str, cfg: dict, seed: int,
              batch_size: int, model_name: str = "",
              progress: Callable[[str], None] | None = None) -> tuple[Tensor, dict]:
    """DAS for one unit direction at ``site_name`` (``mlp`` or ``resid``) of the site layer, on the
    training pairs ``batch``; ``cfg``: ``subspace_ioi`` (``lr``, ``epochs``, ``batch``).

    Training runs on one thread (:func:`mechrepro.core.threads.one_thread`), so the direction does
    not depend on the cores the job gets. Returns the direction and its record
    (:func:`das_summary`: loss curve, training FLDD and interchange accuracy, timings).
    """
    import time

    t0 = time.time()
    cache = cache_site(model, batch, site["layer"], batch_size, progress=progress)
    t_cache = time.time() - t0
    history: list[float] = []
    t0 = time.time()
    with one_thread():
        v = learn(model, cache, batch, site_name, epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch"],
                  seed=seed, history=history)
    t_train = time.time() - t0
    ld, top = patched(model, cache, batch, site_name, v, batch_size)
    summary = das_summary(site_name, site, model_name, cfg, cache, batch, history, ld, top,
                          {"cache_s": t_cache, "train_s": t_train})
    return v, summary


@dataclass
class SiteEvaluation:
    """Everything :func:`evaluate_site` finds: ``rows`` (Table 1: per row FLDD, interchange accuracy,
    LD), ``pairs`` (per test pair), ``details`` (``ioi.json``'s ``ioi``: :func:`eval_summary`),
    ``projections`` and ``dormant`` (the histogram tables, summarised in ``details`` by :func:`separation`
    and :func:`dormant_stats`) and ``dirs`` (all ten directions)."""

    rows: dict
    pairs: pd.DataFrame
    details: dict
    projections: pd.DataFrame
    dormant: pd.DataFrame
    dirs: dict[str, Tensor]


def evaluate_site(model: Transformer, train: PairBatch, test: PairBatch, site: dict, learned: dict[str, Tensor],
                  batch_size: int, model_name: str = "", model_description: str = "",
                  progress: Callable[[str], None] | None = None) -> SiteEvaluation:
    """Table 1 of the paper at the site layer: the learned directions (``learned``: ``v_mlp``,
    ``v_resid``), their row-/null-space parts, the baselines ``v_grad`` (from the training pairs)
    and ``v_mean``, and the full patches, each evaluated on the held-out test pairs; plus the
    projection and dormant-pathway tables of the histograms.

    Gradients, means and decompositions (SVD) run on one thread (thread-independent sums).
    """
    import time

    layer, bs = site["layer"], batch_size
    name_movers = [tuple(h) for h in site["name_movers"]]
    t = {}
    t0 = time.time()
    c_train = cache_site(model, train, layer, bs, progress=progress)
    with one_thread():  # gradients, means and SVDs add in a thread-dependent order otherwise
        v_grad = grad_direction(model, c_train, train, name_movers, bs)
        v_mean = mean_direction(c_train, train)
    del c_train
    t["baselines_s"] = time.time() - t0
    t0 = time.time()
    cache = cache_site(model, test, layer, bs, progress=progress)
    t["cache_test_s"] = time.time() - t0
    with one_thread():
        parts = decompose_all(model, layer, learned["v_mlp"], learned["v_resid"], name_movers)
    dirs = {"v_mlp": learned["v_mlp"], "v_resid": learned["v_resid"], **parts["dirs"], "v_grad": v_grad,
            "v_mean": v_mean}
    t0 = time.time()
    rows, frame = table1(model, cache, test, dirs, bs)
    t["table1_s"] = time.time() - t0
    details = eval_summary(model_name, model_description, site, len(train), cache, test, dirs, parts, t)
    proj, dormant = projections(cache, test, dirs), dormant_pathway(model, cache, test, dirs, v_grad)
    details.update(separation=separation(proj), dormant=dormant_stats(dormant))
    return SiteEvaluation(rows, frame, details, proj, dormant, dirs)
