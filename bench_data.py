"""
Throughput of data.py: samples/s of building input_ids, labels and pixels, for LLaVA-Instruct-like samples (a 640x480
JPEG photo-like image, a three-exchange conversation of about 250 words, vicuna_v1), in one process on one thread, as a
single DataLoader worker does it. It prints the rate of the text part, the image part and whole dataset samples.

    python bench_data.py                                    # 300 samples at 336 px, a byte-level BPE trained here
    python bench_data.py --size 224 --aspect pad --samples 500   # flags as every script's (flags.py)
    python bench_data.py --tokenizer path/to/tokenizer.json # a real tokenizer (Vicuna, LLaMA, ...)
"""
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import flags
from data import Collator, LLaVADataset, encode_conversation, load_image, process_image

WORDS = ("the a man woman dog cat bus street red blue green small large left right next to on in near holding "
         "standing sitting wearing table window car tree sky building people two three image shows there is are "
         "with and of while its background foreground bright dark scene appears likely because").split()


def sentence(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def conversation(rng):
    """Three exchanges: a short question and a 20-60 word answer each, the image tag before or after the question."""
    turns = []
    for k in range(3):
        question = sentence(rng, rng.randint(6, 12)).rstrip(".") + "?"
        if k == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        answer = " ".join(sentence(rng, rng.randint(8, 15)) for _ in range(rng.randint(2, 4)))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def photo_like(rng, width=640, height=480):
    """A gradient with a few filled shapes and mild noise: compresses and decodes like a photo, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)  # (H, W, 3)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(width - 100), rng.randrange(height - 100)
        draw.ellipse((x0, y0, x0 + rng.randint(30, 200), y0 + rng.randint(30, 200)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-8, 9, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def trained_tokenizer(records):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([turn["value"] for r in records for turn in r["conversations"]], trainer)
    return tokenizer


def rate(label, n, seconds):
    print(f"{label:<44} {n / seconds:8.1f} samples/s  ({1000 * seconds / n:.2f} ms/sample)")


@dataclass
class BenchConfig:
    # samples: what is measured
    samples: int = 300  # LLaVA-Instruct-like samples to build
    size: int = 336  # the image side the vision tower takes, in pixels
    aspect: Literal["crop", "pad"] = "crop"  # non-square images: centre crop (CLIP) or pad to a square (LLaVA-1.5)
    tokenizer: str = ""  # a tokenizer.json ("": a byte-level BPE trained on the samples)
    distinct_images: int = 20  # JPEG files the samples share


def main(argv=None):
    with flags.one_line_errors("bench_data.py"):
        given = flags.command_line(BenchConfig, argv, "bench_data.py", "python bench_data.py [--field value ...]",
                                   __doc__)
        if given is None:  # --help
            return
        args = BenchConfig(**given)
        flags.at_least(args, 1, "samples", "size", "distinct_images")
    torch.set_num_threads(1)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        for k in range(args.distinct_images):
            photo_like(rng).save(Path(folder) / f"{k:012d}.jpg", quality=90)
        records = [{"id": str(k), "image": f"{k % args.distinct_images:012d}.jpg", "conversations": conversation(rng)}
                   for k in range(args.samples)]
        (Path(folder) / "records.json").write_text(json.dumps(records))
        tokenizer = Tokenizer.from_file(args.tokenizer) if args.tokenizer else trained_tokenizer(records)
        dataset = LLaVADataset(str(Path(folder) / "records.json"), folder, tokenizer, image_size=args.size,
                               aspect=args.aspect)
        dataset[0]  # warm-up
        print(f"{args.samples} samples, {args.size} px, aspect {args.aspect}, "
              f"{np.mean([len(dataset[k]['input_ids']) for k in range(10)]):.0f} tokens/sample on average")

        start = time.perf_counter()
        for r in records:
            encode_conversation(r["conversations"], tokenizer, rng=rng)
        rate("text: input_ids + labels", len(records), time.perf_counter() - start)

        start = time.perf_counter()
        for r in records:
            process_image(load_image(Path(folder) / r["image"]), args.size, args.aspect)
        rate("image: load (JPEG decode) + process_image", len(records), time.perf_counter() - start)

        start = time.perf_counter()
        for k in range(len(dataset)):
            dataset[k]  # not kept: holding hundreds of 336 px tensors would time page faults, not data.py
        rate("dataset[i]: text + image", len(dataset), time.perf_counter() - start)

        items = [dataset[k] for k in range(min(64, len(dataset)))]
        collate = Collator(pad_token_id=3, max_length=2048, num_image_tokens=(args.size // 14) ** 2)
        start = time.perf_counter()
        for k in range(0, len(items), 16):
            collate(items[k:k + 16])
        rate("Collator (batches of 16)", len(items), time.perf_counter() - start)


if __name__ == "__main__":
    main()
