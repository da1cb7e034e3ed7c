"""The model organism of Study C: a small transformer trained here to answer multiple-choice questions.

The embedded default model (SmolLM2-135M) answers A/B/C/D questions at chance, and the paper's
model (Chinchilla 70B) is closed, so the default run trains its own subject: a Llama-style
decoder (RMSNorm, rotary positions, SwiGLU MLP; 4 layers, d_model 256, 4 heads each with its own
keys and values) with the real GPT-2 BPE tokenizer, on the synthetic questions of
:mod:`mechrepro.studies.mcq_circuits.data`. It is trained with the project's own forward pass
(:class:`mechrepro.core.model.Transformer`, whose weights :meth:`~mechrepro.core.model.Transformer.trainable`
turns into leaves), so the model trained is the model analysed, and saved as an ordinary model
directory (Hugging Face config + safetensors + tokenizer + ``manifest.json``) that
:func:`mechrepro.core.registry.load_model` loads like any other model.

Why it is built this way (the paper's mechanism, issue "an organism with genuine correct-letter
heads"): a correct-letter head attends from the final position to the label of the correct option
and copies its letter. Under causal attention that takes three steps: (i) an option's content
works out that it is correct, (ii) the final position fetches the correct option's list index,
(iii) a head whose query is that index attends to the label with the same index and copies it.
A model whose content tokens read their own label (the label comes just before its content) can
skip (iii): the final position then gathers the letter from the correct content ("content
gatherer", what the earlier 2-layer organism with a label probe learned).

Training (seeded; the time and the held-out accuracies are recorded every ``eval_every`` steps in
``history``, the training-time/accuracy curve).

**What makes it learn** (issue 15; every number below is one seeded run on the 2-core machine):

* **The answer loss runs over the whole vocabulary** (``answer_loss: vocabulary``), as a language
  model's next-token loss does. Over the options' answer tokens only, a head that attends equally
  to every label and copies what it reads raises every offered letter alike, so the loss cannot
  see the copy: the OV circuit gets no gradient until attention is on the correct label, and
  attention none until the OV copies (``tests/test_mcq_stages.py`` shows the zero gradient). With
  the options-only loss, random-letter accuracy stayed at chance for 2,000 steps while ABCD and
  digits reached 0.97 through an index → fixed letter shortcut; with one asked category and random
  letters only, the vocabulary loss reached 0.98 training accuracy by step 175 and the options
  loss was still at chance at step 375.
* **Category questions** (``tasks: [category]``): an option's word learns whether it is correct in
  one attention step (it reads the asked category). Fact and copy questions need the word matched
  with its duplicate in the question; under rotary positions a duplicate's layer-0 value is the
  word's own, so that takes two composed steps, and every run with them stayed at chance for
  500-1,200 steps. They remain available in ``tasks``.
* **Letters first and most**: the first ``first_steps`` steps use letters only (``any_letters``,
  below), and then three items in five (``train_label_sets``), so a label is mostly something to
  copy.
* **A constant learning rate after the warm-up** (``lr_schedule``): a cosine schedule over 600
  steps decayed the rate before the plateau (task loss at ln n) ended.
* The end probe reads the residual stream after layer 2 (``end_probe_layer``), one layer after the
  correctness it gathers.

Training details:

* Fresh items every step from a seeded stream. Each item's label set is drawn from
  ``train_label_sets`` (letters, ABCD, digits: label sets a pretrained model has seen; labels are
  arbitrary tokens to be copied). Shuffled ABCD, another separator and a missing prelude are never
  seen (``random_letters`` and ``other_letters`` are drawn from the training letters).
* **Curriculum**: the first ``first_steps`` steps use only ``first_label_sets``; the first
  ``copy_steps`` steps ask copy questions only when ``tasks`` has them ("Which option says
  dog?"); the number of options grows from 2 to 4 over the first ``ramp_steps`` steps; after
  that it is drawn from 2-4 (4 half of the time). Options get an adjective with probability
  ``adjective_p`` (options of variable length, so a label's list index is not a fixed offset).
* Losses: the cross-entropy of the correct answer token (``" " + label``) at the final position
  (``answer_loss``, above); a next-token loss over every position (``lm_weight``, softmax over the generator's
  vocabulary only); and **training-only probes** (``probe_weight``) on the residual stream after
  layer ``probe_layer``: the **list index** (0 … n−1) of every label token and every content
  token, whether each option's last content token (its word; an adjective before it cannot know)
  belongs to the correct option, and (``end_probe``) the correct option's list index at the
  final position after layer ``end_probe_layer``. There is **no label probe**: nothing teaches a content token, or the final
  position, a letter. The probes are discarded; they are
  not part of the saved model.
* ``label_control``: the documented architectural control, **on by default**. When true, no
  position before the answer line attends to a label token
  (:class:`mechrepro.core.model.LabelControl`), so a label's letter exists only at the label and
  the final line must fetch it from there: step (iii) cannot be skipped. The control is part of
  the model (saved in ``config.json``, applied by the analysis model too). It is on because
  training alone did not form the paper's head: without it (random letters three items in five,
  1,050 steps, held-out ABCD 1.00, random letters 0.975) the best head (L3H7) put 0.94 / 0.99
  of its label attention on the correct label, but its keys at the labels did not cluster by list
  position (R² 0.28, the check needs 0.5) and the model followed a swapped label on only 77% of
  prompts; with the control (same mix, 1,400 steps) the keys cluster (R² 0.74) and the model
  follows the swap on 100%.
* **Training letters** (``any_letters``): distinct letters from A-Z, never the normal letters in
  any order, so ABCD itself and shuffled ABCD stay what they were (seen and unseen). With random
  letters from E-Z only, the heads copied E-Z but not A-D (OV check 22/26 letters: A-D appear only
  in ABCD prompts, where the list index alone gives the answer).
* **Four heads per layer** (``n_heads``, d_head 64). With 8 heads (d_head 32, same recipe, 1,400
  steps) seven last-layer heads attended to the correct label and copied it, each carrying a
  seventh of the answer: none passed the direct-vs-total check (:mod:`~mechrepro.studies.mcq_circuits.verify`).
  Their frozen-norm direct effects were 1.5-1.6× their total effects, because when one of seven
  aligned writers is patched to another letter the residual's norm drops and the final norm scales
  the other six back up (with the norm recomputed, direct and total agreed within 10%), and the
  largest total effect (1.68) was below a tenth of the clean − corrupted logit difference. With
  four heads, fewer heads share the letter: in three of five training runs one last-layer head
  passed every check (docs/results.md, Study C); the default run's L3H0 passes narrowly.
* ``min_steps`` 1,400: stopped at 1,000 steps (every label set already ≥ 0.97) the best heads
  passed every check but the keys' (R² 0.485 and 0.44, the check needs 0.5).
* Only the embedding / unembedding rows of the tokens the generator uses are trained (embedding
  and unembedding untied; the trained input rows start at unit scale, ``embed_std``). The rest of
  the GPT-2 vocabulary keeps a seeded random initialisation and is never produced.
* AdamW with a linear warm-up over ``steps``/20, then a constant rate (or cosine decay,
  ``lr_schedule``); training stops early once the held-out accuracy of every training label set
  reaches ``stop_accuracy`` (checked every ``eval_every`` steps, not before ``min_steps``). The held-out set is drawn from another seed. The stage fails, naming the
  measured accuracy, when it stays below ``min_accuracy``.

The manifest records the training config, seed, a SHA-256 of every training token, the control
and the final accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import string
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from mechrepro.core.model import CONTROL_KEY, LabelControl, ModelSpec, Transformer, rotary_inv_freq
from mechrepro.studies.mcq_circuits import data as mcq

NAME = "mcq-organism"
ROPE_THETA = 10000.0
NORM_EPS = 1e-6


class OrganismTooWeakError(RuntimeError):
    """The trained organism did not reach the required held-out accuracy."""


class CachedTokenizer:
    """Memoises a Hugging Face tokenizer's ``__call__`` (the generator repeats few segments)."""

    def __init__(self, tok):
        self.tok = tok
        self._enc = lru_cache(maxsize=100_000)(lambda s: tuple(tok(s, add_special_tokens=False)["input_ids"]))

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": list(self._enc(text))}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def used_token_ids(tok, bos_id: int) -> list[int]:
    """Every token id the synthetic generator can produce, under every label set (and BOS)."""
    ids: set[int] = {bos_id}

    def add(text: str) -> None:
        ids.update(_ids(tok, text))

    for text in (mcq.PRELUDE + "\n\n", "\n", mcq.ANSWER, mcq.SEPARATOR, mcq.MUTATED_SEPARATOR):
        add(text)
    for lab in [*string.ascii_uppercase, *"123456789"]:
        add(lab)
        add(" " + lab)
    for adj in mcq.ADJECTIVES:
        add(" " + adj)
    for cat, words in mcq.CATEGORIES.items():
        add(f"Which of these is a {cat}?")
        for w in words:
            add(" " + w)
            add(f"Which option says {w}?")
            for name in mcq.NAMES:
                for verb, base in mcq.VERBS:
                    add(f"{name} {verb} a {w}. What does {name} {base}?")
    return sorted(ids)


