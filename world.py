"""
The shapes world: a procedural visual world and a rule-based teacher, tinyllava's stand-in for COCO and GPT-4.

LLaVA (Liu et al. 2023, Sec. 3) never shows GPT-4 an image. It gives GPT-4 the captions and boxes of a COCO image
(its symbolic representation) and asks for three kinds of instruction data: multi-turn conversation, detailed
description and complex reasoning. Here a scene is sampled symbolically (objects with a shape, color, size, grid cell
and pixel box), rendered with Pillow, and a teacher writes the same three kinds of data from the symbolic scene alone,
plus the stage-1 pairs (a brief-description question answered by the caption) and, as LLaVA-1.5 mixed VQA data into
its instruction tuning, short-answer and multiple-choice records in LLaVA-1.5's response formats. Everything lands on
disk as LLaVA JSON and PNG files, so training reads it through the same data path as real data; the held-out split
also gets three benchmarks in LLaVA's question-file format (shapes-VQA, shapes-SQA, shapes-POPE).

    python world.py                          # generate the default world (cache/world/default) and print a summary
    python world.py --seed 1 --root /tmp/w   # another seed, another place
    python world.py --choice_answer reasoning_first   # the ScienceQA ablation's world (see CHOICE_ANSWERS)

The world directory (one per seed and settings; generated once, then reused):
    images/train_00000.png ...      the scenes, IMAGE_SIZE x IMAGE_SIZE RGB
    scenes.json                     the symbolic scene of every image (objects, cells, boxes, caption)
    stage1.json, val_stage1.json    brief-description question -> caption (train split, held-out split)
    stage2.json, val_stage2.json    conversations, detailed descriptions, complex reasoning, short-answer (VQA) and
                                    multiple-choice records (some text-only), mixed
    eval.json                       held-out single questions, {id, image, question, answer, type}; the question
                                    holds no <image> tag (the caller adds it, as for any prompt)
    shapes_{vqa,sqa,pope}.jsonl     held-out benchmarks: {question_id, image (absent: text-only), text, category}
                                    lines, as LLaVA's eval question files; their answer keys in
    shapes_{vqa,sqa,pope}_truth.jsonl  {question_id, answer or label, category}
    world.json                      manifest: version, seed, settings, counts
Image paths in the JSON files are relative to the world directory. Answers use one fixed phrasing per question type,
so exact match on held-out questions (`exact_match`) is a meaningful score.
"""
import functools
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from PIL import Image, ImageDraw

import flags
from data import BRIEF_DESCRIPTION_QUESTIONS, DETAILED_DESCRIPTION_QUESTIONS  # the paper's Tables 8 and 9

# ----------------------------------------------------------------------------------------------------------------------
# The world's constants. Changing any of them changes the cache key, so a stale world is never reused.

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache", "world")  # from any directory
VERSION = 2  # bump when the renderer or the teacher changes in a way the constants below do not show

IMAGE_SIZE = 64  # pixels, square RGB
GRID = 3  # GRID x GRID cells, one object per cell at most
CELL_NAMES = (("top left", "top", "top right"),  # one name per cell, row by row: rewrite them if GRID changes
              ("left", "center", "right"),
              ("bottom left", "bottom", "bottom right"))
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 20, 20), "green": (20, 160, 20), "blue": (20, 40, 220),
          "yellow": (240, 220, 0), "purple": (140, 30, 170), "orange": (255, 140, 0)}
SIZES = {"small": 10, "large": 17}  # side of the shape's square box, in pixels
BACKGROUNDS = {"white": (255, 255, 255), "gray": (200, 200, 200), "light blue": (190, 225, 245)}
MIN_OBJECTS, MAX_OBJECTS = 1, 3
CELL_MARGIN = 1  # pixels kept free along each cell edge, so shapes in neighbouring cells never touch
MAX_JITTER = 2  # pixels a shape may move away from its cell's centre, each axis

# Object kinds (a color and a shape: POPE's "objects"). As in COCO, some kinds are common and some go together, so that
# POPE's popular and adversarial negatives differ from random ones: colors and shapes are drawn with these weights, and
# each further object of a scene is, with COMPANION_PROB, the companion of one already drawn (same shape, the
# complementary color).
COLOR_WEIGHTS = {"red": 3, "green": 2, "blue": 3, "yellow": 2, "purple": 1, "orange": 1}
SHAPE_WEIGHTS = {"circle": 2, "square": 2, "triangle": 1}
COMPLEMENTS = {"red": "green", "green": "red", "blue": "orange", "orange": "blue", "yellow": "purple",
               "purple": "yellow"}
COMPANION_PROB = 0.5

N_TRAIN_IMAGES = 8000
N_HELDOUT_IMAGES = 500
CONVERSATION_TURNS = 4  # question-answer turns in a multi-turn conversation
REASONING_TURNS = 2  # question-answer turns in a complex-reasoning record
DESCRIPTION_FRACTION = 0.5  # share of images that also get a detailed-description record
VQA_TURNS = 4  # short-answer turns in a VQA record (one per image)
TEXT_CHOICE_FRACTION = 0.25  # per image, the chance of a text-only multiple-choice record about another scene
EVAL_PER_TYPE = 50  # held-out questions per eval type (eval.json and shapes-VQA)
SQA_PER_TYPE = 30  # held-out shapes-SQA questions per eval type, with an image and (as many) text-only
POPE_IMAGES = 100  # held-out images per POPE split; each gives its present kinds (yes) and as many absent ones (no)

