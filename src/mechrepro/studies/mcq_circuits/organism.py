"""The model organism of Study C: a small transformer trained here to answer multiple-choice questions.

The embedded default model (SmolLM2-135M) answers A/B/C/D questions at chance, and the paper's
model (Chinchilla 70B) is closed, so the default run trains its own subject: a Llama-style
decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP; a few layers,
d_model 128) with the real GPT-2 BPE tokenizer, on the synthetic questions of :mod:`mechrepro.studies.mcq_circuits.data`.
It is saved as an ordinary model directory (Hugging Face config + safetensors + tokenizer +
``manifest.json``), so :func:`mechrepro.core.registry.load_model` loads it like any other model and
the analyses cannot tell it apart from a pretrained one.

Training (seeded, a few minutes on 2 CPU cores):

* Fresh items every step from a seeded stream; each item's label set is drawn from
  ``train_label_sets``. The default, ``[abcd, random_letters]``, shows the model that labels are
  arbitrary tokens to be copied (as pretraining does for real models); numbers, other ordered
  letters, shuffled ABCD, another separator and a missing prelude are never seen, so those
  mutations test generalisation, as in the paper.
* The task loss is the cross-entropy over the options' answer tokens (``" " + label``) at the
  final position. Two auxiliary losses make it learnable in minutes:

  - a next-token loss over every position (weight ``lm_weight``, softmax over the generator's
    vocabulary only), the language-modelling signal a pretrained model has had;
  - **training-only probes** (weight ``probe_weight``) on the residual stream after the first
    layer, at each option's last content token: a linear read-out of that option's label, and of
    whether it is the correct option. The task needs two composed steps (an option's content
    must learn its label, then the final position must find the correct option and copy that
    label); with the task loss alone the model collapsed to a constant answer and stayed at
    chance for 2,000 steps (measured). The probes teach the first step directly; they are
    discarded and are not part of the saved model — the circuit the analyses find is whatever
    the model built on top of such features.

  Only the embedding / unembedding rows of the ~240 tokens the generator uses are trained
  (embedding and unembedding untied; the trained input rows start at unit scale). The rest of
  the GPT-2 vocabulary keeps its random initialisation and is never produced.
* AdamW with linear warm-up and cosine decay; training stops early once the held-out accuracy
  on normal (ABCD) labels reaches ``stop_accuracy`` (checked every ``eval_every`` steps).
* The held-out set is drawn from another seed. The stage fails, naming the measured accuracy,
  when it stays below ``min_accuracy`` (the paper's "only items the model gets right" needs a
  model that gets most of them right).

The manifest records the training config, seed, a SHA-256 of every training token and the
final accuracy.
"""

from __future__ import annotations

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

from mechrepro.studies.mcq_circuits import data as mcq

NAME = "mcq-organism"


class OrganismTooWeakError(RuntimeError):
    """The trained organism did not reach the required held-out accuracy."""


class CachedTokenizer:
    """Memoises a Hugging Face tokenizer's ``__call__`` (the generator repeats few segments)."""

    def __init__(self, tok):
        self.tok = tok
        self._enc = lru_cache(maxsize=100_000)(lambda s: tuple(tok(s, add_special_tokens=False)["input_ids"]))

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": list(self._enc(text))}


