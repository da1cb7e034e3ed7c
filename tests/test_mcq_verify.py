"""The checks of a genuine correct-letter head (studies/mcq_circuits/verify.py) on two tiny hand-built
models that both answer every question:

* ``letter``: layer 0 moves the correct option's index from the question token to the final
  position; head L1H0 attends from there to the label at that index and copies its letter (a
  correct-letter head, by construction);
* ``gatherer``: layer 0 copies each label's letter into its content token; head L1H0 attends from
  the final position to the correct *content* and copies the letter found there (no head attends
  to the labels).

The first must pass every check, the second must not, and the claims that need a correct-letter
head must then be untestable.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT

from mechrepro.core.model import ModelSpec, Transformer
from mechrepro.studies.mcq_circuits import analysis as ma
from mechrepro.studies.mcq_circuits import metrics as M
from mechrepro.studies.mcq_circuits import verify as V
from mechrepro.studies.mcq_circuits.data import Prompt, to_batch
from mechrepro.workflow import claims

D, H, E = 128, 4, 32
LETTER, ANSWER, QUESTION, FILLER, BOS = 1, 27, 53, 57, 0  # token ids: 26 letters, 26 answers, 4 questions
VOCAB = 58
LABEL_POS, CONTENT_POS, END = [3, 5, 7, 9], [4, 6, 8, 10], 12
# residual dimensions: 0-25 letters, 26-29 list index, 30-33 "option j is correct" (question), 34-37 moved index,
# 38 END marker, 39-42 content index, 62 BOS, 63 other tokens
IDX, QDIM, MOVED, ENDD, CIDX, BOSD, OTHER = 26, 30, 34, 38, 39, 62, 63
TH = {"min_label_attention": 0.2, "min_correct_share": 0.5, "max_direct_gap": 0.3, "direct_norm": "frozen", "min_total_share": 0.1,
      "min_swap": 0.8, "min_ov_letters": 0.9, "min_key_r2": 0.5, "n_prompts": 32}


def hand_built(kind: str) -> Transformer:
    """A 2-layer GPT-2-style model whose every weight is set by hand (see the module docstring)."""
    spec = ModelSpec("gpt2", 2, H, H, D, E, 16, VOCAB, 1e-5, n_positions=16, qkv_bias=True)
    z = torch.zeros
    W_E, W_pos, W_U = z(VOCAB, D), z(16, D), z(D, VOCAB)
    for k in range(26):
        W_E[LETTER + k, k] = 1.0
        W_U[k, ANSWER + k] = 1.0
    for j in range(4):
        W_E[QUESTION + j, QDIM + j] = 1.0
        W_pos[LABEL_POS[j], IDX + j] = 1.0
        W_pos[CONTENT_POS[j], CIDX + j] = 1.0
    W_E[BOS, BOSD] = 1.0
    W_E[FILLER, OTHER] = 1.0
    W_pos[END, ENDD] = 1.0
    p = {"W_E": W_E, "W_pos": W_pos, "W_U": W_U, "ln_final.w": torch.ones(D), "ln_final.b": z(D)}
    for l in range(2):
        p |= {f"blocks.{l}.{n}": z(H, D, E) for n in ("W_Q", "W_K", "W_V")}
        p |= {f"blocks.{l}.{n}": z(H, E) for n in ("b_Q", "b_K", "b_V")}
        p |= {f"blocks.{l}.W_O": z(H, E, D), f"blocks.{l}.b_O": z(D), f"blocks.{l}.ln1.w": torch.ones(D),
              f"blocks.{l}.ln1.b": z(D), f"blocks.{l}.ln2.w": torch.ones(D), f"blocks.{l}.ln2.b": z(D),
              f"blocks.{l}.W_in": z(D, 16), f"blocks.{l}.b_in": z(16), f"blocks.{l}.W_out": z(16, D),
              f"blocks.{l}.b_out": z(D)}
    q0, k0, v0, o0 = (p[f"blocks.0.{n}"] for n in ("W_Q", "W_K", "W_V", "W_O"))
    q1, k1, v1, o1 = (p[f"blocks.1.{n}"] for n in ("W_Q", "W_K", "W_V", "W_O"))
    # L0H0: END attends to the question token and moves "option j is correct" to MOVED + j
    q0[0, ENDD, 0] = 3.0
    for j in range(4):
        k0[0, QDIM + j, 0] = 3.0
        v0[0, QDIM + j, j] = 1.0
        o0[0, j, MOVED + j] = 1.0
    if kind == "gatherer":
        # L0H1: each content token attends to the label before it and copies its letter
        for j in range(4):
            q0[1, CIDX + j, j] = 3.0
            k0[1, IDX + j, j] = 3.0
        for k in range(26):
            v0[1, k, k] = 1.0
            o0[1, k, k] = 1.0
    # L1H0: END attends to the label (letter) or the content (gatherer) with the moved index; copies the letter
    key = IDX if kind == "letter" else CIDX
    for j in range(4):
        q1[0, MOVED + j, j] = 4.0
        k1[0, key + j, j] = 4.0
    for k in range(26):
        v1[0, k, k] = 1.0
        o1[0, k, k] = 2.0
    return Transformer(spec, p)


def prompts(n: int, seed: int, random_letters: bool, shift: int = 0) -> list[Prompt]:
    """Fake MCQ prompts: BOS, question (which option is correct), filler, 4 × (label, content), filler, END."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        correct = (i + shift) % 4
        letters = (torch.randperm(22, generator=g)[:4] + 4).tolist() if random_letters else [0, 1, 2, 3]
        tokens = [BOS, QUESTION + correct, FILLER]
        for k in letters:
            tokens += [LETTER + k, FILLER]
        tokens += [FILLER, FILLER]
        out.append(Prompt(tokens, LABEL_POS, [[c] for c in CONTENT_POS], [ANSWER + k for k in letters], correct, END,
                          [11, 12], [chr(65 + k) for k in letters]))
    return out


