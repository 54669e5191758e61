"""evaluate.py --score: each rule against figures worked out by hand from LLaVA's scripts (eval_science_qa.py,
convert_gqa_for_eval.py, eval_pope.py, m4c_evaluator.py), on the answers where a looser reading would differ."""
import io
import json

import pytest

import flags
import scoring


def write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def score(tmp_path, kind, answers, key, prompts=None):
    """--score on answers {id: text} (an id left out: no answer) against a key {id: answer or (answer, category)};
    returns (the headline figures, what it printed)."""
    answer_file = write_lines(tmp_path / "a.jsonl", [
        {"question_id": k, "text": v, "prompt": (prompts or {}).get(k, "a question")} for k, v in answers.items()])
    key_file = write_lines(tmp_path / "key.jsonl", [
        {"question_id": k, "answers" if kind == "vqa" else "answer": v[0] if isinstance(v, tuple) else v}
        | ({"category": v[1]} if isinstance(v, tuple) else {}) for k, v in key.items()])
    printed = io.StringIO()
    figures = scoring.score(kind, answer_file, key_file, out=printed)
    return figures, printed.getvalue()


def rows(printed):
    """{first word: the rest} of each table line."""
    return {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split()}


def test_scienceqa_letters_missing_answers_and_img_accuracy(tmp_path):
    answers = {1: "A", 2: "B. blue", 3: "The answer is C because the circle is red.",
               4: "The answer is A. The answer is B.", 5: "A.", 6: " A", 7: "F", 8: "E", 10: "a"}
    key = {k: (v, "image" if k <= 5 else "text") for k, v in
           {1: "A", 2: "B", 3: "C", 4: "B", 5: "A", 6: "A", 7: "A", 8: "B", 9: "A", 10: "A"}.items()}
    prompts = {1: "<image>\nQ", 3: "<image>\nQ", 4: "<image>\nQ", 8: "<image>\nQ"}
    figures, printed = score(tmp_path, "choice", answers, key, prompts)
    # right: 1 (the letter), 2 ('X. '), 3 ('The answer is X' + any character); FAILED: 4 (two matches), 5 ('A.' is
    # neither the letter nor 'X. '), 6 (a leading space), 7 (F is not an option), 9 (no answer), 10 (lowercase);
    # 8 reads E, wrong. IMG: the answers whose prompt holds <image>, 1 3 4 8, of which 1 and 3 are right; the missing
    # 9 is an image question but has no prompt, so eval_science_qa.py leaves it out of IMG.
    assert figures == {"accuracy": 0.3, "IMG-accuracy": 0.5}
    assert rows(printed)["image"] == ["3", "5", "0.6000", "2"] and rows(printed)["text"] == ["0", "5", "0.0000", "4"]
    assert rows(printed)["overall"] == ["3", "10", "0.3000", "6"]
    assert "1 questions of the key have no answer (counted wrong), e.g. 9" in printed
    assert "format: 3 of 9 answers (33.3%) are a bare letter" in printed  # A, E, and ' A' stripped


def test_scienceqa_problems_json_scores_the_test_split_of_pid_splits_by_subject(tmp_path):
    problems = {"1": {"answer": 0, "choices": ["x", "y", "z"], "subject": "natural science", "split": "test"},
                "2": {"answer": 2, "choices": ["x", "y", "z"], "subject": "language science", "split": "test"},
                "3": {"answer": 1, "choices": ["x", "y"], "subject": "natural science", "split": "train"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    answers = write_lines(tmp_path / "a.jsonl", [{"question_id": "1", "text": "A", "prompt": "<image>\nQ"},
                                                 {"question_id": "3", "text": "B", "prompt": "Q"}])
    with pytest.raises(flags.Stop, match="pid_splits.json is not beside it"):
        scoring.score("choice", answers, str(tmp_path / "problems.json"), out=io.StringIO())
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "train": ["3"]}))
    printed = io.StringIO()
    # problem 3 (train) is not scored though answered right; 2 (test) has no answer: wrong
    assert scoring.score("choice", answers, str(tmp_path / "problems.json"), out=printed) == {
        "accuracy": 0.5, "IMG-accuracy": 1.0}
    assert rows(printed.getvalue())["natural"][-4:] == ["1", "1", "1.0000", "0"]
    assert "1 answers are to questions the key leaves out" in printed.getvalue()
    with pytest.raises(flags.Stop, match="--split val: not a split of"):
        scoring.score("choice", answers, str(tmp_path / "problems.json"), out=io.StringIO(), split="val")