def build(cfg: dict, vocab_size: int, bos_id: int, seed: int):
    """A freshly initialised Hugging Face Llama-style model with the organism's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(num_hidden_layers=cfg["n_layers"], hidden_size=cfg["d_model"],
                         num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
                         intermediate_size=cfg["d_mlp"], vocab_size=vocab_size, max_position_embeddings=512,
                         bos_token_id=bos_id, eos_token_id=bos_id, tie_word_embeddings=False,
                         initializer_range=cfg.get("init_std", 0.02))
    return LlamaForCausalLM(hf_cfg)


def used_token_ids(tok, bos_id: int) -> list[int]:
    """Every token id the synthetic generator can produce, under every label set (and BOS)."""
    ids: set[int] = {bos_id}

    def add(text: str) -> None:
        ids.update(tok(text, add_special_tokens=False)["input_ids"])

    for text in (mcq.PRELUDE + "\n\n", "\n", mcq.ANSWER, mcq.SEPARATOR, mcq.MUTATED_SEPARATOR):
        add(text)
    for lab in [*string.ascii_uppercase, *"123456789"]:
        add(lab)
        add(" " + lab)
    for cat, words in mcq.CATEGORIES.items():
        add(f"Which of these is a {cat}?")
        for w in words:
            add(" " + w)
            add(f"Which option says {w}?")
            for name in mcq.NAMES:
                for verb, base in mcq.VERBS:
                    add(f"{name} {verb} a {w}. What does {name} {base}?")
    return sorted(ids)


class _Trainable(torch.nn.Module):
    """The HF model with its embedding and unembedding frozen except for the rows of the tokens in use.

    Training only those rows keeps the optimizer step small (the GPT-2 vocabulary has 50,257
    rows; the generator uses a few hundred). The trained input rows start at unit scale
    (``embed_std``): with the default 0.02 the token identities are drowned by the blocks' outputs
    in the residual stream and the model collapses to a constant answer. :meth:`write_back`
    copies the rows into the model (embedding and unembedding are untied).
    """

    def __init__(self, hf_model, used: list[int], embed_std: float = 1.0):
        super().__init__()
        self.hf = hf_model
        emb, out = hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight
        emb.requires_grad_(False)
        out.requires_grad_(False)
        self.used = torch.tensor(used)
        self.rows = torch.nn.Parameter(torch.randn(len(used), emb.shape[1]) * embed_std)
        self.out_rows = torch.nn.Parameter(out.detach()[self.used].clone())
        self.remap = torch.full((emb.shape[0],), -1, dtype=torch.long)
        self.remap[self.used] = torch.arange(len(used))
        d = emb.shape[1]
        # training scaffolding (not saved): probes on the residual stream after the first layer
        self.probe_label = torch.nn.Linear(d, len(used))
        self.probe_correct = torch.nn.Linear(d, 1)

    def _index(self, ids: Tensor) -> Tensor:
        idx = self.remap[ids]
        if (idx < 0).any():
            raise ValueError(f"token ids {ids[idx < 0].unique().tolist()[:5]} are not in the organism's vocabulary")
        return idx

    def option_logits(self, batch: dict[str, Tensor], lm: bool = False):
        """Option logits at END ``[b, n]``; with ``lm`` also the auxiliary losses ``(next-token, probes)``."""
        idx = self._index(batch["tokens"])
        out = self.hf.model(inputs_embeds=self.rows[idx], attention_mask=batch["mask"], output_hidden_states=lm)
        hidden = out.last_hidden_state
        rows = torch.arange(len(hidden))
        h_end = hidden[rows, batch["end"]]  # already final-normed
        opt = torch.einsum("bd,bkd->bk", h_end, self.out_rows[self._index(batch["answer_ids"])])
        if not lm:
            return opt
        logits = hidden[:, :-1] @ self.out_rows.T  # [b, p-1, used]
        keep = batch["mask"][:, 1:].bool()
        lm_loss = torch.nn.functional.cross_entropy(logits[keep], idx[:, 1:][keep])
        # probes at each option's last content token, after layer 0: its label, and whether it is correct
        width = batch["tokens"].shape[1]
        last = (batch["content_mask"] * torch.arange(width)).argmax(-1)  # [b, n]
        h1 = out.hidden_states[1][rows[:, None], last]  # [b, n, d]
        labels = idx.gather(1, batch["label_pos"])  # [b, n]
        probe = torch.nn.functional.cross_entropy(self.probe_label(h1).flatten(0, 1), labels.flatten())
        target = torch.nn.functional.one_hot(batch["correct"], h1.shape[1]).float()
        probe = probe + torch.nn.functional.binary_cross_entropy_with_logits(self.probe_correct(h1)[..., 0], target)
        return opt, lm_loss, probe

    @torch.no_grad()
    def write_back(self):
        self.hf.get_input_embeddings().weight[self.used] = self.rows.detach()
        self.hf.get_output_embeddings().weight[self.used] = self.out_rows.detach()
        return self.hf


def option_logits(hf_model, batch: dict[str, Tensor]) -> Tensor:
    """Logits of the options' answer tokens at the final position: ``[b, n_options]``."""
    if isinstance(hf_model, _Trainable):
        return hf_model.option_logits(batch)
    hidden = hf_model.model(input_ids=batch["tokens"], attention_mask=batch["mask"]).last_hidden_state
    h_end = hidden[torch.arange(len(hidden)), batch["end"]]  # already final-normed
    W = hf_model.get_output_embeddings().weight  # [v, d]
    return torch.einsum("bd,bkd->bk", h_end, W[batch["answer_ids"]])