# LLaVA-1.5's response-format prompts (its VQA and multiple-choice data, and its evaluations)
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
# How multiple-choice records are answered: "letter" (LLaVA-1.5: the bare letter, after CHOICE_PROMPT), or the
# paper's ScienceQA ablation, without the prompt: an explanation then "The answer is X." ("reasoning_first") or the
# other way round ("answer_first")
CHOICE_ANSWERS = ("letter", "reasoning_first", "answer_first")
LETTERS = "ABCD"

CONVERSATION_TYPES = ("color", "shape", "count", "position", "existence", "relative_position")
EVAL_TYPES = CONVERSATION_TYPES + ("reasoning",)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
assert len(CELL_NAMES) == GRID and MIN_OBJECTS >= 1 and MAX_OBJECTS <= min(GRID * GRID, len(NUMBER_WORDS) - 1)

# ----------------------------------------------------------------------------------------------------------------------
# Scenes: the symbolic representation, sampled at random.


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    box: tuple  # (x0, y0, x1, y1) in pixels, x1 and y1 exclusive


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple  # SceneObjects in reading order (row, then column): the canonical order of captions

    def key(self):
        """What the scene says, without the pixel jitter: two scenes with the same key are the same scene."""
        return (self.background,) + tuple((o.row, o.col, o.shape, o.color, o.size) for o in self.objects)


def place(shape, color, size, row, col, rng=None):
    """An object centred in its cell, moved by up to MAX_JITTER pixels per axis if rng is given."""
    side = SIZES[size]
    corner = []
    for index in (col, row):  # x from the column, y from the row
        start = index * IMAGE_SIZE // GRID + CELL_MARGIN
        end = (index + 1) * IMAGE_SIZE // GRID - CELL_MARGIN
        slack = end - start - side
        assert slack >= 0, f"a {size} shape ({side} px) does not fit in a cell of {end - start} px"
        jitter = rng.randint(-min(MAX_JITTER, slack // 2), min(MAX_JITTER, slack - slack // 2)) if rng else 0
        corner.append(start + slack // 2 + jitter)
    x0, y0 = corner
    return SceneObject(shape, color, size, row, col, (x0, y0, x0 + side, y0 + side))


def sample_kind(rng):
    """A (color, shape) drawn with COLOR_WEIGHTS and SHAPE_WEIGHTS."""
    return (rng.choices(list(COLOR_WEIGHTS), weights=list(COLOR_WEIGHTS.values()))[0],
            rng.choices(list(SHAPE_WEIGHTS), weights=list(SHAPE_WEIGHTS.values()))[0])


def sample_scene(rng):
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(MIN_OBJECTS, MAX_OBJECTS)))
    kinds = []
    for _ in cells:
        if kinds and rng.random() < COMPANION_PROB:
            color, shape = rng.choice(kinds)
            kinds.append((COMPLEMENTS[color], shape))
        else:
            kinds.append(sample_kind(rng))
    rng.shuffle(kinds)  # a companion may stand anywhere, not only after its partner
    objects = tuple(place(shape, color, rng.choice(list(SIZES)), cell // GRID, cell % GRID, rng)
                    for cell, (color, shape) in zip(cells, kinds))
    return Scene(rng.choice(list(BACKGROUNDS)), objects)


# What a grid cell can hold, named: the scene "written" for the tiny LLM's pretraining (make_bases.py), and what its
# image tokens are read back as (sample.py --read_image)
ATTRIBUTES = tuple(name for row in CELL_NAMES for name in row) + tuple(BACKGROUNDS) + ("empty",) + tuple(SIZES) \
    + tuple(COLORS) + SHAPES


def cell_attributes(scene):
    """What each cell holds, in reading order (the image tokens' order): [cell name, background, size, color, shape],
    or [cell name, background, "empty"]."""
    cells = [[name, scene.background, "empty"] for row in CELL_NAMES for name in row]
    for o in scene.objects:
        cells[o.row * GRID + o.col] = [CELL_NAMES[o.row][o.col], scene.background, o.size, o.color, o.shape]
    return cells


# The LLM reads a cell as the mean of its words' embeddings, each word the text token the questions use (" top",
# " left", " large", " red", " circle"), so that the question's " red" and the red cell share a vector. Two names are
# special tokens added to the tiny LLM's vocabulary: "light blue" (its " blue" would read as the object's colour) and
# "empty" (a word no text of the world uses).
SCENE_TOKENS = ("<|light blue|>", "<|empty|>")


def cell_words(cell):
    """A cell_attributes entry as the LLM's tokens: [" top", " left", " white", " large", " red", " circle"]."""
    words = []
    for name in cell:
        words += [f"<|{name}|>"] if f"<|{name}|>" in SCENE_TOKENS else [" " + word for word in name.split()]
    return words


def cell_word_ids(cell, tokenizer):
    """The token ids of cell_words(cell) in a tokenizers.Tokenizer, or None unless each word a cell can hold is one
    token of it (as in the tiny bases' tokenizer, and no other)."""
    ids = scene_word_ids(tokenizer)
    return None if ids is None else [ids[word] for word in cell_words(cell)]


@functools.lru_cache(maxsize=4)  # per tokenizer: make_bases.py asks for 9 cells of every scene of every batch
def scene_word_ids(tokenizer):
    """{word: token id} for every word cell_words writes, or None unless each is one token of the tokenizer."""
    words = {word for cell in possible_cells() for word in cell_words(cell)}
    ids = {word: tokenizer.encode(word, add_special_tokens=False).ids for word in words}
    return {word: i[0] for word, i in ids.items()} if all(len(i) == 1 for i in ids.values()) else None


def possible_cells():
    """Every cell_attributes entry a scene can have, in a fixed order."""
    contents = [["empty"]] + [[size, color, shape] for size in SIZES for color in COLORS for shape in SHAPES]
    return [[name, background] + content for row in CELL_NAMES for name in row for background in BACKGROUNDS
            for content in contents]


def scene_from_json(record):
    """The Scene of a scenes.json record (scene_to_json's inverse)."""
    return Scene(record["background"], tuple(SceneObject(o["shape"], o["color"], o["size"], o["row"], o["col"],
                                                         tuple(o["box"])) for o in record["objects"]))


def scene_to_json(scene):
    return {"background": scene.background,
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "cell": CELL_NAMES[o.row][o.col],
                         "row": o.row, "col": o.col, "box": list(o.box)} for o in scene.objects]}