def label_control(tok) -> LabelControl:
    """The control of this tokenizer: newline tokens and every single-token label (A-Z, 1-9)."""
    newline = sorted({i for t in ("\n", "\n\n") for i in _ids(tok, t)})
    labels = sorted({_ids(tok, x)[0] for x in [*string.ascii_uppercase, *"123456789"] if len(_ids(tok, x)) == 1})
    return LabelControl(tuple(newline), tuple(labels))


def organism_spec(cfg: dict, vocab_size: int) -> ModelSpec:
    d, h = cfg["d_model"], cfg["n_heads"]
    return ModelSpec("llama", cfg["n_layers"], h, cfg["n_kv_heads"], d, d // h, cfg["d_mlp"], vocab_size, NORM_EPS)


def init_params(spec: ModelSpec, gen: torch.Generator, embed_std: float, std: float = 0.02) -> dict[str, Tensor]:
    """Seeded initial weights in :class:`Transformer`'s layout (as Hugging Face initialises Llama,
    but the input embedding at ``embed_std``)."""
    d, e, f, h, g, v = spec.d_model, spec.d_head, spec.d_mlp, spec.n_heads, spec.n_kv_heads, spec.vocab_size

    def normal(*shape, s=std):
        return torch.randn(*shape, generator=gen) * s

    p = {"W_E": normal(v, d, s=embed_std)}
    for l in range(spec.n_layers):
        p |= {f"blocks.{l}.W_Q": normal(h, d, e), f"blocks.{l}.W_K": normal(g, d, e), f"blocks.{l}.W_V": normal(g, d, e),
              f"blocks.{l}.W_O": normal(h, e, d), f"blocks.{l}.ln1.w": torch.ones(d), f"blocks.{l}.ln2.w": torch.ones(d),
              f"blocks.{l}.W_gate": normal(d, f), f"blocks.{l}.W_in": normal(d, f), f"blocks.{l}.W_out": normal(f, d)}
    p |= {"ln_final.w": torch.ones(d), "W_U": normal(d, v)}
    return p


class Organism(torch.nn.Module):
    """The organism during training: a :class:`Transformer` over the generator's vocabulary only
    (``used`` GPT-2 ids → rows 0 … U−1) and the training-only probes."""

    def __init__(self, cfg: dict, used: list[int], control: LabelControl | None, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.used = torch.tensor(used)
        self.remap = torch.full((max(used) + 1,), -1, dtype=torch.long)
        self.remap[self.used] = torch.arange(len(used))
        spec = organism_spec(cfg, len(used))
        compact_control = None
        if control is not None:  # the control in compact ids
            compact_control = LabelControl(tuple(self.remap[list(control.newline_ids)].tolist()),
                                           tuple(int(self.remap[i]) for i in control.label_ids if i <= max(used)
                                                 and self.remap[i] >= 0))
        self.model = Transformer(spec, init_params(spec, gen, cfg.get("embed_std", 1.0)),
                                 rotary_inv_freq(spec.d_head, ROPE_THETA), compact_control)
        self.weights = self.model.trainable()
        self.probe_layer = min(cfg["probe_layer"], spec.n_layers - 1)
        self.end_probe_layer = min(cfg["end_probe_layer"], spec.n_layers - 1)
        self.probe_index = torch.nn.Linear(spec.d_model, 4)
        self.probe_correct = torch.nn.Linear(spec.d_model, 1)
        self.probe_end = torch.nn.Linear(spec.d_model, 4)
        self.end_probe = bool(cfg["end_probe"])

    def index(self, ids: Tensor) -> Tensor:
        if int(ids.max()) >= len(self.remap) or (self.remap[ids] < 0).any():
            bad = ids[(ids >= len(self.remap)) | (self.remap[ids.clamp_max(len(self.remap) - 1)] < 0)]
            raise ValueError(f"token ids {bad.unique().tolist()[:5]} are not in the organism's vocabulary")
        return self.remap[ids]

    def option_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Option logits at END ``[b, n]``."""
        logits = self.model(self.index(batch["tokens"]), logits_at=batch["end"])
        return logits.gather(1, self.index(batch["answer_ids"]))

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Logits at END over the organism's vocabulary ``[b, U]``, the option logits ``[b, n]``, the
        next-token loss and the probe loss of one training batch."""
        idx = self.index(batch["tokens"])
        cache: dict[str, Tensor] = {}
        name = f"blocks.{self.probe_layer}.hook_resid_post"
        end_name = f"blocks.{self.end_probe_layer}.hook_resid_post"
        logits = self.model(idx, cache=cache, cache_names=[name, end_name])  # [b, p, U]
        rows = torch.arange(len(idx))
        full = logits[rows, batch["end"]]
        opt = full.gather(1, self.index(batch["answer_ids"]))
        keep = batch["mask"][:, 1:].bool()
        lm = torch.nn.functional.cross_entropy(logits[:, :-1][keep], idx[:, 1:][keep])
        h = cache[name]  # [b, p, d]
        n = batch["label_pos"].shape[1]
        # list index at every label token and every content token
        lab_h = h[rows[:, None], batch["label_pos"]]  # [b, n, d]
        target = torch.arange(n).expand(len(idx), n)
        probe = torch.nn.functional.cross_entropy(self.probe_index(lab_h).flatten(0, 1), target.flatten())
        cm = batch["content_mask"].float()  # [b, n, p]
        tok_index = (cm * torch.arange(n)[None, :, None]).sum(1).long()  # [b, p]
        is_content = cm.sum(1) > 0
        probe = probe + torch.nn.functional.cross_entropy(self.probe_index(h[is_content]), tok_index[is_content])
        last, is_correct = correctness_targets(batch)  # [b, n] each
        probe = probe + torch.nn.functional.binary_cross_entropy_with_logits(
            self.probe_correct(h[rows[:, None], last])[..., 0], is_correct.float())
        if self.end_probe:  # the correct option's list index at the final position (step (ii))
            probe = probe + torch.nn.functional.cross_entropy(self.probe_end(cache[end_name][rows, batch["end"]]),
                                                              batch["correct"])
        return full, opt, lm, probe

    def answer_loss(self, full: Tensor, opt: Tensor, batch: dict[str, Tensor], kind: str) -> Tensor:
        """The task loss: cross-entropy of the correct answer token at END, over the organism's whole
        vocabulary (``vocabulary``, a language model's next-token loss) or over the options' answer
        tokens only (``options``)."""
        if kind == "options":
            return torch.nn.functional.cross_entropy(opt, batch["correct"])
        target = self.index(batch["answer_ids"]).gather(1, batch["correct"][:, None])[:, 0]
        return torch.nn.functional.cross_entropy(full, target)


def correctness_targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Where the correctness probe reads and what it should say: each option's *last* content token
    ``[b, n]`` and whether that option is the correct one ``[b, n]``.

    Only the last token: the option's word comes last (an adjective precedes it), and whether an
    option is correct is decided by its word, so an adjective cannot know it under causal
    attention (a target it cannot meet is noise in the probe loss).
    """
    cm = batch["content_mask"]  # [b, n, p]
    last = (cm * torch.arange(1, cm.shape[2] + 1)).argmax(-1)  # the last position with a 1
    n = cm.shape[1]
    return last, torch.arange(n)[None, :] == batch["correct"][:, None]


@torch.no_grad()
def evaluate(model, prompts: list[mcq.Prompt], pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """Accuracy (correct answer token has the highest option logit) and mean loss over ``prompts``.
    ``model``: an :class:`Organism` (training) or a full-vocabulary :class:`Transformer`."""
    correct, loss, n = 0, 0.0, 0
    for i in range(0, len(prompts), batch_size):
        batch = mcq.to_batch(prompts[i:i + batch_size], pad_id)
        if isinstance(model, Organism):
            logits = model.option_logits(batch)
        else:
            logits = model(batch["tokens"], logits_at=batch["end"]).gather(1, batch["answer_ids"])
        correct += (logits.argmax(-1) == batch["correct"]).sum().item()
        loss += torch.nn.functional.cross_entropy(logits, batch["correct"], reduction="sum").item()
        n += len(logits)
    return {"accuracy": correct / n, "loss": loss / n, "n": n}


def curriculum(cfg: dict, step: int, rng: random.Random) -> tuple[int, tuple[str, ...]]:
    """The number of options and the tasks of a training step (see the module docstring)."""
    tasks = ("copy",) if step < cfg["copy_steps"] else tuple(cfg["tasks"])
    if step < cfg["ramp_steps"]:
        top = 2 + int(2 * step / max(1, cfg["ramp_steps"]))
        return rng.randint(2, min(4, top)), tasks
    return (4 if rng.random() < 0.5 else rng.randint(2, 3)), tasks


def training_batch(cfg: dict, step: int, rng: random.Random, tok, bos_id: int) -> dict[str, Tensor]:
    n, tasks = curriculum(cfg, step, rng)
    label_sets = cfg["first_label_sets"] if step < cfg["first_steps"] else cfg["train_label_sets"]
    prompts = []
    for _ in range(cfg["batch_size"]):
        item = mcq.synthetic_item(rng, n, tasks, adjective_p=cfg["adjective_p"])
        ls = mcq.label_set(rng.choice(label_sets), n, rng)
        prompts.append(mcq.tokenize(item, ls, tok, bos_id))
    return mcq.to_batch(prompts, bos_id)


def heldout_sets(cfg: dict, tok, bos_id: int, seed: int) -> dict[str, list[mcq.Prompt]]:
    """The held-out prompts of every training label set (ABCD first), from another seed."""
    items = mcq.synthetic_items(cfg["n_eval"], seed + 10_000, tasks=tuple(cfg["tasks"]), prefix="heldout")
    names = ["abcd"] + [s for s in dict.fromkeys(cfg["train_label_sets"]) if s != "abcd"]
    return {s: mcq.make_prompts(items, s, tok, bos_id, seed) for s in names}


@contextlib.contextmanager
def deterministic_kernels():
    """Deterministic torch kernels inside (restored after). With two CPU threads some backward kernels
    sum in a varying order, so two runs of one seed trained different organisms (measured: different
    weights after 40 steps; the same with this on, at no cost in time)."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@deterministic_kernels()
def train(cfg: dict, tok, bos_id: int, seed: int, progress: Callable[[str], None] = print):
    """Train the organism; return ``(organism, summary)``.

    Raises :class:`OrganismTooWeakError` with the measured accuracy if the held-out normal-label
    accuracy stays below ``cfg["min_accuracy"]``.
    """
    torch.manual_seed(seed)
    ctok = CachedTokenizer(tok)
    control = label_control(ctok) if cfg["label_control"] else None
    org = Organism(cfg, used_token_ids(ctok, bos_id), control, seed)
    params = [p for p in org.parameters() if p.requires_grad] + org.weights
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.98))
    steps, warm = cfg["steps"], max(1, cfg["steps"] // 20)
    if cfg["lr_schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    else:  # constant after the warm-up
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = random.Random(f"organism-train-{seed}")
    held = heldout_sets(cfg, ctok, bos_id, seed)
    data_hash = hashlib.sha256()
    history = []
    t0 = time.time()
    stopped_at = steps
    for step in range(steps):
        batch = training_batch(cfg, step, rng, ctok, bos_id)
        data_hash.update(batch["tokens"].numpy().tobytes())
        full, opt_logits, lm_loss, probe_loss = org.losses(batch)
        task_loss = org.answer_loss(full, opt_logits, batch, cfg["answer_loss"])
        loss = task_loss + cfg["lm_weight"] * lm_loss + cfg["probe_weight"] * probe_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            evs = {s: evaluate(org, p, bos_id) for s, p in held.items()}
            history.append({"step": step + 1, "seconds": round(time.time() - t0, 1), "train_loss": task_loss.item(),
                            "lm_loss": lm_loss.item(), "probe_loss": probe_loss.item(),
                            "heldout_accuracy": evs["abcd"]["accuracy"], "heldout_loss": evs["abcd"]["loss"],
                            "heldout_accuracy_by_label_set": {s: e["accuracy"] for s, e in evs.items()}})
            progress(f"step {step + 1}/{steps}: task loss {task_loss.item():.3f}, probes {probe_loss.item():.3f}, "
                     "held-out accuracy " + ", ".join(f"{s} {e['accuracy']:.3f}" for s, e in evs.items())
                     + f" ({time.time() - t0:.0f}s)")
            if min(e["accuracy"] for e in evs.values()) >= cfg["stop_accuracy"] and step + 1 >= cfg["min_steps"]:
                stopped_at = step + 1
                break
    for w in org.weights:
        w.requires_grad_(False)
    final = {s: evaluate(org, p, bos_id) for s, p in held.items()}
    summary = {"config": dict(cfg), "seed": seed, "steps_run": stopped_at, "train_tokens_sha256": data_hash.hexdigest(),
               "heldout": final["abcd"], "heldout_by_label_set": final, "history": history,
               "timings": {"train_seconds": round(time.time() - t0, 1)},
               "label_control": control.to_dict() if control else None,
               "n_trained_parameters": sum(p.numel() for p in org.weights), "vocabulary_trained": len(org.used)}
    if final["abcd"]["accuracy"] < cfg["min_accuracy"]:
        raise OrganismTooWeakError(
            f"the MCQ organism reached {final['abcd']['accuracy']:.3f} held-out accuracy on normal labels after "
            f"{stopped_at} steps, below mcq.organism.min_accuracy = {cfg['min_accuracy']}; train longer "
            "(mcq.organism.steps) or with a higher learning rate (mcq.organism.lr)")
    return org, summary


def to_hf(org: Organism, vocab_size: int, bos_id: int, control: LabelControl | None, seed: int):
    """The trained organism as a Hugging Face Llama model over the whole GPT-2 vocabulary (rows of
    unused tokens: seeded random, never produced), with the control in its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m, spec = org.model, org.model.spec
    d, e, h, g = spec.d_model, spec.d_head, spec.n_heads, spec.n_kv_heads
    extra = {CONTROL_KEY: control.to_dict()} if control is not None else {}
    cfg = LlamaConfig(num_hidden_layers=spec.n_layers, hidden_size=d, num_attention_heads=h, num_key_value_heads=g,
                      intermediate_size=spec.d_mlp, vocab_size=vocab_size, max_position_embeddings=512,
                      bos_token_id=bos_id, eos_token_id=bos_id, tie_word_embeddings=False, rms_norm_eps=NORM_EPS,
                      rope_theta=ROPE_THETA, **extra)
    gen = torch.Generator().manual_seed(seed + 1)
    emb = torch.randn(vocab_size, d, generator=gen) * 0.02
    out = torch.randn(vocab_size, d, generator=gen) * 0.02
    with torch.no_grad():
        emb[org.used] = m.p("W_E")
        out[org.used] = m.p("W_U").T
        sd = {"model.embed_tokens.weight": emb, "lm_head.weight": out, "model.norm.weight": m.p("ln_final.w")}
        for l in range(spec.n_layers):
            s, b = f"model.layers.{l}.", f"blocks.{l}."
            for kind, n in (("q", h), ("k", g), ("v", g)):
                sd[s + f"self_attn.{kind}_proj.weight"] = m.p(b + f"W_{kind.upper()}").permute(0, 2, 1).reshape(n * e, d)
            sd[s + "self_attn.o_proj.weight"] = m.p(b + "W_O").reshape(h * e, d).T
            sd[s + "input_layernorm.weight"] = m.p(b + "ln1.w")
            sd[s + "post_attention_layernorm.weight"] = m.p(b + "ln2.w")
            sd[s + "mlp.gate_proj.weight"] = m.p(b + "W_gate").T
            sd[s + "mlp.up_proj.weight"] = m.p(b + "W_in").T
            sd[s + "mlp.down_proj.weight"] = m.p(b + "W_out").T
        hf = LlamaForCausalLM(cfg)
        hf.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=True)
    return hf.eval()


def save(org: Organism, tok, out_dir: str | Path, summary: dict) -> dict:
    """Save the organism as a model directory with ``manifest.json`` (loadable by ``registry.load_model``)."""
    from mechrepro.core.registry import _save_local, state_dict_sha256
    from mechrepro.workflow.artifacts import write_json

    control = LabelControl.from_dict(summary.get("label_control"))
    hf = to_hf(org, len(tok), int(tok.bos_token_id), control, summary["seed"])
    out = Path(out_dir)
    files = _save_local(hf, tok, out)
    model = Transformer.from_hf(hf)
    acc = summary["heldout"]["accuracy"]
    spec = model.spec
    ctl = "; control: positions before the answer line cannot attend to labels" if control else ""
    manifest = {
        "name": NAME,
        "description": (f"MCQ model organism ({spec.n_layers} layers, d_model {spec.d_model}, "
                        f"{spec.n_heads} heads / {spec.n_kv_heads} kv heads{ctl}; trained here on synthetic "
                        f"questions, seed {summary['seed']}, held-out ABCD accuracy {acc:.3f})"),
        "source": {"kind": "trained", "seed": summary["seed"], "config": summary["config"],
                   "train_tokens_sha256": summary["train_tokens_sha256"], "steps_run": summary["steps_run"],
                   "heldout_accuracy": acc},
        "label_control": control.to_dict() if control else None,
        "files": files, "weight_sha256": state_dict_sha256(model), "spec": spec.to_dict(),
        "bos_token_id": int(tok.bos_token_id),
    }
    write_json(out / "manifest.json", manifest)
    summary["n_parameters"] = sum(p.numel() for p in model.state_dict().values())
    return manifest
