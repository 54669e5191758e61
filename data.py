"""
What the model reads: conversation templates, token ids with answer-only labels, the paper's turn-randomized image
placement, LLaVA JSON datasets, CLIP image preprocessing, batching and length-grouped sampling.

A LLaVA record is {"id", "image" (absent for text-only), "conversations": [{"from": "human"|"gpt", "value"}, ...]}.
Its `<image>` tag is removed and the image goes back into the first question, before it or after it at random
(paper Eq. 2: X_instruct^1 = [X_q^1, X_v] or [X_v, X_q^1]); the official code always moves it to the front. Ids
and labels are built segment by segment, so the answer mask can never drift from the ids (the official code
re-tokenizes and guesses offsets, and on a mismatch silently zeroes the loss of the whole sample).

    python -m pytest -q tests/test_data.py   # the tests
    python bench_data.py                     # samples/s of building ids, labels and pixels
"""
import json
import os
import random
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Paper Table 8: instructions for a brief image description (stage 1 data).
BRIEF_DESCRIPTION_QUESTIONS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
# Paper Table 9: instructions for a detailed image description.
DETAILED_DESCRIPTION_QUESTIONS = (
    "Describe the following image in detail", "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see", "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image", "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner", "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative", "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation", "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
)
IMAGE_TAG = "<image>"

# ----------------------------------------------------------------------------------------------------------------------
# Templates and tokenization


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # text before the first turn
    roles: tuple  # (user, assistant) as written in the prompt
    end_of_turn: str  # closes each answer: "</s>" means the tokenizer's EOS token, anything else is text


TEMPLATES = {
    # {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>   (LLaVA stage 2, Vicuna v1)
    "vicuna_v1": Template("vicuna_v1", "A chat between a curious user and an artificial intelligence assistant. The "
                          "assistant gives helpful, detailed, and polite answers to the user's questions.",
                          ("USER", "ASSISTANT"), "</s>"),
    # <image>{caption}\n   (LLaVA-1.5 stage 1: the instruction is dropped, no EOS)
    "plain": Template("plain", "", (), "\n"),
}
IMAGE, EOS = object(), object()  # non-text segments: the image placeholder and the EOS token


