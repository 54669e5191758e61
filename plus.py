"""
LLaVA-Plus (Liu et al. 2023, "Learning to Use Tools for Multimodal Agents") in the shapes world: the tools, their
training data, and the loop that serves a model which calls them.

    python plus.py                           # write the data into the default world: plus.json, val_plus.json,
                                             # plus_no_thoughts.json, shapes_plus.jsonl, shapes_plus_truth.jsonl

An assistant turn of LLaVA-Plus carries thoughts, actions (a list of {"API_name", "API_params"}, empty when no tool
is needed) and a value (what the user reads); data.assistant_text writes them as the model's text and parse_turn reads
them back. When the model names a tool, the server runs it on the image the user gave (never an image the model
names), cleans its output to text and asks again with a new user turn:

    <tool> model outputs: {'boxes': [[0.41, 0.38, 0.56, 0.53]], 'logits': [0.97], 'phrases': ['small green circle']}

    Please summarize the model outputs and answer my first question: <the first question>

The tools are vision experts of the shapes world: they read the pixels, never the scene the image was drawn from
(images are crisp: every pixel is the background or one object's colour, and objects never touch).

    detector   {"caption": "small green circle . red square"}  -> boxes (x0, y0, x1, y1, normalized, two decimals),
               a score per box (how well the shape test fits) and the phrase of each object found
    segmenter  {"caption": "the red square"}  -> each matching object's area in pixels (its mask for the user only)
    editor     {"caption": "the red square", "new_color": "blue"}  -> the edited image, for the user only ("background"
               as the new colour removes the object)

The data: a tool record per training image (finding a box, measuring an area, recolouring or removing an object; the
question written from the scene, the tool's output read from the pixels) and the world's conversations with "no tool
needed" answers, as LLaVA-Plus mixed its tool data with LLaVA-158K; a held-out benchmark of 50 questions per task,
keyed by the teacher's tool call and answer.

A tool of one's own is a function (image, **params) -> dict, registered under its name:

    @plus.tool("counter")
    def count_objects(image, caption):
        return {"count": len(plus.detect(image, caption)["boxes"])}
"""
import ast
import json
import os
import random
import re
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

import flags
import world
from data import IMAGE_TAG
from weights import atomic_write

TOOLS = {}  # name -> function(image, **params) -> output dict; the model calls them by these names
TYPICAL_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}  # a shape's share of its box
GENERIC_WORDS = {"a", "an", "the", "object", "objects", "shape", "shapes", "thing", "things", "one", "ones", "all"}
SUMMARIZE = "Please summarize the model outputs and answer my first question: {question}"


class ToolError(ValueError):
    """A tool call the server cannot run (unknown tool, parameters it does not take, a query it cannot read): told
    to the user in one line; the conversation goes on."""


def tool(name):
    """Register a function(image, **params) -> dict as the tool the model calls by `name`."""
    def register(function):
        TOOLS[name] = function
        return function
    return register

# ----------------------------------------------------------------------------------------------------------------------
# Seeing: the objects in an image, from its pixels


def find_objects(image):
    """[{box: (x0, y0, x1, y1) in pixels, x1 and y1 exclusive, area, color, shape, size, fit, mask}] of an image, in
    reading order: the background is the corners' colour; each object is a connected region of one palette colour,
    its shape told by how much of its box it fills, its size by its side."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # (H, W, 3)
    corners = [tuple(pixels[y, x]) for y in (0, -1) for x in (0, -1)]
    background = max(set(corners), key=corners.count)
    palette = np.array(list(world.COLORS.values()))  # (C, 3)
    distance = np.abs(pixels[:, :, None, :] - palette[None, None]).sum(-1)  # (H, W, C)
    color_index = np.where(distance.min(-1) <= 60, distance.argmin(-1), -1)  # (H, W); -1: background or unknown
    color_index[(np.abs(pixels - background).sum(-1) <= 30)] = -1
    seen, found = np.zeros(color_index.shape, dtype=bool), []
    for y, x in zip(*np.nonzero(color_index >= 0)):
        if not seen[y, x]:
            mask = region(color_index, seen, y, x)
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            side, area = max(box[2] - box[0], box[3] - box[1]), int(mask.sum())
            fill = area / ((box[2] - box[0]) * (box[3] - box[1]))
            shape = "square" if fill >= 0.9 else "circle" if fill >= 0.65 else "triangle"
            found.append(dict(box=box, area=area, color=list(world.COLORS)[color_index[y, x]], shape=shape, mask=mask,
                              size="large" if side > sum(world.SIZES.values()) / 2 else "small",
                              fit=round(1 - abs(fill - TYPICAL_FILL[shape]), 2)))
    cell = pixels.shape[0] / world.GRID  # reading order: by the row of the box's centre, then from the left
    return sorted(found, key=lambda o: ((o["box"][1] + o["box"][3]) / 2 // cell, o["box"][0]))


def region(color_index, seen, y, x):
    """The mask of the 4-connected region of (y, x)'s colour, marked seen."""
    mask, queue, color = np.zeros(color_index.shape, dtype=bool), deque([(y, x)]), color_index[y, x]
    seen[y, x] = True
    while queue:
        y, x = queue.popleft()
        mask[y, x] = True
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and not seen[ny, nx] \
                    and color_index[ny, nx] == color:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return mask


