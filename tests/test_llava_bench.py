"""llava_bench.py: the rule-based judge on hand-written answers, scored by hand from the rules in docs/evaluation.md
("LLaVA-Bench in miniature": 1 for an answer that states nothing the rules read; else 2 + 8 x right / (asked +
wrong), rounded half up); the review lines as LLaVA's summarize_gpt_review.py reads them and the relative score worked
out by hand; the teacher's every answer read whole; the command end to end on the tiny checkpoint."""
import glob
import json
import os
import random

import pytest

import llava_bench
import world
from tiny_llava import tiny_llava


def scene(background, *objects):
    """A scene from (size, color, shape, row, col) tuples, through the world's own reader of scenes.json."""
    return world.scene_from_json({"background": background, "objects": [
        {"size": size, "color": color, "shape": shape, "row": row, "col": col, "box": [0, 0, 1, 1]}
        for size, color, shape, row, col in objects]})


# held-out image val_00113.png of the README: a large red circle at the top, a large purple square in the top right
# corner, a small green circle on the left, light blue background
SCENE = scene("light blue", ("large", "red", "circle", 0, 1), ("large", "purple", "square", 0, 2),
              ("small", "green", "circle", 1, 0))
DESCRIBE = "Describe the image in detail."
DESCRIPTION = ("The image shows three objects on a light blue background. A large red circle is at the top. A large "
               "purple square is in the top right corner. A small green circle is on the left.")  # 2 + 3 x 3 facts
RELATIVE = ("Where is the small circle relative to the square?", "The small circle is on the left and the square is in "
            "the top right corner, so the small circle is below and to the left of the square.")  # 3 facts
BIGGER = ("Is the square bigger than the green object?", "The square is large and the green object is small, so yes, "
          "the square is bigger than the green object.")  # 4 facts: two sizes, yes, the comparison
ONE = scene("gray", ("large", "blue", "square", 2, 0))  # 2 + 3 facts
ONE_DESCRIPTION = "The image shows one object on a gray background. A large blue square is in the bottom left corner."
NEIGHBOUR = ("What color is the object to the right of the red circle?", "The red circle is at the top, and the object "
             "to the right of it is in the top right corner, so it is purple.")  # 3 facts


def scores(question, reference, answer, on=SCENE):
    return llava_bench.judge(on, question, reference, answer)[:2]


@pytest.mark.parametrize("answer, expected", [
    (ONE_DESCRIPTION.replace("blue", "red"), 7),  # a wrong colour: 2 + 8 x 4 / (5 + 1) = 7.33 (not asked: 8.4)
    (ONE_DESCRIPTION.replace("one object", "two objects"), 7),  # a wrong count, the same
    (ONE_DESCRIPTION + " A small blue triangle is in the top right corner.", 7),  # hallucinated: 2 + 8 x 5 / (5 + 3)
    (ONE_DESCRIPTION.replace("on a gray", "on a white"), 7),  # the background
    # the square put where the scene has nothing: 3 wrong there, 3 missing where it is: 2 + 8 x 2 / (5 + 3)
    (ONE_DESCRIPTION.replace("bottom left", "bottom right"), 4)])
def test_each_wrong_fact_of_a_description_costs_as_the_rules_say(answer, expected):
    assert scores(DESCRIBE, ONE_DESCRIPTION, answer, on=ONE) == (10, expected)


@pytest.mark.parametrize("question, reference", [
    ("What color is the square?", "The square is purple."), ("How many circles are there?", "There are two circles."),
    ("Is there a blue square in the image?", "No, there is no blue square."), (DESCRIBE, DESCRIPTION), RELATIVE,
    BIGGER, NEIGHBOUR, ("How many other objects are the same color as the square?",
                        "The square is purple, and there are no other purple objects.")])
def test_a_perfect_answer_the_reference_itself_scores_as_the_reference_ten(question, reference):
    assert scores(question, reference, reference) == (10, 10)


