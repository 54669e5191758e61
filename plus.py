"""
LLaVA-Plus (Liu et al. 2023, "Learning to Use Tools for Multimodal Agents") in the shapes world: the tools, and the
loop that serves a model which calls them.

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

A tool of one's own is a function (image, **params) -> dict, registered under its name (docs/plus.md):

    @plus.tool("counter")
    def count_objects(image, caption):
        return {"count": len(plus.detect(image, caption)["boxes"])}
"""
import ast
import json
import re
from collections import deque

import numpy as np
from PIL import Image

import world

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
    match = re.search(r'"thoughts🤔"(.*)"actions🚀"(.*)"value👉"(.*)', text, re.DOTALL)
    if not match:
        return None, [], text.strip()
    thoughts, actions, value = (part.strip() for part in match.groups())
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
    except TypeError as error:  # a parameter missing or one the tool does not take
        raise ToolError(f"{name}: {error}") from None
    return clean_output(name, output), output


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