@torch.no_grad()
def evaluate(model, prompts: list[mcq.Prompt], pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """Accuracy (correct answer token has the highest option logit) and mean loss over ``prompts``."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for i in range(0, len(prompts), batch_size):
        batch = mcq.to_batch(prompts[i:i + batch_size], pad_id)
        logits = option_logits(model, batch)
        correct += (logits.argmax(-1) == batch["correct"]).sum().item()
        loss += torch.nn.functional.cross_entropy(logits, batch["correct"], reduction="sum").item()
        n += len(logits)
    return {"accuracy": correct / n, "loss": loss / n, "n": n}


def train(cfg: dict, tok, bos_id: int, seed: int, progress: Callable[[str], None] = print):
    """Train the organism; return ``(hf_model, summary)``.

    Raises :class:`OrganismTooWeakError` with the measured accuracy if the held-out normal-label
    accuracy stays below ``cfg["min_accuracy"]``.
    """
    ctok = CachedTokenizer(tok)
    vocab = len(tok)
    hf = build(cfg, vocab, bos_id, seed)
    model = _Trainable(hf, used_token_ids(ctok, bos_id))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.98))
    steps, warm = cfg["steps"], max(1, cfg["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(f"organism-train-{seed}")
    held_items = mcq.synthetic_items(cfg["n_eval"], seed + 10_000, prefix="heldout")
    held = mcq.make_prompts(held_items, "abcd", ctok, bos_id, seed)
    data_hash = hashlib.sha256()
    history = []
    t0 = time.time()
    stopped_at = steps
    for step in range(steps):
        model.train()
        prompts = []
        for _ in range(cfg["batch_size"]):
            item = mcq.synthetic_item(rng)
            ls = mcq.label_set(rng.choice(cfg["train_label_sets"]), len(item.options), rng)
            prompts.append(mcq.tokenize(item, ls, ctok, bos_id))
        batch = mcq.to_batch(prompts, bos_id)
        data_hash.update(batch["tokens"].numpy().tobytes())
        opt_logits, lm_loss, probe_loss = model.option_logits(batch, lm=True)
        task_loss = torch.nn.functional.cross_entropy(opt_logits, batch["correct"])
        loss = task_loss + cfg["lm_weight"] * lm_loss + cfg["probe_weight"] * probe_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            ev = evaluate(model, held, bos_id)
            history.append({"step": step + 1, "train_loss": task_loss.item(), "lm_loss": lm_loss.item(),
                            "heldout_accuracy": ev["accuracy"],
                            "heldout_loss": ev["loss"]})
            progress(f"step {step + 1}/{steps}: task loss {task_loss.item():.3f}, next-token loss {lm_loss.item():.3f}, "
                     f"held-out accuracy "
                     f"{ev['accuracy']:.3f} ({time.time() - t0:.0f}s)")
            if ev["accuracy"] >= cfg["stop_accuracy"]:
                stopped_at = step + 1
                break
    hf = model.write_back()
    hf.eval()
    final = evaluate(hf, held, bos_id)  # the saved model itself, full vocabulary path
    summary = {"config": dict(cfg), "seed": seed, "steps_run": stopped_at, "train_tokens_sha256": data_hash.hexdigest(),
               "heldout": final, "history": history, "timings": {"train_seconds": round(time.time() - t0, 1)},
               "n_parameters": sum(p.numel() for p in hf.parameters()),
               "n_trained_parameters": sum(p.numel() for p in params), "vocabulary_trained": len(model.used)}
    if final["accuracy"] < cfg["min_accuracy"]:
        raise OrganismTooWeakError(
            f"the MCQ organism reached {final['accuracy']:.3f} held-out accuracy on normal labels after "
            f"{stopped_at} steps, below mcq.organism.min_accuracy = {cfg['min_accuracy']}; train longer "
            "(mcq.organism.steps) or with a higher learning rate (mcq.organism.lr)")
    return hf, summary


def save(hf_model, tok, out_dir: str | Path, summary: dict) -> dict:
    """Save the organism as a model directory with ``manifest.json`` (loadable by ``registry.load_model``)."""
    from mechrepro.workflow.artifacts import write_json
    from mechrepro.core.model import Transformer
    from mechrepro.core.registry import _save_local, state_dict_sha256

    out = Path(out_dir)
    files = _save_local(hf_model, tok, out)
    model = Transformer.from_hf(hf_model)
    acc = summary["heldout"]["accuracy"]
    manifest = {
        "name": NAME,
        "description": (f"MCQ model organism ({model.spec.n_layers} layers, d_model {model.spec.d_model}, "
                        f"{model.spec.n_heads} heads / {model.spec.n_kv_heads} kv heads; trained here on synthetic "
                        f"questions, seed {summary['seed']}, held-out ABCD accuracy {acc:.3f})"),
        "source": {"kind": "trained", "seed": summary["seed"], "config": summary["config"],
                   "train_tokens_sha256": summary["train_tokens_sha256"], "steps_run": summary["steps_run"],
                   "heldout_accuracy": acc},
        "files": files, "weight_sha256": state_dict_sha256(model), "spec": model.spec.to_dict(),
        "bos_token_id": int(tok.bos_token_id),
    }
    write_json(out / "manifest.json", manifest)
    return manifest
