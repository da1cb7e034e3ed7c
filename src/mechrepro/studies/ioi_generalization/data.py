"""IOI (indirect object identification) prompt datasets for Study A.

A prompt such as "When Mary and John went to the store, John gave a drink to" has an indirect
object IO (Mary) and a subject S (John) that is mentioned twice; the model should continue with
" Mary". Token roles: S1 / IO1 (first mentions), S1+1 / IO1+1 (the tokens after them), IO2 / IO3
(extra IO mentions of the ``double_io`` / ``triple_io`` variants), S2 (second S mention) and END
(the last token, where the answer is predicted).

Every prompt has a paired ABC prompt: same template, place and object, with every name slot
refilled by distinct random names. ABC prompts are the reference distribution for mean ablation
(means per template) and the corrupted source for path patching.

All names, places and objects are filtered to single tokens (with a leading space) in the model's
tokenizer, so all prompts of one template have the same length and positions align.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from mechrepro.core.tokens import pad

VARIANTS = ("base", "double_io", "triple_io")
ROLES = ("S1", "S1+1", "IO1", "IO1+1", "IO2", "IO3", "S2", "END")
PLACEHOLDERS = ("{N1}", "{N2}", "{S}")


class DatasetError(ValueError):
    """The prompt material cannot make the requested dataset."""


def single_token_words(words: list[str], tokenizer) -> list[str]:
    """The words of ``words`` (deduplicated, order kept) that are one token after a space."""
    out, seen = [], set()
    for w in words:
        if w in seen:
            continue
        seen.add(w)
        if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1:
            out.append(w)
    return out


def check_template(template: str, index: int) -> None:
    """Raise :class:`DatasetError` unless ``template`` has {N1}, {N2} and {S}, in that order."""
    missing = [p for p in PLACEHOLDERS if template.count(p) != 1]
    if missing:
        raise DatasetError(
            f"ioi template {index} ('{template}') must contain each of {', '.join(PLACEHOLDERS)} exactly "
            f"once; problem with {', '.join(missing)}. Fix it in the ioi data file (config key ioi.data_file)."
        )
    i1, i2, i3 = (template.index(p) for p in PLACEHOLDERS)
    if not i1 < i2 < i3:
        raise DatasetError(f"ioi template {index} ('{template}'): the order must be {{N1}} ... {{N2}} ... {{S}}")
    unknown = set(re.findall(r"\{[^}]*\}", template)) - {*PLACEHOLDERS, "{PLACE}", "{OBJECT}"}
    if unknown:
        raise DatasetError(f"ioi template {index} ('{template}') has unknown placeholders {sorted(unknown)}; "
                           "allowed: {N1} {N2} {S} {PLACE} {OBJECT}")


def insert_variant(template: str, sentences: list[str]) -> str:
    """Insert the variant's extra sentences ("{IO} was happy." …) directly before {S}."""
    if not sentences:
        return template
    return template.replace("{S}", " ".join(sentences) + " {S}")


@dataclass
class Rendered:
    text: str
    spans: dict[str, tuple[int, int]]  # role -> character span of that name


def render(template: str, names: dict[str, str], place: str, obj: str) -> Rendered:
    """Fill a (variant-expanded) template; record character spans of the name slots.

    ``names`` maps slot -> name for the slots N1, N2, S and IO (the extra IO mentions).
    """
    pieces = re.split(r"(\{[A-Z0-9]+\})", template)
    text, spans, io_count = "", {}, 0
    for piece in pieces:
        if piece == "{PLACE}":
            text += place
        elif piece == "{OBJECT}":
            text += obj
        elif piece in ("{N1}", "{N2}", "{S}", "{IO}"):
            slot = piece[1:-1]
            if slot == "IO":
                io_count += 1
                slot = f"IO{io_count + 1}"  # first extra mention is IO2
            name = names[slot if slot in names else "IO"]
            spans[slot] = (len(text), len(text) + len(name))
            text += name
        else:
            text += piece
    return Rendered(text, spans)


