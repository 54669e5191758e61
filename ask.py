"""
Asking a trained model, shared by sample.py (answers, chat) and evaluate.py (benchmarks): which model to load and
where it runs (the flags both scripts take), its inputs (the pixels of an image, the prompt of a question) and its
answers, decoded.

    import ask
    model, tokenizer = ask.load(ask.ModelFlags(ckpt="out/stage2"))
    pixel_values = ask.to_pixels(model, [load_image("photo.png")])
    texts = ask.greedy_answers(model, tokenizer, [question_ids("What is it?", tokenizer, "vicuna_v1")], pixel_values)
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from data import image_settings, load_tokenizer, process_image, question_ids, stop_token_ids
from flags import Stop
from tinyllava import REPO_DIR, TinyLLaVA, read_checkpoint, resolve

OUT_DIR = "out"  # train.py writes out/stage1/ckpt.pt and out/stage2/ckpt.pt


@dataclass
class ModelFlags:
    # model: which model answers, and where it runs (every mode that loads one)
    ckpt: str = ""  # one of our checkpoints, a ckpt.pt or its directory ("": out/stage2, else out/stage1; a path is
                    # looked for where you run this, then in the repository)
    hf: str = ""  # an HF LLaVA directory (LlavaForConditionalGeneration with tokenizer.json, e.g. llava-1.5-7b-hf),
                  # prompted with vicuna_v1 and, unless --aspect says otherwise, images padded to a square as
                  # LLaVA-1.5 was trained
    template: Literal["vicuna_v1", "plain"] | None = None  # the prompt template (default: the checkpoint's, vicuna_v1
                                                           # for --hf); vicuna_v1 asks a stage-1 model questions
                                                           # zero-shot, through an LLM pretrained to answer them (as
                                                           # the tiny bases' LLaMA is)
    aspect: Literal["crop", "pad"] | None = None  # non-square images: centre crop or pad to a square (default: what
                                                  # the checkpoint was trained with; pad for --hf)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA if there is one
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the weights' and activations' type (auto:
                                                                       # bfloat16 on CUDA, float32 on CPU)
    threads: int = 0  # torch CPU threads (0: torch's default; 1 when others share the cores)


def find_model(flags):
    """The model to load: --hf, --ckpt, or the newest stage's checkpoint under out/; each found where this runs, else
    in the repository (tinyllava.resolve), as train.py finds its paths."""
    if flags.hf and flags.ckpt:
        raise Stop("--ckpt and --hf each name a model: give one of them")
    if flags.hf:
        path = resolve(flags.hf)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise Stop(f"--hf {flags.hf}: " + ("no config.json here, not an HF LLaVA directory"
                                               if os.path.exists(path) else "no such directory"))
        return path
    if flags.ckpt:
        path = resolve(flags.ckpt)
        if not os.path.exists(path):
            raise Stop(f"--ckpt {flags.ckpt}: no such file or directory")
        return path
    for base in ("", REPO_DIR):
        for stage in ("stage2", "stage1"):
            path = os.path.join(base, OUT_DIR, stage, "ckpt.pt")
            if os.path.isfile(path):
                return path
    raise Stop(f"no checkpoint: neither {OUT_DIR}/stage2/ckpt.pt nor {OUT_DIR}/stage1/ckpt.pt exists here or in "
               f"{REPO_DIR}; train one (python train.py --stage 1) or pass --ckpt PATH or --hf DIR")


def saved_template(path):
    """The prompt template a model at `path` is prompted in by default, read without loading its weights."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return "vicuna_v1"  # an HF LLaVA
    try:
        return read_checkpoint(path, mmap=True)["config"].get("template")
    except (FileNotFoundError, ValueError) as error:
        raise Stop(str(error)) from None


def refuse_captioner(flags, path, asker):
    """Stop, before any loading, when `asker` would put questions to a model prompted in the plain template (stage
    1's), which only captions: they would get captions back and score nothing."""
    if (flags.template or saved_template(path)) == "plain":
        which = "--template plain" if flags.template else f"{path} is a stage-1 model (plain template): it"
        raise Stop(f"{asker} asks questions, but {which} only captions; add --template vicuna_v1 to ask a stage-1 "
                   "model zero-shot (its LLM answers), or give a stage-2 checkpoint")