def read_query(caption, tool_name):
    """A phrase ("the small green circle") as {size, color, shape} (each present or not); a word that is none of
    these is a ToolError."""
    attributes = {}
    for word in caption.lower().replace(",", " ").split():
        for name, values in (("size", world.SIZES), ("color", world.COLORS), ("shape", world.SHAPES)):
            if word in values or (name == "shape" and word.rstrip("s") in values):
                attributes[name] = word.rstrip("s") if name == "shape" else word
                break
        else:
            if word not in GENERIC_WORDS:
                raise ToolError(f"{tool_name}: cannot look for {word!r} (it sees sizes, colours and shapes: "
                                f"{', '.join(world.SIZES)}, {', '.join(world.COLORS)}, {', '.join(world.SHAPES)})")
    return attributes


def matching(image, caption, tool_name):
    """[(phrase asked, object)] for each ' . '-separated phrase of the caption, the objects it describes."""
    if not isinstance(caption, str) or not caption.strip():
        raise ToolError(f"{tool_name}: 'caption' must be a phrase such as 'the small green circle'")
    objects = find_objects(image)
    found = []
    for phrase in [p.strip() for p in caption.split(" . ") if p.strip()]:
        wanted = read_query(phrase, tool_name)
        found += [(phrase, o) for o in objects if all(o[k] == v for k, v in wanted.items())]
    return found


def describe(obj):
    return f"{obj['size']} {obj['color']} {obj['shape']}"

# ----------------------------------------------------------------------------------------------------------------------
# The tools


@tool("detector")
def detect(image, caption):
    """Grounding DINO's part: the boxes of the objects a caption describes (x0, y0, x1, y1 over the image's width and
    height), each with its score and phrase."""
    width, height = image.size
    found = matching(image, caption, "detector")
    return {"boxes": [[o["box"][0] / width, o["box"][1] / height, o["box"][2] / width, o["box"][3] / height]
                      for _, o in found],
            "logits": [o["fit"] for _, o in found], "phrases": [describe(o) for _, o in found]}


@tool("segmenter")
def segment(image, caption):
    """SAM's part: each described object's area in pixels, and its mask (for the user)."""
    found = matching(image, caption, "segmenter")
    return {"areas": [o["area"] for _, o in found], "phrases": [describe(o) for _, o in found],
            "masks": [o["mask"] for _, o in found]}


@tool("editor")
def edit(image, caption, new_color):
    """InstructPix2Pix's part: the described objects repainted in new_color ("background": removed)."""
    if new_color != "background" and new_color not in world.COLORS:
        raise ToolError(f"editor: 'new_color' {new_color!r} is none of {', '.join(world.COLORS)}, background")
    found = matching(image, caption, "editor")
    pixels = np.array(image.convert("RGB"))  # (H, W, 3)
    fill = pixels[0, 0].copy() if new_color == "background" else world.COLORS[new_color]
    for _, o in found:
        pixels[o["mask"]] = fill
    return {"edited_image": Image.fromarray(pixels), "phrases": [describe(o) for _, o in found]}

# ----------------------------------------------------------------------------------------------------------------------
# The loop: parse the model's turn, run the tool it names, hand the output back as text