def _template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def load_tokenizer(checkpoint_dir):
    """The tokenizers.Tokenizer stored as tokenizer.json in a checkpoint directory (a LLaMA or LLaVA one)."""
    path = os.path.join(checkpoint_dir, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    if os.path.isfile(os.path.join(checkpoint_dir, "tokenizer.model")):
        raise FileNotFoundError(
            f"{checkpoint_dir}: no tokenizer.json, only a sentencepiece tokenizer.model; write the tokenizer.json once "
            f"with transformers: python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained("
            f"'{checkpoint_dir}').save_pretrained('{checkpoint_dir}')\" (docs/real_scale.md)")
    raise FileNotFoundError(f"{checkpoint_dir}: no tokenizer.json here (only the fast-tokenizer file is read)")


@lru_cache(maxsize=8)
def _tokenizer_facts(tokenizer):
    """(bos, eos, newline id, prefixes) of a tokenizers.Tokenizer. prefixes: each encoded text gets a leading "▁"."""
    def find(candidates, what):
        for token in candidates:
            if tokenizer.token_to_id(token) is not None:
                return tokenizer.token_to_id(token)
        raise ValueError(f"the tokenizer has no {what} token (looked for {' and '.join(candidates)})")
    bos = find(("<s>", "<|begin_of_text|>"), "BOS")
    eos = find(("</s>", "<|end_of_text|>"), "EOS")
    newline = tokenizer.encode("\n", add_special_tokens=False).ids[-1]
    prefixes = tokenizer.encode("a", add_special_tokens=False).tokens[0].startswith("▁")
    return bos, eos, newline, prefixes


def parse_conversation(conversations, answered=True):
    """Check a LLaVA conversation; return ([(question, answer)], has_image) with the <image> tag taken out.
    answered=True: it ends with gpt's answer (training); False: it ends with a question (the last answer is None)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k} is not {{'from': ..., 'value': str}}: {str(turn)[:80]}")
        if turn.get("from") not in ("human", "gpt"):
            raise ValueError(f"turn {k} has unknown role {turn.get('from')!r} (expected 'human' or 'gpt')")
        if turn["from"] != ("human", "gpt")[k % 2]:
            raise ValueError(f"turn {k} is {turn['from']!r}: turns must alternate human, gpt, ... from human")
    if answered != (len(conversations) % 2 == 0):
        raise ValueError("the last turn must be " + ("gpt's answer" if answered else "a human question"))
    values = [assistant_text(turn) if turn["from"] == "gpt" else turn["value"] for turn in conversations]
    tagged = [k for k, value in enumerate(values) for _ in range(value.count(IMAGE_TAG))]
    if len(tagged) > 1:
        raise ValueError(f"{len(tagged)} <image> tags (turns {tagged}); a sample holds at most one image")
    if tagged and tagged[0] != 0:
        raise ValueError(f"the <image> tag is in turn {tagged[0]}, not in the first human turn")
    if tagged:
        values[0] = values[0].replace(IMAGE_TAG, "").strip()
    return list(zip(values[0::2], values[1::2] + [None])), bool(tagged)


def assistant_text(turn):
    """A gpt turn as the model reads and writes it: its value, or, for a LLaVA-Plus turn that also carries thoughts
    and actions (tool calls, a list of {API_name, API_params}), each part on a line of its own after its marker."""
    if "thoughts" not in turn and "actions" not in turn:
        return turn["value"]
    if not isinstance(turn.get("thoughts", ""), str) or not isinstance(turn.get("actions", []), list):
        raise ValueError(f"a LLaVA-Plus turn's thoughts must be text and its actions a list: {str(turn)[:80]}")
    parts = [("thoughts🤔", turn.get("thoughts")), ("actions🚀", json.dumps(turn["actions"]) if "actions" in turn
              else None), ("value👉", turn["value"])]
    return "".join(f'"{marker}" {text}\n' for marker, text in parts if text is not None)


def _segments(pairs, template, has_image, image_first):
    """The conversation as [(piece, supervised)]: piece is a text, IMAGE or EOS. Texts split where supervision
    changes; a text that follows another text starts at a space."""
    if template.name == "plain":
        if not has_image or len(pairs) != 1:
            raise ValueError("the plain template takes one question-answer exchange about an image")
        caption = pairs[0][1]
        return [(IMAGE, False)] + ([] if caption is None else [(caption + template.end_of_turn, True)])
    user, assistant = template.roles
    segments, text = [], template.system + " "
    for k, (question, answer) in enumerate(pairs):
        text += f"{user}: "
        if k == 0 and has_image and image_first:  # X_instruct^1 = [X_v, X_q^1]: USER: <image>\n{q}
            segments += [(text, False), (IMAGE, False)]
            text = "\n" + question
        elif k == 0 and has_image:  # X_instruct^1 = [X_q^1, X_v]: USER: {q}\n<image>
            segments += [(text + question + "\n", False), (IMAGE, False)]
            text = ""
        else:
            text += question
        text += f" {assistant}:"
        if answer is None:
            break
        segments += [(text, False), (" " + answer, True), (EOS, True)]
        text = ""
    return segments + ([(text, False)] if text else [])


def _encode(segments, tokenizer):
    bos, eos, _, prefixes = _tokenizer_facts(tokenizer)
    input_ids, labels = [bos], [IGNORE_INDEX]
    after_text = False
    for piece, supervised in segments:
        if piece is IMAGE:
            ids = [IMAGE_TOKEN_INDEX]
        elif piece is EOS:
            ids = [eos]
        else:
            # A text right after a text starts at a space ("ASSISTANT:" | " answer"). Sentencepiece-style tokenizers
            # write a text's first space as the "▁" they put before every encoded text, so that space goes; byte-level
            # BPE keeps it on the next word ("Ġanswer"). Either way the ids equal those of both texts encoded at once.
            # A text after the image or the EOS is encoded as a text of its own, as LLaVA's training code did.
            if after_text and prefixes:
                piece = piece[1:]
            ids = tokenizer.encode(piece, add_special_tokens=False).ids
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)  # loss on the answers X_a only (paper Eq. 3)
        after_text = isinstance(piece, str)
    assert len(input_ids) == len(labels), (len(input_ids), len(labels))
    return input_ids, labels


def encode_conversation(conversations, tokenizer, template="vicuna_v1", image_first=None, rng=None):
    """(input_ids, labels) of a complete conversation: one BOS, one IMAGE_TOKEN_INDEX if it has an <image> tag, labels
    IGNORE_INDEX except on the answers and their end-of-turn token. image_first=None draws it with rng (p=0.5)."""
    pairs, has_image = parse_conversation(conversations, answered=True)
    if image_first is None:
        image_first = (rng or random).random() < 0.5
    return _encode(_segments(pairs, _template(template), has_image, image_first), tokenizer)


def encode_prompt(conversations, tokenizer, template="vicuna_v1", image_first=True):
    """Inference prompt ids for a conversation ending with a question (earlier answers with their end-of-turn token).
    Adding an answer and a question only appends ids, so a chat can keep its KV cache."""
    pairs, has_image = parse_conversation(conversations, answered=False)
    return _encode(_segments(pairs, _template(template), has_image, image_first), tokenizer)[0]


def question_ids(text, tokenizer, template="vicuna_v1", image=True):
    """Inference prompt ids for one question about an image, the image first (image=False: a question without one).
    An <image> tag in the text is dropped: the image's place is set here."""
    text = text.replace(IMAGE_TAG, "").strip()
    return encode_prompt([{"from": "human", "value": (IMAGE_TAG + "\n" if image else "") + text}], tokenizer, template)


def render_conversation(conversations, template="vicuna_v1", image_first=True):
    """The prompt as text, with <image> and </s> where the placeholder and the EOS go (to read, not to tokenize)."""
    pairs, has_image = parse_conversation(conversations, answered=len(conversations) % 2 == 0)
    segments = _segments(pairs, _template(template), has_image, image_first)
    return "".join(IMAGE_TAG if piece is IMAGE else "</s>" if piece is EOS else piece for piece, _ in segments)


def stop_token_ids(tokenizer, template):
    """Token ids that end a generated answer: EOS for vicuna_v1; the newline token (and EOS) for plain."""
    _, eos, newline, _ = _tokenizer_facts(tokenizer)
    return [eos] if _template(template).end_of_turn == "</s>" else [newline, eos]

# ----------------------------------------------------------------------------------------------------------------------
# Images


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def to_rgb(image):
    """Any PIL image as RGB. Transparency is composited onto white (as CLIPImageProcessor does), 16-bit grey is scaled
    to 8 bits (Pillow would clip it to white), the other modes (L, P, CMYK, YCbCr, ...) use Pillow's conversions."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, I: grey 0..65535 -> 0..255
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path):
    """An image file as RGB, EXIF orientation applied. Any failure (missing, empty, truncated, not an image, a
    decompression bomb) raises ImageError naming the file."""
    def decoded(image):
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))  # exif_transpose returns a copy, safe after close
    return with_image(path, decoded)


def check_image(path):
    """What can be known of an image file without decoding it, as a check before training: that it opens, and (PNG,
    GIF) that its data is whole (Image.verify). ImageError names the file. A JPEG cut short in its data passes: it
    fails when it loads (load_image)."""
    with_image(path, lambda image: image.verify())


def with_image(path, use):
    """use(the opened image file); any failure raises ImageError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb fails instead of merely warning
            with Image.open(path) as image:
                return use(image)
    except Exception as error:
        raise ImageError(f"cannot load image {path}: {type(error).__name__}: {error}") from error


def expand_to_square(image, background):
    """LLaVA-1.5's 'pad': the image centred on a square of the background colour, its side the longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def process_image(image, size, aspect="crop", mean=CLIP_MEAN, std=CLIP_STD):
    """CLIPImageProcessor's pixels: shortest side resized to size (bicubic), centre crop, /255, (x - mean) / std.
    aspect='pad' first expands the image to a square of the mean colour (LLaVA-1.5). Returns (3, size, size) float32."""
    image = to_rgb(image)
    if aspect == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in mean))
    elif aspect != "crop":
        raise ValueError(f"aspect must be 'crop' or 'pad', got {aspect!r}")
    width, height = image.size
    long_side = int(size * max(width, height) / min(width, height))  # truncated, as the processor does
    image = image.resize((size, long_side) if width <= height else (long_side, size), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = torch.from_numpy(np.array(image.crop((left, top, left + size, top + size))))  # (size, size, 3) uint8
    pixels = pixels.permute(2, 0, 1).float() / 255  # (3, size, size)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)  # (3, size, size)


def image_settings(vision_dir):
    """dict(size, mean, std) for a vision checkpoint: size from config.json (a CLIPVisionConfig, or the vision_config
    of a CLIP or LLaVA config), mean and std from preprocessor_config.json where there is one (else CLIP's)."""
    path = os.path.join(vision_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    vision = config.get("vision_config") or config
    if "image_size" not in vision:
        raise ValueError(f"{path}: no image_size (nor vision_config.image_size)")
    settings = dict(size=int(vision["image_size"]), mean=CLIP_MEAN, std=CLIP_STD)
    path = os.path.join(vision_dir, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            processor = json.load(f)
        settings.update(mean=tuple(processor.get("image_mean", CLIP_MEAN)),
                        std=tuple(processor.get("image_std", CLIP_STD)))
        crop = processor.get("crop_size", settings["size"])
        crop = crop.get("height") if isinstance(crop, dict) else crop
        if crop != settings["size"]:
            raise ValueError(f"{path}: crop size {crop} differs from the vision model's image_size {settings['size']}")
    return settings

# ----------------------------------------------------------------------------------------------------------------------
# Datasets


def read_records(source):
    """LLaVA records from a list, or from a JSON file (malformed JSON fails naming the file and the position)."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    try:
        with open(source, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: malformed JSON at line {error.lineno}, column {error.colno}: "
                         f"{error.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not a LLaVA JSON file (not UTF-8 text)") from None
    except OSError as error:
        raise ValueError(f"{source}: {error.strerror.lower()}") from None
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of records, got a {type(records).__name__}")
    return records


def check_record(record, index, template):
    """(id, image or None, conversations, length) of a valid record; ValueError naming the record otherwise. length is
    the word count, negative for text-only samples (LLaVA's modality_lengths)."""
    sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
    try:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        pairs, has_image = parse_conversation(record.get("conversations"))
        image = record.get("image")
        if image is not None and not (isinstance(image, str) and image):
            raise ValueError(f"'image' must be a relative path, got {image!r}")
        if image and not has_image:
            raise ValueError(f"has image {image!r} but no <image> tag in its text")
        if has_image and not image:
            raise ValueError("has an <image> tag but no image")
        _segments(pairs, _template(template), has_image, True)
    except ValueError as error:
        raise ValueError(f"record {index} (id {sample_id}): {error}") from None
    length = max(1, sum(len(turn["value"].split()) for turn in record["conversations"]))
    return sample_id, image, record["conversations"], length if image else -length


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA JSON records (LCS-558K, Instruct-150K, mix665k, text-only included) with their images, loaded lazily.

    Records are checked up front: malformed ones are skipped, counted and printed, and construction fails if more
    than max_bad_fraction of them are. An image that turns out bad at load time gives dict(id, error) in place of the
    sample (Collator reports it). The image-first draw is seeded by (seed, epoch, index), so it is the same in any
    DataLoader worker; call set_epoch before iterating (workers started with persistent_workers=True keep the epoch
    they were started with)."""

    def __init__(self, records_or_json_path, image_folder, tokenizer, template="vicuna_v1", image_size=336,
                 aspect="crop", mean=CLIP_MEAN, std=CLIP_STD, image_first_prob=0.5, seed=0, max_bad_fraction=0.01,
                 check_images=True):
        source = records_or_json_path if isinstance(records_or_json_path, (str, os.PathLike)) else "records"
        records = read_records(records_or_json_path)
        _template(template)  # an unknown template fails now, and so does a tokenizer without BOS or EOS
        _tokenizer_facts(tokenizer)
        self.samples, self.skipped = [], []
        for index, record in enumerate(records):
            try:
                self.samples.append(check_record(record, index, template))
            except ValueError as error:
                self.skipped.append(str(error))
        if check_images:  # once, before any training: a missing or broken image is found now, not at its step
            self.skip_unreadable_images(image_folder)
        if self.skipped:
            print(f"data: {source}: skipped {len(self.skipped)} of {len(records)} records:")
            for message in self.skipped[:10]:
                print(f"  {message}")
        allowed = int(max_bad_fraction * len(records))
        if len(self.skipped) > allowed or not self.samples:
            needed = len(self.skipped) / len(records)
            hint = f"; --max_bad_fraction {needed:.2g} would skip them" if self.samples else ""
            raise ValueError(f"{source}: {len(self.skipped)} of {len(records)} records are malformed or have an "
                             f"unreadable image, more than the {allowed} --max_bad_fraction {max_bad_fraction} allows"
                             f"{hint}; first: {self.skipped[0] if self.skipped else '-'}")
        self.lengths = [length for *_, length in self.samples]
        self.image_folder, self.tokenizer, self.template = image_folder, tokenizer, template
        self.image_size, self.aspect, self.mean, self.std = image_size, aspect, mean, std
        self.image_first_prob, self.seed, self.epoch = image_first_prob, seed, 0

    def skip_unreadable_images(self, image_folder):
        """Move the samples whose image does not open (check_image) to the skipped ones, each distinct image checked
        once."""
        reasons = {}
        for image in dict.fromkeys(image for _, image, _, _ in self.samples if image):
            try:
                check_image(os.path.join(image_folder, image))
            except ImageError as error:
                reasons[image] = str(error)
        self.skipped += [f"sample {sample_id}: {reasons[image]}" for sample_id, image, *_ in self.samples
                         if image in reasons]
        self.samples = [sample for sample in self.samples if sample[1] not in reasons]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample_id, image, conversations, _ = self.samples[index]
        pixel_values = None
        if image is not None:
            path = os.path.join(self.image_folder, image)
            try:
                pixel_values = process_image(load_image(path), self.image_size, self.aspect, self.mean, self.std)
            except ImageError as error:
                return dict(id=sample_id, error=f"sample {sample_id}: {error}")
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # string seeds hash the same in every process
        input_ids, labels = encode_conversation(conversations, self.tokenizer, self.template,
                                                image_first=rng.random() < self.image_first_prob)
        return dict(id=sample_id, input_ids=torch.tensor(input_ids), labels=torch.tensor(labels),
                    pixel_values=pixel_values)


def caption_records(pairs, seed=0):
    """Image-caption pairs [{"id", "image", "caption"}] as single-turn LLaVA records, each asking a brief-description
    question drawn (seeded) from paper Table 8."""
    rng = random.Random(seed)
    return [{"id": str(pair["id"]), "image": pair["image"], "conversations": [
        {"from": "human", "value": IMAGE_TAG + "\n" + rng.choice(BRIEF_DESCRIPTION_QUESTIONS)},
        {"from": "gpt", "value": pair["caption"]}]} for pair in pairs]

# ----------------------------------------------------------------------------------------------------------------------
# Batching


class Collator:
    """Dataset items -> a right-padded batch. The length limit counts the num_image_tokens each placeholder becomes in
    the model; text is truncated from the end, a sample whose image would be cut is dropped, and so is one left with no
    supervised token. Dropped samples and dataset errors are listed in batch["skipped"]. An empty batch has (0, 0)
    tensors. pixel_values holds the batch's images in order, one per placeholder (None when there is none).
    pack=True: the samples are laid end to end in one row instead, no padding, and batch["samples"] lists their
    lengths (the model keeps each to itself: TinyLLaVA.forward's samples)."""

    def __init__(self, pad_token_id, max_length, num_image_tokens, pack=False):
        self.pad_token_id, self.max_length, self.num_image_tokens = pad_token_id, max_length, num_image_tokens
        self.pack = pack

    def __call__(self, items):
        kept, skipped = [], []
        for item in items:
            if "error" in item:
                skipped.append(item["error"])
                continue
            input_ids, labels = item["input_ids"], item["labels"]
            is_image = input_ids == IMAGE_TOKEN_INDEX
            widths = torch.where(is_image, self.num_image_tokens, 1)  # positions each id takes in the model
            keep = int((widths.cumsum(0) <= self.max_length).sum())
            if is_image[keep:].any():
                skipped.append(f"sample {item['id']}: dropped, max_length {self.max_length} cuts its image")
            elif not (labels[:keep] != IGNORE_INDEX).any():
                skipped.append(f"sample {item['id']}: dropped, no answer token within max_length {self.max_length}")
            else:
                kept.append((item, input_ids[:keep], labels[:keep]))
        rows = [(input_ids, labels) for _, input_ids, labels in kept]
        if self.pack and rows:
            # one row; a sample's last position predicts the next one's BOS, whose label is IGNORE_INDEX (_encode)
            rows = [tuple(torch.cat(parts) for parts in zip(*rows))]
        longest = max((len(input_ids) for input_ids, _ in rows), default=0)
        batch_input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        batch_labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.bool)  # (B, T)
        for row, (input_ids, labels) in enumerate(rows):
            batch_input_ids[row, :len(input_ids)], batch_labels[row, :len(labels)] = input_ids, labels
            attention_mask[row, :len(input_ids)] = True
        images = [item["pixel_values"] for item, _, _ in kept if item["pixel_values"] is not None]
        n_placeholders = int((batch_input_ids == IMAGE_TOKEN_INDEX).sum())
        assert n_placeholders == len(images), f"{n_placeholders} image placeholders but {len(images)} images"
        batch = dict(input_ids=batch_input_ids, labels=batch_labels, attention_mask=attention_mask,
                     pixel_values=torch.stack(images) if images else None,  # (N_images, 3, S, S)
                     ids=[item["id"] for item, _, _ in kept], skipped=skipped)
        if self.pack:
            batch["samples"] = [len(input_ids) for _, input_ids, _ in kept]
        return batch


def modality_length_grouped_order(lengths, batch_size, chunks, rng):
    """
    One epoch in LLaVA's group_by_modality_length order (its llava_trainer.py): a list of sample indices whose
    consecutive blocks of chunks * batch_size are the global batches of the steps, each block `chunks` micro-batches
    of batch_size in a row (chunks: processes x gradient accumulation; micro-batch k of a step goes to process
    k % processes, as LLaVA's sharded loader deals them).

    Image samples (length > 0) and text-only ones (length < 0) are shuffled apart and cut into global batches; each
    global batch is sorted longest first and dealt into its micro-batches so their total lengths come out even (each
    sample to the lightest micro-batch not yet full): the processes get even work, while the lengths inside a
    micro-batch stay mixed (padding remains). The full global batches of both modalities are shuffled together; the
    last (or only partial) global batch of each modality goes into one mixed remainder, which leads the epoch where
    it fills a global batch and ends it otherwise.
    """
    global_batch = chunks * batch_size

    def deal(batch):  # micro-batches of even total length (LLaVA's split_to_even_chunks)
        if len(batch) % chunks:
            return [batch[k::chunks] for k in range(chunks)]
        dealt, totals = [[] for _ in range(chunks)], [0.0] * chunks
        for i in batch:
            lightest = totals.index(min(totals))
            dealt[lightest].append(i)
            totals[lightest] = totals[lightest] + abs(lengths[i]) if len(dealt[lightest]) < len(batch) // chunks \
                else float("inf")  # full: takes no more
        return dealt

    def global_batches(indices):
        indices = [indices[k] for k in rng.permutation(len(indices))]
        sorted_batches = [sorted(indices[start:start + global_batch], key=lambda i: -abs(lengths[i]))
                          for start in range(0, len(indices), global_batch)]
        return [[i for micro_batch in deal(batch) for i in micro_batch] for batch in sorted_batches]
    image = global_batches([i for i, length in enumerate(lengths) if length > 0])
    text = global_batches([i for i, length in enumerate(lengths) if length < 0])
    remainder = (image.pop() if image else []) + (text.pop() if text else [])
    batches = image + text
    batches = [batches[k] for k in rng.permutation(len(batches))]
    if len(remainder) >= global_batch:
        batches, remainder = [remainder[:global_batch]] + batches, remainder[global_batch:]
    return [int(i) for batch in batches + [remainder] for i in batch]