def load(flags, path=None):
    """(model, tokenizer) from --ckpt or --hf (path: find_model's answer, when the caller looked already), on the
    device and in the dtype the flags ask, prompted with --template and fed images as --aspect says. LoRA adapters are
    merged on load, so decoding costs what the plain model's does."""
    path = path or find_model(flags)
    if flags.threads:
        torch.set_num_threads(flags.threads)
    device = "cuda" if flags.device == "cuda" or (flags.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise Stop("--device cuda: CUDA is not available on this machine")
    dtype = getattr(torch, flags.dtype if flags.dtype != "auto" else "bfloat16" if device == "cuda" else "float32")
    print(f"loading {path} on {device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    try:
        model = TinyLLaVA.from_pretrained(path, dtype=dtype, device=device).eval()
        model.merge_lora()
        tokenizer = load_tokenizer(resolve(model.config.llm_path))  # an HF LLaVA directory holds its own
    except (FileNotFoundError, ValueError) as error:  # the message names the file at fault
        raise Stop(str(error) if str(error).startswith(path) else f"cannot load {path}: {error}") from None
    is_hf = os.path.isfile(os.path.join(path, "config.json"))
    model.config.template = flags.template or model.config.template
    model.config.image_aspect = flags.aspect or ("pad" if is_hf else model.config.image_aspect)
    return model, tokenizer


def model_id(path):
    """The name answer files give a model (LLaVA's model_id): its directory's name."""
    return os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))


def to_pixels(model, images):
    """PIL images -> (N, 3, S, S), preprocessed exactly as training does for this vision tower and checkpoint."""
    settings = image_settings(resolve(model.config.vision_path))
    return torch.stack([process_image(image, settings["size"], model.config.image_aspect, settings["mean"],
                                      settings["std"]) for image in images])


def answer_budget(model, past, new_positions, max_new, culprit):
    """How many tokens the answer may have so that past + new positions + the answer fit the model's context;
    a prompt that does not fit is an error naming the culprit."""
    context = model.llm.config.max_position_embeddings
    if past + new_positions > context:
        raise Stop(f"{culprit}: {past + new_positions} positions (the image counts {model.num_image_tokens}) do not "
                   f"fit the model's context of {context} (max_position_embeddings)")
    # every answer token but the last is fed back, so context - used + 1 of them fit
    return min(max_new, context - past - new_positions + 1)


def decode_answer(ids, tokenizer, stops):
    """The answer's text: its ids up to the first stop token (rows that stopped repeat it), decoded, trimmed."""
    ids = list(ids)
    end = next((k for k, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def greedy_answers(model, tokenizer, prompts, pixel_values=None, max_new_tokens=256, culprit="a prompt"):
    """One batch: the greedy answer text to each prompt (token-id lists, with one image placeholder each when
    pixel_values holds their images, in order; none otherwise). Rows of different lengths are left-padded by
    generate_stream, and each answers as it would alone."""
    longest = max(map(len, prompts)) - 1 + (model.num_image_tokens if pixel_values is not None else 1)
    budget = answer_budget(model, 0, longest, max_new_tokens, culprit)
    stops = stop_token_ids(tokenizer, model.config.template)
    generated = model.generate(prompts, pixel_values, max_new_tokens=budget, stop_token_ids=stops).tolist()  # (B, N)
    return [decode_answer(ids, tokenizer, stops) for ids in generated]


def answer_batches(model, tokenizer, questions, images, batch_size, max_new_tokens):
    """Greedy answers to one question about each image (the image first, as evaluations ask), batch by batch: yields
    each batch's answer texts. The answer length is budgeted for the longest prompt of all."""
    prompts = [question_ids(question, tokenizer, model.config.template) for question in questions]
    budget = answer_budget(model, 0, max(map(len, prompts)) - 1 + model.num_image_tokens, max_new_tokens,
                           "an eval question")
    for start in range(0, len(prompts), batch_size):
        yield greedy_answers(model, tokenizer, prompts[start:start + batch_size],
                             to_pixels(model, images[start:start + batch_size]), budget, "an eval question")