def checks(model: Transformer) -> tuple[pd.DataFrame, dict]:
    clean, rl = prompts(32, 0, False), prompts(32, 0, True)
    corrupt = prompts(32, 0, False, shift=1)  # the correct option moves: the paper's content permutation
    b_clean, b_rl, b_corrupt = to_batch(clean, BOS), to_batch(rl, BOS), to_batch(corrupt, BOS)
    assert ma.evaluate(model, b_clean)["correct"].mean() == 1.0  # both models do the task
    assert ma.evaluate(model, b_rl)["correct"].mean() == 1.0
    res = ma.patch_nodes(model, b_clean, b_corrupt)
    patch = M.patching_table(res).set_index("node")
    psum = {"clean_ld": res["clean_ld"].item(), "corrupt_ld": res["corrupt_ld"].item()}
    means = {"abcd": M.head_means(model, [b_clean])[0], "random_letters": M.head_means(model, [b_rl])[0]}
    letters = V.letter_tokens(clean + rl)
    swap = V.label_swap(model, [V.swap_batch(V.swap_prompts(clean, letters, 0), BOS)])
    ov = V.ov_copying(model, [b_clean, b_rl], letters)
    key_r2 = V.key_position_r2(V.label_keys(model, b_rl))
    names = [M.node_name(l, h) for l in range(2) for h in range(H)]
    frame = V.verify_table(names, V.attention_checks(means), patch, psum, swap, ov, key_r2, TH)
    return frame.set_index("node", drop=False), V.verify_summary(frame, TH, {"abcd": 32}, ov["letters"], "hand-built")


@pytest.fixture(scope="module")
def letter():
    return checks(hand_built("letter"))


@pytest.fixture(scope="module")
def gatherer():
    return checks(hand_built("gatherer"))


def test_a_built_correct_letter_head_passes_every_check(letter, one_thread):
    frame, summary = letter
    row = frame.loc["L1H0"]
    assert row.correct_share_abcd > 0.9 and row.correct_share_random_letters > 0.9 and row.label_att_abcd > 0.5
    assert abs(row.direct_effect - row.total_effect) <= 0.3 * abs(row.total_effect) and row.total_effect < -1
    assert row.swap_model == 1.0 and row.swap_head == 1.0
    assert row.ov_letters == 1.0 and row.key_position_r2 > 0.9
    assert summary["heads_passing"] == ["L1H0"]
    # L0H0 (moves the index) acts through L1H0: a large total and no direct effect, like the paper's L24 H18
    assert abs(frame.loc["L0H0", "total_effect"]) > 1 and abs(frame.loc["L0H0", "direct_effect"]) < 1e-3
    assert not frame.loc["L0H0", "passes"]


def test_a_content_gatherer_passes_no_check_that_needs_label_attention(gatherer, one_thread):
    frame, summary = gatherer
    row = frame.loc["L1H0"]
    assert row.label_att_abcd < 0.05 and not row.pass_attention_abcd and not row.pass_attention_random_letters
    # what a gatherer shares with a correct-letter head: swapping the label changes its answer, its OV copies letters
    assert row.pass_label_swap and row.pass_ov_copy
    assert summary["n_heads_passing"] == 0 and summary["heads_passing"] == []


def test_direct_total_check_reads_the_direct_effect_its_option_names():
    patch = pd.DataFrame({"node": ["L1H0", "L1H1"], "kind": "head", "total_effect": [-1.0, -1.0],
                          "direct_effect": [-1.6, -1.1], "direct_effect_norm": [-1.05, -1.6]}).set_index("node")
    frozen = V.direct_total_check(patch, 5.0, -5.0, TH)
    recomputed = V.direct_total_check(patch, 5.0, -5.0, TH | {"direct_norm": "recomputed"})
    assert frozen.tolist() == [False, True] and recomputed.tolist() == [True, False]