def test_gqa_short_answers_drop_trailing_periods_then_lowercase_and_nothing_else(tmp_path):
    answers = {1: "Red.", 2: "yes..", 3: " Top Left. ", 4: "RED", 5: "red circle", 6: "2."}
    key = {1: "red", 2: "yes", 3: "top left", 4: "red", 5: "red", 6: "2", 7: "blue"}
    figures, printed = score(tmp_path, "short", answers, key)
    # right 1, 2, 4, 6; 3 keeps its spaces (and so its period), 5 is not the answer, 7 has none (counted wrong)
    assert figures == {"accuracy": 4 / 7}
    assert rows(printed)["all"] == ["4", "7", "0.5714"]


def test_pope_first_sentence_single_space_words_and_the_mean_of_the_categories(tmp_path):
    answers = {1: "Yes", 2: "No, there is not.", 3: "There is\nno dog.", 4: "Not at all.", 5: "yes..", 6: " no"}
    key = {1: ("yes", "random"), 2: ("no", "random"), 3: ("no", "random"),
           4: ("no", "adversarial"), 5: ("yes", "adversarial"), 6: ("yes", "adversarial")}
    figures, printed = score(tmp_path, "pope", answers, key)
    # read: yes, no, yes ("is\nno" is one word), yes ("Not" is not "No" nor "not"), yes, no ("" and "no")
    # random: right 1, 2; TP 1 of 2 predicted yes, of 1 true yes: P 0.5, R 1, F1 2/3, yes 2/3
    # adversarial: right 5; TP 1 of 2 predicted yes, of 2 true yes: P 0.5, R 0.5, F1 0.5, yes 2/3
    table = {name: [float(x) for x in values] for name, values in rows(printed).items()
             if name in ("random", "adversarial", "mean")}
    assert table["random"] == [3, round(2 / 3, 4), 0.5, 1.0, round(2 / 3, 4), round(2 / 3, 4)]
    assert table["adversarial"] == [3, round(1 / 3, 4), 0.5, 0.5, 0.5, round(2 / 3, 4)]
    assert table["mean"] == [6, 0.5, 0.5, 0.75, round(7 / 12, 4), round(2 / 3, 4)]
    assert figures == pytest.approx({"accuracy": 0.5, "F1": 7 / 12})


def test_vqa_accuracy_normalizes_answers_and_averages_the_leave_one_out_subsets(tmp_path):
    answers = {1: "Dog.", 2: "two", 3: "t-shirt", 4: "cat", 6: "The Yes"}
    key = {1: ["dog", "dog", "a dog"] + ["puppy"] * 7, 2: ["2"] + ["3"] * 9, 3: ["t shirt"] * 10,
           4: ["dog"] * 10, 5: ["dog"] * 10, 6: [{"answer": "yes"}] * 4 + [{"answer": "no"}] * 6}
    figures, printed = score(tmp_path, "vqa", answers, key)
    # 1: 'dog' is 3 humans: left out one of them 2/3, else 1: (3 * 2/3 + 7) / 10 = 0.9. 2: 'two' is '2', one human:
    # (9 * 1/3 + 0) / 10 = 0.3. 3: '-' becomes a space: 1. 4: 0. 6: 'yes' after the article goes, 4 humans: 1.
    # 5 has no answer: left out, as eval_textvqa.py scores only the answers.
    assert figures == pytest.approx({"accuracy": (0.9 + 0.3 + 1 + 0 + 1) / 5})
    assert "1 questions of the key have no answer (left out, as LLaVA's script does), e.g. 5" in printed
    assert scoring.vqa_normalize("Ten dogs, isnt it?") == "10 dogs isn't it"
    assert scoring.vqa_normalize("3.5 m. (approx)") == "3.5 m approx"
    textvqa = tmp_path / "TextVQA_0.5.1_val.json"
    textvqa.write_text(json.dumps({"data": [{"question_id": 1, "answers": ["stop"] * 10}]}))
    one = write_lines(tmp_path / "one.jsonl", [{"question_id": 1, "text": "STOP"}])
    assert scoring.score("vqa", one, str(textvqa), out=io.StringIO()) == {"accuracy": 1.0}
    with pytest.raises(flags.Stop, match="needs each question's human answers"):
        scoring.score("vqa", one, write_lines(tmp_path / "k.jsonl", [{"question_id": 1, "answer": "stop"}]),
                      out=io.StringIO())


