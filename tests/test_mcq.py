"""Study C data: synthetic questions, label mutations, the corrupted prompt, MMLU, tokenization."""

from __future__ import annotations

import json
import random
import string

import pytest

from mechrepro.studies.mcq_circuits import data as mcq


def test_synthetic_items_balanced_and_answerable():
    items = mcq.synthetic_items(40, seed=3)
    assert [sum(it.correct == j for it in items) for j in range(4)] == [10, 10, 10, 10]
    for it in items:
        answer = it.options[it.correct]
        if it.task == "category":
            cat = it.question.removeprefix("Which of these is a ").removesuffix("?")
            assert answer in mcq.CATEGORIES[cat]
            assert all(o not in mcq.CATEGORIES[cat] for j, o in enumerate(it.options) if j != it.correct)
        else:
            assert answer in it.question and sum(o in it.question.split() or o + "." in it.question
                                                 or o + "?" in it.question for o in it.options) == 1
    assert mcq.synthetic_items(40, seed=3) == items  # seeded


@pytest.mark.parametrize("name", mcq.LABEL_SETS)
def test_mutations_keep_the_correct_answer_content(name, tokenizer):
    items = mcq.synthetic_items(12, seed=1)
    normal = mcq.make_prompts(items, "abcd", tokenizer, tokenizer.bos_token_id, 0)
    mutated = mcq.make_prompts(items, name, tokenizer, tokenizer.bos_token_id, 0)
    for it, p, q in zip(items, normal, mutated):
        assert q.correct == p.correct == it.correct
        # the correct option's content tokens are the same as under normal labels
        assert [q.tokens[i] for i in q.content_pos[q.correct]] == [p.tokens[i] for i in p.content_pos[p.correct]]
        assert tokenizer.decode([q.tokens[i] for i in q.content_pos[q.correct]]).strip() == it.options[it.correct]
        assert [tokenizer.decode([q.tokens[i]]) for i in q.label_pos] == q.labels
        assert [tokenizer.decode([a]) for a in q.answer_ids] == [" " + lab for lab in q.labels]
        assert q.end == len(q.tokens) - 1 and tokenizer.decode(q.tokens[-2:]) == "Answer:"
        assert len(set(q.labels)) == 4
    labels = [q.labels for q in mutated]
    if name in ("abcd", "separator", "no_prelude"):
        assert all(lab == ["A", "B", "C", "D"] for lab in labels)
    if name == "random_letters":
        assert all(not set(lab) & set("ABCD") for lab in labels) and len({tuple(x) for x in labels}) > 1
    if name == "other_letters":
        assert all([ord(c) - ord(lab[0]) for c in lab] == [0, 1, 2, 3] and lab[0] > "D" for lab in labels)
    if name == "numbers":
        assert all(lab == ["1", "2", "3", "4"] for lab in labels)
    if name == "any_letters":
        assert all(set(lab) != set("ABCD") for lab in labels) and len({tuple(x) for x in labels}) > 1
    if name == "shuffled":
        assert all(sorted(lab) == ["A", "B", "C", "D"] and lab != ["A", "B", "C", "D"] for lab in labels)
    if name == "separator":
        assert all(") " + it.options[0] in q.text for it, q in zip(items, mutated))
    has_prelude = [q.text.startswith(mcq.PRELUDE) for q in mutated]
    assert all(has_prelude) == (name != "no_prelude") and any(has_prelude) == (name != "no_prelude")


def test_any_letters_draw_a_to_z_but_never_the_normal_letters_in_any_order():
    # the organism's training letters: A-D must be letters to copy too, but the normal and the
    # shuffled label sets (the first n letters, in any order) stay unseen
    rng = random.Random(0)
    seen: set[str] = set()
    for n in (2, 3, 4):
        for _ in range(3000):
            labels = mcq.label_set("any_letters", n, rng).labels
            assert len(set(labels)) == n and set(labels) != set("ABCD"[:n])
            seen |= set(labels)
    assert seen == set(string.ascii_uppercase)


def test_label_sets_drawn_from_the_training_letters_count_as_seen():
    assert mcq.seen_label_sets(["any_letters", "abcd", "any_letters"]) == [
        "any_letters", "abcd", "random_letters", "other_letters"]
    assert mcq.seen_label_sets(["abcd", "random_letters"]) == ["abcd", "random_letters"]


def test_content_permuted_moves_the_correct_content():
    it = mcq.MCQItem("Which of these is a fruit?", ["dog", "apple", "red", "car"], 1)
    for shift in (1, 2, 3):
        p = mcq.content_permuted(it, shift)
        assert p.question == it.question and sorted(p.options) == sorted(it.options)
        assert p.options[p.correct] == "apple" and p.correct != it.correct
    with pytest.raises(mcq.MCQError, match="in place"):
        mcq.content_permuted(it, 4)


def test_item_with_fewer_than_two_options_is_refused():
    with pytest.raises(mcq.MCQError, match="at least 2 options"):
        mcq.MCQItem("Which?", ["only"], 0)
    with pytest.raises(mcq.MCQError, match="correct index 4"):
        mcq.MCQItem("Which?", ["a", "b"], 4)
    with pytest.raises(mcq.MCQError, match="unknown label set 'abcde'"):
        mcq.label_set("abcde", 4, random.Random(0))


def test_multi_token_label_is_refused(tokenizer):
    it = mcq.MCQItem("Which?", ["a", "b"], 0)
    with pytest.raises(mcq.MCQError, match="single tokens"):
        mcq.tokenize(it, mcq.LabelSet("x", ["Abracadabra", "B"]), tokenizer, None)


def test_read_mmlu_skips_header_rows_and_counts():
    items = mcq.read_mmlu()
    assert len(items) == 14042
    assert all(len(it.options) == 4 and 0 <= it.correct < 4 for it in items[:500])
    assert not any(it.question == "question" for it in items)


def test_read_mmlu_bad_row_names_the_line(tmp_path):
    rows = [{"question": "q?", "answer_a": "x", "answer_b": "y", "answer_c": "z", "answer_d": "w",
             "correct_answer": "B", "topic": "t"},
            {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "t"},
            {"question": "q2?", "answer_a": "x", "correct_answer": "C", "topic": "t"}]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    items = mcq.read_mmlu(path)
    assert len(items) == 1 and items[0].correct == 1
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(mcq.MCQError, match="line 3"):
        mcq.read_mmlu(path)


def test_few_shot_examples_use_the_question_labels(tokenizer):
    shots = mcq.synthetic_items(2, seed=9, prefix="shot")
    it = mcq.synthetic_items(1, seed=10)[0]
    p = mcq.tokenize(it, mcq.LabelSet("numbers", ["1", "2", "3", "4"]), tokenizer, tokenizer.bos_token_id, shots)
    assert p.text.count("Answer:") == 3 and f"Answer: {shots[0].correct + 1}\n" in p.text
    assert tokenizer.decode(p.tokens[1:]) == p.text.replace("\n\n\n", "\n\n") or p.text in tokenizer.decode(p.tokens)
    assert [tokenizer.decode([p.tokens[i]]) for i in p.label_pos] == ["1", "2", "3", "4"]
