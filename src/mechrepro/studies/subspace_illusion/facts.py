"""Factual recall: subspace patches of MLP keys and the rank-1 edits they amount to (Study B, parts 3-4).

Makelov, Lange & Nanda (2023), Section 6, on facts ``(subject, relation prompt, object)``:

* **Facts and pairs** (:func:`build_facts`, :func:`answer_facts`, :func:`make_pairs`): facts come
  from relation templates (``config/facts_data.yaml``; or a CounterFact JSON,
  :func:`load_counterfact`). A fact is kept when the model's top-1 next token is the object's
  first token. A *pair* is two kept facts of one relation with different objects: the *base*
  (e.g. "The capital city of France is" → Paris) and the *source* (… Japan … → Tokyo).
* **Site**: the MLP hidden activation (``blocks.{l}.mlp.hook_post``: post-GELU on GPT-2, the
  down-projection input of a gated MLP) at the subject's last token, where ROME locates facts.
* **1-D patch per pair** (:func:`learn_pair_directions`): one unit direction ``v`` per pair,
  trained to make the base prompt prefer the source object, loss
  ``logit(base object) − logit(source object)`` after patching ``v``'s component from the
  source's key into the base's key. All pairs train in one batch (each row its own direction);
  only the layers above the site are recomputed, from the cached residual stream.
* **Comparisons** (:func:`sweep_layer`): the full-MLP patch (the whole key), the 1-D patch, its
  row-space-only and null-space-only parts against ``W_out`` (:mod:`mechrepro.core.subspace`), and the
  rank-1 weight edit equivalent to the 1-D patch (:func:`mechrepro.studies.subspace_illusion.rome.patch_to_rank1_edit`, with
  ROME's key second moment ``Σ``). A pair is *flipped* when the patched model prefers the source
  object: ``LD = logit(base obj) − logit(src obj) < 0`` at the last token.
* **ROME and its subspace intervention** (:func:`rome_layer`): the ROME edit writing the source's
  object into the base fact, its equivalent 1-D patch (:func:`mechrepro.studies.subspace_illusion.rome.rank1_edit_to_subspace`)
  and that patch's row-space part, compared by rewrite score, with the Pearson correlation of the
  ROME and derived scores over the pairs.
* **Key statistic corpus** (:func:`corpus_texts`): English prose available offline (see there).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from mechrepro.studies.subspace_illusion.checks import WIKIPEDIA_SAMPLE

from mechrepro.studies.subspace_illusion import rome as R
from mechrepro.core import engine as E
from mechrepro.core import subspace as S
from mechrepro.core.tokens import pad
from mechrepro.workflow.config import read_yaml
from mechrepro.core.model import Transformer

Encode = Callable[[str], list[int]]
Log = Callable[..., None]


def _nolog(*_args) -> None:
    pass


# ------------------------------------------------------------------ fact material
def load_facts_data(path: str | Path) -> dict[str, dict]:
    """Relations ``{name: {"prompt": "… {} …", "facts": {subject: object}}}`` from a YAML file, checked."""
    data = read_yaml(path, FileNotFoundError(f"facts data file {path} not found; set facts.data_file to a YAML file "
                                             "of relations")) or {}
    relations = data.get("relations")
    if not isinstance(relations, dict) or not relations:
        raise ValueError(f"{path}: needs a non-empty 'relations' mapping (name -> {{prompt, facts}})")
    for name, rel in relations.items():
        if not isinstance(rel, dict) or not isinstance(rel.get("prompt"), str) or not isinstance(rel.get("facts"), dict):
            raise ValueError(f"{path}: relation '{name}' needs a 'prompt' string and a 'facts' mapping subject -> object")
        if rel["prompt"].count("{}") != 1:
            raise ValueError(f"{path}: the prompt of relation '{name}' must contain exactly one '{{}}' (the subject), "
                             f"got {rel['prompt']!r}")
        for subj, obj in rel["facts"].items():
            if not str(subj).strip() or not str(obj).strip():
                raise ValueError(f"{path}: relation '{name}' has an empty subject or object ({subj!r}: {obj!r})")
    return relations


def load_counterfact(path: str | Path) -> dict[str, dict]:
    """Relations from a CounterFact JSON (Meng et al. 2022): a list of records with
    ``requested_rewrite: {prompt, subject, target_true: {str}, relation_id}``; the true objects
    become the facts, grouped by ``relation_id`` and prompt template."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CounterFact file {path} not found (facts.counterfact_file); leave it empty to use "
                                "facts.data_file only")
    records = json.loads(path.read_text())
    relations: dict[str, dict] = {}
    for i, rec in enumerate(records):
        try:
            rw = rec["requested_rewrite"]
            prompt, subject, obj, rel = rw["prompt"], rw["subject"], rw["target_true"]["str"], rw["relation_id"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: record {i} is not a CounterFact record (missing {err})") from err
        if prompt.count("{}") != 1:
            continue
        entry = relations.setdefault(f"{rel}:{prompt}", {"prompt": prompt, "facts": {}})
        entry["facts"].setdefault(subject, obj)
    return relations


def build_facts(relations: dict[str, dict], encode: Encode, bos_id: int) -> list[dict]:
    """Tokenise every fact: ``tokens`` (BOS first), ``subject_pos`` (last subject token),
    ``end_pos`` (last token), ``object_id`` (first token of ``" " + object``).

    A fact whose subject tokens are not a prefix of the prompt's tokens (BPE merged the subject
    with what follows) is skipped; so is a subject that is not followed by any token.
    """
    facts = []
    for rel_name, rel in relations.items():
        template = rel["prompt"]
        prefix = template.split("{}")[0]
        for subject, obj in rel["facts"].items():
            subject, obj = str(subject), str(obj)
            text = template.replace("{}", subject)
            ids = encode(text)
            head = encode(prefix + subject)
            if ids[:len(head)] != head:
                continue
            obj_ids = encode(" " + obj)
            if not obj_ids:
                continue
            facts.append({"relation": rel_name, "subject": subject, "object": obj, "prompt": text,
                          "tokens": [bos_id, *ids], "subject_pos": len(head), "end_pos": len(ids),
                          "object_id": obj_ids[0]})
    return facts


@torch.no_grad()
def answer_facts(model: Transformer, facts: list[dict], batch: int = 64) -> list[dict]:
    """Add the model's answer to each fact: ``top1`` id, ``p_object``, ``correct`` (top-1 = object)."""
    out = []
    for i in range(0, len(facts), batch):
        chunk = facts[i:i + batch]
        tokens = pad([f["tokens"] for f in chunk], 0)
        end = torch.tensor([f["end_pos"] for f in chunk], dtype=torch.long)
        logits = model(tokens, logits_at=end)
        probs = logits.float().softmax(-1)
        top1 = logits.argmax(-1)
        for j, f in enumerate(chunk):
            out.append({**f, "top1": int(top1[j]), "p_object": float(probs[j, f["object_id"]]),
                        "correct": bool(top1[j] == f["object_id"])})
    return out


def make_pairs(facts: list[dict], n_pairs: int, seed: int, require_correct: bool = True) -> list[dict]:
    """Ordered pairs ``{base, src, relation}`` (indices into ``facts``) of one relation, different objects.

    Only facts answered correctly take part unless ``require_correct`` is false. Pairs are drawn
    round-robin over the relations (each relation's candidates in a seeded random order, pairs whose
    base is not yet a base first), so the relations are as balanced as their facts allow.
    """
    rng = random.Random(seed)
    by_rel: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        if f.get("correct", False) or not require_correct:
            by_rel.setdefault(f["relation"], []).append(i)
    candidates = {}
    for rel, idx in sorted(by_rel.items()):
        cand = [(a, b) for a in idx for b in idx if facts[a]["object_id"] != facts[b]["object_id"]]
        rng.shuffle(cand)
        if cand:
            candidates[rel] = cand
    pairs: list[dict] = []
    used_base: set[int] = set()
    used: set[tuple[int, int]] = set()
    while len(pairs) < n_pairs and candidates:
        for rel in list(candidates):
            cand = [c for c in candidates[rel] if c not in used]
            if not cand:
                del candidates[rel]
                continue
            fresh = [c for c in cand if c[0] not in used_base]
            a, b = (fresh or cand)[0]
            used.add((a, b))
            used_base.add(a)
            pairs.append({"base": a, "src": b, "relation": rel})
            if len(pairs) >= n_pairs:
                break
    return pairs


def check_pairs(pairs: list[dict], facts: list[dict], min_pairs: int, model: str, data_file: str) -> None:
    """Stop with a message naming the counts when fewer than ``min_pairs`` pairs could be built."""
    if len(pairs) >= min_pairs:
        return
    n_correct = sum(bool(f.get("correct")) for f in facts)
    raise ValueError(
        f"only {len(pairs)} fact pairs could be built ({n_correct} of {len(facts)} facts answered correctly by "
        f"{model}), fewer than facts.min_pairs = {min_pairs}: add facts the model knows to {data_file}, lower "
        "facts.min_pairs, or (for a random test model only) set facts.require_correct: false")


def count_correct(facts: list[dict]) -> tuple[int, dict[str, dict[str, int]]]:
    """The number of facts the model answers correctly, and ``{relation: {"n", "correct"}}``."""
    n_correct = sum(f["correct"] for f in facts)
    by_rel: dict[str, dict[str, int]] = {}
    for f in facts:
        r = by_rel.setdefault(f["relation"], {"n": 0, "correct": 0})
        r["n"] += 1
        r["correct"] += int(f["correct"])
    return n_correct, by_rel


@dataclass
class PairBatch:
    """Token tensors and positions of the base and source prompts of ``n`` pairs."""

    tokens_base: Tensor  # [n, p]
    subj_base: Tensor  # [n]
    end_base: Tensor  # [n]
    tokens_src: Tensor  # [n, p']
    subj_src: Tensor  # [n]
    obj_base: Tensor  # [n]
    obj_src: Tensor  # [n]

    def __len__(self) -> int:
        return len(self.obj_base)

    @property
    def target(self) -> Tensor:
        """``[n, 2]``: (base object, source object), the order of the facts loss."""
        return torch.stack([self.obj_base, self.obj_src], dim=1)


def pair_batch(facts: list[dict], pairs: list[dict]) -> PairBatch:
    """Tensors for ``pairs`` (from :func:`make_pairs`) over ``facts``."""
    base = [facts[p["base"]] for p in pairs]
    src = [facts[p["src"]] for p in pairs]

    def t(xs):
        return torch.tensor(xs, dtype=torch.long)

    return PairBatch(pad([f["tokens"] for f in base], 0), t([f["subject_pos"] for f in base]),
                     t([f["end_pos"] for f in base]), pad([f["tokens"] for f in src], 0),
                     t([f["subject_pos"] for f in src]), t([f["object_id"] for f in base]),
                     t([f["object_id"] for f in src]))


# ------------------------------------------------------------------ corpus for the key statistic
# Standard-library modules whose documentation is English prose (used by corpus_texts).
STDLIB_DOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "email.message", "enum", "filecmp", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar",
    "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "platform", "poplib", "pprint", "profile", "queue", "random",
    "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "symtable", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)


def _prose(doc: str | None) -> list[str]:
    """Paragraphs of ``doc`` that read as prose: ≥ 12 words, mostly letters, no code or tables."""
    out = []
    for para in (doc or "").split("\n\n"):
        text = " ".join(para.split())
        words = text.split(" ")
        if len(words) < 12 or ">>>" in text or "::" in text or "|" in text or "==" in text:
            continue
        letters = sum(c.isalpha() or c == " " for c in text)
        if letters / len(text) >= 0.85:
            out.append(text)
    return out




def _drop_nested(text: str, open_: str, close: str) -> str:
    """``text`` without its (possibly nested) ``open_ … close`` spans (templates, tables)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wikitext_paragraphs(wikitext: str, min_words: int = 8) -> list[str]:
    """The prose paragraphs of one article's MediaWiki markup: comments, references, templates,
    tables, files and categories removed; links and bold/italic replaced by their text; headings,
    lists, indented lines and paragraphs of fewer than ``min_words`` words dropped."""
    import re

    t = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _drop_nested(_drop_nested(t, "{{", "}}"), "{|", "|}")
    t = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[\[([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    out = []
    for line in t.split("\n"):
        line = " ".join(line.split())
        if line and not line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")) and len(line.split()) >= min_words:
            out.append(line)
    return out


def wikipedia_paragraphs(path: str | Path, seed: int = 0) -> list[str]:
    """Prose paragraphs of the articles (no redirects, namespaced pages or pages of 50 words or fewer) of a bz2 MediaWiki XML
    dump, in an order shuffled with ``seed``: the first tokens of the corpus then come from many
    articles, not from the first few (the dump is alphabetical)."""
    import bz2
    import xml.etree.ElementTree as ET

    root = ET.parse(bz2.open(path)).getroot()
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    paras = []
    for page in root.iter(f"{ns}page"):
        title, text = page.findtext(f"{ns}title") or "", page.findtext(f"{ns}revision/{ns}text") or ""
        if ":" in title or text.lstrip().lower().startswith("#redirect"):
            continue
        body = wikitext_paragraphs(text)
        if sum(len(b.split()) for b in body) > 50:  # stubs and disambiguation pages left out
            paras.extend(body)
    random.Random(seed).shuffle(paras)
    return paras


def corpus_texts(source: str) -> list[str]:
    """English texts for ROME's key statistic, available offline.

    ``source = "stdlib_docs"``: the prose paragraphs of the documentation strings of
    :data:`STDLIB_DOC_MODULES` and their public classes and functions — English written by people,
    shipped with every Python (no package, no download), deterministic for a Python version.
    It is technical English, not ROME's Wikipedia.

    ``source = "wikipedia_sample"``: the prose paragraphs of 97 English Wikipedia articles
    (:func:`wikipedia_paragraphs` of :data:`WIKIPEDIA_SAMPLE`, about 396,000 words), the kind of
    text ROME's statistic was computed from. Any other ``source`` is the path of a plain-text file
    (e.g. WikiText): paragraphs are separated by blank lines.
    """
    if source == "wikipedia_sample":
        if not Path(WIKIPEDIA_SAMPLE).is_file():
            raise FileNotFoundError(f"rome.corpus 'wikipedia_sample' needs {WIKIPEDIA_SAMPLE}: fetch it with "
                                    "scripts/fetch_wikipedia_sample.sh (make env runs it)")
        return wikipedia_paragraphs(WIKIPEDIA_SAMPLE)
    if source != "stdlib_docs":
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"rome.corpus {source!r} is neither 'stdlib_docs' nor a text file")
        return [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    import importlib
    import inspect

    seen: set[str] = set()
    texts = []
    for name in STDLIB_DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod)]
        for attr in sorted(getattr(mod, "__all__", None) or [a for a in dir(mod) if not a.startswith("_")]):
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj))
        for doc in docs:
            for p in _prose(doc):
                if p not in seen:
                    seen.add(p)
                    texts.append(p)
    return texts


def corpus_batches(texts: list[str], encode: Encode, bos_id: int, n_tokens: int, chunk: int, batch: int = 16):
    """``(tokens [b, chunk], mask)`` batches: the texts' tokens concatenated and cut into chunks of
    ``chunk − 1`` tokens after a BOS, until ``n_tokens`` keys (BOS positions excluded) are covered."""
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text + "\n"))
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than rome.corpus_tokens = {n_tokens}; "
                         "lower rome.corpus_tokens or give a larger corpus")
    step = chunk - 1
    rows = [[bos_id, *ids[i:i + step]] for i in range(0, len(ids), step)]
    for i in range(0, len(rows), batch):
        group = rows[i:i + batch]
        tokens = pad(group, 0)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for j, r in enumerate(group):
            mask[j, 1:len(r)] = True
        yield tokens, mask


# ------------------------------------------------------------------ the per-layer sweep
def key_at(model: Transformer, layer: int, tokens: Tensor, pos: Tensor) -> Tensor:
    """MLP keys ``[n, f]`` (``blocks.{layer}.mlp.hook_post``) at ``pos``."""
    return S.site_activations(model, f"blocks.{layer}.mlp.hook_post", tokens, pos)


class SuffixForward:
    """``forward_fn`` for the MLP key of ``layer`` at each row's subject position, recomputing only the suffix.

    A patch at position ``s`` of layer ``l`` changes nothing before ``s``. One clean run caches
    the keys and values of layers ``l…L−1`` and ``blocks.{l}.hook_resid_pre``
    (:func:`mechrepro.core.engine.cache_prefix`); a patched run resumes the suffix ``s … end`` at
    layer ``l`` (:func:`mechrepro.core.engine.resume`), overwrites the MLP key at the suffix's first
    position, and attends to the cached prefix. Rows are run in groups of equal suffix length (no
    padded positions are computed). Logits are computed at ``end`` only, for ``vocab`` only (the
    token ids the metric reads; ``None``: the whole vocabulary). Same numbers as
    :func:`mechrepro.core.subspace.mlp_post_forward` (a test checks it), several times faster when
    the subject is near the end of the prompt.
    """

    def __init__(self, model: Transformer, layer: int, tokens: Tensor, subj: Tensor, end: Tensor,
                 vocab: Tensor | None = None):
        self.model, self.layer, self.vocab = model, layer, vocab
        self.prefix, _ = E.cache_prefix(model, tokens, range(layer, model.spec.n_layers), [layer])
        self.subj, self.end_local = subj, end - subj

    def __call__(self, patched: Tensor, idx: Tensor) -> Tensor:
        widths = self.end_local[idx] + 1
        out = None
        for w in torch.unique(widths).tolist():
            sel = (widths == w).nonzero().flatten()
            logits = self._run(patched[sel], idx[sel], int(w))
            if out is None:
                out = logits.new_zeros(len(idx), logits.shape[-1])
            out = out.index_put((sel,), logits)
        return out

    def _run(self, patched: Tensor, rows: Tensor, width: int) -> Tensor:
        zero = torch.zeros(len(rows), dtype=torch.long, device=patched.device)

        def write(x: Tensor) -> Tensor:
            return S._write_rows(x, zero, patched)

        positions = self.subj[rows, None] + torch.arange(width, device=rows.device)
        return E.resume(self.model, self.prefix, self.layer, positions, rows=rows, vocab=self.vocab, trim=True,
                        hooks={f"blocks.{self.layer}.mlp.hook_post": write})


RowsLoss = Callable[[Tensor], Tensor]


def _adam_run(rows_loss: RowsLoss, u0: Tensor, lr: float, steps: int, log: Log) -> tuple[Tensor, Tensor]:
    """Adam on free vectors ``u`` (``v = u / ‖u‖``) for ``steps`` steps; the final directions and losses."""
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    for step in range(steps):
        loss = rows_loss(u / u.norm(dim=1, keepdim=True))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        if step % max(1, steps // 4) == 0:
            log("  adam lr %g step %d/%d: mean loss %.3f", lr, step, steps, float(loss.detach().mean()))
    with torch.no_grad():
        v = u.detach() / u.detach().norm(dim=1, keepdim=True)
        return v, rows_loss(v)


def _sgd_run(rows_loss: RowsLoss, u0: Tensor, lr: float, steps: int, end_factor: float,
             log: Log) -> tuple[Tensor, Tensor]:
    """The paper's optimiser (the authors' fact-patching notebook): plain SGD on the unit vectors
    themselves, the learning rate decaying linearly to ``end_factor · lr`` over ``steps`` steps, each
    vector renormalised after every step; per row, the direction with the lowest loss over all steps."""
    v = u0.clone().requires_grad_(True)
    opt = torch.optim.SGD([v], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=end_factor, total_iters=steps)
    best_v, best_loss = v.detach().clone(), torch.full((len(v),), math.inf, dtype=v.dtype, device=v.device)
    for step in range(steps):
        loss = rows_loss(v)
        with torch.no_grad():
            better = loss < best_loss
            best_v[better], best_loss[better] = v[better], loss[better]
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            v.div_(v.norm(dim=1, keepdim=True))
        if step % max(1, steps // 4) == 0:
            log("  sgd lr %g step %d/%d: mean loss %.3f", lr, step, steps, float(loss.detach().mean()))
    return best_v, best_loss


def learn_pair_directions(k_base: Tensor, k_src: Tensor, forward_fn: S.ForwardFn, target: Tensor, *,
                          steps: int, lrs: Sequence[float], seed: int, log: Log = _nolog, optimizer: str = "adam",
                          trials: int = 1, end_factor: float = 1e-3) -> tuple[Tensor, Tensor]:
    """One unit direction per pair (row), all rows trained together.

    Each row ``i`` has its own direction, started as a seeded random unit vector; the loss is
    ``Σ_i [logit_i(base obj) − logit_i(src obj)]`` after patching row ``i`` along ``v_i`` (a sum, so
    each row's gradient is its own). One run per learning rate in ``lrs``, repeated ``trials``
    times with other initial vectors (run ``j`` seeded ``seed + j``, the lrs cycling as in the
    authors' sweep). ``optimizer``: ``"adam"`` (:func:`_adam_run`, ``steps`` steps, each run's final
    direction) or ``"sgd"`` (:func:`_sgd_run`, the paper's: linear decay to ``end_factor``, each run's
    best direction over its steps). For each row the run with the lowest loss wins. Returns
    ``(V [n, f], its loss per row [n])``.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"facts.optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    n, f = k_base.shape
    rows = torch.arange(n, device=k_base.device)

    def rows_loss(v: Tensor) -> Tensor:
        coef = ((k_src - k_base) * v).sum(1)
        logits = forward_fn(k_base + coef[:, None] * v, rows)
        return logits[rows, target[:, 0]] - logits[rows, target[:, 1]]

    best_v, best_loss = None, None
    for j, lr in enumerate(list(lrs) * trials):
        g = torch.Generator().manual_seed(seed + j)
        u = torch.randn(n, f, generator=g, dtype=k_base.dtype).to(k_base.device)
        u = u / u.norm(dim=1, keepdim=True)
        if optimizer == "adam":
            v, loss = _adam_run(rows_loss, u, lr, steps, log)
        else:
            v, loss = _sgd_run(rows_loss, u, lr, steps, end_factor, log)
        if best_v is None:
            best_v, best_loss = v.clone(), loss.detach().clone()
        else:
            better = loss < best_loss
            best_v[better], best_loss[better] = v[better], loss.detach()[better]
    return best_v, best_loss


def _ld(logits: Tensor, target: Tensor) -> Tensor:
    rows = torch.arange(len(target), device=logits.device)
    return logits[rows, target[:, 0]] - logits[rows, target[:, 1]]


@torch.no_grad()
def patch_rows(forward_fn: S.ForwardFn, k_base: Tensor, k_src: Tensor, V: Tensor | None) -> Tensor:
    """Logits after patching each row along its own direction ``V[i]`` (``None``: the whole key)."""
    idx = torch.arange(len(k_base), device=k_base.device)
    if V is None:
        return forward_fn(k_src, idx)
    coef = ((k_src - k_base) * V).sum(1) / (V * V).sum(1)
    return forward_fn(k_base + coef[:, None] * V, idx)


def pinv_psd(C: Tensor) -> Tensor:
    """Pseudo-inverse of a symmetric PSD matrix, computed in float64."""
    return torch.linalg.pinv(C.double(), hermitian=True).to(C.dtype)


@torch.no_grad()
def rank1_edit_logits(model: Transformer, layer: int, pb: PairBatch, V: Tensor, k_base: Tensor, k_src: Tensor,
                      C_pinv: Tensor | None, vocab: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Logits (over ``vocab``; ``None``: all) of each base prompt with ``W_out`` of ``layer`` edited by the
    rank-1 equivalent of its 1-D patch (:func:`mechrepro.studies.subspace_illusion.rome.patch_to_rank1_edit`), and the max abs difference per row
    between the edited MLP output at ``k_base`` and the patched key's MLP output (≈ 0: the
    equivalence on the edited key)."""
    resid = S._cached(model, pb.tokens_base, f"blocks.{layer}.hook_resid_pre", layer)
    W = model.p(f"blocks.{layer}.W_out")
    outs, errs = [], []
    for i in range(len(pb)):
        W2 = R.patch_to_rank1_edit(W, V[i], k_base[i], k_src[i], None, C_pinv=C_pinv)
        patched_key = S.subspace_patch(k_base[i], k_src[i], V[i])
        errs.append(float((k_base[i] @ W2 - patched_key @ W).abs().max()))
        with R.edited(model, layer, W2):
            outs.append(model(None, start_layer=layer, start_resid=resid[i:i + 1], logits_at=pb.end_base[i:i + 1],
                              logit_tokens=vocab))
    return torch.cat(outs), torch.tensor(errs)


def sweep_layer(model: Transformer, layer: int, facts: list[dict], pairs: list[dict], C: Tensor | None, *,
                steps: int, lrs: Sequence[float], seed: int, log: Log = _nolog,
                **train: object) -> tuple[pd.DataFrame, dict, Tensor]:
    """Everything the paper reports for one layer of the facts sweep.

    ``train``: ``optimizer``, ``trials``, ``end_factor`` of :func:`learn_pair_directions`.
    Returns ``(per-pair frame, summary, directions V [n, f])``. The summary holds ``n_pairs``,
    the flip fractions (``flip_frac_1d``, ``flip_frac_full_mlp``, ``flip_frac_row``,
    ``flip_frac_null``, ``flip_frac_rank1_edit``), ``rank1_agrees_1d`` (fraction of pairs the
    edit and the patch classify alike), ``rank1_key_max_err``, mean LDs (clean and per
    intervention) and ``ld_rel_*`` = mean patched LD / mean clean LD, ``null_norm`` (mean
    ``‖v_null‖``), ``random_null_norm`` and ``final_loss``.
    """
    pb = pair_batch(facts, pairs)
    k_base = key_at(model, layer, pb.tokens_base, pb.subj_base)
    k_src = key_at(model, layer, pb.tokens_src, pb.subj_src)
    # logits are only needed for the objects: restrict the unembedding to them
    vocab = torch.unique(torch.cat([pb.obj_base, pb.obj_src]))
    target = torch.searchsorted(vocab, pb.target)
    fwd = SuffixForward(model, layer, pb.tokens_base, pb.subj_base, pb.end_base, vocab)
    V, final = learn_pair_directions(k_base, k_src, fwd, target, steps=steps, lrs=lrs, seed=seed, log=log, **train)
    Q = S.mlp_rowspace(model, layer)
    v_row = (V @ Q) @ Q.T
    v_null = V - v_row
    with torch.no_grad():
        idx = torch.arange(len(pb))
        lds = {"clean": _ld(fwd(k_base, idx), target),
               "full_mlp": _ld(patch_rows(fwd, k_base, k_src, None), target),
               "1d": _ld(patch_rows(fwd, k_base, k_src, V), target),
               "row": _ld(patch_rows(fwd, k_base, k_src, v_row / v_row.norm(dim=1, keepdim=True)), target),
               "null": _ld(patch_rows(fwd, k_base, k_src, v_null / v_null.norm(dim=1, keepdim=True)), target)}
        C_pinv = None if C is None else pinv_psd(C)
        edit_logits, key_err = rank1_edit_logits(model, layer, pb, V, k_base, k_src, C_pinv, vocab)
        lds["rank1_edit"] = _ld(edit_logits, target)
    null_norm = v_null.norm(dim=1)
    frame = pd.DataFrame({
        "pair": range(len(pb)), "relation": [p["relation"] for p in pairs],
        "base_subject": [facts[p["base"]]["subject"] for p in pairs],
        "src_subject": [facts[p["src"]]["subject"] for p in pairs],
        "base_object": [facts[p["base"]]["object"] for p in pairs],
        "src_object": [facts[p["src"]]["object"] for p in pairs],
        **{f"ld_{k}": v.tolist() for k, v in lds.items()},
        "null_norm": null_norm.tolist(), "proj_diff": ((k_src - k_base) * V).sum(1).tolist(),
        "final_loss": final.tolist(), "rank1_key_err": key_err.tolist(),
    })
    flips = {k: (v < 0) for k, v in lds.items() if k != "clean"}
    clean_mean = float(lds["clean"].mean())
    f, r = Q.shape
    summary = {
        "layer": layer, "n_pairs": len(pb),
        **{f"flip_frac_{k}": S.fraction(v) for k, v in flips.items()},
        "rank1_agrees_1d": S.fraction(flips["rank1_edit"] == flips["1d"]),
        "rank1_key_max_err": float(key_err.max()),
        "ld_clean": clean_mean,
        **{f"ld_{k}": float(v.mean()) for k, v in lds.items() if k != "clean"},
        **{f"ld_rel_{k}": float(v.mean()) / clean_mean if clean_mean else math.nan
           for k, v in lds.items() if k != "clean"},
        "null_norm": float(null_norm.mean()), "null_norm_std": float(null_norm.std()) if len(pb) > 1 else 0.0,
        "random_null_norm": S.random_null_norm(f, r), "d_mlp": f, "rowspace_dim": r,
        "final_loss": float(final.mean()),
    }
    return frame, summary, V


# ------------------------------------------------------------------ ROME and its subspace intervention
ESSENCE_PROMPTS = ("{} is a",)  # ROME's KL ("essence drift") prompts


def rome_prompts(fact: dict, contexts: Sequence[str], encode: Encode, bos_id: int,
                 essence: Sequence[str] = ESSENCE_PROMPTS) -> tuple[Tensor, Tensor, Tensor, int]:
    """The prompts of ROME's value step for ``fact``: ``(tokens [n + m, p], subject [n + m], read [n + m], n)``.

    ``n`` rewriting rows: the bare fact prompt (row 0), then ``context + ". " + prompt`` for each
    context (ROME's templates ``"{}"`` and ``x + ". {}"``), read at their last token; then the
    essence rows (``"{subject} is a"``), read at the subject's last token (where ROME's code
    reads them). BOS first; right-padded with 0. The subject's last token is found as in
    :func:`build_facts`; a context after which the subject's tokens are not a prefix of the
    prompt's tokens (BPE merged across the boundary) is left out.
    """
    at = fact["prompt"].find(fact["subject"])
    if at < 0:
        raise ValueError(f"fact {fact['prompt']!r} does not contain its subject {fact['subject']!r}")
    head_text = fact["prompt"][:at + len(fact["subject"])]
    rows = [(fact["tokens"], fact["subject_pos"], fact["end_pos"])]

    def add(text: str, head: str, read_subject: bool) -> None:
        ids, h = encode(text), encode(head)
        if h and ids[:len(h)] == h:
            rows.append(([bos_id, *ids], len(h), len(h) if read_subject else len(ids)))

    for ctx in contexts:
        add(f"{ctx}. {fact['prompt']}", f"{ctx}. {head_text}", False)
    n = len(rows)
    for template in essence:
        add(template.replace("{}", fact["subject"]), template.split("{}")[0] + fact["subject"], True)

    def t(i: int) -> Tensor:
        return torch.tensor([r[i] for r in rows], dtype=torch.long)

    return pad([r[0] for r in rows], 0), t(1), t(2), n


@torch.no_grad()
def _p_new(logits: Tensor, target_id: int) -> float:
    return float(logits.float().softmax(-1)[0, target_id])


def _rewrites(run: R.SubjectRun, direction: Tensor, new: int, old: int) -> Callable[[Tensor], Tensor]:
    """``alphas -> bool``: whether ``α · direction`` at the bare prompt's subject makes ``new`` beat ``old``."""
    def fn(alphas: Tensor) -> Tensor:
        with torch.no_grad():
            logits = run(alphas.to(direction)[:, None] * direction, torch.zeros(len(alphas), dtype=torch.long))
        return logits[:, new] > logits[:, old]
    return fn


@dataclass
class RomeSetup:
    """What every edit of one layer shares."""

    model: Transformer
    layer: int
    C: Tensor | None
    ridge: float
    params: R.ValueParams
    contexts: Sequence[str]
    encode: Encode
    bos_id: int


def rome_pair(s: RomeSetup, base: dict, src: dict, Q: Tensor) -> dict:
    """One ROME edit (``base``'s fact rewritten to ``src``'s object) and its diagnostics (see :func:`rome_layer`)."""
    model, layer = s.model, s.layer
    rome = s.params.method == "rome"
    tokens, subj, read, n = rome_prompts(base, s.contexts if rome else (), s.encode, s.bos_id,
                                         ESSENCE_PROMPTS if rome else ())
    run = R.SubjectRun(model, layer, tokens, subj, read)
    new, old = src["object_id"], base["object_id"]
    res = R.compute_value(run, n, new, s.params)
    k_bare, w = run.keys[0], res.delta
    u = R.rome_left(s.C, run.keys[:n].mean(0), k_bare, s.ridge)
    W = model.p(f"blocks.{layer}.W_out")
    k_src = key_at(model, layer, torch.tensor([src["tokens"]]), torch.tensor([src["subject_pos"]]))[0]
    tok, end = tokens[:1, :base["end_pos"] + 1], read[:1]
    with torch.no_grad():
        p = {"before": _p_new(model(tok, logits_at=end), new)}
        with R.edited(model, layer, W + torch.outer(u, w)):
            p["rome"] = _p_new(model(tok, logits_at=end), new)
        conv = R.rank1_edit_to_subspace(W, u, w, k_bare, k_src, Q)
        fwd = S.mlp_post_forward(model, layer, tok, subj[:1], end)
        zero = torch.zeros(1, dtype=torch.long)
        p["derived"] = _p_new(fwd(S.subspace_patch(k_bare, k_src, conv.v)[None], zero), new)
        p["row"] = _p_new(fwd(S.subspace_patch(k_bare, k_src, R.rowspace_component(conv.v, Q))[None], zero), new)
        p["delta_only"] = _p_new(run(w, zero), new)
        coef = R.collect_keys(model, [layer], [tok])[layer] @ u
    spill = torch.cat([coef[:base["subject_pos"]], coef[base["subject_pos"] + 1:]]).abs()
    w_norm = float(w.norm())
    alpha = R.smallest_scale(_rewrites(run, w / w_norm, new, old), 2 * w_norm) if w_norm > 0 else math.nan
    return {"p_new_before": p["before"], "p_new_rome": p["rome"], "p_new_derived": p["derived"],
            "p_new_row": p["row"], "p_new_delta_only": p["delta_only"],
            **{k: float(R.rewrite_score(p["before"], p[v])) for k, v in
               (("rome", "rome"), ("derived_subspace", "derived"), ("row_only", "row"), ("rome_delta_only", "delta_only"))},
            "exact": conv.exact, "achieved": conv.achieved, "theta": conv.theta,
            "delta_norm": w_norm, "v0_norm": res.v0_norm, "delta_rel": w_norm / res.v0_norm,
            "clamped": res.clamped, "clamp_steps": res.clamp_steps, "steps": res.steps, "stopped_early": res.stopped_early,
            "loss_nll": res.nll, "loss_kl": res.kl, "loss_wd": res.wd, "n_contexts": n - 1,
            "alpha_min_rel": alpha / w_norm if w_norm > 0 else math.nan,
            "spill_max": float(spill.max()) if len(spill) else 0.0, **R.edit_geometry(W, conv, s.C)}


def rome_layer(setup: RomeSetup, facts: list[dict], pairs: list[dict], log: Log = _nolog) -> tuple[pd.DataFrame, dict]:
    """Rewrite scores of ROME, of its equivalent subspace intervention and of that intervention's
    row-space part, with diagnostics, for each pair (the base fact rewritten to the source's object).

    ROME: ``δ`` from :func:`mechrepro.studies.subspace_illusion.rome.compute_value` (``setup.params``,
    over :func:`rome_prompts`), ``u = C⁻¹k* / (k_bareᵀC⁻¹k*)`` (``k*`` the mean key over the
    contexts), ``W' = W + u ⊗ δ``. The derived intervention patches, at the base's subject token, along
    the direction ``v`` of :func:`mechrepro.studies.subspace_illusion.rome.rank1_edit_to_subspace`
    from the source's key; ``exact`` says whether a 1-D patch from that source can reproduce the
    edit's output change at the bare prompt's key (else ``v`` is the best one). Per edit also:
    ``rome_delta_only`` (rewrite score of ``δ`` added at the subject token alone, without the
    weight edit's changes at the other tokens), ``spill_max`` (largest ``|kᵀu|`` at another token
    of the prompt: the share of ``δ`` the weight edit adds there), ``alpha_min_rel`` (the smallest
    ``α/‖δ‖`` for which ``α·δ̂`` at the subject alone makes the new object beat the old, on
    ``(0, 2]``; NaN above), the optimisation's ``v0_norm``, ``delta_rel = ‖δ‖/‖v0‖``, ``clamped``,
    ``steps``, and :func:`mechrepro.studies.subspace_illusion.rome.edit_geometry`. Summary: the means
    of the scores, ``pearson`` (ROME vs derived; None when either is constant), ``exact_frac`` and
    the diagnostics' means (medians for ``alpha_min_rel`` and ``z_over_rms``).
    """
    Q = S.mlp_rowspace(setup.model, setup.layer)
    rows = []
    for i, p in enumerate(pairs):
        base, src = facts[p["base"]], facts[p["src"]]
        rows.append({"pair": i, "relation": p["relation"], "base_subject": base["subject"],
                     "new_object": src["object"], **rome_pair(setup, base, src, Q)})
        r = rows[-1]
        log("  pair %d/%d (%s -> %s): rewrite ROME %.3f, derived %.3f, row-only %.3f, delta only %.3f; "
            "|delta|/|v0| %.2f, %d steps%s", i + 1, len(pairs), base["subject"], src["object"], r["rome"],
            r["derived_subspace"], r["row_only"], r["rome_delta_only"], r["delta_rel"], r["steps"],
            ", clamped" if r["clamped"] else "")
    frame = pd.DataFrame(rows)
    return frame, rome_summary(frame, setup.layer, setup.params.method)


def _median(x) -> float | None:
    vals = [float(v) for v in x if not math.isnan(float(v))]
    return float(torch.tensor(vals, dtype=torch.float64).median()) if vals else None


def rome_summary(frame: pd.DataFrame, layer: int, method: str) -> dict:
    """The per-layer summary of :func:`rome_layer`'s frame (JSON-safe: None instead of NaN)."""
    r = pearson(frame.rome, frame.derived_subspace)
    return {"layer": layer, "method": method, "n_pairs": len(frame),
            **{k: float(frame[k].mean()) for k in ("rome", "derived_subspace", "row_only", "rome_delta_only",
                                                   "achieved", "delta_rel", "v0_norm", "gain_rel", "row_frac",
                                                   "spill_max")},
            "pearson": None if math.isnan(r) else r, "exact_frac": float(frame.exact.mean()),
            "clamp_frac": float(frame.clamped.mean()), "early_stop_frac": float(frame.stopped_early.mean()),
            "mean_steps": float(frame.steps.mean()), "alpha_min_rel": _median(frame.alpha_min_rel),
            "alpha_found_frac": float(frame.alpha_min_rel.notna().mean()), "z_over_rms": _median(frame.z_over_rms)}


def pearson(x, y) -> float:
    """Pearson correlation of two sequences; NaN when fewer than 2 values or either is constant."""
    a, b = torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))