def test_damaged_answer_files_are_named_not_scored_silently(tmp_path):
    key = write_lines(tmp_path / "key.jsonl", [{"question_id": k, "answer": "A"} for k in (1, 2)])
    repeated = write_lines(tmp_path / "r.jsonl", [{"question_id": 1, "text": "A"}, {"question_id": 1, "text": "B"}])
    with pytest.raises(flags.Stop, match=r"r.jsonl:2: question_id 1 again \(first at line 1\)"):
        scoring.score("choice", repeated, key, out=io.StringIO())
    with pytest.raises(flags.Stop, match="1 question ids are not in --truth"):
        scoring.score("choice", write_lines(tmp_path / "u.jsonl", [{"question_id": 9, "text": "A"}]), key,
                      out=io.StringIO())
    with pytest.raises(flags.Stop, match="no answer lines to score"):
        scoring.score("choice", write_lines(tmp_path / "e.jsonl", []), key, out=io.StringIO())
    with pytest.raises(flags.Stop, match="b.jsonl:1: not an answer line"):
        scoring.score("choice", write_lines(tmp_path / "b.jsonl", [{"question_id": 1, "text": 3}]), key,
                      out=io.StringIO())


def test_pope_annotation_directory_pairs_by_question_id_and_names_answers_out_of_order(tmp_path):
    # POPE's label files number their questions from 1 each, so ids collide across categories; eval_pope.py pairs
    # the n-th answer of a category (in the answer file's order) with the n-th label. Here the answers are in the
    # question file's order for 'random' but not for 'popular': paired by id, and the category named.
    questions = write_lines(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10, "image": "a.jpg", "text": "Is there a cat?", "category": "random"},
        {"question_id": 11, "image": "a.jpg", "text": "Is there a dog?", "category": "popular"},
        {"question_id": 12, "image": "b.jpg", "text": "Is there a car?", "category": "random"},
        {"question_id": 13, "image": "b.jpg", "text": "Is there a bus?", "category": "popular"}])
    (tmp_path / "coco").mkdir()
    write_lines(tmp_path / "coco" / "coco_pope_random.json", [{"question_id": 1, "label": "yes"},
                                                               {"question_id": 2, "label": "no"}])
    write_lines(tmp_path / "coco" / "coco_pope_popular.json", [{"question_id": 1, "label": "no"},
                                                                {"question_id": 2, "label": "yes"}])
    answers = write_lines(tmp_path / "a.jsonl", [{"question_id": 13, "text": "Yes."}, {"question_id": 10, "text": "Yes"},
                                                 {"question_id": 12, "text": "No"}, {"question_id": 11, "text": "No"}])
    printed = io.StringIO()
    figures = scoring.score("pope", answers, str(tmp_path / "coco"), out=printed, questions=questions)
    assert figures["accuracy"] == 1.0  # by order, popular would read yes against 'no' and no against 'yes': 0
    assert "the 'popular' answers are not in the question file's order" in printed.getvalue()
    assert "'random' answers are not" not in printed.getvalue()
    with pytest.raises(flags.Stop, match="needs --questions"):
        scoring.score("pope", answers, str(tmp_path / "coco"), out=io.StringIO())
    with pytest.raises(flags.Stop, match="read only as POPE's annotation directory"):
        scoring.score("short", answers, str(tmp_path / "coco"), out=io.StringIO(), questions=questions)
    write_lines(tmp_path / "coco" / "coco_pope_random.json", [{"question_id": 1, "label": "yes"}] * 3)
    with pytest.raises(flags.Stop, match="3 labels for the 2 'random' questions"):
        scoring.score("pope", answers, str(tmp_path / "coco"), out=io.StringIO(), questions=questions)