def parse_turn(text):
    """(thoughts, actions, value) of an assistant turn written as data.assistant_text writes it; a reply without
    that form is (None, [], text). Actions that are not a JSON list of {API_name, API_params} are a ToolError."""
    match = re.search(r'(?:"thoughts🤔"(.*))?"actions🚀"(.*)"value👉"(.*)', text, re.DOTALL)  # thoughts: optional
    if not match:
        return None, [], text.strip()
    thoughts, actions, value = (part if part is None else part.strip() for part in match.groups())
    try:
        actions = json.loads(actions)
    except json.JSONDecodeError:
        try:
            actions = ast.literal_eval(actions)  # single quotes, as LLaVA-Plus retries them
        except (ValueError, SyntaxError):
            raise ToolError(f"the actions are not JSON: {actions[:80]!r}") from None
    if not isinstance(actions, list) or not all(isinstance(a, dict) and isinstance(a.get("API_name"), str)
                                                and isinstance(a.get("API_params", {}), dict) for a in actions):
        raise ToolError(f"the actions are not a list of {{API_name, API_params}}: {str(actions)[:80]}")
    return thoughts, actions, value


def run_tool(action, image):
    """(the output as the model reads it, the output whole for the user) of one action, run on the server's image:
    the model's parameters as written, but for any 'image' it names."""
    name, params = action["API_name"], dict(action.get("API_params", {}))
    if name not in TOOLS:
        raise ToolError(f"there is no tool {name!r} (there are {', '.join(sorted(TOOLS))})")
    if image is None:
        raise ToolError(f"{name} needs an image, and this conversation has none")
    params.pop("image", None)
    try:
        output = TOOLS[name](image, **params)
    except ToolError:
        raise
    except TypeError as error:  # a parameter missing or one the tool does not take
        raise ToolError(f"{name}: {error}") from None
    except Exception as error:  # a tool of the user's failing: one line, and the conversation goes on
        raise ToolError(f"{name} failed: {type(error).__name__}: {error}") from None
    check_output(name, output, image)
    return clean_output(name, output), output


def check_output(name, output, image):
    """A ToolError unless the outputs the user's picture reads have the built-in tools' shapes (a tool of the user's
    may return anything): boxes [x0, y0, x1, y1] fractions of the image, masks (H, W) booleans, an edited PIL image."""
    if not isinstance(output, dict):
        raise ToolError(f"{name} returned {type(output).__name__}, not a dict of outputs")
    for box in output.get("boxes", []):
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
            raise ToolError(f"{name} returned the box {str(box)[:60]}, not [x0, y0, x1, y1] fractions of the image")
    for mask in output.get("masks", []):
        if not (isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == image.size[::-1]):
            raise ToolError(f"{name} returned a mask that is not an (H, W) = {image.size[::-1]} boolean array")
    if "edited_image" in output and not isinstance(output["edited_image"], Image.Image):
        raise ToolError(f"{name} returned an edited_image that is not a PIL image")


def clean_output(name, output):
    """The output as text goes back to the model: numbers to two decimals, masks and images left out (the user sees
    them), and a message when nothing is left (LLaVA-Plus's cleaning)."""
    rounded = lambda v: round(v, 2) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) else v
    kept = {k: rounded(v) for k, v in output.items() if k not in ("masks", "edited_image", "size")}
    return f"{name} model outputs: {kept or {'message': f'The {name} has processed the image.'}}"


def tool_turn(reply, image, question):
    """What the server does with one assistant reply: None when it calls no tool, else (the user turn that hands the
    tool's output back, the output whole). A call it cannot run is a ToolError."""
    _, actions, _ = parse_turn(reply)
    if not actions:
        return None
    if len(actions) > 1:
        raise ToolError(f"{len(actions)} actions in one turn; the server runs one")
    text, output = run_tool(actions[0], image)
    return f"{text}\n\n{SUMMARIZE.format(question=question)}", output