def _token_index(offsets: list[tuple[int, int]], span: tuple[int, int]) -> int:
    for i, (a, b) in enumerate(offsets):
        if a < span[1] and b > span[0]:
            return i
    raise DatasetError(f"no token covers character span {span}")


def tokenize(rendered: Rendered, tokenizer, bos_id: int) -> tuple[list[int], dict[str, int]]:
    """Token ids (BOS first) and the position of each name slot."""
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [bos_id] + list(enc["input_ids"])
    pos = {slot: _token_index(enc["offset_mapping"], span) + 1 for slot, span in rendered.spans.items()}
    return ids, pos


def make_dataset(data: dict, variant: str, n: int, tokenizer, bos_id: int, seed: int,
                 min_names: int = 10) -> dict:
    """Build ``n`` IOI prompts of ``variant`` (ABBA/BABA balanced) with paired ABC prompts.

    The random draws depend only on ``seed`` and the prompt index, not on the variant, so prompt i
    of every variant uses the same names, template, place and object.
    """
    if variant not in data["variant_sentences"]:
        raise DatasetError(f"unknown ioi variant '{variant}'; allowed: {', '.join(data['variant_sentences'])}")
    if n < 2:
        raise DatasetError(f"ioi.n_prompts must be at least 2 (got {n})")
    templates = data["templates"]
    for i, t in enumerate(templates):
        check_template(t, i)
    names = single_token_words(data["names"], tokenizer)
    places = single_token_words(data["places"], tokenizer)
    objects = single_token_words(data["objects"], tokenizer)
    if len(names) < max(min_names, 7):
        raise DatasetError(
            f"only {len(names)} of the {len(data['names'])} names in the ioi data file are single tokens "
            f"for this tokenizer; at least {max(min_names, 7)} are needed. Add more common first names."
        )
    if not places or not objects:
        raise DatasetError("no single-token places or objects left: extend 'places'/'objects' in the ioi data file")
    sentences = data["variant_sentences"][variant]
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        t_id = (i // 2) % len(templates)
        order = "ABBA" if i % 2 == 0 else "BABA"
        picks = rng.choice(len(names), size=7, replace=False)
        io, s = names[picks[0]], names[picks[1]]
        place = places[rng.integers(len(places))]
        obj = objects[rng.integers(len(objects))]
        template = insert_variant(templates[t_id], sentences)
        slots = {"N1": io if order == "ABBA" else s, "N2": s if order == "ABBA" else io, "S": s, "IO": io}
        clean = render(template, slots, place, obj)
        ids, pos = tokenize(clean, tokenizer, bos_id)
        # ABC: every name slot gets a distinct random name
        abc_names = [names[j] for j in picks[2:]]  # unrelated to IO and S
        abc_slots = {"N1": abc_names[0], "N2": abc_names[1], "S": abc_names[2],
                     "IO2": abc_names[3], "IO3": abc_names[4], "IO": abc_names[3]}
        abc = render(template, abc_slots, place, obj)
        abc_ids, abc_pos = tokenize(abc, tokenizer, bos_id)
        if len(abc_ids) != len(ids) or abc_pos != pos:
            raise DatasetError(f"ABC prompt of '{clean.text}' does not align with it")
        io_slot, s_slot = ("N1", "N2") if order == "ABBA" else ("N2", "N1")
        positions = {"S1": pos[s_slot], "S1+1": pos[s_slot] + 1, "IO1": pos[io_slot],
                     "IO1+1": pos[io_slot] + 1, "IO2": pos.get("IO2", -1), "IO3": pos.get("IO3", -1),
                     "S2": pos["S"], "END": len(ids) - 1}
        prompts.append({
            "id": i, "template": t_id, "order": order, "text": clean.text, "io": io, "s": s,
            "place": place, "object": obj, "tokens": ids,
            "io_token": tokenizer(" " + io, add_special_tokens=False)["input_ids"][0],
            "s_token": tokenizer(" " + s, add_special_tokens=False)["input_ids"][0],
            "positions": positions, "abc_text": abc.text, "abc_tokens": abc_ids,
        })
    return {"variant": variant, "n": n, "seed": seed, "n_templates": len(templates),
            "names": names, "places": places, "objects": objects, "prompts": prompts}


@dataclass
class Batch:
    """Tensors of a dataset, right-padded: ``tokens [n, p]``, ``abc [n, p]``, ``pos[role] [n]``."""

    tokens: torch.Tensor
    abc: torch.Tensor
    pos: dict[str, torch.Tensor]
    io: torch.Tensor
    s: torch.Tensor
    template: torch.Tensor
    order: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, idx) -> Batch:
        idx = torch.as_tensor(idx)
        return Batch(self.tokens[idx], self.abc[idx], {k: v[idx] for k, v in self.pos.items()},
                     self.io[idx], self.s[idx], self.template[idx], [self.order[i] for i in idx.tolist()])


