"""
Ask a trained tinyllava model about images: one answer streamed as it is generated, a batch of images, a chat, or
the held-out exact-match eval on the shapes world.

The model: --ckpt (one of ours: a ckpt.pt or its directory), --hf (a LlavaForConditionalGeneration directory), or by
default out/stage2/ckpt.pt, else out/stage1/ckpt.pt (train.py's default out_dirs). Paths are found as train.py finds
them: as given (relative to where you run this), else relative to this repository, so out/ and bases/ work from any
directory. Flags are spelled as train.py's: --key value or --key=value, and --max-new-tokens is --max_new_tokens.
Images are preprocessed as in training (the vision tower's size, mean and std; the checkpoint's crop or pad) and the
prompt is the model's template with the image first. Answers go to stdout; everything else goes to stderr.
LLaVA's evaluation files are read and written as its model_vqa does (question lines {"question_id", "image", "text"[,
"category"]}, a line without "image" asked without one; answer lines {"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}) and scored by the benchmarks' own rules (--score).

Examples:

    python sample.py --image photo.png                                        # the default question: describe it
    python sample.py --image photo.png --prompt "What color is the circle?"   # one question, streamed to stdout
    python sample.py --image a.png b.png --prompt "How many shapes are there?"  # one batch, an answer per file
    python sample.py --image photo.png --chat                                 # multi-turn; an empty line or Ctrl-D ends
    python sample.py --ckpt out/stage1 --image photo.png                      # a stage-1 model captions the image
    python sample.py --ckpt out/stage2-lora --image photo.png                 # a LoRA run (adapters merged on load)
    python sample.py --image photo.png --threads 1 --max-new-tokens 32        # 1 thread when others load the cores
    python sample.py --hf llava-1.5-7b-hf --image photo.jpg --device cuda     # published LLaVA weights (HF layout)
    python sample.py --eval                                                   # held-out accuracy on the world
    python sample.py --eval --ckpt out/stage1/ckpt.pt --limit 70              # 70 questions, spread over the types
    python sample.py --read_image --image photo.png                           # what each image token reads as
    python sample.py --questions q.jsonl --answers a.jsonl --image_folder DIR  # LLaVA's question file -> answers
    python sample.py --questions q.jsonl --answers a.jsonl --num_chunks 8 --chunk_idx 0  # one eighth of it
    python sample.py --score short --answers a.jsonl --truth t.jsonl          # VQAv2/GQA-style short answers
    python sample.py --score choice --answers a.jsonl --truth t.jsonl         # ScienceQA/MMBench letters
    python sample.py --score pope --answers a.jsonl --truth t.jsonl           # POPE yes/no, per negative sampling
"""
import argparse
import difflib
import json
import os
import pickle
import re
import shutil
import sys
import time
import uuid
import zipfile
from collections import Counter, defaultdict

import torch

from data import (IMAGE_TAG, ImageError, encode_conversation, encode_prompt, image_settings, load_image,
                  load_tokenizer, process_image, stop_token_ids)
from llama import KVCache
from tinyllava import REPO_DIR, TinyLLaVA, resolve
from world import (SCENE_TOKENS, cell_attributes, cell_word_ids, ensure_world, exact_match, possible_cells,
                   scene_from_json)

# ----------------------------------------------------------------------------------------------------------------------
# Defaults (each has a flag below)
out_dir = "out"  # train.py writes out/stage1/ckpt.pt and out/stage2/ckpt.pt
question = "Describe the image concisely."  # paper Table 8's first brief-description instruction
max_new_tokens = 256
temperature = 0.0  # 0: greedy, reproducible. LLaVA chats at 0.2 (--temperature 0.2) and benchmarks greedily
top_k = 0  # 0: no top-k cut
top_p = 1.0  # 1.0: no nucleus cut
seed = 1337
batch_size = 32  # images per generate call (several --image files, --eval)
# ----------------------------------------------------------------------------------------------------------------------