# ----------------------------------------------------------------------------------------------------------------------
# Rendering: crisp shapes (no antialiasing), so every pixel is either the background or exactly one object's color.


def render(scene):
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        x1, y1 = x1 - 1, y1 - 1  # Pillow's boxes include their last pixel
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":  # pointing up, its base on the box's bottom edge
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image

# ----------------------------------------------------------------------------------------------------------------------
# Language: naming objects and places.


def where(row, col):
    """'in the top left corner', 'at the top', 'on the left', 'in the center'."""
    name = CELL_NAMES[row][col]
    if name == "center":
        return "in the center"
    if " " in name:
        return f"in the {name} corner"
    return f"at the {name}" if name in ("top", "bottom") else f"on the {name}"


def phrase(size=None, color=None, shape=None):
    """'large red circle', 'red object', 'circle', 'object'."""
    return " ".join([word for word in (size, color) if word] + [shape or "object"])


def with_article(text):
    return ("an " if text[0] in "aeiou" else "a ") + text


def capitalize(text):
    return text[0].upper() + text[1:]


def count(scene, **attributes):
    """How many objects have all the given attribute values (size=, color=, shape=)."""
    return sum(all(getattr(o, name) == value for name, value in attributes.items()) for o in scene.objects)


def number(n, noun):
    """'one circle', 'two circles', 'no circles'."""
    return f"{NUMBER_WORDS[n]} {noun}" + ("" if n == 1 else "s")


# The ways to name an object, shortest first: "the circle", "the red object", ..., "the small red circle".
REFERENCES = (("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"), ("size", "color"),
              ("size", "color", "shape"))


def refer(scene, obj, hide=()):
    """The shortest name that picks out obj alone, using no attribute in `hide`. When attributes are not enough it
    falls back on the cell ('the object in the center') unless "cell" is hidden too; then it returns None."""
    for names in REFERENCES:
        if not set(names) & set(hide):
            attributes = {name: getattr(obj, name) for name in names}
            if count(scene, **attributes) == 1:
                return "the " + phrase(**attributes)
    return None if "cell" in hide else f"the object {where(obj.row, obj.col)}"


def relation(a, b):
    """Where a lies relative to b: 'above', 'to the left of', 'below and to the right of', ..."""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    return " and ".join(part for part in (vertical, horizontal) if part)

# ----------------------------------------------------------------------------------------------------------------------
# Captions (stage 1) and detailed descriptions: every object, in reading order.