def to_batch(dataset: dict, pad_id: int) -> Batch:
    """Stack a dataset's prompts into padded tensors."""
    prompts = dataset["prompts"]
    tok = pad([p["tokens"] for p in prompts], pad_id)
    abc = pad([p["abc_tokens"] for p in prompts], pad_id, width=tok.shape[1])
    pos = {r: torch.tensor([p["positions"][r] for p in prompts]) for r in ROLES}
    return Batch(tok, abc, pos, torch.tensor([p["io_token"] for p in prompts]),
                 torch.tensor([p["s_token"] for p in prompts]),
                 torch.tensor([p["template"] for p in prompts]), [p["order"] for p in prompts])


# Seeds of the prompt sets besides the evaluation prompts (``seed`` + offset): the discovery split and
# the ABC sample of the ablation means are drawn from their own streams.
DISCOVERY_SEED_OFFSET = 1_000_003
ABLATION_SEED_OFFSET = 2_000_003


def discovery_split(data: dict, n: int, tokenizer, bos_id: int, seed: int, exclude: dict,
                    min_names: int = 10) -> dict:
    """``n`` base prompts for circuit discovery, disjoint from the evaluation prompts ``exclude``.

    Drawn like :func:`make_dataset` from the seed ``seed + DISCOVERY_SEED_OFFSET``; a prompt whose
    text (or whose ABC text) is also an evaluation prompt's is dropped and another is drawn, so
    no discovery prompt is evaluated. ``n_dropped`` records how many were dropped.
    """
    taken = {p["text"] for p in exclude["prompts"]} | {p["abc_text"] for p in exclude["prompts"]}
    draw = 2 * n + 2
    while True:
        ds = make_dataset(data, "base", draw, tokenizer, bos_id, seed + DISCOVERY_SEED_OFFSET, min_names)
        kept = [p for p in ds["prompts"] if p["text"] not in taken and p["abc_text"] not in taken]
        if len(kept) >= n:
            break
        if draw > 64 * n + len(taken):
            raise DatasetError(f"only {len(kept)} of {draw} discovery prompts differ from the evaluation prompts; "
                               "add names, places or objects to the ioi data file")
        draw *= 2
    prompts = [dict(p, id=i) for i, p in enumerate(kept[:n])]
    return dict(ds, n=n, seed=seed + DISCOVERY_SEED_OFFSET, prompts=prompts, n_dropped=len(ds["prompts"]) - len(kept),
                split="discovery")


def abc_sample(data: dict, variant: str, n: int, tokenizer, bos_id: int, seed: int,
               min_names: int = 10) -> tuple[list[list[int]], list[int]]:
    """``n`` ABC prompts of ``variant`` (tokens and template ids) for the ablation means, drawn from
    the seed ``seed + ABLATION_SEED_OFFSET`` (not the evaluation prompts' ABC partners)."""
    ds = make_dataset(data, variant, n, tokenizer, bos_id, seed + ABLATION_SEED_OFFSET, min_names)
    return [p["abc_tokens"] for p in ds["prompts"]], [p["template"] for p in ds["prompts"]]

