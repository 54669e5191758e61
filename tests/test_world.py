"""Tests for world.py: determinism, split hygiene, pixels against symbols, the teacher's answers, file formats."""
import json
import random
import re
from collections import Counter

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
    assert len(files) == 70 + 7  # 40 + 30 images and 7 JSON files
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
        assert all(record["image"].startswith(prefix) for record in load(small_world, name)), name

def test_splits_stay_disjoint_in_a_world_with_few_distinct_scenes(tmp_path, monkeypatch):
    # one shape, two colors, two sizes, one background, one object: 9 cells * 2 * 2 = 36 distinct scenes in all
    monkeypatch.setattr(world, "SHAPES", ("circle",))
    monkeypatch.setattr(world, "COLORS", {"red": world.COLORS["red"], "blue": world.COLORS["blue"]})
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
        "A large red circle, a small blue square and a large green triangle on a white background.")
    assert world.description(scene) == (
        "The image shows three objects on a white background. A large red circle is in the top left corner. "
        "A small blue square is in the center. A large green triangle is in the bottom right corner.")
    assert world.color_question(scene, square) == ("What color is the square?", "The square is blue.")
    assert world.shape_question(scene, circle) == ("What shape is the red object?", "The red object is a circle.")
    assert world.count_question(scene) == ("How many objects are there?", "There are three objects.")
    assert world.count_question(scene, color="blue") == (
        "How many blue objects are there?", "There is one blue object.")
    assert world.count_question(scene, color="red", shape="square") == (
        "How many red squares are there?", "There are no red squares.")
    assert world.position_question(scene, triangle) == (
        "Where is the triangle?", "The triangle is in the bottom right corner.")
    assert world.existence_question(scene, color="green", shape="triangle") == (
        "Is there a green triangle in the image?", "Yes, there is a green triangle.")
    assert world.existence_question(scene, color="orange") == (
        "Is there an orange object in the image?", "No, there is no orange object.")
    assert world.relative_position_question(scene, circle, triangle) == (
        "Where is the circle relative to the triangle?", "The circle is above and to the left of the triangle.")
    assert world.relative_position_question(scene, square, circle) == (
        "Where is the square relative to the circle?", "The square is below and to the right of the circle.")
    # complex reasoning
    assert world.bigger_question(scene, square, circle) == (
        "Is the square bigger than the circle?", "No, the square is smaller than the circle.")
    assert world.bigger_question(scene, triangle, circle) == (
        "Is the triangle bigger than the circle?", "No, the triangle and the circle are the same size.")
    assert world.neighbour_color_question(scene, square, "to the left of") == (
        "What color is the object to the left of the square?", "The object to the left of the square is red.")
    assert world.neighbour_color_question(scene, square, "below") == (
        "What color is the object below the square?", "The object below the square is green.")
    assert world.neighbour_color_question(scene, circle, "above") is None  # nothing is above the circle
    assert world.neighbour_color_question(scene, triangle, "above") is None  # two objects are: ambiguous
    assert world.same_color_question(scene, circle, square) == (
        "Are the circle and the square the same color?", "No, the circle is red and the square is blue.")


def test_teacher_names_lookalike_objects_by_their_cell_or_not_at_all():
    scene = make_scene("gray", ("circle", "red", "small", 0, 1), ("circle", "red", "large", 1, 0),
                       ("circle", "red", "small", 2, 2))
    top, left, _ = scene.objects
    assert world.caption(scene) == "A small red circle, a large red circle and a small red circle on a gray background."
    assert world.color_question(scene, left) == ("What color is the large object?", "The large object is red.")
    assert world.color_question(scene, top) == ("What color is the object at the top?", "The object at the top is red.")
    assert world.position_question(scene, top) is None  # two small red circles: no name without the cell
    assert world.position_question(scene, left) == ("Where is the large object?", "The large object is on the left.")
    assert world.relative_position_question(scene, top, left) is None
    assert world.count_question(scene, shape="circle") == ("How many circles are there?", "There are three circles.")
    assert world.same_color_count_question(scene, left) == (
        "How many other objects are the same color as the large object?", "There are two other red objects.")
    assert world.same_color_question(scene, top, left) == (
        "Are the object at the top and the large object the same color?", "Yes, both are red.")
    assert world.bigger_question(scene, left, top) == (
        "Is the object on the left bigger than the object at the top?",
        "Yes, the object on the left is bigger than the object at the top.")
    assert world.neighbour_color_question(scene, left, "to the right of") is None  # two objects: ambiguous


def test_teacher_answers_on_a_one_object_scene():
    scene = make_scene("light blue", ("square", "yellow", "small", 1, 1))
    (square,) = scene.objects
    assert world.caption(scene) == "A small yellow square on a light blue background."
    assert world.description(scene) == (
        "The image shows one object on a light blue background. A small yellow square is in the center.")
    assert world.count_question(scene) == ("How many objects are there?", "There is one object.")
    assert world.same_color_count_question(scene, square) == (
        "How many other objects are the same color as the square?", "There are no other yellow objects.")
    assert world.existence_question(scene, shape="circle") == (
        "Is there a circle in the image?", "No, there is no circle.")
    assert world.ask("relative_position", scene, random.Random(0)) is None

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