def caption(scene):
    """'A large red circle in the top left corner and a small blue square in the center on a white background.'"""
    names = [f"{with_article(phrase(o.size, o.color, o.shape))} {where(o.row, o.col)}" for o in scene.objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return capitalize(f"{listed} on {with_article(scene.background)} background.")


def description(scene, subject="The image"):
    """'The image shows two objects on a gray background. A large red circle is in the top left corner. ...'"""
    sentences = [f"{subject} shows {number(len(scene.objects), 'object')} on {with_article(scene.background)} "
                 "background."]
    for o in scene.objects:
        sentences.append(capitalize(f"{with_article(phrase(o.size, o.color, o.shape))} is {where(o.row, o.col)}."))
    return " ".join(sentences)

# ----------------------------------------------------------------------------------------------------------------------
# Questions. Each takes its targets explicitly and returns a QA, or None when the scene does not give the question a
# unique answer. `ask` below picks the targets at random. Complex reasoning, and where two objects are compared, is
# answered as GPT-4 answered LLaVA's reasoning questions: the facts first, then the conclusion.


class QA(NamedTuple):
    question: str
    answer: str  # a sentence, as in LLaVA's conversations
    short: str  # a single word or phrase, as in LLaVA-1.5's VQA data


def color_question(scene, obj):
    name = refer(scene, obj, hide=("color",))
    return QA(f"What color is {name}?", capitalize(f"{name} is {obj.color}."), obj.color)


def shape_question(scene, obj):
    name = refer(scene, obj, hide=("shape",))
    return QA(f"What shape is {name}?", capitalize(f"{name} is a {obj.shape}."), obj.shape)


def count_question(scene, **attributes):
    noun, n = phrase(**attributes), count(scene, **attributes)
    return QA(f"How many {noun}s are there?", ("There is " if n == 1 else "There are ") + number(n, noun) + ".",
              str(n))


def position_question(scene, obj):
    name = refer(scene, obj, hide=("cell",))
    if name is None:
        return None
    return QA(f"Where is {name}?", capitalize(f"{name} is {where(obj.row, obj.col)}."), CELL_NAMES[obj.row][obj.col])


def existence_question(scene, **attributes):
    noun = phrase(**attributes)
    present = count(scene, **attributes) > 0
    answer = f"Yes, there is {with_article(noun)}." if present else f"No, there is no {noun}."
    return QA(f"Is there {with_article(noun)} in the image?", answer, "yes" if present else "no")


def relative_position_question(scene, a, b):
    name_a, name_b = refer(scene, a, hide=("cell",)), refer(scene, b, hide=("cell",))
    if name_a is None or name_b is None:
        return None
    return QA(f"Where is {name_a} relative to {name_b}?",
              capitalize(f"{name_a} is {where(a.row, a.col)} and {name_b} is {where(b.row, b.col)}, so {name_a} is "
                         f"{relation(a, b)} {name_b}."), relation(a, b).removesuffix(" of"))

# Complex reasoning: each answer states two facts about the scene, then what follows from them.


DIRECTIONS = {"to the left of": lambda o, anchor: o.col < anchor.col,
              "to the right of": lambda o, anchor: o.col > anchor.col,
              "above": lambda o, anchor: o.row < anchor.row, "below": lambda o, anchor: o.row > anchor.row}


def neighbour_color_question(scene, anchor, direction):
    """Where the anchor is, then which object lies that way of it, then its color."""
    name = refer(scene, anchor, hide=("cell",))
    found = [o for o in scene.objects if DIRECTIONS[direction](o, anchor)]
    if name is None or len(found) != 1:
        return None
    return QA(f"What color is the object {direction} {name}?",
              capitalize(f"{name} is {where(anchor.row, anchor.col)}, and the object {direction} it is "
                         f"{where(found[0].row, found[0].col)}, so it is {found[0].color}."), found[0].color)


def bigger_question(scene, a, b):
    """The size of a, the size of b, then the comparison."""
    name_a, name_b = refer(scene, a, hide=("size",)), refer(scene, b, hide=("size",))
    facts = capitalize(f"{name_a} is {a.size} and {name_b} is {b.size}, so ")
    if SIZES[a.size] > SIZES[b.size]:
        answer, short = f"yes, {name_a} is bigger than {name_b}.", "yes"
    elif SIZES[a.size] < SIZES[b.size]:
        answer, short = f"no, {name_a} is smaller than {name_b}.", "no"
    else:
        answer, short = "no, they are the same size.", "no"
    return QA(f"Is {name_a} bigger than {name_b}?", facts + answer, short)


def same_color_count_question(scene, obj):
    """The color of obj, then how many other objects have it."""
    name = refer(scene, obj, hide=("color",))
    others = count(scene, color=obj.color) - 1
    return QA(f"How many other objects are the same color as {name}?",
              capitalize(f"{name} is {obj.color}, and there {'is' if others == 1 else 'are'} "
                         f"{number(others, f'other {obj.color} object')}."), str(others))


def same_color_question(scene, a, b):
    """The color of a, the color of b, then the comparison."""
    name_a, name_b = refer(scene, a, hide=("color",)), refer(scene, b, hide=("color",))
    same = a.color == b.color
    return QA(f"Are {name_a} and {name_b} the same color?",
              capitalize(f"{name_a} is {a.color} and {name_b} is {b.color}, so "
                         + ("yes, they are the same color." if same else "no, they are not the same color.")),
              "yes" if same else "no")


def random_attributes(scene, rng, present):
    """size/color/shape values of a random object of the scene (present=True) or drawn at random (False)."""
    if present:
        obj = rng.choice(scene.objects)
        return {"size": obj.size, "color": obj.color, "shape": obj.shape}
    return {"size": rng.choice(list(SIZES)), "color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES)}


def random_existence_question(scene, rng, want_yes):
    """An existence question about a random description whose answer is yes (want_yes) or no."""
    for _ in range(1000):  # a "no" exists as long as the objects don't cover every color-shape pair
        values = random_attributes(scene, rng, present=want_yes)
        attributes = {name: values[name] for name in rng.choice(REFERENCES)}
        if (count(scene, **attributes) > 0) == want_yes:
            return existence_question(scene, **attributes)
    return None


def first_answerable(make_question, candidates, rng):
    """Try the candidate targets in random order; the first question with a unique answer, or None."""
    for args in rng.sample(candidates, len(candidates)):
        qa = make_question(*args)
        if qa is not None:
            return qa
    return None


def ask(kind, scene, rng):
    """A random question of the given type (a CONVERSATION_TYPES entry or "reasoning") about the scene, or None."""
    objects = scene.objects
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    if kind == "color":
        return color_question(scene, rng.choice(objects))
    if kind == "shape":
        return shape_question(scene, rng.choice(objects))
    if kind == "count":  # total, per color, per shape or per both; half of them about what the scene holds
        names = rng.choice(((), ("color",), ("shape",), ("color", "shape")))
        values = random_attributes(scene, rng, present=rng.random() < 0.5)
        return count_question(scene, **{name: values[name] for name in names})
    if kind == "existence":  # yes and no equally often
        return random_existence_question(scene, rng, want_yes=rng.random() < 0.5)
    if kind == "position":
        return first_answerable(lambda o: position_question(scene, o), [(o,) for o in objects], rng)
    if kind == "relative_position":
        return first_answerable(lambda a, b: relative_position_question(scene, a, b), pairs, rng)
    if kind == "reasoning":
        candidates = {neighbour_color_question: [(o, d) for o in objects for d in DIRECTIONS],
                      bigger_question: pairs, same_color_question: pairs,
                      same_color_count_question: [(o,) for o in objects]}
        for question in rng.sample(list(candidates), len(candidates)):  # a random template the scene allows
            qa = first_answerable(lambda *args: question(scene, *args), candidates[question], rng)
            if qa is not None:
                return qa
        return None
    raise ValueError(f"unknown question type {kind!r}")

# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5's response formats: a short answer, or a letter among options


def short_answer_question(question):
    """The question as LLaVA-1.5's VQA data asks it: answered by a single word or phrase."""
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


ANSWER_SETS = (("yes", "no"), tuple(COLORS), SHAPES, tuple(str(n) for n in range(MAX_OBJECTS + 1)),
               tuple(name for row in CELL_NAMES for name in row),
               tuple(f"{v} and {h}" if v and h else v or h for v in ("above", "below", "")
                     for h in ("to the left", "to the right", "") if v or h))


def options_for(short, rng):
    """The short answer and up to three wrong ones of the same kind (colors for a color...), shuffled."""
    answers = next(answers for answers in ANSWER_SETS if short in answers)
    wrong = [a for a in answers if a != short]
    options = [short] + rng.sample(wrong, min(len(LETTERS) - 1, len(wrong)))
    rng.shuffle(options)
    return options


def choice_question(qa, context, rng, choice_answer="letter"):
    """(question, answer) in ScienceQA's form: the context, the question, lettered options; answered by the letter
    after CHOICE_PROMPT, or by the explanation (qa.answer) and the letter in the order choice_answer says."""
    options = options_for(qa.short, rng)
    letter = LETTERS[options.index(qa.short)]
    text = f"Context: {context}\n{qa.question}\n" + "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, options))
    if choice_answer == "letter":
        return f"{text}\n{CHOICE_PROMPT}", letter
    if choice_answer == "reasoning_first":
        return text, f"{qa.answer} The answer is {letter}."
    if choice_answer == "answer_first":
        return text, f"The answer is {letter}. {qa.answer}"
    raise ValueError(f"choice_answer must be one of {', '.join(CHOICE_ANSWERS)}, got {choice_answer!r}")


def image_context(scene):
    """A true sentence about the image that answers no question of the world (none asks for the background)."""
    return f"The shapes are drawn on {with_article(scene.background)} background."

# ----------------------------------------------------------------------------------------------------------------------
# The teacher: LLaVA-JSON records for one image.


def llava_record(record_id, image, pairs):
    """{"id", "image", "conversations"}: human/gpt turns, the <image> tag at the head of the first question; a
    text-only record (image None) has neither the tag nor the "image" key."""
    conversations = []
    for turn, (question, answer) in enumerate(pairs):
        tag = "<image>\n" if turn == 0 and image is not None else ""
        conversations.append({"from": "human", "value": tag + question})
        conversations.append({"from": "gpt", "value": answer})
    record = {"id": record_id, "image": image, "conversations": conversations}
    return record if image is not None else {"id": record_id, "conversations": conversations}


def questions(scene, rng, kinds, turns, tally):
    """Up to `turns` distinct questions (QAs), each of a type drawn from `kinds`."""
    found = []
    for _ in range(20 * turns):  # bounded: a one-object scene allows few distinct reasoning questions
        if len(found) == turns:
            break
        kind = rng.choice(kinds)
        qa = ask(kind, scene, rng)
        if qa is not None and qa.question not in [known.question for known in found]:
            found.append(qa)
            tally[kind] += 1
    return found


def fresh_question(rng, avoid, kinds=EVAL_TYPES):
    """(scene, QA) about a random scene whose key is not in `avoid` (scenes never described in the training text),
    of a type drawn from `kinds`; None when a thousand draws find none (a world with few distinct scenes)."""
    for _ in range(1000):
        scene = sample_scene(rng)
        qa = None if scene.key() in avoid else ask(rng.choice(kinds), scene, rng)
        if qa is not None:
            return scene, QA(*(text.replace("in the image", "in the drawing") for text in qa))
    return None


def teach(scene, image, rng, tally, choice_answer="letter", avoid=frozenset()):
    """The stage-1 record and the stage-2 records: conversation, complex reasoning, maybe a detailed description
    (LLaVA-Instruct), a short-answer VQA record and a multiple-choice record (LLaVA-1.5's formats), and maybe a
    text-only multiple-choice record about another scene (drawn outside `avoid`)."""
    name = Path(image).stem
    stage1 = llava_record(f"{name}-caption", image, [(rng.choice(BRIEF_DESCRIPTION_QUESTIONS), caption(scene))])
    tally["caption"] += 1
    stage2 = [llava_record(f"{name}-conversation", image, [qa[:2] for qa in questions(
                  scene, rng, CONVERSATION_TYPES, CONVERSATION_TURNS, tally)]),
              llava_record(f"{name}-reasoning", image, [qa[:2] for qa in questions(
                  scene, rng, ("reasoning",), REASONING_TURNS, tally)])]
    if rng.random() < DESCRIPTION_FRACTION:
        stage2.append(llava_record(f"{name}-description", image,
                                   [(rng.choice(DETAILED_DESCRIPTION_QUESTIONS), description(scene))]))
        tally["description"] += 1
    stage2.append(llava_record(f"{name}-vqa", image, [(short_answer_question(qa.question), qa.short) for qa in
                                                      questions(scene, rng, EVAL_TYPES, VQA_TURNS, tally)]))
    tally["vqa"] += 1
    for qa in questions(scene, rng, EVAL_TYPES, 1, tally):
        stage2.append(llava_record(f"{name}-choice", image, [choice_question(qa, image_context(scene), rng,
                                                                             choice_answer)]))
        tally["choice"] += 1
    text_only = fresh_question(rng, avoid) if rng.random() < TEXT_CHOICE_FRACTION else None
    if text_only is not None:
        other_scene, qa = text_only
        stage2.append(llava_record(f"{name}-text-choice", None, [choice_question(
            qa, description(other_scene, subject="A drawing"), rng, choice_answer)]))
        tally["text choice"] += 1
    return stage1, stage2


def eval_questions(scenes, images, seed, per_type):
    """Single held-out questions, `per_type` of each EVAL_TYPES type, each type spread over distinct images:
    [(item, qa)] with item = {id, image, question, answer, type}."""
    items = []
    for kind in EVAL_TYPES:
        rng = random.Random(f"{seed}:eval:{kind}")
        found = 0
        for i in rng.sample(range(len(scenes)), len(scenes)):
            if found == per_type:
                break
            if kind == "existence":  # exactly as many yes as no answers
                qa = random_existence_question(scenes[i], rng, want_yes=found % 2 == 0)
            else:
                qa = ask(kind, scenes[i], rng)
            if qa is not None:
                items.append(({"id": f"eval-{kind}-{found:04d}", "image": images[i], "question": qa.question,
                               "answer": qa.answer, "type": kind}, qa))
                found += 1
    return items

# ----------------------------------------------------------------------------------------------------------------------
# Benchmarks on the held-out split, in LLaVA's eval file formats: question lines {question_id, image, text, category}
# (no image: a text-only question) and answer keys {question_id, answer or label, category}


def vqa_benchmark(eval_items):
    """shapes-VQA: eval.json's questions, answered by a single word or phrase (as LLaVA-1.5 asks VQAv2 and GQA)."""
    return [({"question_id": f"vqa-{item['id'][len('eval-'):]}", "image": item["image"],
              "text": short_answer_question(qa.question), "category": item["type"]},
             {"question_id": f"vqa-{item['id'][len('eval-'):]}", "answer": qa.short, "category": item["type"]})
            for item, qa in eval_items]


def sqa_benchmark(scenes, images, seed, per_type, choice_answer, avoid):
    """shapes-SQA: multiple choice with a context, per type `per_type` questions about an image and as many text-only
    ones answerable from their context (a described drawing never seen in training), as ScienceQA mixes them."""
    lines = []
    for kind in EVAL_TYPES:
        rng = random.Random(f"{seed}:sqa:{kind}")
        for n, i in enumerate(rng.sample(range(len(scenes)), len(scenes))):
            if sum(line["category"] == "image" and line["type"] == kind for _, line in lines) == per_type:
                break
            qa = ask(kind, scenes[i], rng)
            if qa is not None:
                text, answer = choice_question(qa, image_context(scenes[i]), rng, choice_answer)
                lines.append(({"question_id": f"sqa-{kind}-image-{n:04d}", "image": images[i], "text": text,
                               "category": "image"}, {"question_id": f"sqa-{kind}-image-{n:04d}",
                                                      "answer": LETTERS[options_letter(text, qa.short)],
                                                      "category": "image", "type": kind}))
        for n in range(per_type):
            text_only = fresh_question(rng, avoid, (kind,))
            if text_only is None:
                break
            scene, qa = text_only
            text, _ = choice_question(qa, description(scene, subject="A drawing"), rng, choice_answer)
            lines.append(({"question_id": f"sqa-{kind}-text-{n:04d}", "text": text, "category": "text"},
                          {"question_id": f"sqa-{kind}-text-{n:04d}", "answer": LETTERS[options_letter(text, qa.short)],
                           "category": "text", "type": kind}))
    return lines


def options_letter(text, short):
    """Which option of a choice question's text is `short` (its index)."""
    options = [line[3:] for line in text.split("\n") if line[:3] in [f"{l}. " for l in LETTERS]]
    return options.index(short)


def pope_benchmark(scenes, images, train_scenes, seed, n_images):
    """shapes-POPE: "Is there a <kind> in the image?" for the kinds an image holds (yes) and as many it does not (no),
    the negatives drawn as POPE draws them: at random, the most frequent kinds in the training images (popular), or the
    kinds seen most often together with the image's own (adversarial)."""
    all_kinds = [(color, shape) for color in COLORS for shape in SHAPES]
    frequency = Counter((o.color, o.shape) for scene in train_scenes for o in scene.objects)
    together = Counter()
    for scene in train_scenes:
        present = {(o.color, o.shape) for o in scene.objects}
        together.update((a, b) for a in present for b in present if a != b)
    popular = sorted(all_kinds, key=lambda kind: -frequency[kind])
    lines = []
    for split in ("random", "popular", "adversarial"):
        rng = random.Random(f"{seed}:pope:{split}")
        for i in sorted(rng.sample(range(len(scenes)), min(n_images, len(scenes)))):
            present = sorted({(o.color, o.shape) for o in scenes[i].objects})
            absent = [kind for kind in all_kinds if kind not in present]
            if split == "random":
                negatives = rng.sample(absent, len(present))
            elif split == "popular":
                negatives = [kind for kind in popular if kind not in present][:len(present)]
            else:
                negatives = sorted(absent, key=lambda kind: (-sum(together[p, kind] for p in present),
                                                             popular.index(kind)))[:len(present)]
            for label, kinds in (("yes", present), ("no", negatives)):
                for color, shape in kinds:
                    question_id = f"pope-{split}-{len(lines):05d}"
                    lines.append(({"question_id": question_id, "image": images[i], "category": split,
                                   "text": short_answer_question(f"Is there {with_article(f'{color} {shape}')} in "
                                                                 "the image?")},
                                  {"question_id": question_id, "label": label, "category": split}))
    return lines

# ----------------------------------------------------------------------------------------------------------------------
# Files: sample distinct scenes, split them, render, teach, write; atomically, into a cache directory.


def settings(seed, n_train, n_heldout, eval_per_type, choice_answer="letter"):
    """Everything the world's content depends on; its hash names the cache directory."""
    return {"version": VERSION, "seed": seed, "n_train": n_train, "n_heldout": n_heldout,
            "eval_per_type": eval_per_type, "choice_answer": choice_answer, "image_size": IMAGE_SIZE, "grid": GRID,
            "cell_names": CELL_NAMES, "shapes": SHAPES, "colors": COLORS, "sizes": SIZES,
            "backgrounds": BACKGROUNDS, "objects": [MIN_OBJECTS, MAX_OBJECTS], "color_weights": COLOR_WEIGHTS,
            "shape_weights": SHAPE_WEIGHTS, "complements": COMPLEMENTS, "companion_prob": COMPANION_PROB,
            "cell_margin": CELL_MARGIN, "max_jitter": MAX_JITTER, "conversation_turns": CONVERSATION_TURNS,
            "reasoning_turns": REASONING_TURNS, "description_fraction": DESCRIPTION_FRACTION,
            "vqa_turns": VQA_TURNS, "text_choice_fraction": TEXT_CHOICE_FRACTION, "sqa_per_type": SQA_PER_TYPE,
            "pope_images": POPE_IMAGES, "short_answer_prompt": SHORT_ANSWER_PROMPT, "choice_prompt": CHOICE_PROMPT,
            "brief_questions": BRIEF_DESCRIPTION_QUESTIONS, "detailed_questions": DETAILED_DESCRIPTION_QUESTIONS}


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def write_jsonl(path, lines):
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def distinct_scenes(rng, count):
    """`count` scenes, no two the same (so the two splits can't share one), in random order."""
    scenes, seen = [], set()
    for _ in range(100 * count):
        if len(scenes) == count:
            break
        scene = sample_scene(rng)
        if scene.key() not in seen:
            seen.add(scene.key())
            scenes.append(scene)
    if len(scenes) < count:
        raise ValueError(f"the world has too few distinct scenes for {count} images")
    rng.shuffle(scenes)  # rejection favours many-object scenes late in sampling; spread them over both splits
    return scenes


def generate(directory, seed, n_train, n_heldout, eval_per_type, choice_answer="letter"):
    """Write a whole world into `directory` (which exists and is empty); return its manifest."""
    directory = Path(directory)
    (directory / "images").mkdir()
    scenes = distinct_scenes(random.Random(seed), n_train + n_heldout)
    held_out_keys = frozenset(scene.key() for scene in scenes[n_train:])
    manifest = {**settings(seed, n_train, n_heldout, eval_per_type, choice_answer), "files": {},
                "question_types": {},
                "objects_per_scene": dict(sorted(Counter(str(len(s.objects)) for s in scenes).items()))}
    scene_records = []
    for split, split_scenes, prefix in (("train", scenes[:n_train], ""), ("val", scenes[n_train:], "val_")):
        images, stage1, stage2, tally = [], [], [], Counter()
        for i, scene in enumerate(split_scenes):
            image = f"images/{split}_{i:05d}.png"
            render(scene).save(directory / image, compress_level=1)
            one, more = teach(scene, image, random.Random(f"{seed}:{image}"), tally, choice_answer, held_out_keys)
            images.append(image)
            stage1.append(one)
            stage2.extend(more)
            scene_records.append({"image": image, "split": split, **scene_to_json(scene), "caption": caption(scene)})
        random.Random(f"{seed}:{split}:mix").shuffle(stage2)  # the response types, mixed
        write_json(directory / f"{prefix}stage1.json", stage1)
        write_json(directory / f"{prefix}stage2.json", stage2)
        manifest["files"].update({f"{prefix}stage1.json": len(stage1), f"{prefix}stage2.json": len(stage2)})
        manifest["question_types"][split] = dict(sorted(tally.items()))
        if split == "val":
            items = eval_questions(split_scenes, images, seed, eval_per_type)
            write_json(directory / "eval.json", [item for item, _ in items])
            manifest["files"]["eval.json"] = len(items)
            manifest["question_types"]["eval"] = dict(Counter(item["type"] for item, _ in items))
            avoid = frozenset(scene.key() for scene in scenes)
            for name, lines in (("vqa", vqa_benchmark(items)),
                                ("sqa", sqa_benchmark(split_scenes, images, seed, SQA_PER_TYPE, choice_answer, avoid)),
                                ("pope", pope_benchmark(split_scenes, images, scenes[:n_train], seed, POPE_IMAGES))):
                write_jsonl(directory / f"shapes_{name}.jsonl", [question for question, _ in lines])
                write_jsonl(directory / f"shapes_{name}_truth.jsonl", [truth for _, truth in lines])
                manifest["files"][f"shapes_{name}.jsonl"] = len(lines)
    write_json(directory / "scenes.json", scene_records)
    manifest["files"].update({"scenes.json": len(scene_records), "images": len(scenes)})
    write_json(directory / "world.json", manifest)
    return manifest


def world_directory(root=DEFAULT_ROOT, seed=0, n_train=N_TRAIN_IMAGES, n_heldout=N_HELDOUT_IMAGES,
                    eval_per_type=EVAL_PER_TYPE, choice_answer="letter"):
    """root/v{VERSION}-seed{seed}-{hash of all the settings}: a change of constants or seed never reuses a stale
    world."""
    digest = hashlib.sha256(json.dumps(settings(seed, n_train, n_heldout, eval_per_type, choice_answer),
                                       sort_keys=True).encode())
    return Path(root) / f"v{VERSION}-seed{seed}-{digest.hexdigest()[:10]}"


def ensure_world(root=DEFAULT_ROOT, seed=0, n_train=N_TRAIN_IMAGES, n_heldout=N_HELDOUT_IMAGES,
                 eval_per_type=EVAL_PER_TYPE, choice_answer="letter"):
    """The world's directory (see world_directory), generated on first use. The default world (train.py's) is also
    reachable as root/default, a link kept pointing at it: a path that stays the same when other worlds exist."""
    if choice_answer not in CHOICE_ANSWERS:
        raise ValueError(f"choice_answer must be one of {', '.join(CHOICE_ANSWERS)}, got {choice_answer!r}")
    directory = world_directory(root, seed, n_train, n_heldout, eval_per_type, choice_answer)
    if not directory.exists():
        generate_once(directory, seed, n_train, n_heldout, eval_per_type, choice_answer)
    elif not (directory / "world.json").exists():
        raise RuntimeError(f"{directory} exists but holds no world.json: not a world written by world.py; remove it "
                           "to regenerate")
    if (seed, n_train, n_heldout, eval_per_type, choice_answer) == (0, N_TRAIN_IMAGES, N_HELDOUT_IMAGES,
                                                                     EVAL_PER_TYPE, "letter"):
        link = directory.parent / "default"
        if not (link.is_symlink() and os.readlink(link) == directory.name):
            temporary = directory.parent / f"default.tmp-{os.getpid()}"
            os.symlink(directory.name, temporary)
            os.replace(temporary, link)  # atomically: a reader sees the old link or the new one
    return directory


def generate_once(directory, seed, n_train, n_heldout, eval_per_type, choice_answer):
    """Generate a world into `directory`, which appears whole or not at all (another process may win the race)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    temporary = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        manifest = generate(temporary, seed, n_train, n_heldout, eval_per_type, choice_answer)
        os.chmod(temporary, 0o755)
        os.rename(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if (directory / "world.json").exists():  # another process finished the same world first
            return
        raise
    files = manifest["files"]
    print(f"world: {n_train} train + {n_heldout} held-out images, {files['stage1.json']} stage-1 and "
          f"{files['stage2.json']} stage-2 records, {files['eval.json']} eval questions "
          f"in {time.time() - started:.1f}s -> {directory}")

# ----------------------------------------------------------------------------------------------------------------------
# Held-out questions and their scoring.


def eval_items(directory, limit=0):
    """The held-out questions of a world directory's eval.json, checked (ValueError names the file and the item); with
    a limit, the first questions of each type in turn, so that every type shows."""
    path = os.path.join(directory, "eval.json")
    try:
        with open(path) as f:
            items = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the eval questions: {error}") from None
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in
                                                 ("image", "question", "answer", "type")):
            raise ValueError(f"{path}: item {index} is not {{id, image, question, answer, type}}: {str(item)[:80]}")
    if limit:
        rank, seen = [], Counter()
        for item in items:
            rank.append(seen[item["type"]])
            seen[item["type"]] += 1
        order = sorted(range(len(items)), key=lambda k: rank[k])  # stable: the file's type order within a rank
        items = [items[k] for k in sorted(order[:limit])]
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


def normalize_answer(text):
    """Lowercase, single spaces, no trailing punctuation: '  The circle is  RED. ' -> 'the circle is red'."""
    return re.sub(r"[\s.!?,;:]+$", "", " ".join(text.lower().split()))


def exact_match(prediction, answer):
    return normalize_answer(prediction) == normalize_answer(answer)


@dataclass
class WorldConfig:
    # the world: which one, and where it is written
    seed: int = 0  # the scenes' and the teacher's random seed (train.py's default world is seed 0)
    root: str = DEFAULT_ROOT  # where world directories are generated, one per seed and settings
    choice_answer: Literal[CHOICE_ANSWERS] = "letter"  # how multiple-choice records are answered: the letter
                                                       # (LLaVA-1.5), or the paper's ScienceQA ablation: an explanation
                                                       # then the letter (reasoning_first), or the other way round


def main(argv=None):
    """Generate the world the flags name (once), print its directory and a summary."""
    with flags.one_line_errors("world.py", expected=(OSError,)):  # --root unwritable: the path, in one line
        given = flags.command_line(WorldConfig, argv, "world.py", "python world.py [--field value ...]", __doc__)
        if given is None:  # --help
            return
        config = WorldConfig(**given)
        cached = world_directory(config.root, config.seed, choice_answer=config.choice_answer).exists()
        started = time.time()
        directory = ensure_world(config.root, config.seed, choice_answer=config.choice_answer)
        elapsed = time.time() - started
    manifest = json.loads((directory / "world.json").read_text())
    print(f"world directory: {directory}")
    print(f"objects per scene: {manifest['objects_per_scene']}")
    for name, n in manifest["files"].items():
        print(f"  {name:18s} {n:7d}")
    for split, tally in manifest["question_types"].items():
        print(f"  {split} question types: " + ", ".join(f"{kind} {n}" for kind, n in tally.items()))
    print("already generated, nothing to do" if cached else f"generated in {elapsed:.1f}s")


if __name__ == "__main__":
    main()