def help_format(prog):
    """The help laid out as train.py's: flags in columns, wrapped to the terminal (120 columns in a pipe), the text as
    written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34,
                                                width=min(120, shutil.get_terminal_size((120, 24)).columns))


class SampleError(Exception):
    """Bad input: main prints its one-line message on stderr and exits with status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with train.py's conventions: --key-name spells --key_name, an unknown flag gets a suggestion, and a
    mistake is one line."""

    def parse_args(self, argv=None, namespace=None):
        return super().parse_args([self.spelled(arg) for arg in (sys.argv[1:] if argv is None else argv)], namespace)

    def spelled(self, arg):
        key, equals, value = arg.partition("=")
        if not re.fullmatch(r"--\w[\w-]*", key):  # a value, not a flag
            return arg
        key = "--" + key[2:].replace("-", "_")
        if key not in self._option_string_actions:
            close = difflib.get_close_matches(key, self._option_string_actions, n=1)
            self.error(f"unknown flag {key}" + (f" (did you mean {close[0]}?)" if close else "")
                       + "; python sample.py --help explains every flag")
        return key + equals + value

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser():
    parser = Parser(prog="sample.py", usage="python sample.py --image FILE [FILE ...] [--prompt TEXT | --chat] "
                    "[flags]   or   python sample.py --eval [flags]", epilog=__doc__.strip(),
                    formatter_class=help_format, allow_abbrev=False)
    ask = parser.add_argument_group("images and questions")
    ask.add_argument("--image", nargs="+", action="extend", default=[], metavar="FILE",
                     help="image file(s); several are answered as one batch, each answer labelled by its file")
    ask.add_argument("--prompt", default=None, metavar="TEXT",
                     help="the question (with --chat, the first one); a stage-1 model ignores it and captions "
                          f"(default: {question!r})")
    mode = ask.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="a multi-turn conversation about one image, from stdin")
    mode.add_argument("--eval", action="store_true",
                      help="held-out exact match on the world's eval.json; the last line is 'accuracy: <fraction>'")
    mode.add_argument("--read_image", action="store_true",
                      help="show what each image token of each --image reads as in the LLM's word embeddings, as a "
                           "grid: the nearest cell the tiny bases' scene words can write, else the nearest words")
    ask.add_argument("--world", default=None, metavar="DIR",
                     help="--eval: a world directory holding eval.json (default: the shapes world, generated on "
                          "first use)")
    ask.add_argument("--limit", type=int, default=None, metavar="N",
                     help="--eval: only N questions, taken evenly across the question types (default: all)")
    files = parser.add_argument_group("LLaVA's evaluation files")
    files.add_argument("--questions", default=None, metavar="FILE",
                       help="answer a question file: JSON lines {question_id, image (absent: text-only), text[, "
                            "category]}, or a LLaVA JSON list of records (ScienceQA's llava_test_CQM-A.json); "
                            "greedy, image first, in batches; with --score, the question file a POPE annotation "
                            "directory is read against")
    files.add_argument("--answers", default=None, metavar="FILE",
                       help="the answer file --questions appends to (a killed run resumes: question ids already in "
                            "it are skipped) and --score reads")
    files.add_argument("--image_folder", default=None, metavar="DIR",
                       help="--questions: the folder the image paths are relative to (default: the question file's)")
    files.add_argument("--num_chunks", type=int, default=1, metavar="N",
                       help="--questions: split the questions into N contiguous chunks, as LLaVA does (default: 1)")
    files.add_argument("--chunk_idx", type=int, default=0, metavar="K",
                       help="--questions: answer chunk K of them, 0-based (default: 0)")
    files.add_argument("--max_bad_fraction", type=float, default=0.01, metavar="F",
                       help="--questions: stop once more than this share of the questions is bad (a malformed line, "
                            "a missing image); each is reported and skipped (default: 0.01)")
    files.add_argument("--score", choices=("short", "choice", "pope"), default=None,
                       help="score --answers against --truth by a benchmark's rules: short (GQA: lowercase, no "
                            "trailing period, exact match), choice (ScienceQA: the letter alone, 'X. ...' or 'The "
                            "answer is X.'; anything else fails), pope (the first sentence: no/not means no)")
    files.add_argument("--plot", nargs="+", default=None, metavar="LOG",
                       help="draw the held-out accuracy train.py logged (--eval_questions) against the step, one "
                            "curve per log.jsonl (labelled by its directory), into --png")
    files.add_argument("--png", default="curve.png", metavar="FILE", help="--plot: the picture (default: curve.png)")
    files.add_argument("--truth", default=None, metavar="PATH",
                       help="--score: the answer key: JSON lines {question_id, answer or label[, category]}, a JSON "
                            "object by question id (GQA's questions file, ScienceQA's problems.json), or POPE's "
                            "annotation directory of coco_pope_{category}.json files (with --questions: the question "
                            "file, whose order pairs questions and labels, as eval_pope.py)")
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default=None, metavar="PATH",
                        help=f"one of our checkpoints, a ckpt.pt or its directory (default: {out_dir}/stage2, else "
                             f"{out_dir}/stage1, where you run this, then in the repository)")
    source.add_argument("--hf", default=None, metavar="DIR",
                        help="an HF LLaVA directory (LlavaForConditionalGeneration with tokenizer.json, e.g. "
                             "llava-1.5-7b-hf), prompted with vicuna_v1 and, unless --aspect says otherwise, images "
                             "padded to a square as LLaVA-1.5 was trained")
    model.add_argument("--template", choices=("vicuna_v1", "plain"), default=None,
                       help="the prompt template (default: the checkpoint's, vicuna_v1 for --hf); --template "
                            "vicuna_v1 asks a stage-1 model questions zero-shot, through an LLM pretrained to answer "
                            "them (as the tiny bases' LLaMA is)")
    model.add_argument("--aspect", choices=("crop", "pad"), default=None,
                       help="non-square images: centre crop or pad to a square (default: what the checkpoint was "
                            "trained with; pad for --hf)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max_new_tokens", type=int, default=max_new_tokens, metavar="N",
                            help=f"most tokens per answer, fewer where the context ends (default: {max_new_tokens})")
    generation.add_argument("--temperature", type=float, default=temperature, metavar="T",
                            help=f"0: greedy, reproducible; LLaVA's chat demo uses 0.2 (default: {temperature})")
    generation.add_argument("--top_k", type=int, default=top_k, metavar="K",
                            help=f"sample among the k most likely tokens (0: all) (default: {top_k})")
    generation.add_argument("--top_p", type=float, default=top_p, metavar="P",
                            help=f"nucleus sampling threshold (1.0: off) (default: {top_p})")
    generation.add_argument("--seed", type=int, default=seed, metavar="N",
                            help=f"of the sampling generator (default: {seed})")
    generation.add_argument("--batch_size", type=int, default=batch_size, metavar="N",
                            help=f"images per generate call (default: {batch_size})")
    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto (CUDA if there is one), cuda or cpu (default: auto)")
    system.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="the weights' and activations' type; auto: bfloat16 on CUDA, float32 on CPU (default: "
                             "auto)")
    system.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch CPU threads (0: torch's default; 1 when others share the cores) (default: 0)")
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.score:
        if not (args.answers and args.truth):
            parser.error("--score reads --answers FILE and --truth FILE")
        return args
    if args.plot:
        return args
    if args.truth:
        parser.error("--truth goes with --score")
    if args.questions:
        if not args.answers:
            parser.error("--questions writes its answers to --answers FILE")
        if args.image or args.prompt is not None or args.eval or args.chat or args.read_image:
            parser.error("--questions asks the file's questions: drop --image, --prompt, --eval, --chat, --read_image")
        if not 0 <= args.chunk_idx < args.num_chunks:
            parser.error(f"--chunk_idx {args.chunk_idx} must be in [0, --num_chunks {args.num_chunks})")
        return check_ranges(parser, args)
    if args.answers or args.image_folder or args.num_chunks != 1 or args.chunk_idx:
        parser.error("--answers, --image_folder, --num_chunks and --chunk_idx go with --questions (or --score)")
    if args.read_image and (args.prompt is not None or not args.image):
        parser.error("--read_image shows what the --image files become, with no question: give --image, drop --prompt")
    if args.eval and (args.image or args.prompt is not None):
        parser.error("--eval asks the world's questions about its images: drop --image and --prompt")
    if args.eval and (args.temperature != 0 or args.top_k or args.top_p != 1.0):
        parser.error("--eval decodes greedily: drop --temperature, --top_k and --top_p")
    if not args.eval and not args.image:
        parser.error("give an --image FILE (or --eval)")
    if args.prompt is not None and not args.prompt.strip():
        parser.error(f"--prompt is empty: ask a question, or leave --prompt out for the default ({question!r})")
    if args.chat and len(args.image) > 1:
        parser.error("--chat talks about one image; give a single --image")
    if (args.world or args.limit is not None) and not args.eval:
        parser.error("--world and --limit go with --eval")
    return check_ranges(parser, args)


def check_ranges(parser, args):
    for flag, value, ok in (("--max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top_k", args.top_k, args.top_k >= 0),
                            ("--top_p", args.top_p, 0 < args.top_p <= 1),
                            ("--batch_size", args.batch_size, args.batch_size >= 1),
                            ("--limit", args.limit, args.limit is None or args.limit >= 1),
                            ("--threads", args.threads, args.threads >= 0),
                            ("--num_chunks", args.num_chunks, args.num_chunks >= 1),
                            ("--max_bad_fraction", args.max_bad_fraction, 0 <= args.max_bad_fraction <= 1)):
        if not ok:
            parser.error(f"{flag} {value} is out of range")
    return args

# ----------------------------------------------------------------------------------------------------------------------
# The model, the tokenizer and the pixels


def pick_device(device, dtype):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def checkpoint_path(args):
    """The model to load: --hf, --ckpt, or the newest stage's checkpoint under out_dir; each found as train.py finds
    paths, where this runs, else in the repository (tinyllava.resolve)."""
    if args.hf:
        path = resolve(args.hf)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SampleError(f"--hf {args.hf}: " + ("no config.json here, not an HF LLaVA directory"
                                                     if os.path.exists(path) else "no such directory"))
        return path
    if args.ckpt:
        path = resolve(args.ckpt)
        if not os.path.exists(path):
            raise SampleError(f"--ckpt {args.ckpt}: no such file or directory")
        return path
    for base in ("", REPO_DIR):
        for stage in ("stage2", "stage1"):
            path = os.path.join(base, out_dir, stage, "ckpt.pt")
            if os.path.isfile(path):
                return path
    raise SampleError(f"no checkpoint: neither {out_dir}/stage2/ckpt.pt nor {out_dir}/stage1/ckpt.pt exists here or "
                      f"in {REPO_DIR}; train one (python train.py --stage 1) or pass --ckpt PATH or --hf DIR")


def load_model(path, device, dtype, chat=False, template=None):
    """(model, tokenizer, is_hf) from one of our checkpoints or an HF LLaVA directory, prompted with `template` if
    given, with a one-line error for anything else, before any loading for a --chat in the plain template."""
    is_hf = os.path.isfile(os.path.join(path, "config.json"))
    if not is_hf:
        file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise SampleError(f"{path}: no ckpt.pt and no config.json here: neither one of our checkpoints nor an HF "
                              "LLaVA directory")
        if not zipfile.is_zipfile(file):  # torch.save writes a zip archive
            raise SampleError(f"{file}: unknown checkpoint format: not a tinyllava ckpt.pt (torch.save) nor an HF "
                              "LLaVA directory")
    try:
        if chat and (template or ("vicuna_v1" if is_hf else saved_template(file))) == "plain":
            raise SampleError(f"--chat needs an instruction-tuned model (vicuna_v1 template, a stage-2 checkpoint); "
                              f"{'--template plain' if template else file + ' uses plain (stage 1)'} only captions: "
                              "drop --chat")
        print(f"loading {path} on {device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr)
        model = TinyLLaVA.from_pretrained(path, dtype=dtype, device=device).eval()
        model.merge_lora()  # a LoRA checkpoint's adapters folded in: decoding costs what the plain model's does
        model.config.template = template or model.config.template
        tokenizer = load_tokenizer(resolve(model.config.llm_path))  # an HF LLaVA directory holds its own
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as error:
        raise SampleError(f"cannot load {path}: {error}") from None
    return model, tokenizer, is_hf


def saved_template(file):
    """The prompt template one of our ckpt.pt files was trained with, read without loading its weights (mmap)."""
    checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("config", {}).get("template") if isinstance(checkpoint, dict) else None


def to_pixels(model, images, aspect):
    """PIL images -> (N, 3, S, S), preprocessed exactly as training does for this vision tower."""
    settings = image_settings(resolve(model.config.vision_path))
    return torch.stack([process_image(image, settings["size"], aspect, settings["mean"], settings["std"])
                        for image in images])


def question_ids(text, tokenizer, template):
    """Prompt ids for one question, the image first. A <image> tag the user typed is dropped: the image goes first."""
    conversation = [{"from": "human", "value": IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()}]
    return encode_prompt(conversation, tokenizer, template, image_first=True)


def answer_budget(model, past, new_positions, max_new, culprit):
    """How many tokens the answer may have so that past + new positions + the answer fit the model's context;
    a prompt that does not fit is an error naming the culprit."""
    context = model.llm.config.max_position_embeddings
    if past + new_positions > context:
        raise SampleError(f"{culprit}: {past + new_positions} positions (the image counts {model.num_image_tokens}) "
                          f"do not fit the model's context of {context} (max_position_embeddings)")
    # every answer token but the last is fed back, so context - used + 1 of them fit
    return min(max_new, context - past - new_positions + 1)

# ----------------------------------------------------------------------------------------------------------------------
# Answers


def decode_answer(ids, tokenizer, stops):
    """The answer's text: its ids up to the first stop token (rows that stopped repeat it), decoded, trimmed."""
    ids = list(ids)
    end = next((k for k, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def stream_answer(tokens, tokenizer, stops, out):
    """Print an answer as its tokens arrive and return its ids (with the stop token, if one came). Each step decodes
    all the ids so far and prints only what is new, so spaces and characters made of several tokens come out right."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = decode_answer(ids, tokenizer, stops)
        if text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write(decode_answer(ids, tokenizer, stops)[len(shown):] + "\n")
    out.flush()
    return ids


def answer_images(model, tokenizer, images, names, text, aspect, args, sampling, out=None):
    """One question about each image. A single image streams its answer; several are generated in batches (left
    padding is generate_stream's business) and each answer is printed as 'file: answer' when its batch is done."""
    out = out or sys.stdout
    template = model.config.template
    prompt = question_ids(text, tokenizer, template)
    new_tokens = answer_budget(model, 0, len(prompt) - 1 + model.num_image_tokens, args.max_new_tokens, "--prompt")
    stops = stop_token_ids(tokenizer, template)
    for start in range(0, len(images), args.batch_size):
        pixel_values = to_pixels(model, images[start:start + args.batch_size], aspect)
        tokens = model.generate_stream([prompt] * len(pixel_values), pixel_values, max_new_tokens=new_tokens,
                                       stop_token_ids=stops, **sampling)
        if len(images) == 1:
            stream_answer((int(token[0]) for token in tokens), tokenizer, stops, out)
            return
        generated = torch.stack(list(tokens), dim=1).tolist()  # (B, N)
        for name, ids in zip(names[start:], generated):
            print(f"{name}: {decode_answer(ids, tokenizer, stops)}", file=out, flush=True)


def read_question(prompt):
    """The next line of stdin (None at EOF), with a '> ' prompt when a person types it."""
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def chat(model, tokenizer, pixel_values, max_new, sampling, read=read_question, out=None):
    """
    A conversation about one image, each turn continuing in one KV cache: only the new turn's tokens are prefilled.
    Returns [(ids fed this turn, answer ids)] per turn.

    The cache holds every position seen so far except the last answer's final token: generate_stream yields it but
    never feeds it. A new turn feeds that token (and the end-of-turn token if the answer was cut short) followed by
    the new question's ids, and those come from encode_prompt, which is prefix-stable: the prompt of the whole
    conversation is the prompt through the last answer's end-of-turn token, then the new question. The answer's own
    ids are the ones generated, which re-encoding its text need not reproduce, so the new question's ids are taken
    as a length difference between two encodings of the same text (the conversation through the last answer, and
    that plus the question), never by slicing the generated history.
    """
    out = out or sys.stdout
    template = model.config.template  # vicuna_v1: load_model refuses a --chat with a plain (stage-1) model
    weight = model.llm.embed_tokens.weight
    cache = KVCache(model.llm.config, 1, model.llm.config.max_position_embeddings, weight.device, weight.dtype)
    stops = stop_token_ids(tokenizer, template)
    end_of_turn = stops[0]  # vicuna_v1 closes each answer with EOS
    conversation, turns, unfed = [], [], []
    while True:
        text = read("> ")
        if text is None or not text.strip():
            break
        first = not conversation
        conversation.append({"from": "human", "value": (IMAGE_TAG + "\n" if first else "")
                             + text.replace(IMAGE_TAG, "").strip()})
        prompt = encode_prompt(conversation, tokenizer, template, image_first=True)
        if first:
            new_ids = prompt
        else:
            known = len(encode_conversation(conversation[:-1], tokenizer, template, image_first=True)[0])
            new_ids = unfed + prompt[known:]  # (last answer token, [end of turn]) + "USER: {question} ASSISTANT:"
        new_positions = (len(new_ids) - 1 + model.num_image_tokens) if first else len(new_ids)  # image counted
        budget = answer_budget(model, cache.length, new_positions, max_new,
                               "the conversation is too long; start a new chat")
        tokens = model.generate_stream([new_ids], pixel_values if first else None, cache=cache,
                                       max_new_tokens=budget, stop_token_ids=stops, **sampling)
        answer = stream_answer((int(token[0]) for token in tokens), tokenizer, stops, out)
        unfed = [answer[-1]] + ([] if answer[-1] in stops else [end_of_turn])
        # the text only serves the length arithmetic above; a tag in it would read as a second image
        conversation.append({"from": "gpt", "value": decode_answer(answer, tokenizer, stops).replace(IMAGE_TAG, "")})
        turns.append((new_ids, answer))
    return turns

# ----------------------------------------------------------------------------------------------------------------------
# LLaVA's evaluation files: question lines in, answer lines out (as llava/eval/model_vqa.py), resumable and chunked


def read_questions(path):
    """[(line number, {question_id, image or None, text, category or None})] of a question file, and the bad lines
    as messages. JSON lines, or a JSON list of LLaVA records (the question is the first human turn, <image> taken
    out)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except OSError as error:
        raise SampleError(f"--questions {path}: {error.strerror}") from None
    if content.lstrip().startswith("["):  # a LLaVA JSON list (ScienceQA's llava_test_CQM-A.json)
        try:
            lines = [(k + 1, {"question_id": r.get("id"), "image": r.get("image"), "category": r.get("category"),
                              "text": r["conversations"][0]["value"].replace(IMAGE_TAG, "").strip()})
                     for k, r in enumerate(json.loads(content))]
        except (json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError) as error:
            raise SampleError(f"--questions {path}: not a JSON list of LLaVA records ({error})") from None
    else:
        lines = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    lines.append((number, f"not JSON ({error.msg})"))
    questions, bad, seen = [], [], set()
    for number, line in lines:
        if isinstance(line, dict) and line.get("question_id") is not None and isinstance(line.get("text"), str) \
                and isinstance(line.get("image") or "", str) and line["question_id"] not in seen:
            seen.add(line["question_id"])
            questions.append((number, {"question_id": line["question_id"], "image": line.get("image") or None,
                                       "text": line["text"], "category": line.get("category")}))
        else:
            reason = line if isinstance(line, str) else "a repeated question_id" if isinstance(line, dict) and \
                line.get("question_id") in seen else "not {question_id, text[, image, category]}"
            bad.append(f"{path}:{number}: {reason}")
    return questions, bad


def chunk(items, num_chunks, index):
    """Chunk `index` of `num_chunks` contiguous chunks of ceil(len / num_chunks) items (LLaVA's split_list)."""
    size = -(-len(items) // num_chunks)
    return items[index * size:(index + 1) * size]


def answered_ids(path):
    """The question ids already in an answer file: a run killed halfway goes on after them. A last line the kill cut
    short is removed first (its question is asked again), so that appending starts on a line of its own."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb+") as f:
        content = f.read()
        if content and not content.endswith(b"\n"):
            whole = content.rfind(b"\n") + 1  # the end of the last whole line
            f.truncate(whole)
            print(f"{path}: removed a last line cut short: {content[whole:][:60]!r}", file=sys.stderr)
            content = content[:whole]
    done = set()
    for number, line in enumerate(content.decode("utf-8").splitlines(), 1):
        try:
            done.add(json.loads(line)["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SampleError(f"--answers {path}:{number}: not an answer line; give another --answers file") from None
    return done


def answer_file(model, tokenizer, questions, image_folder, answers_path, model_id, aspect, args, bad):
    """Answer the questions greedily in batches (the image before the question, as model_vqa; text-only ones without
    one), appending each batch's answer lines to answers_path as it is done. Missing images are reported with their
    line and skipped, and the run stops once more than max_bad_fraction of the questions were bad."""
    template = model.config.template
    stops = stop_token_ids(tokenizer, template)
    total = len(questions) + len(bad)
    started, done = time.time(), 0
    with open(answers_path, "a", encoding="utf-8") as out:
        for start in range(0, len(questions), args.batch_size):
            batch, images = [], []
            for number, question in questions[start:start + args.batch_size]:
                if question["image"] is not None:
                    try:
                        images.append(load_image(os.path.join(image_folder, question["image"])))
                    except ImageError as error:
                        bad.append(f"{args.questions}:{number}: {error}")
                        print(f"skipped: {bad[-1]}", file=sys.stderr)
                        if len(bad) > args.max_bad_fraction * total:
                            raise SampleError(f"{len(bad)} bad questions of {total} in {args.questions}, more than "
                                              f"--max_bad_fraction {args.max_bad_fraction}; first: {bad[0]}")
                        continue
                batch.append(question)
            for has_image in (True, False):  # a batch of one kind: images spliced in order, or none at all
                group = [q for q in batch if (q["image"] is not None) == has_image]
                if not group:
                    continue
                prompts = [question_ids(q["text"], tokenizer, template) if has_image else
                           encode_prompt([{"from": "human", "value": q["text"].replace(IMAGE_TAG, "").strip()}],
                                         tokenizer, template) for q in group]
                pixel_values = to_pixels(model, images, aspect) if has_image else None
                longest = max(map(len, prompts)) - 1 + (model.num_image_tokens if has_image else 1)
                new_tokens = answer_budget(model, 0, longest, args.max_new_tokens, f"question {group[0]['question_id']}")
                generated = model.generate(prompts, pixel_values, max_new_tokens=new_tokens,
                                           stop_token_ids=stops).tolist()  # (B, N), greedy
                for question, ids in zip(group, generated):
                    out.write(json.dumps({"question_id": question["question_id"], "prompt": question["text"],
                                          "text": decode_answer(ids, tokenizer, stops),
                                          "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
                                          "metadata": {"category": question["category"]} if question["category"]
                                          else {}}) + "\n")
            out.flush()
            done = min(start + args.batch_size, len(questions))
            elapsed = time.time() - started
            print(f"answers: {done}/{len(questions)}, {elapsed:.0f}s, ETA {elapsed / done * (len(questions) - done):.0f}s",
                  file=sys.stderr)
    return done


def ask_question_file(args, device, dtype):
    questions, bad = read_questions(args.questions)
    for message in bad[:10]:
        print(f"skipped: {message}", file=sys.stderr)
    total = len(questions) + len(bad)
    if len(bad) > args.max_bad_fraction * total:
        raise SampleError(f"{len(bad)} bad lines of {total} in {args.questions}, more than --max_bad_fraction "
                          f"{args.max_bad_fraction}; first: {bad[0]}")
    mine = chunk(questions, args.num_chunks, args.chunk_idx)
    done = answered_ids(args.answers)
    todo = [(number, q) for number, q in mine if q["question_id"] not in done]
    print(f"questions: {len(mine)} in chunk {args.chunk_idx} of {args.num_chunks} from {args.questions}, "
          f"{len(mine) - len(todo)} already in {args.answers}, {len(todo)} to answer", file=sys.stderr)
    if not todo:
        return
    path = checkpoint_path(args)
    model, tokenizer, is_hf = load_model(path, device, dtype, template=args.template)
    aspect = args.aspect or ("pad" if is_hf else model.config.image_aspect)
    image_folder = args.image_folder or os.path.dirname(os.path.abspath(args.questions))
    model_id = os.path.basename(os.path.normpath(path if is_hf or os.path.isdir(path) else os.path.dirname(path)))
    answer_file(model, tokenizer, todo, image_folder, args.answers, model_id, aspect, args, bad)

# ----------------------------------------------------------------------------------------------------------------------
# Scoring answer files by the benchmarks' rules


def read_truth(path, questions=None):
    """{question_id: (answer, category or None)} from JSON lines {question_id, answer or label[, category]}, or from
    a JSON object by question id ({"answer": ...}: GQA's questions file; ScienceQA's problems.json, whose answer is
    the index of the right choice), or from POPE's annotation directory (read_pope_truth)."""
    if os.path.isdir(path):
        return read_pope_truth(path, questions)
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
        try:
            whole = json.loads(content)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, dict) and "question_id" not in whole:
            return {key: (chr(ord("A") + v["answer"]) if isinstance(v["answer"], int) else v["answer"],
                          v.get("category") or v.get("split")) for key, v in whole.items()}
        truth = {}
        for line in filter(str.strip, content.splitlines()):
            record = json.loads(line)
            truth[record["question_id"]] = (record["answer"] if "answer" in record else record["label"],
                                            record.get("category"))
        return truth
    except OSError as error:
        raise SampleError(f"--truth {path}: {error.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise SampleError(f"--truth {path}: not an answer key ({type(error).__name__}: {error})") from None


def read_pope_truth(directory, questions):
    """POPE's key as eval_pope.py reads it: coco_pope_{category}.json holds one label line per question of that
    category, in the order of the question file (whose question ids are unique; the label files' are not)."""
    if not questions:
        raise SampleError(f"--truth {directory}: a POPE annotation directory needs --questions (the question file "
                          "llava_pope_test.jsonl), whose categories and order pair each question with its label")
    order = defaultdict(list)  # category -> question ids, in the question file's order
    with open(questions, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(filter(str.strip, lines), 1):
        try:
            record = json.loads(line)
            order[record["category"]].append(record["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SampleError(f"--questions {questions}:{number}: not a POPE question line") from None
    truth = {}
    for category, ids in order.items():
        path = os.path.join(directory, f"coco_pope_{category}.json")
        try:
            with open(path, encoding="utf-8") as f:
                labels = [json.loads(line)["label"] for line in filter(str.strip, f)]
        except OSError as error:
            raise SampleError(f"--truth {path}: {error.strerror} (category {category!r} of --questions)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SampleError(f"--truth {path}: not a POPE label file ({type(error).__name__}: {error})") from None
        if len(labels) != len(ids):
            raise SampleError(f"--truth {path}: {len(labels)} labels for the {len(ids)} {category!r} questions of "
                              f"--questions {questions}")
        truth.update({key: (label, category) for key, label in zip(ids, labels)})
    return truth


def short_answer(text):
    """GQA's conversion (convert_gqa_for_eval.py): lowercase, the trailing period dropped."""
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") else text


def choice_letter(text):
    """ScienceQA's extraction (eval_science_qa.py): the bare letter, 'X. ...', or 'The answer is X.'; else None
    (FAILED, counted wrong)."""
    text = text.strip()
    if re.fullmatch(r"[A-Z]", text):
        return text
    if re.match(r"[A-Z]\. ", text):
        return text[0]
    found = re.findall(r"The answer is ([A-Z])\.", text)
    return found[0] if len(found) == 1 else None


def yes_or_no(text):
    """POPE's reading (eval_pope.py): the first sentence, commas dropped; 'no' if a word is No, no or not."""
    words = text.split(".")[0].replace(",", "").split()
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def score(kind, answers_path, truth_path, out=None, questions=None):
    """Score an answer file: a table per category (POPE: accuracy, precision, recall, F1, yes-ratio); returns the
    overall accuracy. questions: the question file, for a POPE annotation directory as truth_path."""
    out = out or sys.stdout
    if os.path.isdir(truth_path) and kind != "pope":
        raise SampleError(f"--truth {truth_path}: a directory is read only as POPE's annotation directory (--score pope)")
    truth = read_truth(truth_path, questions)
    answers = {}
    with open(answers_path, encoding="utf-8") as f:
        for number, line in enumerate(filter(str.strip, f), 1):
            try:
                record = json.loads(line)
                answers[record["question_id"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SampleError(f"--answers {answers_path}:{number}: not an answer line") from None
    if not answers:
        raise SampleError(f"--answers {answers_path}: no answer lines to score")
    unknown = [key for key in answers if key not in truth]
    if unknown:
        raise SampleError(f"--answers {answers_path}: {len(unknown)} question ids are not in --truth {truth_path}, "
                          f"e.g. {unknown[0]!r}")
    groups = defaultdict(list)  # category -> [(predicted, right answer)]
    failed = Counter()
    for key, record in answers.items():
        right, category = truth[key]
        category = category or record.get("metadata", {}).get("category") or "all"
        if kind == "short":
            predicted, right = short_answer(record["text"]), short_answer(right)
        elif kind == "choice":
            predicted = choice_letter(record["text"])
            failed[category] += predicted is None
        else:
            predicted, right = yes_or_no(record["text"]), right.strip().lower()
        groups[category].append((predicted, right))
    groups["overall"] = [pair for category in sorted(groups) for pair in groups[category]]
    failed["overall"] = sum(failed.values())
    missing = len(truth) - len(answers)
    print(f"{len(answers)} answers scored" + (f"; {missing} questions of the key have no answer" if missing else ""),
          file=out)
    if kind == "pope":
        print(f"{'category':<14} {'n':>6} {'accuracy':>9} {'precision':>10} {'recall':>8} {'F1':>8} {'yes':>8}",
              file=out)
    else:
        print(f"{'category':<20} {'right':>6} {'n':>6} {'accuracy':>9}" + ("  failed" if kind == "choice" else ""),
              file=out)
    for category, pairs in groups.items():
        right = sum(p == t for p, t in pairs)
        if kind == "pope":
            tp = sum(p == t == "yes" for p, t in pairs)
            precision = tp / max(1, sum(p == "yes" for p, _ in pairs))
            recall = tp / max(1, sum(t == "yes" for _, t in pairs))
            f1 = 2 * precision * recall / max(1e-9, precision + recall)
            print(f"{category:<14} {len(pairs):>6} {right / len(pairs):>9.4f} {precision:>10.4f} {recall:>8.4f} "
                  f"{f1:>8.4f} {sum(p == 'yes' for p, _ in pairs) / len(pairs):>8.4f}", file=out)
        else:
            print(f"{category:<20} {right:>6} {len(pairs):>6} {right / len(pairs):>9.4f}"
                  + (f"  {failed[category]:>6}" if kind == "choice" else ""), file=out)
    overall = groups["overall"]
    print(format_compliance(kind, overall, [record["text"] for record in answers.values()]), file=out)
    return sum(p == t for p, t in overall) / len(overall)


def format_compliance(kind, pairs, texts):
    """The share of answers in the response format the prompt asked for, right or wrong: a word or phrase among the
    key's answers (short), a bare letter (choice), a first sentence that is yes or no (pope)."""
    if kind == "short":
        vocabulary = {right for _, right in pairs}
        n, what = sum(predicted in vocabulary for predicted, _ in pairs), "a word or phrase among the key's answers"
    elif kind == "choice":
        n, what = sum(bool(re.fullmatch(r"[A-Z]", text.strip())) for text in texts), "a bare letter"
    else:
        n = sum(text.split(".")[0].replace(",", " ").split()[:1] in (["Yes"], ["No"], ["yes"], ["no"]) for text in texts)
        what = "yes or no first"
    return f"format: {n} of {len(texts)} answers ({n / max(1, len(texts)):.1%}) are {what}"

# ----------------------------------------------------------------------------------------------------------------------
# Learning curves: held-out accuracy against the step, from train.py's logs


def plot_curves(logs, png, size=(720, 440), margin=60):
    """Each log.jsonl's "eval" records with an accuracy, as one curve (step on x, accuracy 0..1 on y), into a PNG."""
    from PIL import Image, ImageDraw
    curves = []
    for path in logs:
        try:
            with open(path) as f:
                points = [(r["step"], r["accuracy"]) for r in map(json.loads, f) if "accuracy" in r]
        except (OSError, json.JSONDecodeError, KeyError) as error:
            raise SampleError(f"--plot {path}: cannot read a train.py log ({error})") from None
        if not points:
            raise SampleError(f"--plot {path}: no held-out accuracy logged (train stage 2 with --eval_questions N)")
        curves.append((os.path.basename(os.path.dirname(os.path.abspath(path))), points))
    width, height = size
    last = max(step for _, points in curves for step, _ in points)
    to_xy = lambda step, accuracy: (margin + (width - 2 * margin) * step / last,
                                    height - margin - (height - 2 * margin) * accuracy)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for tick in range(0, 11, 2):  # the accuracy grid, 0 to 1
        x0, y = to_xy(0, tick / 10)
        draw.line([(x0, y), (width - margin, y)], fill=(225, 225, 225))
        draw.text((10, y - 6), f"{tick / 10:.1f}", fill="black")
    draw.line([to_xy(0, 0), to_xy(last, 0)], fill="black")
    draw.line([to_xy(0, 0), to_xy(0, 1)], fill="black")
    for step in (0, last // 2, last):
        x, y = to_xy(step, 0)
        draw.text((x - 10, y + 8), str(step), fill="black")
    draw.text((width // 2 - 60, height - 25), "stage-2 optimizer step", fill="black")
    draw.text((margin, 15), "held-out exact-match accuracy", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for k, (label, points) in enumerate(curves):
        color = colors[k % len(colors)]
        draw.line([to_xy(*point) for point in points], fill=color, width=3)
        for point in points:
            x, y = to_xy(*point)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        draw.text((width - margin - 150, height - margin - 20 - 16 * (len(curves) - k)),
                  f"{label}: {points[-1][1]:.3f}", fill=color)
    image.save(png)

# ----------------------------------------------------------------------------------------------------------------------
# What the image tokens read as: H_v = W · Z_v against the LLM's word embeddings


def reading_vocabulary(model, tokenizer):
    """(names, vectors) the image tokens are read against. With the tiny bases' scene words in the vocabulary: every
    cell they can write (cell, background, then 'empty' or size color shape), as the mean of its words' embeddings,
    exactly as the LLM was pretrained to read a cell. Otherwise every single token of the vocabulary."""
    table = model.llm.embed_tokens.weight.detach().float()
    if not has_scene_words(tokenizer):
        return [tokenizer.id_to_token(i) for i in range(len(table))], table
    cells = possible_cells()
    return cells, torch.stack([table[cell_word_ids(cell, tokenizer)].mean(0) for cell in cells])


def has_scene_words(tokenizer):
    """Whether the tokenizer writes every cell of the shapes world in single tokens (the tiny bases' does)."""
    return tokenizer.token_to_id(SCENE_TOKENS[0]) is not None and \
        all(cell_word_ids(cell, tokenizer) is not None for cell in possible_cells())


def read_image_tokens(model, tokenizer, pixel_values):
    """For each image (N, 3, S, S), what each of its tokens reads as: the nearest entry of reading_vocabulary by
    cosine similarity, [N][tokens]."""
    names, vectors = reading_vocabulary(model, tokenizer)
    with torch.no_grad():
        tokens = model.image_features(pixel_values).float()  # (N, num_image_tokens, D): H_v = W · Z_v
    similarity = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(vectors, dim=-1).T
    return [[names[k] for k in row] for row in similarity.argmax(-1).tolist()]  # (N, num_image_tokens)


def draw_grid(readings):
    """The readings of one image's tokens as a square grid of text, row by row."""
    side = int(len(readings) ** 0.5)
    texts = [" ".join(reading) if isinstance(reading, list) else reading for reading in readings]
    width = max(map(len, texts)) + 2
    rule = "+" + "+".join(["-" * width] * side) + "+"
    lines = [rule]
    for row in range(0, len(texts) - len(texts) % side or len(texts), side):
        lines += ["|" + "|".join(f" {text:<{width - 1}}" for text in texts[row:row + side]) + "|", rule]
    return "\n".join(lines)


def share_read_right(model, tokenizer, world_dir, image_names, aspect, batch):
    """Of the image tokens of these world images, the share whose reading is exactly their cell (cell name,
    background, content), or None when the LLM has no scene words."""
    if not has_scene_words(tokenizer):
        return None
    with open(os.path.join(world_dir, "scenes.json")) as f:
        scenes = {record["image"]: scene_from_json(record) for record in json.load(f)}
    right = total = 0
    for start in range(0, len(image_names), batch):
        names = image_names[start:start + batch]
        pixel_values = to_pixels(model, [load_image(os.path.join(world_dir, name)) for name in names], aspect)
        for name, readings in zip(names, read_image_tokens(model, tokenizer, pixel_values)):
            truth = cell_attributes(scenes[name])
            right += sum(reading == cell for reading, cell in zip(readings, truth))
            total += len(truth)
    return right / total

# ----------------------------------------------------------------------------------------------------------------------
# Held-out eval on the shapes world


def eval_items(world_dir, limit):
    """The eval.json items, checked; with a limit, the first questions of each type in turn (every type shows)."""
    path = os.path.join(world_dir, "eval.json")
    try:
        with open(path) as f:
            items = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise SampleError(f"{path}: cannot read the eval questions: {error}") from None
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in
                                                 ("image", "question", "answer", "type")):
            raise SampleError(f"{path}: item {index} is not {{id, image, question, answer, type}}: {str(item)[:80]}")
    if limit is not None:
        rank, seen = [], Counter()
        for item in items:
            rank.append(seen[item["type"]])
            seen[item["type"]] += 1
        order = sorted(range(len(items)), key=lambda k: rank[k])  # stable: the file's type order within a rank
        items = [items[k] for k in sorted(order[:limit])]
    return items


def evaluate(model, tokenizer, items, images, aspect, batch, max_new, out=None, progress=True):
    """Greedy answers to every question, image first, in batches; exact match per question type and overall.
    progress: a line on stderr after each batch."""
    out = out or sys.stdout
    template = model.config.template
    stops = stop_token_ids(tokenizer, template)
    prompts = [question_ids(item["question"], tokenizer, template) for item in items]
    longest = max(len(prompt) for prompt in prompts)
    max_new = answer_budget(model, 0, longest - 1 + model.num_image_tokens, max_new, "an eval question")
    correct, total = Counter(), Counter()
    started = time.time()
    for start in range(0, len(items), batch):
        pixel_values = to_pixels(model, images[start:start + batch], aspect)
        generated = model.generate(prompts[start:start + batch], pixel_values, max_new_tokens=max_new,
                                   stop_token_ids=stops).tolist()  # (B, N), greedy
        for item, ids in zip(items[start:start + batch], generated):
            total[item["type"]] += 1
            correct[item["type"]] += exact_match(decode_answer(ids, tokenizer, stops), item["answer"])
        done = min(start + batch, len(items))
        if progress:
            print(f"eval: {done}/{len(items)} questions, {sum(correct.values())} right, {time.time() - started:.1f}s",
                  file=sys.stderr)
    for kind in total:
        print(f"{kind:<20} {correct[kind]:>5}/{total[kind]:<5} {correct[kind] / total[kind]:.4f}", file=out)
    accuracy = sum(correct.values()) / len(items)
    print(f"{'overall':<20} {sum(correct.values()):>5}/{len(items):<5} {accuracy:.4f}", file=out)
    print(f"accuracy: {accuracy:.4f}", file=out)
    return accuracy

# ----------------------------------------------------------------------------------------------------------------------


def run(args):
    if args.score:
        for flag, path in (("--answers", args.answers), ("--truth", args.truth), ("--questions", args.questions)):
            if path and not os.path.exists(path):
                raise SampleError(f"{flag} {path}: no such file")
        accuracy = score(args.score, args.answers, args.truth, questions=args.questions)
        print(f"accuracy: {accuracy:.4f}")
        return
    if args.plot:
        plot_curves(args.plot, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.questions:
        ask_question_file(args, *pick_device(args.device, args.dtype))
        return
    # every image is read before any model is loaded: a typo in a path should not cost a 7B load
    if args.eval:
        world_dir = args.world or ensure_world()
        items = eval_items(world_dir, args.limit)
        if not items:
            raise SampleError(f"{world_dir}: eval.json holds no questions")
        images = [load_image(os.path.join(world_dir, item["image"])) for item in items]
    else:
        images = [load_image(path) for path in args.image]  # ImageError names the file
    device, dtype = pick_device(args.device, args.dtype)
    path = checkpoint_path(args)
    model, tokenizer, is_hf = load_model(path, device, dtype, chat=args.chat, template=args.template)
    aspect = args.aspect or ("pad" if is_hf else model.config.image_aspect)
    if args.eval:
        print(f"eval: {len(items)} questions from {os.path.join(world_dir, 'eval.json')}", file=sys.stderr)
        evaluate(model, tokenizer, items, images, aspect, args.batch_size, args.max_new_tokens)
        share = share_read_right(model, tokenizer, world_dir, sorted({item["image"] for item in items}), aspect,
                                 args.batch_size)
        if share is not None:
            print(f"image tokens read as their cell (nearest cell of the LLM's scene words): {share:.4f}")
        return
    if args.read_image:
        for name, readings in zip(args.image, read_image_tokens(model, tokenizer, to_pixels(model, images, aspect))):
            print(f"{name}: what each image token reads as, row by row\n{draw_grid(readings)}")
        return
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    if model.config.template == "plain" and args.prompt is not None and not args.chat:
        print("note: a stage-1 model (plain template) ignores --prompt and captions the image", file=sys.stderr)
    if args.chat:
        print(f"chat about {args.image[0]} ({model.config.template} template): type a question; an empty line or "
              "Ctrl-D ends", file=sys.stderr)
        opening = [args.prompt] if args.prompt is not None else []  # --prompt, if given, is the first question

        def read(prompt):
            return opening.pop() if opening else read_question(prompt)
        chat(model, tokenizer, to_pixels(model, images, aspect), args.max_new_tokens, sampling, read)
    else:
        answer_images(model, tokenizer, images, args.image, question if args.prompt is None else args.prompt, aspect,
                      args, sampling)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (SampleError, ImageError) as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
