"""Tests for world.py: determinism, split hygiene, pixels against symbols, the teacher's answers, file formats."""
import json
import os
import random
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

import world

SMALL = dict(n_train=40, n_heldout=30, eval_per_type=8)  # a world small enough to build in well under a second

# Written out by hand (not taken from world.py) so that the parsers below check world.py independently.
CELL_PHRASES = {"in the top left corner": "top left", "at the top": "top", "in the top right corner": "top right",
                "on the left": "left", "in the center": "center", "on the right": "right",
                "in the bottom left corner": "bottom left", "at the bottom": "bottom",
                "in the bottom right corner": "bottom right"}
NUMBERS = {"no": 0, "one": 1, "two": 2, "three": 3}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return world.ensure_world(tmp_path_factory.mktemp("world"), seed=0, **SMALL)


def load(directory, name):
    return json.loads((directory / name).read_text())


def scenes_by_image(directory):
    return {scene["image"]: scene for scene in load(directory, "scenes.json")}


def all_files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

# ---------------------------------------------------------------------------------------------------------------------
# Determinism, caching, atomic writes


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, small_world):
    again = world.ensure_world(tmp_path / "again", seed=0, **SMALL)
    other = world.ensure_world(tmp_path / "other", seed=1, **SMALL)
    assert again.name == small_world.name and other.name != small_world.name
    files, files_again, files_other = all_files(small_world), all_files(again), all_files(other)
    assert len(files) == 70 + 13  # 40 + 30 images, 7 JSON files and 3 benchmarks with their answer keys
    assert files == files_again
    assert files_other["stage2.json"] != files["stage2.json"]
    assert files_other["scenes.json"] != files["scenes.json"]
    assert sum(files_other[name] != files[name] for name in files if name.endswith(".png")) > 50