@pytest.mark.parametrize("question, reference, answer, expected", [
    # a hallucinated object: its three attributes are three wrong facts: 2 + 8 x 11 / (11 + 3) = 8.29
    (DESCRIBE, DESCRIPTION, DESCRIPTION + " A small blue triangle is in the bottom right corner.", 8),
    # 'yes' and 'there is a blue square' both untrue, the 2 facts asked for missing: 2 + 8 x 0 / (2 + 2)
    ("Is there a blue square in the image?", "No, there is no blue square.", "Yes, there is a blue square.", 2),
    # a wrong colour: in a description one fact of 11 wrong (2 + 8 x 10 / 12 = 8.67); alone, the one fact asked for
    (DESCRIBE, DESCRIPTION, DESCRIPTION.replace("large red circle", "large orange circle"), 9),
    ("What color is the square?", "The square is purple.", "The square is blue.", 2),
    # a wrong count: 2 + 8 x 10 / 12 in a description; alone, 2
    (DESCRIBE, DESCRIPTION, DESCRIPTION.replace("three objects", "four objects"), 9),
    ("How many circles are there?", "There are two circles.", "There are three circles.", 2),
    ("How many circles are there?", "There are two circles.", "There are two circles and one triangle.", 6),
    ("How many other objects are the same color as the square?", "The square is purple, and there are no other purple "
     "objects.", "The square is purple, and there is one other purple object.", 5),  # 2 + 8 x 1 / (2 + 1) = 4.67
    # an empty answer, and one the rules read nothing in, score lowest
    ("What color is the square?", "The square is purple.", "", 1),
    ("What color is the square?", "The square is purple.", "  \n", 1),
    ("What color is the square?", "The square is purple.", "I like turtles.", 1),
    # facts missing: 1 of 3 stated (2 + 8 / 3 = 4.67); the relation wrong: 2 + 8 x 2 / (3 + 1)
    (*RELATIVE, "The small circle is on the left.", 5),
    (*RELATIVE, RELATIVE[1].replace("below and to the left of", "to the left of"), 6),
    # the green object's size, the yes/no and the comparison wrong, the square's size right: 2 + 8 x 1 / (4 + 3) = 3.14
    (*BIGGER, "The square is large and the green object is large, so no, they are the same size.", 3),
    # 'it' is the object named before: the colour of the object to the right of the red circle wrong: 2 + 8 x 2 / 4
    (*NEIGHBOUR, NEIGHBOUR[1].replace("so it is purple", "so it is red"), 6),
    # 'the circle' fits two objects: neither right nor wrong, the fact asked for missing: 2 + 8 x 0 / 1
    ("What color is the small circle?", "The small circle is green.", "The circle is green.", 2),
    # a true fact not asked for costs nothing
    ("What color is the square?", "The square is purple.", "The square is purple. It is in the top right corner.", 10),
])
def test_hand_written_answers_get_the_scores_the_rules_give_by_hand(question, reference, answer, expected):
    assert scores(question, reference, answer) == (10, expected)


def test_the_review_says_what_was_right_missing_and_wrong():
    content = llava_bench.judge(SCENE, DESCRIBE, DESCRIPTION, DESCRIPTION.replace(
        "large purple square", "large blue square") + " A small blue triangle is in the bottom right corner.")[2]
    first, reference, answer = content.split("\n")
    assert first == "10 7"  # 2 + 8 x 10 / (11 + 4) = 7.33
    assert "states 11 of the 11 facts asked for" in reference
    assert reference.endswith("Score 10 (2 + 8 x 11 / (11 + 0)).")
    assert "the large purple square in the top right corner: color blue (the scene: purple)" in answer
    assert "misses the large purple square in the top right corner: color purple" in answer
    assert "'a small blue triangle in the bottom right corner' (bottom right is empty): shape triangle" in answer
    assert answer.endswith("Score 7 (2 + 8 x 10 / (11 + 4)).")
    assert "(an empty answer)" in llava_bench.judge(SCENE, DESCRIBE, DESCRIPTION, "")[2]


def test_the_judge_reads_every_answer_the_teacher_writes_whole_and_finds_it_true(tmp_path):
    directory = world.ensure_world(tmp_path, seed=3, n_train=4, n_heldout=40, eval_per_type=2)
    with open(directory / "scenes.json") as f:
        scenes = [world.scene_from_json(record) for record in json.load(f) if record["split"] == "val"]
    rng, asked = random.Random(0), 0
    for held_out in scenes:
        for kind in world.EVAL_TYPES:
            qa = world.ask(kind, held_out, rng)
            if qa is not None:
                claims, unread = llava_bench.read_answer(qa.answer, held_out, qa.question)
                assert claims and not unread and all(claim.true for claim in claims), (qa, claims, unread)
                asked += 1
        claims, unread = llava_bench.read_answer(world.description(held_out), held_out, DESCRIBE)
        assert not unread and all(claim.true for claim in claims) and len(claims) == 2 + 3 * len(held_out.objects)
    assert asked > 40 * len(world.CONVERSATION_TYPES) // 2