def test_a_missing_check_fails_the_head(letter):
    frame, _ = letter
    names = frame.node.tolist()
    no_rl = V.verify_table(names, {k: v for k, v in {
        "label_att_abcd": torch.tensor(frame.label_att_abcd.to_numpy()).reshape(2, H),
        "correct_share_abcd": torch.tensor(frame.correct_share_abcd.to_numpy()).reshape(2, H)}.items()},
        pd.DataFrame({"node": names, "kind": "head", "total_effect": frame.total_effect,
                      "direct_effect": frame.direct_effect,
                      "direct_effect_norm": frame.direct_effect_norm}).set_index("node"),
        {"clean_ld": 5.0, "corrupt_ld": -5.0}, None, None, None, TH)
    assert not no_rl.passes.any()


def _claims(ids):
    ref = yaml.safe_load((ROOT / "reference" / "published.yaml").read_text())
    return [c for c in ref["study_c"]["claims"] if c["id"] in ids]


@pytest.mark.parametrize("kind", ["letter", "gatherer"])
def test_claims_that_need_a_correct_letter_head_are_null_without_one(kind, letter, gatherer):
    frame, summary = letter if kind == "letter" else gatherer
    heads = pd.DataFrame({"node": frame.node, "layer": [int(n[1]) for n in frame.node],
                          "head": [int(n[3]) for n in frame.node], "dla": -frame.total_effect,
                          "category": "other"})
    head, why, verified = M.pick_head(heads, frame.reset_index(drop=True))
    assert verified == (kind == "letter") and (head == (1, 0) or kind == "gatherer")
    metrics = {"accuracy": {"abcd": 1.0}, "verification": {"n_heads_passing": summary["n_heads_passing"]},
               "head_categories": {"correct-letter": 1},
               "low_rank": {"correct_letter_head": verified, "loss_by_rank": {"3": 0.01, "full": 0.01},
                            "ablated_loss": 1.0, "key_position_r2": {"random_letters": 0.95}},
               "low_rank_kept": {"random_letters": 0.6, "numbers": 0.3, "shuffled": 1.0}}
    verdicts = {c["id"]: claims.verdict(c, metrics).verdict for c in _claims({"C3", "C6", "C7", "C8", "C9"})}
    if kind == "gatherer":
        assert set(verdicts.values()) <= {claims.UNTESTABLE, claims.PARTLY, claims.NOT_REPRODUCED}
        assert all(verdicts[c] == claims.UNTESTABLE for c in ("C6", "C7", "C8", "C9"))
        assert verdicts["C3"] != claims.REPRODUCED
    else:
        assert claims.UNTESTABLE not in verdicts.values(), verdicts  # the same numbers decide them
        assert verdicts["C3"] == verdicts["C6"] == verdicts["C7"] == claims.REPRODUCED


def test_checks_run_on_every_architecture(models, arch, one_thread):
    """The checks on tiny random GPT-2, grouped-query Llama and Qwen2 models (the real-model path):
    shapes, a key/value group's heads share their keys and values, the label swap changes one label."""
    from conftest import SMALL_VOCAB

    model = models[arch]
    L, Hm = model.spec.n_layers, model.spec.n_heads
    base = prompts(6, 1, True)
    for p in base:  # the tiny vocabulary: keep every id below SMALL_VOCAB
        assert max(p.tokens) < SMALL_VOCAB and max(p.answer_ids) < SMALL_VOCAB
    batch = to_batch(base, BOS)
    vals, keys = V.label_values(model, batch), V.label_keys(model, batch)
    assert vals.shape == keys.shape == (6, 4, L, Hm, model.spec.d_head)
    if model.spec.n_kv_heads < Hm:
        assert torch.equal(keys[:, :, :, 0], keys[:, :, :, 1]) and torch.equal(vals[:, :, :, 0], vals[:, :, :, 1])
    letters = V.letter_tokens(base)
    swapped = V.swap_prompts(base, letters, 0)
    for p, s in zip(base, swapped):
        changed = [i for i, (a, b) in enumerate(zip(p.tokens, s.tokens)) if a != b]
        assert changed == [p.label_pos[p.correct]] and s.answer_ids[-1] == p.answer_ids[p.correct]
        assert s.labels[s.correct] not in p.labels
    sw = V.label_swap(model, [V.swap_batch(swapped, BOS)])
    assert sw["heads"].shape == (L, Hm) and 0 <= float(sw["model"]) <= 1
    ov = V.ov_copying(model, [batch], letters)
    assert ov["share"].shape == (L, Hm) and set(ov["letters"]) <= set(letters)
    r2 = V.key_position_r2(keys)
    assert r2.shape == (L, Hm) and ((r2 >= -1e-6) & (r2 <= 1 + 1e-6)).all()