def test_cache_is_reused_and_its_name_changes_with_constants(tmp_path, monkeypatch, small_world):
    monkeypatch.setattr(world, "generate", lambda *args: pytest.fail("an existing world was generated again"))
    assert world.ensure_world(small_world.parent, seed=0, **SMALL) == small_world
    monkeypatch.setattr(world, "COLORS", {**world.COLORS, "red": (200, 0, 0)})
    assert world.world_directory(small_world.parent, seed=0, **SMALL) != small_world
    assert world.world_directory(small_world.parent, seed=5, **SMALL).name.startswith(f"v{world.VERSION}-seed5-")


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def render_then_fail(scene):
        calls.append(scene)
        if len(calls) == 10:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return original_render(scene)

    original_render = world.render
    monkeypatch.setattr(world, "render", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        world.ensure_world(tmp_path, seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []  # no half world, no temporary directory
    monkeypatch.setattr(world, "render", original_render)
    directory = world.ensure_world(tmp_path, seed=0, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [directory.name] and (directory / "world.json").exists()

# ---------------------------------------------------------------------------------------------------------------------
# Splits


def test_train_and_heldout_scenes_are_disjoint_and_files_use_their_own_split(small_world):
    scenes = load(small_world, "scenes.json")
    def key(scene):
        return (scene["background"],) + tuple((o["cell"], o["shape"], o["color"], o["size"]) for o in scene["objects"])
    train = {key(s) for s in scenes if s["split"] == "train"}
    heldout = [key(s) for s in scenes if s["split"] == "val"]
    assert len(train) == 40 and len(set(heldout)) == 30
    assert not train & set(heldout)
    for name, prefix in (("stage1.json", "images/train_"), ("stage2.json", "images/train_"),
                         ("val_stage1.json", "images/val_"), ("val_stage2.json", "images/val_"),
                         ("eval.json", "images/val_")):
        assert all(record["image"].startswith(prefix) for record in load(small_world, name) if "image" in record), name

def test_splits_stay_disjoint_in_a_world_with_few_distinct_scenes(tmp_path, monkeypatch):
    # one shape, two colors, two sizes, one background, one object: 9 cells * 2 * 2 = 36 distinct scenes in all
    monkeypatch.setattr(world, "SHAPES", ("circle",))
    monkeypatch.setattr(world, "SHAPE_WEIGHTS", {"circle": 1})
    monkeypatch.setattr(world, "COLORS", {"red": world.COLORS["red"], "blue": world.COLORS["blue"]})
    monkeypatch.setattr(world, "COLOR_WEIGHTS", {"red": 1, "blue": 1})
    monkeypatch.setattr(world, "COMPLEMENTS", {"red": "blue", "blue": "red"})
    monkeypatch.setattr(world, "BACKGROUNDS", {"white": world.BACKGROUNDS["white"]})
    monkeypatch.setattr(world, "MAX_OBJECTS", 1)
    directory = world.ensure_world(tmp_path, seed=0, n_train=24, n_heldout=12, eval_per_type=2)
    scenes = load(directory, "scenes.json")
    keys = [(s["split"], json.dumps([{k: o[k] for k in ("cell", "color", "size")} for o in s["objects"]]))
            for s in scenes]
    assert len({key for _, key in keys}) == 36
    with pytest.raises(ValueError, match="too few distinct scenes"):
        world.ensure_world(tmp_path, seed=0, n_train=30, n_heldout=7, eval_per_type=2)


# ---------------------------------------------------------------------------------------------------------------------
# Pixels against the symbolic representation


def blobs(mask):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen, components = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, component = True, [start], []
        while stack:
            y, x = stack.pop()
            component.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        components.append(component)
    return components


def test_rendered_pixels_agree_with_the_symbolic_scene(small_world):
    fill_ranges = {"square": (1.0, 1.0), "circle": (0.70, 0.86), "triangle": (0.42, 0.62)}  # pi/4 = 0.785, 1/2
    for image_path, scene in scenes_by_image(small_world).items():
        pixels = np.asarray(Image.open(small_world / image_path).convert("RGB"))
        assert pixels.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        background = world.BACKGROUNDS[scene["background"]]
        inside_boxes = np.zeros(pixels.shape[:2], bool)
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert x1 - x0 == y1 - y0 == world.SIZES[o["size"]]
            inside_boxes[y0:y1, x0:x1] = True
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == world.COLORS[o["color"]], (image_path, o)
            cell_size = world.IMAGE_SIZE / world.GRID  # the box centre lies in the object's cell
            assert int((x0 + x1) / 2 // cell_size) == o["col"] and int((y0 + y1) / 2 // cell_size) == o["row"]
        assert (pixels[~inside_boxes] == background).all(), image_path
        foreground = (pixels != background).any(axis=-1)
        components = blobs(foreground)
        assert len(components) == len(scene["objects"]), image_path
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["box"]
            (component,) = [c for c in components if ((y0 + y1) // 2, (x0 + x1) // 2) in c]
            assert all(tuple(pixels[y, x]) == world.COLORS[o["color"]] for y, x in component)
            low, high = fill_ranges[o["shape"]]
            assert low <= len(component) / (x1 - x0) ** 2 <= high, (image_path, o)


def test_colors_are_distinct_and_every_object_color_contrasts_with_every_background():
    def distance(a, b):
        return np.linalg.norm(np.subtract(a, b))
    objects, backgrounds = list(world.COLORS.values()), list(world.BACKGROUNDS.values())
    assert min(distance(a, b) for a in objects for b in backgrounds) > 150
    assert min(distance(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]) > 75
    assert min(distance(a, b) for i, a in enumerate(backgrounds) for b in backgrounds[i + 1:]) > 40

# ---------------------------------------------------------------------------------------------------------------------
# The teacher on hand-built scenes, with hand-written answers


def make_scene(background, *objects):
    return world.Scene(background, tuple(world.place(*o) for o in objects))


def test_teacher_answers_on_a_three_object_scene():
    scene = make_scene("white", ("circle", "red", "large", 0, 0), ("square", "blue", "small", 1, 1),
                       ("triangle", "green", "large", 2, 2))
    circle, square, triangle = scene.objects
    assert world.caption(scene) == (
        "A large red circle in the top left corner, a small blue square in the center and a large green triangle in "
        "the bottom right corner on a white background.")
    assert world.description(scene) == (
        "The image shows three objects on a white background. A large red circle is in the top left corner. "
        "A small blue square is in the center. A large green triangle is in the bottom right corner.")
    assert world.color_question(scene, square) == ("What color is the square?", "The square is blue.", "blue")
    assert world.shape_question(scene, circle) == ("What shape is the red object?", "The red object is a circle.",
                                                   "circle")
    assert world.count_question(scene) == ("How many objects are there?", "There are three objects.", "3")
    assert world.count_question(scene, color="blue") == (
        "How many blue objects are there?", "There is one blue object.", "1")
    assert world.count_question(scene, color="red", shape="square") == (
        "How many red squares are there?", "There are no red squares.", "0")
    assert world.position_question(scene, triangle) == (
        "Where is the triangle?", "The triangle is in the bottom right corner.", "bottom right")
    assert world.existence_question(scene, color="green", shape="triangle") == (
        "Is there a green triangle in the image?", "Yes, there is a green triangle.", "yes")
    assert world.existence_question(scene, color="orange") == (
        "Is there an orange object in the image?", "No, there is no orange object.", "no")
    assert world.relative_position_question(scene, circle, triangle) == (
        "Where is the circle relative to the triangle?",
        "The circle is in the top left corner and the triangle is in the bottom right corner, so the circle is above "
        "and to the left of the triangle.", "above and to the left")
    assert world.relative_position_question(scene, square, circle) == (
        "Where is the square relative to the circle?",
        "The square is in the center and the circle is in the top left corner, so the square is below and to the "
        "right of the circle.", "below and to the right")
    # complex reasoning: the facts, then the conclusion
    assert world.bigger_question(scene, square, circle) == (
        "Is the square bigger than the circle?",
        "The square is small and the circle is large, so no, the square is smaller than the circle.", "no")
    assert world.bigger_question(scene, triangle, circle) == (
        "Is the triangle bigger than the circle?",
        "The triangle is large and the circle is large, so no, they are the same size.", "no")
    assert world.neighbour_color_question(scene, square, "to the left of") == (
        "What color is the object to the left of the square?",
        "The square is in the center, and the object to the left of it is in the top left corner, so it is red.",
        "red")
    assert world.neighbour_color_question(scene, square, "below") == (
        "What color is the object below the square?",
        "The square is in the center, and the object below it is in the bottom right corner, so it is green.",
        "green")
    assert world.neighbour_color_question(scene, circle, "above") is None  # nothing is above the circle
    assert world.neighbour_color_question(scene, triangle, "above") is None  # two objects are: ambiguous
    assert world.same_color_question(scene, circle, square) == (
        "Are the circle and the square the same color?",
        "The circle is red and the square is blue, so no, they are not the same color.", "no")


def test_teacher_names_lookalike_objects_by_their_cell_or_not_at_all():
    scene = make_scene("gray", ("circle", "red", "small", 0, 1), ("circle", "red", "large", 1, 0),
                       ("circle", "red", "small", 2, 2))
    top, left, _ = scene.objects
    assert world.caption(scene) == ("A small red circle at the top, a large red circle on the left and a small red "
                                    "circle in the bottom right corner on a gray background.")
    assert world.color_question(scene, left) == ("What color is the large object?", "The large object is red.", "red")
    assert world.color_question(scene, top) == ("What color is the object at the top?",
                                                "The object at the top is red.", "red")
    assert world.position_question(scene, top) is None  # two small red circles: no name without the cell
    assert world.position_question(scene, left) == ("Where is the large object?", "The large object is on the left.",
                                                    "left")
    assert world.relative_position_question(scene, top, left) is None
    assert world.count_question(scene, shape="circle") == ("How many circles are there?", "There are three circles.",
                                                           "3")
    assert world.same_color_count_question(scene, left) == (
        "How many other objects are the same color as the large object?",
        "The large object is red, and there are two other red objects.", "2")
    assert world.same_color_question(scene, top, left) == (
        "Are the object at the top and the large object the same color?",
        "The object at the top is red and the large object is red, so yes, they are the same color.", "yes")
    assert world.bigger_question(scene, left, top) == (
        "Is the object on the left bigger than the object at the top?",
        "The object on the left is large and the object at the top is small, so yes, the object on the left is "
        "bigger than the object at the top.", "yes")
    assert world.neighbour_color_question(scene, left, "to the right of") is None  # two objects: ambiguous


def test_teacher_answers_on_a_one_object_scene():
    scene = make_scene("light blue", ("square", "yellow", "small", 1, 1))
    (square,) = scene.objects
    assert world.caption(scene) == "A small yellow square in the center on a light blue background."
    assert world.description(scene) == (
        "The image shows one object on a light blue background. A small yellow square is in the center.")
    assert world.count_question(scene) == ("How many objects are there?", "There is one object.", "1")
    assert world.same_color_count_question(scene, square) == (
        "How many other objects are the same color as the square?",
        "The square is yellow, and there are no other yellow objects.", "0")
    assert world.existence_question(scene, shape="circle") == (
        "Is there a circle in the image?", "No, there is no circle.", "no")
    assert world.ask("relative_position", scene, random.Random(0)) is None


def test_response_formats_short_answer_and_lettered_choices_in_llava_15_wording():
    qa = world.QA("What color is the square?", "The square is blue.", "blue")
    assert world.short_answer_question(qa.question) == (
        "What color is the square?\nAnswer the question using a single word or phrase.")
    question, answer = world.choice_question(qa, "The shapes are drawn on a white background.", random.Random(0))
    context, asked, *options, prompt = question.split("\n")
    assert context == "Context: The shapes are drawn on a white background." and asked == qa.question
    assert prompt == "Answer with the option's letter from the given choices directly."
    assert [option[:3] for option in options] == ["A. ", "B. ", "C. ", "D. "]
    assert len({option[3:] for option in options}) == 4 and all(o[3:] in world.COLORS for o in options)
    assert options["ABCD".index(answer)] == f"{answer}. blue"
    yes_no = world.choice_question(world.QA("Is there a circle in the image?", "No, there is no circle.", "no"), "c",
                                   random.Random(0))[0].split("\n")[2:-1]
    assert sorted(option[3:] for option in yes_no) == ["no", "yes"]
    for choice_answer, expected in (("reasoning_first", r"The square is blue\. The answer is ([ABCD])\."),
                                    ("answer_first", r"The answer is ([ABCD])\. The square is blue\.")):
        question, answer = world.choice_question(qa, "c", random.Random(0), choice_answer)
        letter = re.fullmatch(expected, answer)[1]
        assert not question.endswith(world.CHOICE_PROMPT) and f"\n{letter}. blue" in question

# ---------------------------------------------------------------------------------------------------------------------
# Generated questions, checked against scenes.json by an independent reading of the text


def resolve(name, objects):
    """The objects a name like 'the small red object', 'the circle' or 'the object at the top' can mean."""
    assert name.startswith("the "), name
    words = name[len("the "):]
    for phrase, cell in CELL_PHRASES.items():
        if words == f"object {phrase}":
            return [o for o in objects if o["cell"] == cell]
    *adjectives, noun = words.split()
    return [o for o in objects
            if all(a in (o["size"], o["color"]) for a in adjectives) and noun in ("object", o["shape"])]


def the_one(name, objects):
    matches = resolve(name, objects)
    assert len(matches) == 1, f"{name!r} names {len(matches)} objects"
    return matches[0]


def sentence(text):
    return text[0].upper() + text[1:]


PLACE = {cell: phrase for phrase, cell in CELL_PHRASES.items()}
WORDS = {n: word for word, n in NUMBERS.items()}


def expected(question, objects):
    """(type, answer, short answer) of a question, re-derived from the objects by reading its text; None for a
    question of no known form."""
    if m := re.fullmatch(r"What color is the object (to the left of|to the right of|above|below) (.+)\?", question):
        anchor, axis = the_one(m[2], objects), "col" if "of" in m[1] else "row"
        sign = -1 if m[1] in ("to the left of", "above") else 1
        (found,) = [o for o in objects if np.sign(o[axis] - anchor[axis]) == sign]
        return ("reasoning", sentence(f"{m[2]} is {PLACE[anchor['cell']]}, and the object {m[1]} it is "
                                      f"{PLACE[found['cell']]}, so it is {found['color']}."), found["color"])
    if m := re.fullmatch(r"Is (.+) bigger than (.+)\?", question):
        a, b = the_one(m[1], objects), the_one(m[2], objects)
        short, verdict = {("large", "small"): ("yes", f"yes, {m[1]} is bigger than {m[2]}."),
                          ("small", "large"): ("no", f"no, {m[1]} is smaller than {m[2]}.")}.get(
            (a["size"], b["size"]), ("no", "no, they are the same size."))
        return "reasoning", sentence(f"{m[1]} is {a['size']} and {m[2]} is {b['size']}, so {verdict}"), short
    if m := re.fullmatch(r"How many other objects are the same color as (.+)\?", question):
        color = the_one(m[1], objects)["color"]
        n = sum(o["color"] == color for o in objects) - 1
        said = f"is one other {color} object" if n == 1 else f"are {WORDS[n]} other {color} objects"
        return "reasoning", sentence(f"{m[1]} is {color}, and there {said}."), str(n)
    if m := re.fullmatch(r"Are (.+) and (.+) the same color\?", question):
        a, b = the_one(m[1], objects), the_one(m[2], objects)
        same = a["color"] == b["color"]
        return ("reasoning", sentence(f"{m[1]} is {a['color']} and {m[2]} is {b['color']}, so "
                                      + ("yes, they are the same color." if same else
                                         "no, they are not the same color.")), "yes" if same else "no")
    if m := re.fullmatch(r"What color is (.+)\?", question):
        color = the_one(m[1], objects)["color"]
        return "color", sentence(f"{m[1]} is {color}."), color
    if m := re.fullmatch(r"What shape is (.+)\?", question):
        shape = the_one(m[1], objects)["shape"]
        return "shape", sentence(f"{m[1]} is a {shape}."), shape
    if m := re.fullmatch(r"Where is (.+) relative to (.+)\?", question):
        a, b = the_one(m[1], objects), the_one(m[2], objects)
        vertical = {-1: "above", 0: "", 1: "below"}[np.sign(a["row"] - b["row"])]
        horizontal = {-1: "to the left of", 0: "", 1: "to the right of"}[np.sign(a["col"] - b["col"])]
        where = " and ".join(p for p in (vertical, horizontal) if p)
        return ("relative_position", sentence(f"{m[1]} is {PLACE[a['cell']]} and {m[2]} is {PLACE[b['cell']]}, so "
                                              f"{m[1]} is {where} {m[2]}."), where.removesuffix(" of"))
    if m := re.fullmatch(r"Where is (.+)\?", question):
        cell = the_one(m[1], objects)["cell"]
        return "position", sentence(f"{m[1]} is {PLACE[cell]}."), cell
    if m := re.fullmatch(r"How many (.+)s are there\?", question):
        n = len(resolve("the " + m[1], objects))
        return "count", f"There {'is' if n == 1 else 'are'} {WORDS[n]} {m[1]}{'' if n == 1 else 's'}.", str(n)
    if m := re.fullmatch(r"Is there an? (.+) in the (image|drawing)\?", question):
        present = bool(resolve("the " + m[1], objects))
        return ("existence", f"Yes, there is {'an' if m[1][0] in 'aeiou' else 'a'} {m[1]}." if present else
                f"No, there is no {m[1]}.", "yes" if present else "no")
    return None


def check(question, answer, objects, short=False):
    """Assert that `answer` (a sentence, or the short answer if `short`) is right; return the question's type."""
    found = expected(question, objects)
    assert found is not None, question
    assert answer == found[2 if short else 1], (question, answer, found)
    return found[0]


def described_objects(context):
    """The objects a text-only context lists ('A drawing shows ... A large red circle is in the top left corner.')."""
    cells = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
    return [dict(zip(("size", "color", "shape"), m[1].lower().split()), cell=CELL_PHRASES[m[2]],
                 row=cells.index(CELL_PHRASES[m[2]]) // 3, col=cells.index(CELL_PHRASES[m[2]]) % 3)
            for m in re.finditer(r"An? (\w+ \w+ \w+) is (.+?)\.", context)]


def test_generated_questions_have_unique_correct_answers(small_world):
    scenes = scenes_by_image(small_world)
    checked = Counter()
    for name in ("stage2.json", "val_stage2.json"):
        for record in load(small_world, name):
            kind = record["id"].rsplit("-", 1)[1]
            if kind in ("conversation", "reasoning", "vqa"):
                turns = record["conversations"]
                for human, gpt in zip(turns[::2], turns[1::2]):
                    question = human["value"].replace("<image>\n", "")
                    if kind == "vqa":
                        question, prompt = question.split("\n")
                        assert prompt == "Answer the question using a single word or phrase."
                    objects = scenes[record["image"]]["objects"]
                    checked[check(question, gpt["value"], objects, short=kind == "vqa"), kind] += 1
    for item in load(small_world, "eval.json"):
        assert check(item["question"], item["answer"], scenes[item["image"]]["objects"]) == item["type"], item
    assert {question_type for question_type, _ in checked} == set(world.EVAL_TYPES)
    assert {question_type for question_type, kind in checked if kind == "vqa"} == set(world.EVAL_TYPES)
    assert checked["reasoning", "reasoning"] > 70


def choice_parts(text):
    """(context, question, {letter: option}, prompt or None) of a multiple-choice question's text."""
    lines = text.removeprefix("<image>\n").split("\n")
    prompt = lines.pop() if lines[-1] == "Answer with the option's letter from the given choices directly." else None
    context, question, *options = lines
    assert context.startswith("Context: ") and all(re.fullmatch(r"[A-D]\. .+", o) for o in options), text
    return context[len("Context: "):], question, {o[0]: o[3:] for o in options}, prompt


def test_multiple_choice_records_have_one_right_letter_with_images_or_from_their_text_alone(small_world):
    scenes = scenes_by_image(small_world)
    kinds = Counter()
    for record in load(small_world, "stage2.json") + load(small_world, "val_stage2.json"):
        if record["id"].endswith("choice"):
            human, gpt = record["conversations"]
            context, question, options, prompt = choice_parts(human["value"])
            assert prompt is not None and re.fullmatch("[A-D]", gpt["value"])
            if record["id"].endswith("-text-choice"):
                assert "image" not in record and "<image>" not in human["value"]
                assert context.startswith("A drawing shows ")
                objects = described_objects(context)
            else:
                assert human["value"].startswith("<image>\n") and context.startswith("The shapes are drawn on ")
                objects = scenes[record["image"]]["objects"]
            right = expected(question, objects)[2]
            assert options[gpt["value"]] == right and list(options.values()).count(right) == 1, record
            kinds[record["id"].endswith("-text-choice")] += 1
    assert kinds[False] == 70 and kinds[True] > 5


def test_captions_and_descriptions_list_every_object_in_reading_order(small_world):
    scenes = scenes_by_image(small_world)
    for record in load(small_world, "stage1.json") + load(small_world, "val_stage1.json"):
        scene = scenes[record["image"]]
        objects = scene["objects"]
        assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
        listed = ", ".join(f"{'an' if o['size'][0] in 'aeiou' else 'a'} {o['size']} {o['color']} {o['shape']} "
                           f"{PLACE[o['cell']]}" for o in objects)
        listed = " and ".join(listed.rsplit(", ", 1))
        assert record["conversations"][1]["value"] == sentence(f"{listed} on a {scene['background']} background.")
    for record in load(small_world, "stage2.json") + load(small_world, "val_stage2.json"):
        if record["id"].endswith("-description"):
            objects = scenes[record["image"]]["objects"]
            sentences = record["conversations"][1]["value"].split(". ")[1:]
            assert len(sentences) == len(objects)
            for text, o in zip(sentences, objects):
                size_color_shape, place = re.fullmatch(r"An? (\w+ \w+ \w+) is (.+?)\.?", text).groups()
                assert size_color_shape == f"{o['size']} {o['color']} {o['shape']}" and CELL_PHRASES[place] == o["cell"]

# ---------------------------------------------------------------------------------------------------------------------
# File formats


def test_every_record_is_well_formed_llava_json(small_world):
    ids = set()
    for name in ("stage1.json", "stage2.json", "val_stage1.json", "val_stage2.json"):
        records = load(small_world, name)
        assert records, name
        for record in records:
            text_only = record["id"].endswith("-text-choice")
            assert set(record) == {"id", "conversations"} | (set() if text_only else {"image"}), record
            assert record["id"] not in ids
            ids.add(record["id"])
            turns = record["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
            assert sum(t["value"].count("<image>") for t in turns) == (0 if text_only else 1)
            if text_only:
                continue
            assert (small_world / record["image"]).is_file()
            assert turns[0]["value"].startswith("<image>\n")
            first_question = turns[0]["value"][len("<image>\n"):]
            if "stage1" in name:
                assert len(turns) == 2 and first_question in world.BRIEF_DESCRIPTION_QUESTIONS
            elif record["id"].endswith("-description"):
                assert len(turns) == 2 and first_question in world.DETAILED_DESCRIPTION_QUESTIONS
    stage2_kinds = Counter(record["id"].split("-", 1)[1] for record in load(small_world, "stage2.json"))
    assert set(stage2_kinds) == {"conversation", "reasoning", "description", "vqa", "choice", "text-choice"}
    assert stage2_kinds["vqa"] == stage2_kinds["choice"] == stage2_kinds["conversation"] == 40


def test_eval_has_every_type_balanced_and_existence_half_yes(small_world):
    items = load(small_world, "eval.json")
    assert all(set(item) == {"id", "image", "question", "answer", "type"} for item in items)
    assert Counter(item["type"] for item in items) == {kind: 8 for kind in world.EVAL_TYPES}
    assert set(world.EVAL_TYPES) == {"color", "shape", "count", "position", "existence", "relative_position",
                                     "reasoning"}
    assert len({item["id"] for item in items}) == len(items)
    assert all("<image>" not in item["question"] for item in items)
    existence = [item["answer"].split(",")[0] for item in items if item["type"] == "existence"]
    assert Counter(existence) == {"Yes": 4, "No": 4}
    manifest = load(small_world, "world.json")
    assert manifest["seed"] == 0 and manifest["version"] == world.VERSION and manifest["files"]["eval.json"] == 56


def test_exact_match_ignores_case_spacing_and_trailing_punctuation_only():
    assert world.normalize_answer("  The circle   is RED . ") == "the circle is red"
    assert world.exact_match("the circle is red", "The circle is red.")
    assert world.exact_match("There are two objects!\n", "There are two objects.")
    assert not world.exact_match("The circle is blue.", "The circle is red.")
    assert not world.exact_match("Yes there is a circle.", "Yes, there is a circle.")
    assert not world.exact_match("The circle is red. It is large.", "The circle is red.")

# ---------------------------------------------------------------------------------------------------------------------
# The held-out benchmarks, in LLaVA's eval file formats


def jsonl(directory, name):
    return [json.loads(line) for line in (directory / name).read_text().splitlines()]


def test_shapes_vqa_asks_eval_json_questions_for_a_single_word_or_phrase_with_the_right_key(small_world):
    scenes = scenes_by_image(small_world)
    questions, truth = jsonl(small_world, "shapes_vqa.jsonl"), jsonl(small_world, "shapes_vqa_truth.jsonl")
    items = load(small_world, "eval.json")
    assert [q["question_id"] for q in questions] == [t["question_id"] for t in truth]
    assert [(q["image"], q["text"], q["category"]) for q in questions] == [
        (i["image"], i["question"] + "\nAnswer the question using a single word or phrase.", i["type"]) for i in items]
    for question, key in zip(questions, truth):
        assert check(question["text"].split("\n")[0], key["answer"], scenes[question["image"]]["objects"],
                     short=True) == key["category"]


def test_shapes_sqa_mixes_image_and_text_only_questions_each_with_one_right_letter(small_world):
    scenes = scenes_by_image(small_world)
    questions, truth = jsonl(small_world, "shapes_sqa.jsonl"), jsonl(small_world, "shapes_sqa_truth.jsonl")
    assert [q["question_id"] for q in questions] == [t["question_id"] for t in truth]
    kinds = Counter()
    for question, key in zip(questions, truth):
        context, asked, options, prompt = choice_parts(question["text"])
        assert prompt is not None and question["category"] == key["category"]
        if key["category"] == "text":
            assert "image" not in question and context.startswith("A drawing shows ")
            objects = described_objects(context)
        else:
            objects = scenes[question["image"]]["objects"]
        right = expected(asked, objects)
        assert right[0] == key["type"] and options[key["answer"]] == right[2]
        assert list(options.values()).count(right[2]) == 1
        kinds[key["category"]] += 1
    assert kinds["text"] == 7 * world.SQA_PER_TYPE and kinds["image"] >= 7 * 10


def test_shapes_pope_draws_negatives_at_random_among_popular_and_among_co_occurring_kinds(small_world):
    scenes = load(small_world, "scenes.json")
    kinds_of = lambda scene: {(o["color"], o["shape"]) for o in scene["objects"]}
    frequency, together = Counter(), Counter()
    for scene in scenes:
        if scene["split"] == "train":
            frequency.update((o["color"], o["shape"]) for o in scene["objects"])
            together.update((a, b) for a in kinds_of(scene) for b in kinds_of(scene) if a != b)
    by_image = {scene["image"]: kinds_of(scene) for scene in scenes}
    questions, truth = jsonl(small_world, "shapes_pope.jsonl"), jsonl(small_world, "shapes_pope_truth.jsonl")
    asked = defaultdict(lambda: defaultdict(list))  # split -> image -> [(kind, label)]
    for question, key in zip(questions, truth):
        m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?\nAnswer the question using a single word or "
                         r"phrase\.", question["text"])
        kind = (m[1], m[2])
        assert key["label"] == ("yes" if kind in by_image[question["image"]] else "no")
        asked[question["category"]][question["image"]].append(kind)
    all_kinds = [(c, s) for c in world.COLORS for s in world.SHAPES]
    for split, images in asked.items():
        for image, kinds in images.items():
            present = by_image[image]
            negatives = [kind for kind in kinds if kind not in present]
            assert len(negatives) == len(present) == len(kinds) - len(negatives)  # as many no as yes
            absent = [kind for kind in all_kinds if kind not in present]
            if split == "popular":  # the most frequent absent kinds (ties either way)
                assert min(frequency[k] for k in negatives) >= sorted(
                    (frequency[k] for k in absent), reverse=True)[len(present) - 1]
            if split == "adversarial":  # the absent kinds seen most often with the present ones
                score = lambda kind: sum(together[p, kind] for p in present)
                assert min(map(score, negatives)) >= sorted(map(score, absent), reverse=True)[len(present) - 1]
    assert set(asked) == {"random", "popular", "adversarial"}


def test_the_scienceqa_ablation_worlds_answer_choices_with_an_explanation_before_or_after_the_letter(tmp_path):
    for choice_answer, pattern in (("reasoning_first", r"(.+) The answer is ([A-D])\."),
                                   ("answer_first", r"The answer is ([A-D])\. (.+)")):
        directory = world.ensure_world(tmp_path, seed=0, choice_answer=choice_answer, **SMALL)
        choices = [r for r in load(directory, "stage2.json") if r["id"].endswith("choice")]
        assert choices
        for record in choices:
            human, gpt = record["conversations"]
            _, question, options, prompt = choice_parts(human["value"])
            assert prompt is None and re.fullmatch(pattern, gpt["value"])
        assert all("Answer with the option's letter" not in q["text"] for q in jsonl(directory, "shapes_sqa.jsonl"))
    with pytest.raises(ValueError, match="choice_answer"):
        world.ensure_world(tmp_path, seed=0, choice_answer="letters", **SMALL)


def test_the_default_world_is_reachable_as_root_default_whatever_other_worlds_exist(tmp_path, monkeypatch):
    for name, value in (("N_TRAIN_IMAGES", 24), ("N_HELDOUT_IMAGES", 4), ("EVAL_PER_TYPE", 1)):
        monkeypatch.setattr(world, name, value)  # a small world stands for the default one
    default = world.ensure_world(tmp_path, 0, 24, 4, 1)
    assert os.readlink(tmp_path / "default") == default.name
    other = world.ensure_world(tmp_path, 1, 24, 4, 1)  # another seed: the link stays
    assert other != default and (tmp_path / "default").resolve() == default.resolve()
    assert world.ensure_world(tmp_path, 0, 24, 4, 1) == default and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(["default", default.name, other.name])  # no link left half made