def picture(image, output, smallest=256):
    """What a tool did, for the user's eyes: the edited image, or the image with the boxes found drawn and the masks
    tinted, a small drawing enlarged a whole number of times until its longer side reaches `smallest` pixels (a photo
    as it is); None when the output holds none of these."""
    if "edited_image" in output:
        return output["edited_image"]
    if not output.get("boxes") and not output.get("masks"):
        return None
    scale = max(1, smallest // max(image.size))  # the world's 64-pixel drawings 4 times larger
    pixels = np.asarray(image.convert("RGB")).repeat(scale, 0).repeat(scale, 1).copy()  # (H*scale, W*scale, 3)
    for mask in output.get("masks", []):
        big = mask.repeat(scale, 0).repeat(scale, 1)  # (H*scale, W*scale)
        pixels[big] = pixels[big] // 2 + np.array([0, 0, 127], dtype=np.uint8)  # half blue
    drawn = Image.fromarray(pixels)
    draw, (width, height) = ImageDraw.Draw(drawn), drawn.size
    for x0, y0, x1, y1 in output.get("boxes", []):
        draw.rectangle((x0 * width, y0 * height, x1 * width - 1, y1 * height - 1), outline=(0, 0, 0), width=2)
    return drawn

# ----------------------------------------------------------------------------------------------------------------------
# Teaching: LLaVA-Plus's records, the question from the scene (the teacher's part), the tool's output from the pixels

WAIT = "I will use {tool} to help to answer the question. Please wait for a moment."
THANKS = "Thanks to the output of {tool}. I can answer the question better."
NO_TOOL = "The question can be answered by the information in the context, without need any external tools."
TASKS = {  # kind: the tool, the phrasings of the question, the thoughts that call the tool
    "box": ("detector", ("What is the bounding box of {name}?", "Where exactly is {name}? Give its box."),
            "The exact box of {name} is finer than what I see; the detector measures it."),
    "area": ("segmenter", ("How many pixels does {name} cover?", "What is the area of {name} in pixels?"),
             "The area of {name} needs its pixels counted; the segmenter counts them."),
    "recolor": ("editor", ("Make {name} {color}.", "Paint {name} {color}."),
                "Changing the image needs the editor."),
    "remove": ("editor", ("Remove {name}.", "Erase {name} from the image."), "Changing the image needs the editor."),
}
PLUS_EVAL_PER_KIND = 50  # held-out questions per tool task, and as many ordinary ones per task (no tool wanted)


def tool_task(kind, scene, image, rng):
    """{question, action, output (as the model reads it), answer, thoughts} of one tool task about a random object
    that a phrase picks out alone (the detector reads sizes, colours and shapes, not cells); None when the scene has
    no such object."""
    named = [(obj, world.refer(scene, obj, hide=("cell",))) for obj in scene.objects]
    named = [(obj, name) for obj, name in named if name is not None]
    if not named:
        return None
    obj, name = rng.choice(named)
    color = rng.choice([c for c in world.COLORS if c != obj.color])
    tool_name, phrasings, thoughts = TASKS[kind]
    params = {"caption": name.removeprefix("the ")} | (
        {"new_color": color} if kind == "recolor" else {"new_color": "background"} if kind == "remove" else {})
    action = {"API_name": tool_name, "API_params": params}
    text, output = run_tool(action, image)
    subject = world.capitalize(name)
    answer = {"box": lambda: f"{subject} is at {[round(c, 2) for c in output['boxes'][0]]}.",  # as the output reads
              "area": lambda: f"{subject} covers {output['areas'][0]} pixels.",
              "recolor": lambda: f"{subject} is now {color}.", "remove": lambda: f"{subject} is gone."}[kind]()
    return dict(question=rng.choice(phrasings).format(name=name, color=color), action=action, output=text,
                answer=answer, thoughts=thoughts.format(name=name))


def tool_record(record_id, image_path, task):
    """LLaVA-Plus's four turns: the question; thoughts, the action and 'please wait'; the tool's output handed back
    with the question again; thanks, no action, the answer."""
    tool_name = task["action"]["API_name"]
    return {"id": record_id, "image": image_path, "conversations": [
        {"from": "human", "value": f"{IMAGE_TAG}\n{task['question']}"},
        {"from": "gpt", "thoughts": task["thoughts"], "actions": [task["action"]], "value": WAIT.format(tool=tool_name)},
        {"from": "human", "value": f"{task['output']}\n\n{SUMMARIZE.format(question=task['question'])}"},
        {"from": "gpt", "thoughts": THANKS.format(tool=tool_name), "actions": [], "value": task["answer"]}]}


def without_tools(record):
    """An ordinary LLaVA record as LLaVA-Plus's tool-augmented LLaVA-158K has it: each answer says no tool is
    needed."""
    return record | {"conversations": [turn | {"thoughts": NO_TOOL, "actions": []} if turn["from"] == "gpt" else turn
                                       for turn in record["conversations"]]}


def without_thoughts(record):
    """The thoughts ablation of LLaVA-Plus's paper: the same record, its assistant turns without thoughts."""
    return record | {"conversations": [{k: v for k, v in turn.items() if k != "thoughts"}
                                       for turn in record["conversations"]]}


def write_json(path, data, lines=False):
    """A JSON file (or JSON lines) that appears whole or not at all."""
    def write(tmp_path):
        with open(tmp_path, "w") as f:
            if lines:
                f.writelines(json.dumps(line) + "\n" for line in data)
            else:
                json.dump(data, f, indent=1)
    atomic_write(path, write)


def plus_records(directory, split, scenes, seed):
    """The split's LLaVA-Plus mix: a tool record per image (its task drawn at random) and each image's conversation
    record from the world's stage-2 data, its answers marked as needing no tool; shuffled."""
    prefix = "val_" if split == "val" else ""
    with open(os.path.join(directory, f"{prefix}stage2.json")) as f:
        records = [without_tools(r) for r in json.load(f) if r["id"].endswith("-conversation")]
    for scene in scenes:
        rng = random.Random(f"{seed}:plus:{scene['image']}")
        image = Image.open(os.path.join(directory, scene["image"]))
        task = tool_task(rng.choice(list(TASKS)), world.scene_from_json(scene), image, rng)
        if task is not None:
            records.append(tool_record(f"{os.path.basename(scene['image'])[:-4]}-tool", scene["image"], task))
    random.Random(f"{seed}:plus:{split}:mix").shuffle(records)
    return records


def plus_benchmark(directory, scenes, seed):
    """[(question line, answer key line)]: PLUS_EVAL_PER_KIND held-out questions of each tool task, each about
    another image; the key holds the tool and parameters the teacher used and the answer it wrote."""
    lines = []
    for kind in TASKS:
        rng, found = random.Random(f"{seed}:plus-eval:{kind}"), 0
        for scene in rng.sample(scenes, len(scenes)):
            task = tool_task(kind, world.scene_from_json(scene), Image.open(os.path.join(directory, scene["image"])),
                             rng)
            if task is not None and found < PLUS_EVAL_PER_KIND:
                question_id = f"plus-{kind}-{found:04d}"
                lines.append(({"question_id": question_id, "image": scene["image"], "text": task["question"],
                               "category": kind},
                              {"question_id": question_id, "category": kind, "action": task["action"],
                               "answer": task["answer"]}))
                found += 1
    return lines


def ensure_plus_data(directory, seed=0):
    """Write LLaVA-Plus's files into a world directory once: plus.json and val_plus.json (the training mix),
    plus_no_thoughts.json (the same without thoughts: the paper's ablation), shapes_plus.jsonl and
    shapes_plus_truth.jsonl (the held-out tool benchmark). Returns {file: count}."""
    names = ("plus.json", "val_plus.json", "plus_no_thoughts.json", "shapes_plus.jsonl", "shapes_plus_truth.jsonl")
    if all(os.path.exists(os.path.join(directory, name)) for name in names):
        return None
    if not os.path.isfile(os.path.join(directory, "scenes.json")):
        raise ValueError(f"{directory}: not a world directory (no scenes.json); python world.py generates one")
    with open(os.path.join(directory, "scenes.json")) as f:
        scenes = json.load(f)
    counts = {}
    for split, prefix in (("train", ""), ("val", "val_")):
        records = plus_records(directory, split, [s for s in scenes if s["split"] == split], seed)
        write_json(os.path.join(directory, f"{prefix}plus.json"), records)
        counts[f"{prefix}plus.json"] = Counter("tool" if r["id"].endswith("-tool") else "no tool" for r in records)
        if split == "train":
            write_json(os.path.join(directory, "plus_no_thoughts.json"), [without_thoughts(r) for r in records])
    lines = plus_benchmark(directory, [s for s in scenes if s["split"] == "val"], seed)
    write_json(os.path.join(directory, "shapes_plus_truth.jsonl"), [key for _, key in lines], lines=True)
    write_json(os.path.join(directory, "shapes_plus.jsonl"), [q for q, _ in lines], lines=True)
    counts["shapes_plus.jsonl"] = Counter(q["category"] for q, _ in lines)
    return counts


@dataclass
class PlusConfig:
    # the world the files are written into
    seed: int = 0  # the world's seed (train.py's default world is seed 0)
    root: str = world.DEFAULT_ROOT  # where world directories are generated


def main(argv=None):
    """Write LLaVA-Plus's files into the world the flags name (generating the world first if need be)."""
    with flags.one_line_errors("plus.py", expected=(OSError, ValueError)):
        given = flags.command_line(PlusConfig, argv, "plus.py", "python plus.py [--field value ...]", __doc__)
        if given is None:  # --help
            return
        config = PlusConfig(**given)
        directory = world.ensure_world(config.root, config.seed)
        counts = ensure_plus_data(str(directory), config.seed)
    print(f"world directory: {directory}")
    for name, tally in (counts or {}).items():
        print(f"  {name:24s} " + ", ".join(f"{kind} {n}" for kind, n in sorted(tally.items())))
    print("already written, nothing to do" if counts is None else "written")


if __name__ == "__main__":
    main()