def check(question, answer, objects):
    """Re-derive the answer of a question from the objects; return the question's type, or None for a question of
    no known form."""
    if m := re.fullmatch(r"What color is the object (to the left of|to the right of|above|below) (.+)\?", question):
        anchor, axis = the_one(m[2], objects), "col" if "of" in m[1] else "row"
        sign = -1 if m[1] in ("to the left of", "above") else 1
        (found,) = [o for o in objects if np.sign(o[axis] - anchor[axis]) == sign]
        assert answer == f"The object {m[1]} {m[2]} is {found['color']}."
        return "reasoning"
    if m := re.fullmatch(r"Is (.+) bigger than (.+)\?", question):
        a, b = the_one(m[1], objects), the_one(m[2], objects)
        assert answer == {("large", "small"): f"Yes, {m[1]} is bigger than {m[2]}.",
                          ("small", "large"): f"No, {m[1]} is smaller than {m[2]}."}.get(
            (a["size"], b["size"]), f"No, {m[1]} and {m[2]} are the same size.")
        return "reasoning"
    if m := re.fullmatch(r"How many other objects are the same color as (.+)\?", question):
        color = the_one(m[1], objects)["color"]
        n = sum(o["color"] == color for o in objects) - 1
        assert answer == {0: f"There are no other {color} objects.", 1: f"There is one other {color} object."}.get(
            n, f"There are two other {color} objects.")
        return "reasoning"
    if m := re.fullmatch(r"Are (.+) and (.+) the same color\?", question):
        a, b = the_one(m[1], objects), the_one(m[2], objects)
        assert answer == (f"Yes, both are {a['color']}." if a["color"] == b["color"] else
                          f"No, {m[1]} is {a['color']} and {m[2]} is {b['color']}.")
        return "reasoning"
    if m := re.fullmatch(r"What color is (.+)\?", question):
        assert answer == sentence(f"{m[1]} is {the_one(m[1], objects)['color']}.")
        return "color"
    elif m := re.fullmatch(r"What shape is (.+)\?", question):
        assert answer == sentence(f"{m[1]} is a {the_one(m[1], objects)['shape']}.")
        return "shape"
    elif m := re.fullmatch(r"Where is (.+) relative to (.+)\?", question):
        a, b = the_one(m[1], objects), the_one(m[2], objects)
        vertical = {-1: "above", 0: "", 1: "below"}[np.sign(a["row"] - b["row"])]
        horizontal = {-1: "to the left of", 0: "", 1: "to the right of"}[np.sign(a["col"] - b["col"])]
        assert answer == sentence(f"{m[1]} is {' and '.join(p for p in (vertical, horizontal) if p)} {m[2]}.")
        return "relative_position"
    elif m := re.fullmatch(r"Where is (.+)\?", question):
        assert answer.startswith(sentence(f"{m[1]} is "))
        assert CELL_PHRASES[answer[len(m[1]) + len(" is "):-1]] == the_one(m[1], objects)["cell"]
        return "position"
    elif m := re.fullmatch(r"How many (.+)s are there\?", question):
        n = len(resolve("the " + m[1], objects))
        said = re.fullmatch(rf"There (is|are) (\w+) {m[1]}s?\.", answer)
        assert said and NUMBERS[said[2]] == n and (said[1] == "is") == (n == 1), (question, answer)
        return "count"
    elif m := re.fullmatch(r"Is there an? (.+) in the image\?", question):
        present = bool(resolve("the " + m[1], objects))
        assert answer == (f"Yes, there is {'an' if m[1][0] in 'aeiou' else 'a'} {m[1]}." if present else
                          f"No, there is no {m[1]}.")
        return "existence"
    return None


def test_generated_questions_have_unique_correct_answers(small_world):
    scenes = scenes_by_image(small_world)
    checked = Counter()
    for name in ("stage2.json", "val_stage2.json"):
        for record in load(small_world, name):
            if not record["id"].endswith("-description"):
                turns = record["conversations"]
                for human, gpt in zip(turns[::2], turns[1::2]):
                    question = human["value"].replace("<image>\n", "")
                    kind = check(question, gpt["value"], scenes[record["image"]]["objects"])
                    assert kind is not None, question
                    checked[kind] += 1
    for item in load(small_world, "eval.json"):
        assert check(item["question"], item["answer"], scenes[item["image"]]["objects"]) == item["type"], item
    assert set(checked) == set(world.EVAL_TYPES) and checked["reasoning"] > 70


def test_captions_and_descriptions_list_every_object_in_reading_order(small_world):
    scenes = scenes_by_image(small_world)
    for record in load(small_world, "stage1.json") + load(small_world, "val_stage1.json"):
        objects = scenes[record["image"]]["objects"]
        assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
        expected = [f"{o['size']} {o['color']} {o['shape']}" for o in objects]
        caption = record["conversations"][1]["value"]
        assert re.findall(r"\ban? (\w+ \w+ \w+)", caption.split(" on ")[0].lower()) == expected, caption
        assert caption.endswith(f"on a {scenes[record['image']]['background']} background.")
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
            assert set(record) == {"id", "image", "conversations"}, record
            assert record["id"] not in ids
            ids.add(record["id"])
            assert (small_world / record["image"]).is_file()
            turns = record["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            first_question = turns[0]["value"][len("<image>\n"):]
            if "stage1" in name:
                assert len(turns) == 2 and first_question in world.BRIEF_DESCRIPTION_QUESTIONS
            elif record["id"].endswith("-description"):
                assert len(turns) == 2 and first_question in world.DETAILED_DESCRIPTION_QUESTIONS
    stage2_kinds = Counter(record["id"].rsplit("-", 1)[1] for record in load(small_world, "stage2.json"))
    assert set(stage2_kinds) == {"conversation", "reasoning", "description"}


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