def test_review_lines_are_read_by_llava_summary_as_written_and_the_relative_score_is_worked_out_by_hand():
    item = {"question": {"question_id": 7, "image": "images/val_00113.png", "text": "What color is the square?",
                         "category": "conv"}, "reference": "The square is purple.", "scene": SCENE}
    line = llava_bench.review(4, item, {"text": "The square is blue.", "answer_id": "abc"})
    assert list(line) == ["id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"]
    assert (line["id"], line["question_id"], line["answer1_id"], line["answer2_id"], line["category"]) == \
        (5, 7, "teacher-7", "abc", "llava_bench_conv")
    assert line["tuple"] == [10.0, 2.0]
    first = line["content"].split("\n")[0].replace(",", " ").split(" ")  # eval_gpt_review_bench.py's parse_score
    assert [float(x) for x in first] == line["tuple"]
    tuples = {"llava_bench_conv": [[10, 8], [10, 6], [-1, -1]], "llava_bench_detail": [[10, 9]]}
    reviews = [{"category": category, "tuple": t} for category, ts in tuples.items() for t in ts]
    # conv: means 19/3 -> 6.333 and 13/3 -> 4.333, 4.333 / 6.333 = 68.42%; detail 9 / 10; all: 5.5 / 7.25 = 75.86%
    assert llava_bench.summarize(reviews) == {"all": (7.25, 5.5, 75.9), "conv": (6.333, 4.333, 68.4),
                                              "detail": (10.0, 9.0, 90.0)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return tiny_llava(root), world.ensure_world(root / "world", seed=3, n_train=4, n_heldout=40, eval_per_type=2)


def test_the_command_writes_llavas_files_judges_the_models_answers_and_prints_the_relative_scores(tiny, tmp_path,
                                                                                                 capsys):
    model, directory = tiny
    out = tmp_path / "bench"
    llava_bench.main(["--ckpt", model.ckpt, "--world", str(directory), "--images", "2", "--out_dir", str(out),
                      "--max_new_tokens", "6", "--threads", "1"])
    read = lambda name: [json.loads(line) for line in open(out / name)]
    questions, references = read("questions.jsonl"), read("answers_teacher.jsonl")
    assert [(q["question_id"], q["category"]) for q in questions] == list(enumerate(["conv", "detail", "complex"] * 2))
    assert len({q["image"] for q in questions}) == 2 and all(os.path.isfile(directory / q["image"]) for q in questions)
    assert [c["image"] for c in read("context.jsonl")] == [questions[0]["image"], questions[3]["image"]]
    assert [r["question_id"] for r in references] == list(range(6))
    (answers,) = [path for path in glob.glob(str(out / "answers_*.jsonl")) if not path.endswith("_teacher.jsonl")]
    (reviews,) = glob.glob(str(out / "review_*.jsonl"))
    answers, reviews = [json.loads(line) for line in open(answers)], [json.loads(line) for line in open(reviews)]
    by_id = {answer["question_id"]: answer for answer in answers}
    assert sorted(by_id) == list(range(6))
    for line, question, reference in zip(reviews, questions, references):
        assert line["question_id"] == question["question_id"]
        assert line["category"] == f"llava_bench_{question['category']}"
        assert line["answer2_id"] == by_id[question["question_id"]]["answer_id"] and line["tuple"][0] == 10.0
        assert line["tuple"] == [float(s) for s in llava_bench.judge(
            scene_of(directory, question["image"]), question["text"], reference["text"],
            by_id[question["question_id"]]["text"])[:2]]
    printed = capsys.readouterr().out.strip().split("\n")
    assert printed[-1] == f"relative score: {llava_bench.summarize(reviews)['all'][2]:.1f}"
    assert [row.split()[0] for row in printed[2:-1]] == ["conv", "detail", "complex", "all"]


def scene_of(directory, image):
    with open(directory / "scenes.json") as f:
        return world.scene_from_json(next(record for record in json.load(f) if record["image"] == image))


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "--images must be at least 1"),
    (["--imags", "3"], "unknown flag --imags (did you mean --images?)"),
    (["--world", "/nonexistent"], "--world /nonexistent: not a world directory"),
    (["--template", "plain"], "add --template vicuna_v1")])
def test_a_mistake_is_one_line_naming_the_flag(tiny, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        llava_bench.main(["--ckpt", tiny[0].ckpt] + argv)
    assert str(stop.value).startswith("llava_bench.py: error: ") and message in str(stop.value)


def test_help_starts_with_runnable_examples(capsys):
    llava_bench.main(["--help"])
    text = capsys.readouterr().out
    examples = text.index("python llava_bench.py --ckpt out/stage2")
    assert examples < text.index("The teacher") < text.index("  --images INT")
