"""
Train LLaVA in its two stages (Liu et al. 2023, Sec. 4.2), on one CPU or on many GPUs.

    stage 1, feature alignment: g (vision) and the LLM frozen, only W trains, on image-caption pairs
    stage 2, end-to-end:        W and the LLM train on instruction conversations, g stays frozen
    both maximize p(X_a | X_v, X_instruct) = prod_i p(x_i | X_v, X_instruct,<i, X_a,<i) over answer tokens only

The shipped tiny default (the tiny bases in bases/ and the shapes world, generated into cache/world on first use):

    python train.py --stage 1                              # -> out/stage1/ckpt.pt (W, aligned on the bases)
    python train.py --stage 2 --init out/stage1            # -> out/stage2/ckpt.pt (W and the LLM)
    python train.py --stage 2 --resume                     # go on from out/stage2/ckpt.pt where it stopped
    python train.py --stage 2 --overwrite true             # train again over out/stage2/ckpt.pt (else refused)
    python train.py --stage 2 --out_dir out/stage2-alone   # stage 2 alone, W from scratch (the paper's ablation)
    python train.py --stage 2 --init out/stage1/ckpt.pt --lora_r 16 --out_dir out/stage2-lora  # LoRA: W and adapters
    python train.py --stage 1 --max_steps 5 --log_interval 1 --out_dir /tmp/s1   # any TrainConfig field
    python train.py --stage 1 --dtype bfloat16 --threads 1 # bf16 autocast on a CPU with AVX512-bf16/AMX (1.5-1.8x
                                                           # faster here); 1 thread when others load the cores
    python train.py --help                                 # every field explained, with its default

Every field of TrainConfig (below) is a flag, `--key value` or `--key=value`, explained in the comment beside it;
STAGE_DEFAULTS fills the fields whose recipe differs between stages, then the flags override. A run never starts over
an existing out_dir/ckpt.pt unless told: --resume continues it, --overwrite true replaces it. Many processes, one per
GPU (or CPU socket): the global batch stays the same, each process takes its fixed slice of it, and gradient
accumulation makes up the rest.

    torchrun --standalone --nproc_per_node=8 train.py --stage 1                  # DDP (NCCL on GPU, gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train.py --stage 2 --fsdp true      # shard the LLM's blocks (FSDP)

The real recipe, LLaVA-1.5-7B on one 8-GPU node (HF checkpoint directories and the LLaVA data, downloaded by you):

    torchrun --standalone --nproc_per_node=8 train.py --stage 1 \\
        --vision_path clip-vit-large-patch14-336 --llm_path vicuna-7b-v1.5 --projector mlp2x_gelu \\
        --data_path LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --image_folder LLaVA-Pretrain/images \\
        --template plain --learning_rate 1e-3 --global_batch_size 256 --batch_size 32 --epochs 1 \\
        --gradient_checkpointing true --eval_interval 0 --out_dir out/llava15-7b-stage1
    torchrun --standalone --nproc_per_node=8 train.py --stage 2 --init out/llava15-7b-stage1/ckpt.pt \\
        --data_path llava_v1_5_mix665k.json --image_folder playground/data --template vicuna_v1 --image_aspect pad \\
        --learning_rate 2e-5 --global_batch_size 128 --batch_size 16 --epochs 1 \\
        --gradient_checkpointing true --fsdp true --eval_interval 0 --out_dir out/llava15-7b-stage2

Recipe for real checkpoints (the paper's and LLaVA-1.5's scripts): AdamW, weight decay 0 (never on biases and norms),
3% warmup then cosine to 0, bf16 autocast, TF32, max length 2048, gradient checkpointing.
    stage 1: lr 2e-3 with a linear W (LLaVA, CC-595K) or 1e-3 with mlp2x_gelu (LLaVA-1.5, LCS-558K, template plain);
             global batch 128 (LLaVA) or 256 (LLaVA-1.5); 1 epoch
    stage 2: lr 2e-5; global batch 128; 3 epochs (LLaVA, Instruct-158K) or 1 (LLaVA-1.5, mix665k, image_aspect pad)

Exactness: every optimizer step consumes one global batch, a function of (seed, epoch, step) alone, and its loss is the
sum of the per-token losses over every supervised token of that global batch divided by their number, so 1 process
with 2 micro-batches and 2 processes with 1 each take the same step (tests/test_train.py checks it with torchrun);
LoRA's dropout draws its masks per process, so with --lora_dropout above 0 they agree in distribution only.
Checkpoints (written atomically) hold everything a resumed run needs to take the same steps an uninterrupted run takes.
"""
import argparse
import contextlib
import difflib
import inspect
import io
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
import typing
import zipfile
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

import sample
import world
from data import TEMPLATES, Collator, LLaVADataset, ModalityLengthGroupedSampler, image_settings, load_tokenizer
from llama import Block, lora_targets
from tinyllava import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLLaVA, TinyLLaVAConfig, base_fingerprints, fingerprint,
                       resolve)
from weights import safetensors_files


# Every field is a flag, explained here and only here: `python train.py --help` prints these comments (see
# explained_fields). A comment line level with the fields starts a group ("name: note"), a field's own comment explains
# it, and deeper comment lines under it go on explaining it; a new flag is a new field with its comment, nothing more.
# The None defaults are set per stage by STAGE_DEFAULTS.
@dataclass
class TrainConfig:
    # model: what trains, and from which weights it starts
    stage: int = 1  # 1: feature alignment (only W trains); 2: end-to-end (W and the LLM train); g never trains
    init: str = ""  # stage 2: the checkpoint to start from, a ckpt.pt or its directory: from a stage-1 one W, from a
                    # stage-2 one W and the LLM; or an HF LLaVA directory (a published LLaVA to fine-tune); it also
                    # sets the five fields below unless they are given ("": a fresh W, the paper's ablation without
                    # stage 1)
    vision_path: str = "bases/clip"  # HF CLIP (or CLIP vision) checkpoint directory: the frozen vision tower g
    llm_path: str = "bases/llama"  # HF LLaMA-family checkpoint directory, with its tokenizer.json
    projector: str = "mlp2x_gelu"  # W: linear (LLaVA) or mlp2x_gelu (LLaVA-1.5)
    vision_feature_layer: int = -2  # the layer of g whose outputs W reads (-2: the penultimate, as the paper)
    keep_class_token: bool = False  # give W the class token too (LLaVA gives it the patch tokens only)
    # data: LLaVA JSON records and their images; with no --data_path, the shapes world (generated into cache/world)
    data_path: str = ""  # the training LLaVA JSON file ("": the world's stage1.json or stage2.json)
    image_folder: str = ""  # the folder the records' "image" paths are relative to ("": the data file's folder)
    val_data_path: str = ""  # held-out LLaVA JSON for the held-out loss ("": the world's, or none with --data_path)
    template: str | None = None  # the prompt format: plain (stage 1: image, then caption) or vicuna_v1 (stage 2:
                                 # the system prompt, then USER: / ASSISTANT: turns)
    image_aspect: str = "crop"  # non-square images: crop (CLIP's processor) or pad to a square (LLaVA-1.5 stage 2)
    max_length: int = 2048  # most tokens per sample, the image's included (capped at the LLM's context)
    image_first_prob: float = 0.5  # paper Eq. 2: how often the image goes before the first question, not after it
    max_bad_fraction: float = 0.01  # stop once more than this share of the records is bad (malformed, an
                                    # unreadable image, or no answer left within max_length); each is reported
                                    # and skipped
    group_by_modality_length: bool = False  # LLaVA's length-grouped batches: faster, but not the exact order
    # optimization
    epochs: int | None = None  # passes over the data; they set the schedule's length unless --max_steps does
    max_steps: int = 0  # the schedule's length in optimizer steps (0: epochs x steps per epoch). Warmup and cosine
                        # shrink to fit it, so a short run is a whole small schedule; to stop a run early on its
                        # full schedule use --stop_at_step instead. Stage 2's 300 are for the shapes world: with
                        # --data_path or --epochs the epochs set the length
    global_batch_size: int | None = None  # samples per optimizer step, over all processes
    batch_size: int | None = None  # samples per forward pass in one process; gradient accumulation makes up the rest
                                   # of the global batch, so the steps do not change with it
    learning_rate: float | None = None  # the peak learning rate, reached after warmup
    min_lr: float = 0.0  # where the cosine ends, after the last step
    warmup_ratio: float = 0.03  # share of the steps spent warming up linearly from 0
    weight_decay: float = 0.0  # AdamW's, on matrices only (never on biases and norms)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.999  # AdamW's second-moment decay
    adam_eps: float = 1e-8  # AdamW's epsilon, added to the update's denominator
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    seed: int = 0  # W's initialization, the data order, the image placement draws
    # progress and checkpoints
    out_dir: str | None = None  # where ckpt.pt and log.jsonl are written (relative to where you run train.py)
    resume: bool = False  # continue <out_dir>/ckpt.pt where it stopped: weights, optimizer, schedule, data position
                          # and random states, so the steps are those of an uninterrupted run
    overwrite: bool = False  # start a new run over an existing <out_dir>/ckpt.pt, replacing it at the first
                             # checkpoint (without it, or --resume, the run refuses to start)
    log_interval: int = 10  # steps between progress lines (and log.jsonl records)
    eval_interval: int = 100  # steps between held-out losses (0: only at the end)
    eval_samples: int = 256  # held-out samples per evaluation, the first ones of the file (0: all)
    eval_questions: int = 0  # stage 2 on the shapes world: also answer this many held-out eval.json questions (every
                             # type in turn) greedily at step 0 and each eval, and log their exact-match accuracy
                             # (sample.py --plot draws it); 0: none
    checkpoint_interval: int = 200  # steps between checkpoints (0: only at the end)
    stop_at_step: int = 0  # end after this step with a checkpoint, the schedule unchanged; --resume goes on from
                           # there (0: run to the end)
    # system
    device: str = "auto"  # auto (CUDA if there is one), cuda or cpu
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 on CPU), bfloat16 (autocast) or float32
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False  # recompute each LLM block in the backward pass to save memory
    fsdp: bool = False  # under torchrun: shard the LLM's blocks with FSDP instead of replicating them with DDP
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    pin_memory: bool = True  # page-locked batches for faster copies to the GPU (CUDA only)
    threads: int = 0  # torch CPU threads per process (0: torch's default; 1 when others share the cores)
    peak_flops: float = 0.0  # the accelerator's peak FLOP/s for MFU (0: looked up from the GPU's name)
    # LoRA: stage 2 with the LLM frozen and low-rank adapters on its blocks' linear layers (Hu et al. 2021)
    lora_r: int = 0  # the adapters' rank (0: no LoRA, the whole LLM trains); each target computes W x + (lora_alpha /
                     # lora_r) B A x and only A, B and W train; checkpoints hold those and name the base they sit on.
                     # LLaVA-1.5's finetune_lora.sh: r 128, alpha 256, dropout 0.05, lr 2e-4, projector lr 2e-5
    lora_alpha: float = 0.0  # the adapters' scale is lora_alpha / lora_r (0: twice lora_r, LLaVA-1.5's ratio)
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_targets: str = "q,k,v,o,gate,up,down"  # the linear layers of every block that get adapters
    projector_lr: float = 0.0  # W's peak learning rate, same schedule (LLaVA's mm_projector_lr; 0: --learning_rate)


# Where the recipe differs between the stages; values for the shipped tiny default (real-scale values: see above).
STAGE_DEFAULTS = {
    1: dict(out_dir="out/stage1", template="plain", learning_rate=1e-3, epochs=1, global_batch_size=32,
            batch_size=32),
    2: dict(out_dir="out/stage2", template="vicuna_v1", learning_rate=2e-4, epochs=1, max_steps=300,
            global_batch_size=32, batch_size=32),  # 300 steps: a quarter of an epoch of the world's mix
}
# taken from the --init checkpoint unless given
MODEL_FIELDS = ("vision_path", "llm_path", "projector", "vision_feature_layer", "keep_class_token")
# may differ on --resume without changing which steps are taken (beyond float rounding)
RESUMABLE_CHANGES = {"resume", "overwrite", "out_dir", "log_interval", "eval_interval", "eval_samples",
                     "eval_questions", "checkpoint_interval", "stop_at_step", "batch_size", "device", "dtype",
                     "compile", "gradient_checkpointing", "fsdp", "num_workers", "pin_memory", "threads", "peak_flops"}
# dense bf16 tensor-core peaks (FLOP/s) for MFU, by GPU name; the first match wins
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12))


def help_format(prog):
    """Both scripts' help: flags in columns, wrapped to the terminal (120 columns in a pipe), the text as written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34,
                                                width=min(120, shutil.get_terminal_size((120, 24)).columns))


class Stop(Exception):
    """A reason to end the run early, told to the user in one message; the process exits non-zero."""

# ----------------------------------------------------------------------------------------------------------------------
# The command line: --key value or --key=value for every TrainConfig field


def parse_flags(argv):
    """Flags -> {field: value of the field's type}. A bool flag alone means true. Unknown flags and bad values fail."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise Stop(f"unexpected argument {arg!r}: every option is --key value or --key=value")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            raise Stop(f"unknown flag --{key}" + (f" (did you mean --{close[0]}?)" if close else "")
                       + "; the flags are TrainConfig's fields, see python train.py --help")
        kind = field_kind(types[key])
        if not has_value:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if kind is bool and (following is None or following.startswith("--")):
                value = "true"
            elif following is None or following.startswith("--"):
                raise Stop(f"--{key} needs a value ({kind.__name__})")
            else:
                value, i = following, i + 1
        overrides[key] = parse_value(key, kind, value)
        i += 1
    return overrides


def field_kind(annotation):
    """A field's value type: int for `int`, str for `str | None`."""
    return next(t for t in typing.get_args(annotation) or (annotation,) if t is not type(None))


def parse_value(key, kind, text):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise Stop(f"--{key} expects true/false/1/0, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise Stop(f"--{key} expects {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}") from None


def find_checkpoint(path, what):
    """The ckpt.pt a flag names, given as the file or its directory, found as sample.py finds one: as given (relative
    to the working directory), else relative to this repository (tinyllava.resolve), so out/stage1 works anywhere."""
    found = resolve(path)
    file = os.path.join(found, "ckpt.pt") if os.path.isdir(found) else found
    if not os.path.isfile(file):
        raise Stop(f"{what} {path}: " + ("no ckpt.pt in this directory" if os.path.isdir(found) else
                                         "no such file or directory"))
    return file


def init_location(path):
    """--init's checkpoint as found on disk: an HF LLaVA directory (one with a config.json), else a ckpt.pt."""
    found = resolve(path)
    return found if os.path.isfile(os.path.join(found, "config.json")) else find_checkpoint(path, "--init")


def load_init(path):
    """--init: one of our checkpoints, or an HF LLaVA directory read as a checkpoint that trained nothing yet."""
    if os.path.isdir(path):
        try:
            model_config = TinyLLaVA.hf_config(path)
        except ValueError as error:
            raise Stop(f"--init {path}: {error}") from None
        return dict(config=asdict(model_config), bases=base_fingerprints(model_config), model={}, hf=True)
    return load_checkpoint(path, "--init")


def load_checkpoint(file, what, mmap=False):
    """One of our ckpt.pt files, without pickle (mmap: tensors are read from the file only when used)."""
    if not os.path.isfile(file):
        raise Stop(f"{what}: {file} does not exist")
    not_ours = f"{what} {file}: not a tinyllava checkpoint"
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive
        raise Stop(f"{not_ours} (not a file torch.save wrote)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise Stop(f"{not_ours} ({str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or not {"config", "bases", "model"} <= checkpoint.keys():
        raise Stop(f"{not_ours} (no config, bases and model entries)")
    return checkpoint


def checkpoint_progress(checkpoint):
    """(stage, step, total steps) of the run that wrote a checkpoint, for messages."""
    saved = checkpoint.get("train_config", {})
    total = saved.get("max_steps") or saved.get("epochs", 0) * checkpoint.get("steps_per_epoch", 0)
    return saved.get("stage"), checkpoint.get("step", 0), total


def refuse_overwrite(path):
    """Stop a new run that would replace an existing checkpoint, saying what it holds and which flag to use."""
    try:
        stage, step, total = checkpoint_progress(load_checkpoint(path, "--out_dir", mmap=True))
    except Stop:
        raise Stop(f"{path} exists (not a tinyllava checkpoint): --overwrite true replaces it, or choose another "
                   "--out_dir") from None
    if step >= total:
        raise Stop(f"{path} holds a finished stage-{stage} run ({step} of {total} steps): --overwrite true trains a "
                   "new one over it, or choose another --out_dir")
    raise Stop(f"{path} holds a stage-{stage} run stopped at step {step} of {total}: --resume continues it, "
               "--overwrite true starts over and replaces it, or choose another --out_dir")


def make_config(argv):
    """(TrainConfig, the resumed checkpoint or None, the --init checkpoint or None) from the command line: stage
    defaults, then a resumed run's own config, then the --init checkpoint's model fields, then the flags."""
    overrides = parse_flags(argv)
    stage = overrides.get("stage", TrainConfig.stage)
    if stage not in STAGE_DEFAULTS:
        raise Stop(f"--stage must be 1 or 2, got {stage}")
    for key in (key for key in overrides if key.startswith("lora_")):
        if stage == 1:
            raise Stop(f"--{key}: LoRA adapts the LLM, which stage 1 keeps frozen (only W trains); use it in stage 2")
        if key != "lora_r" and not overrides.get("lora_r"):
            raise Stop(f"--{key} does nothing without --lora_r (the adapters' rank; 0 turns LoRA off)")
    defaults = dict(STAGE_DEFAULTS[stage])
    if "epochs" in overrides or overrides.get("data_path"):  # the default step count is the shapes world's: on
        defaults.pop("max_steps", None)                      # your data, or with --epochs, the epochs set the length
    config = TrainConfig(**{**defaults, **overrides})
    path = os.path.join(config.out_dir, "ckpt.pt")
    if config.resume and config.overwrite:
        raise Stop(f"--resume continues {path} and --overwrite starts over: give one of them")
    resumed = init = None
    if config.resume:
        resumed = load_checkpoint(path, "--resume")
        saved = resumed["train_config"]
        changed = [f"--{key} ({saved[key]!r} in the checkpoint, {value!r} given)" for key, value in overrides.items()
                   if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value]
        if changed:
            raise Stop(f"--resume continues {path} with the recipe it started with, but {', '.join(changed)}; "
                       "start a new run (with --init) to change the recipe")
        config = TrainConfig(**{**saved, "stop_at_step": TrainConfig.stop_at_step, **overrides})  # stops once
    elif os.path.exists(path) and not config.overwrite:
        refuse_overwrite(path)
    if config.init and config.stage == 2 and not config.resume:
        init = load_init(init_location(config.init))
        for key in MODEL_FIELDS:
            if key not in overrides:
                setattr(config, key, init["config"][key])
    check_config(config)
    return config, resumed, init


def check_config(config):
    choices = dict(projector=("linear", "mlp2x_gelu"), template=tuple(TEMPLATES), image_aspect=("crop", "pad"),
                   device=("auto", "cuda", "cpu"), dtype=("auto", "bfloat16", "float32"))
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise Stop(f"--{key} must be one of {', '.join(allowed)}; got {getattr(config, key)!r}")
    for key in ("epochs", "global_batch_size", "batch_size", "max_length", "log_interval"):
        if getattr(config, key) < 1:
            raise Stop(f"--{key} must be at least 1, got {getattr(config, key)}")
    for key in ("max_steps", "eval_interval", "eval_samples", "eval_questions", "checkpoint_interval", "stop_at_step",
                "num_workers", "threads", "grad_clip", "weight_decay", "min_lr"):
        if getattr(config, key) < 0:
            raise Stop(f"--{key} must be at least 0, got {getattr(config, key)}")
    if config.eval_questions and (config.stage != 2 or config.data_path):  # said before any data loads
        raise Stop(f"--eval_questions {config.eval_questions}: the held-out accuracy is measured in stage 2 on the "
                   "shapes world (no --data_path), in one process")
    if not 0 < config.learning_rate >= config.min_lr:
        raise Stop(f"--learning_rate must be positive and at least --min_lr; got {config.learning_rate}, "
                   f"--min_lr {config.min_lr}")
    if not 0 <= config.warmup_ratio < 1:
        raise Stop(f"--warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.stage == 1 and config.init:
        raise Stop("--init is for stage 2 (a checkpoint to start from); stage 1 starts W from scratch")
    for key in ("lora_r", "lora_alpha", "projector_lr"):
        if getattr(config, key) < 0:
            raise Stop(f"--{key} must be at least 0, got {getattr(config, key)}")
    if not 0 <= config.lora_dropout < 1:
        raise Stop(f"--lora_dropout must be in [0, 1), got {config.lora_dropout}")
    try:
        lora_targets(config.lora_targets)
    except ValueError as error:
        raise Stop(f"--lora_targets {config.lora_targets!r}: {error}") from None


def explained_fields(config_class=TrainConfig):
    """[(group, note, [(field, explanation)])] in the dataclass's order, read from its source: the one place where the
    flags are explained (the rules are in the comment above TrainConfig; make_bases.Settings follows them too)."""
    lines = inspect.getsource(config_class).splitlines()
    groups = []
    for line in lines[next(k for k, line in enumerate(lines) if line.startswith("class ")) + 1:]:
        code, _, comment = line.partition("#")
        comment = comment.strip()
        if code.strip():  # "    name: type = default  # explanation"
            groups[-1][2].append([code.split(":")[0].strip(), comment])
        elif line.startswith("    # "):  # level with the fields: a new group
            name, _, note = comment.partition(": ")
            groups.append((name, note, []))
        elif comment:  # deeper: the explanation above goes on
            groups[-1][2][-1][1] += " " + comment
    return groups


def default_text(name):
    """A field's default as it is typed on the command line; per stage where STAGE_DEFAULTS sets it."""
    per_stage = {stage: defaults.get(name, getattr(TrainConfig, name)) for stage, defaults in STAGE_DEFAULTS.items()}
    if not any(name in defaults for defaults in STAGE_DEFAULTS.values()):
        value = getattr(TrainConfig, name)
        return str(value).lower() if isinstance(value, bool) else '""' if value == "" else str(value)
    if len(set(per_stage.values())) == 1:
        return f"{per_stage[1]} in both stages"
    return ", ".join(f"stage {stage}: {value}" for stage, value in per_stage.items())


def help_text():
    """Usage, every field under its group with its explanation and default, then the docstring (laid out by argparse,
    as sample.py's help is; parse_flags reads the flags)."""
    parser = argparse.ArgumentParser(
        prog="train.py", epilog=__doc__.strip(), add_help=False,
        usage="python train.py [--field value ...]   (or --field=value; --field-name spells --field_name too; a "
              "true/false field alone means true)", formatter_class=help_format)
    types = {f.name: f.type for f in fields(TrainConfig)}
    for name, note, explained in explained_fields():
        group = parser.add_argument_group(name, note or None)
        for field_name, explanation in explained:
            group.add_argument(f"--{field_name}", metavar=field_kind(types[field_name]).__name__.upper(),
                               help=f"{explanation} (default: {default_text(field_name)})".replace("%", "%%"))
    return parser.format_help()


# ----------------------------------------------------------------------------------------------------------------------
# Processes, devices and precision


@dataclass
class Runtime:
    """Where this process trains: its device, its autocast dtype (None: float32) and its place among the processes."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # under torchrun: a process group exists and gradients are averaged over it
    fsdp: bool = False
    pad_token_id: int = 0

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def start_processes(config):
    """Join the process group when run by torchrun (NCCL on GPUs, gloo on CPUs); pick the device and precision."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise Stop("--device cuda, but torch sees no CUDA device")
    runtime = Runtime(distributed="RANK" in os.environ)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True  # and TF32 convolutions (the patch embedding)
    if runtime.distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        runtime.rank, runtime.world_size = dist.get_rank(), dist.get_world_size()
    elif config.fsdp:
        raise Stop("--fsdp shards over processes: run it under torchrun")
    runtime.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if config.dtype == "bfloat16" or (config.dtype == "auto" and cuda):
        runtime.autocast_dtype = torch.bfloat16
    runtime.fsdp = config.fsdp
    if config.threads:
        torch.set_num_threads(config.threads)
    return runtime


def all_reduce_sum(values, runtime):
    """Sum a float64 vector over the processes (a no-op for one process)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if runtime.distributed:
        tensor = tensor.to(runtime.device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()

# ----------------------------------------------------------------------------------------------------------------------
# Data: the sample order of every step, as a function of (seed, epoch) alone


def world_files(stage):
    """The shapes world's (train, held-out) files for a stage, generated on first use."""
    directory = world.ensure_world()
    return str(directory / f"stage{stage}.json"), str(directory / f"val_stage{stage}.json")


def epoch_plan(lengths, config, epoch, grad_accum, runtime):
    """
    This process's micro-batches, step by step, for one epoch: [[indices] * grad_accum] * steps per epoch.

    Exact order (default): a permutation drawn from (seed, epoch); each step's global batch is the next
    global_batch_size samples of it, cut into world_size contiguous shares, rank r taking share r, cut in turn into
    grad_accum micro-batches. Any (world_size, batch_size) with the same global batch sees the same samples per step.
    The last step of an epoch may be short (its micro-batches short or empty). group_by_modality_length: LLaVA's
    length-grouped order (data.ModalityLengthGroupedSampler), grad_accum of its batches per step.
    """
    if config.group_by_modality_length:
        sampler = ModalityLengthGroupedSampler(lengths, config.batch_size, config.seed, runtime.world_size,
                                               runtime.rank)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        return [batches[start:start + grad_accum] for start in range(0, len(batches), grad_accum)]
    order = np.random.default_rng([config.seed, epoch]).permutation(len(lengths))
    share = config.batch_size * grad_accum
    plan = []
    for start in range(0, len(order), config.global_batch_size):
        mine = order[start:start + config.global_batch_size][runtime.rank * share:(runtime.rank + 1) * share]
        plan.append([mine[k * config.batch_size:(k + 1) * config.batch_size].tolist() for k in range(grad_accum)])
    return plan


def loader(dataset, batches, collator, config, runtime):
    # its own generator: a DataLoader draws a seed from torch's global one at every iter(), which would shift the LoRA
    # dropout masks of a resumed run (it makes an iterator mid-epoch, the uninterrupted run does not)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collator,
                                       num_workers=config.num_workers, generator=torch.Generator().manual_seed(
                                           config.seed), pin_memory=config.pin_memory and runtime.device.type == "cuda")


def supervised_tokens(batch):
    """How many tokens of a collated batch carry loss: the model predicts labels[:, 1:] (the BOS is never a target)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sequence_lengths(batch, num_image_tokens):
    """Each sample's length in the model: its text tokens, its image placeholder counted as num_image_tokens."""
    images = (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1)
    return (batch["attention_mask"].sum(1) + (num_image_tokens - 1) * images).tolist()


def model_inputs(batch, runtime):
    """(input_ids, pixel_values, labels) on the device. An empty batch (every sample skipped) becomes a two-token
    stand-in the caller weighs 0: every process still runs the same forward and backward passes, as DDP needs."""
    if batch["input_ids"].numel() == 0:
        pad = runtime.pad_token_id
        return (torch.tensor([[pad, pad]], device=runtime.device), None,
                torch.tensor([[IGNORE_INDEX, pad]], device=runtime.device))
    pixel_values = batch["pixel_values"]
    return (batch["input_ids"].to(runtime.device, non_blocking=True),
            None if pixel_values is None else pixel_values.to(runtime.device, non_blocking=True),
            batch["labels"].to(runtime.device, non_blocking=True))

# ----------------------------------------------------------------------------------------------------------------------
# The recipe: AdamW, warmup then cosine, one step over a global batch


def make_optimizer(model, config, runtime):
    """AdamW over the trainable parameters only (W, and the LLM or its LoRA adapters: the frozen weights get neither
    gradients nor optimizer state), weight decay on matrices only: no decay on biases and norm weights (all 1-D
    parameters). With --projector_lr, W's groups peak there instead (lr_scale), on the same schedule. Call it before
    FSDP wraps the model: it flattens the parameters it shards."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    by_scale = {1.0: [p for name, p in trainable]}
    if config.projector_lr and config.projector_lr != config.learning_rate:
        by_scale = {1.0: [p for name, p in trainable if not name.startswith("projector.")],
                    config.projector_lr / config.learning_rate: [p for name, p in trainable
                                                                 if name.startswith("projector.")]}
    groups = [group for scale, params in by_scale.items() for group in (
        dict(params=[p for p in params if p.ndim >= 2], weight_decay=config.weight_decay, lr_scale=scale),
        dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0, lr_scale=scale)) if group["params"]]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=config.adam_eps,
                             fused=runtime.device.type == "cuda")


def learning_rate(step, total_steps, config):
    """The learning rate of optimizer step `step` (0-based): linear warmup over warmup_ratio of the steps, then a
    cosine from learning_rate down to min_lr, reached after the last step."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1 over the steps after warmup
    return config.min_lr + 0.5 * (config.learning_rate - config.min_lr) * (1 + math.cos(math.pi * progress))


def train_step(model, optimizer, micro_batches, lr, runtime, grad_clip=1.0):
    """
    One optimizer step on this process's micro-batches of one global batch (collated batches, CPU tensors).

    The loss is sum over the global batch's supervised tokens of -log p(token) / their number, however the global
    batch is split over processes and micro-batches: each micro-batch's mean loss is weighed by its token count over
    the global count (all-reduced once), and by world_size, which DDP's and FSDP's gradient averaging divide away.
    Returns dict(loss, grad_norm, and over all processes: tokens, supervised tokens, skipped samples, FLOPs (see
    step_flops)); loss None when the global batch has no supervised token (no update); a non-finite loss or gradient
    is returned without being applied.
    """
    raw = unwrap(model)
    supervised = [supervised_tokens(batch) for batch in micro_batches]
    lengths = [length for batch in micro_batches for length in sequence_lengths(batch, raw.num_image_tokens)]
    images = sum(int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum()) for batch in micro_batches)
    counts = all_reduce_sum([sum(supervised), sum(len(b["skipped"]) for b in micro_batches), sum(lengths),
                             step_flops(raw, lengths, images)], runtime)
    global_supervised = counts[0]
    stats = dict(loss=None, grad_norm=None, supervised=int(counts[0]), skipped=int(counts[1]), tokens=int(counts[2]),
                 flops=counts[3])
    if global_supervised == 0:
        return stats
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    for k, batch in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        # gradients are averaged over the processes once, after the last micro-batch
        with contextlib.nullcontext() if last or not runtime.distributed else model.no_sync():
            input_ids, pixel_values, labels = model_inputs(batch, runtime)
            with runtime.autocast():
                _, loss = model(input_ids, pixel_values, labels)  # mean over this micro-batch's supervised tokens
            (loss * (supervised[k] * runtime.world_size / global_supervised)).backward()
            loss_sum += loss.detach().double() * supervised[k]
    stats["loss"] = all_reduce_sum([loss_sum.item()], runtime)[0] / global_supervised
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: only measure the norm
    if runtime.fsdp:
        norm = model.clip_grad_norm_(max_norm)  # the norm of the whole gradient, over every shard
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    stats["grad_norm"] = float(norm)
    if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints from before --projector_lr have no lr_scale
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def evaluate(model, batches, runtime):
    """The held-out loss: the mean over all supervised tokens of `batches` (this process's share) and the others'."""
    raw = unwrap(model)
    raw.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        input_ids, pixel_values, labels = model_inputs(batch, runtime)
        with runtime.autocast():
            _, loss = model(input_ids, pixel_values, labels)
        n = supervised_tokens(batch)
        loss_sum, count = loss_sum + (loss.double().item() * n if n else 0.0), count + n
    raw.train()
    loss_sum, count = all_reduce_sum([loss_sum, count], runtime)
    return loss_sum / max(count, 1)


def held_out_questions(config, runtime):
    """The first eval_questions questions of the world's eval.json and their images, or None when not asked."""
    if not config.eval_questions:
        return None
    if runtime.distributed:
        raise Stop(f"--eval_questions {config.eval_questions}: the held-out accuracy is measured in one process")
    directory = os.path.dirname(world_files(2)[0])
    try:
        items = sample.eval_items(directory, config.eval_questions)
        images = [sample.load_image(os.path.join(directory, item["image"])) for item in items]
    except (sample.SampleError, sample.ImageError) as error:
        raise Stop(f"--eval_questions: {error}") from None
    return items, images


@torch.no_grad()
def question_accuracy(model, tokenizer, questions, config):
    """Greedy answers to the held-out questions, image first (as sample.py --eval asks them): exact-match share."""
    items, images = questions
    model.eval()
    accuracy = sample.evaluate(model, tokenizer, items, images, config.image_aspect, config.batch_size,
                               sample.max_new_tokens, out=io.StringIO(), progress=False)
    model.train()
    return accuracy


def unwrap(model):
    """The TinyLLaVA inside torch.compile, DDP and FSDP wrappers."""
    for attribute in ("_orig_mod", "module", "_fsdp_wrapped_module"):
        if hasattr(model, attribute) and isinstance(getattr(model, attribute), torch.nn.Module):
            return unwrap(getattr(model, attribute))
    return model


def step_flops(model, lengths, num_images):
    """
    Matmul FLOPs of one training forward and backward pass over sequences of `lengths` (image tokens included) with
    `num_images` images, counted as in the PaLM paper: 2 per weight per token forward; backward 2 more for the
    activation gradients and 2 for the weight gradients of weights that train (the frozen LLM of stage 1 still
    passes gradients back to W, and so does a LoRA run's, whose adapters count 6 per weight); attention 4·d·L per
    token per layer forward (q·kᵀ and attention·v over all L positions, the causal half not discounted), twice that
    backward; the frozen vision tower forward only.
    """
    llm, vision = model.llm.config, model.vision.config
    attention_width = llm.num_attention_heads * llm.head_dim
    llm_weights = llm.num_hidden_layers * (
        llm.hidden_size * (attention_width + 2 * llm.num_key_value_heads * llm.head_dim)  # qkv
        + attention_width * llm.hidden_size + 3 * llm.hidden_size * llm.intermediate_size  # out, SwiGLU
    ) + llm.hidden_size * llm.vocab_size  # the output head
    llm_factor = 6 if any(p.requires_grad for name, p in model.llm.named_parameters() if ".lora_" not in name) else 4
    adapter_weights = sum(p.numel() for name, p in model.llm.named_parameters() if ".lora_" in name)
    tokens, squares = sum(lengths), sum(length ** 2 for length in lengths)
    flops = (llm_factor * llm_weights + 6 * adapter_weights) * tokens \
        + 3 * 4 * attention_width * llm.num_hidden_layers * squares
    projector_weights = vision.hidden_size * llm.hidden_size + (
        llm.hidden_size ** 2 if model.config.projector == "mlp2x_gelu" else 0)
    flops += 6 * projector_weights * num_images * model.num_image_tokens
    layers = len(model.vision.layers) + 1 + model.config.vision_feature_layer if model.config.vision_feature_layer < 0 \
        else model.config.vision_feature_layer  # the blocks the features need
    positions = vision.num_patches + 1
    vision_weights = 4 * vision.hidden_size ** 2 + 2 * vision.hidden_size * vision.intermediate_size
    patch_weights = 3 * vision.patch_size ** 2 * vision.hidden_size
    flops += num_images * (2 * patch_weights * vision.num_patches + layers * positions * (
        2 * vision_weights + 4 * vision.hidden_size * positions))
    return flops


def peak_flops(config, runtime):
    if config.peak_flops or runtime.device.type != "cuda":
        return config.peak_flops
    name = torch.cuda.get_device_name(runtime.device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), 0.0)

# ----------------------------------------------------------------------------------------------------------------------
# Model, wrappers and checkpoints


def check_bases(checkpoint, source, config):
    """Refuse a checkpoint whose W was aligned on other towers than the ones this run is given (by content), or that
    sits on a base (a LoRA run's) which changed since."""
    base = checkpoint["config"].get("base", "")
    if base and not os.path.exists(resolve(base)):
        raise Stop(f"{source} sits on {base}, which is not there any more")
    if base and checkpoint["bases"].get("base") != fingerprint(resolve(base)):
        raise Stop(f"{source} sits on {base}, which changed since (by content): its trained weights only fit the "
                   "base they were trained on")
    here = {"vision": fingerprint(resolve(config.vision_path)), "llm": fingerprint(resolve(config.llm_path))}
    different = [name for name in ("vision", "llm") if checkpoint["bases"].get(name) != here[name]]
    if different:
        was = checkpoint["config"]
        raise Stop(f"{source} was aligned on vision tower {was['vision_path']} and LLM {was['llm_path']}, but this "
                   f"run is asked to train vision tower {config.vision_path} and LLM {config.llm_path}: the "
                   f"{' and the '.join('LLM' if d == 'llm' else 'vision tower' for d in different)} "
                   f"{'differs' if len(different) == 1 else 'differ'} (by content). W only fits the towers it was aligned on: run stage 1 on these bases, or leave out "
                   "--init to start W fresh")


def run_base(config, init, init_path, resumed):
    """What the run sits on beyond the towers at vision_path and llm_path, loaded whole ("": nothing). A resumed run
    keeps its own. A new one sits on its --init when that is an HF LLaVA directory, or a checkpoint that sits on a
    base itself or holds LoRA adapters, or, for a LoRA run, holds a trained LLM (stage 2) that LoRA keeps frozen.
    Otherwise the --init's trained tensors (W; W and the LLM) are simply put over the towers and trained on."""
    if resumed is not None:
        return resumed["config"].get("base", "")
    if init is None:
        return ""
    trained = init["model"].keys()
    if (init.get("hf") or init["config"].get("base") or any(".lora_" in name for name in trained)
            or (config.lora_r and any(name.startswith("llm.") for name in trained))):
        return init_path
    return ""


def build_model(config, runtime, weights=None, source="", base="", with_adapters=True):
    """TinyLLaVA from the bases (or whole from `base`), with LoRA adapters if asked, set for the stage, with trained
    weights (W, or W and the LLM or its adapters) put over it."""
    torch.manual_seed(config.seed)  # W's and the adapters' initialization: the same in every process and every run
    model_config = TinyLLaVAConfig(
        **{key: getattr(config, key) for key in MODEL_FIELDS}, template=config.template,
        image_aspect=config.image_aspect, base=base, lora_r=config.lora_r,
        lora_alpha=config.lora_alpha or 2 * config.lora_r, lora_dropout=config.lora_dropout,
        lora_targets=config.lora_targets)
    # FSDP shards the model from the CPU onto the GPU block by block, so a model too big for one GPU can start
    model = TinyLLaVA.from_config(model_config, device="cpu" if config.fsdp else runtime.device)
    model.set_stage(config.stage)
    if config.lora_r and runtime.autocast_dtype is not None and not config.fsdp:  # FSDP wants one dtype per block
        model.store_frozen_linears_in(runtime.autocast_dtype)  # the same results in half the memory
    if weights is not None:
        model.load_trained_weights(weights, source=source, with_adapters=with_adapters)
    model.llm.gradient_checkpointing = config.gradient_checkpointing
    return model.train()


def wrap(model, config, runtime):
    """DDP (replicas, gradients averaged) or FSDP (the LLM's blocks sharded, the frozen tower kept whole outside it)
    across processes; the model itself for one process. The parameters stay the same objects."""
    if config.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        model.vision.to(runtime.device)
        mixed = None
        if runtime.device.type == "cuda" and runtime.autocast_dtype == torch.bfloat16:  # bf16 compute, fp32 reduce
            mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), ignored_states=[
            model.vision], use_orig_params=True, device_id=runtime.device, mixed_precision=mixed)
    elif runtime.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return model


def rng_states():
    """Every random generator's state, as tensors, lists and numbers (loadable with weights_only=True)."""
    version, state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = dict(torch=torch.get_rng_state(), python=[version, list(state), gauss],
                  numpy=[name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached])
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if len(states.get("cuda", [])) == torch.cuda.device_count() > 0:  # the same GPUs as when it was saved
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, runtime, trained_names, **progress):
    """Every process helps gather (FSDP), process 0 writes, atomically: W (and the LLM), the model config, the bases'
    fingerprints, the optimizer (keyed by parameter name, whatever the wrapping), RNG states and `progress`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=runtime.device.type == "cuda")
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    weights = None
    if runtime.fsdp:
        full = get_model_state_dict(model, options=options)
        weights = {name: full[name] for name in trained_names} if runtime.master else None
    if runtime.master:
        unwrap(model).save(path, weights=weights, optimizer=optimizer_state, rng=rng_states(), **progress)
    if runtime.distributed:
        dist.barrier()


def load_optimizer(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def read_bases(config):
    """(the LLM's tokenizer, the vision tower's image settings), once both base directories are known to hold what a
    run reads (config.json, safetensors weights, the LLM's tokenizer.json); else one line naming the flag."""
    found = {}
    for key in ("vision_path", "llm_path"):
        given, path = getattr(config, key), resolve(getattr(config, key))
        if not os.path.isdir(path):
            shipped = given == getattr(TrainConfig, key)
            raise Stop(f"--{key} {given}: no such checkpoint directory"
                       + (" (the shipped tiny bases; python make_bases.py regenerates them)" if shipped else ""))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise Stop(f"--{key} {given}: no config.json in this directory: not a Hugging Face checkpoint")
        try:
            safetensors_files(path)
            found[key] = image_settings(path) if key == "vision_path" else load_tokenizer(path)
        except (OSError, ValueError) as error:
            raise Stop(f"--{key}: {error}") from None
    return found["llm_path"], found["vision_path"]


def describe_init(init, path):
    """The start-up line saying what --init took from its checkpoint: W, or W and the LLM, and from which run."""
    if init.get("hf"):
        return f"init: a LLaVA in Hugging Face's layout (its W and LLM), from {path}"
    took = "W and the LLM" if any(name.startswith("llm.") for name in init["model"]) else "W only"
    stage, step, total = checkpoint_progress(init)
    return f"init: {took}, from {path}" + (f" (a stage-{stage} checkpoint, step {step} of {total})" if stage else "")

# ----------------------------------------------------------------------------------------------------------------------
# The run


def load_data(config, runtime, tokenizer, images):
    """(data path, dataset, held-out data path, held-out dataset or None): --data_path's LLaVA JSON, or with none the
    shapes world, which one process generates while the others wait. Missing files and malformed data stop the run."""
    data_path, val_data_path = config.data_path, config.val_data_path
    if not data_path:
        if runtime.master:
            world_files(config.stage)
        if runtime.distributed:
            dist.barrier()
        data_path, world_val = world_files(config.stage)
        val_data_path = val_data_path or world_val
    settings = dict(image_folder=config.image_folder or os.path.dirname(os.path.abspath(data_path)),
                    tokenizer=tokenizer, template=config.template, image_size=images["size"],
                    aspect=config.image_aspect, mean=images["mean"], std=images["std"],
                    image_first_prob=config.image_first_prob, seed=config.seed,
                    max_bad_fraction=config.max_bad_fraction)
    try:  # a missing file or malformed data is the user's to fix: one message, no traceback
        dataset = LLaVADataset(data_path, **settings)
        val_dataset = LLaVADataset(val_data_path, **settings) if val_data_path else None
    except (OSError, ValueError) as error:
        raise Stop(str(error)) from None
    return data_path, dataset, val_data_path, val_dataset


def load_model(config, runtime, resumed, init, checkpoint_path):
    """(TinyLLaVA, the base it sits on, --init's path): the bases (or the base a LoRA run sits on), W fresh or from
    --init, or everything trained so far from --resume."""
    init_path = init_location(config.init) if init is not None else None
    if init is not None:
        check_bases(init, init_path, config)
    if resumed is not None:
        check_bases(resumed, checkpoint_path, config)
    base = run_base(config, init, init_path, resumed)
    trained = resumed if resumed is not None else init if not base else None  # a base comes whole, nothing to add
    if config.stage == 2 and resumed is None and init is None:
        print("note: stage 2 without --init: W starts from scratch (the paper's ablation without stage 1)")
    try:  # bases that do not load, or trained weights that do not fit them
        model = build_model(config, runtime, trained and trained["model"], base=base,
                            with_adapters=resumed is not None,
                            source=checkpoint_path if resumed is not None else init_path)
    except (OSError, ValueError) as error:
        raise Stop(str(error)) from None
    return model, base, init_path


def validation_batches(val_dataset, config, runtime):
    """This process's share of the first eval_samples held-out samples, in as many batches on every process."""
    if val_dataset is None:
        return []
    count = min(config.eval_samples or len(val_dataset), len(val_dataset))
    mine = list(range(runtime.rank, count, runtime.world_size))
    per_process = math.ceil(math.ceil(count / runtime.world_size) / config.batch_size)
    return [mine[k * config.batch_size:(k + 1) * config.batch_size] for k in range(per_process)]


@dataclass
class Run:
    """One run's parts and its progress: what its steps, evals and checkpoints share."""
    config: TrainConfig
    runtime: Runtime
    raw: TinyLLaVA  # the model itself
    wrapped: torch.nn.Module  # DDP, FSDP or the model itself: what checkpoints read
    model: torch.nn.Module  # wrapped, compiled with --compile: what the steps call
    optimizer: torch.optim.Optimizer
    tokenizer: typing.Any
    data_path: str
    dataset: LLaVADataset
    val_dataset: LLaVADataset | None
    collator: Collator
    questions: tuple | None  # --eval_questions: held-out eval.json items and their images
    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimizer steps taken
    skipped_in_epoch: int = 0  # samples of this epoch skipped by the collator (malformed or cut by max_length)
    last_checkpoint: int | None = None  # the step of the last checkpoint written
    trained_names: list = field(default_factory=list)
    val_batches: list = field(default_factory=list)

    @property
    def checkpoint_path(self):
        return os.path.join(self.config.out_dir, "ckpt.pt")

    def log(self, record):
        if self.runtime.master:
            with open(os.path.join(self.config.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate_held_out(self):
        """--eval_questions' accuracy, then the held-out loss, printed and logged; returns the loss (None: no data)."""
        if self.questions is not None:
            accuracy = question_accuracy(self.raw, self.tokenizer, self.questions, self.config)
            print(f"step {self.step}/{self.total_steps} | held-out accuracy {accuracy:.4f} "
                  f"({len(self.questions[0])} questions)")
            self.log(dict(kind="eval", step=self.step, accuracy=accuracy))
        if not self.val_batches:
            return None
        loss = evaluate(self.model, loader(self.val_dataset, self.val_batches, self.collator, self.config,
                                           self.runtime), self.runtime)
        print(f"step {self.step}/{self.total_steps} | held-out loss {loss:.4f}")
        self.log(dict(kind="eval", step=self.step, val_loss=loss))
        return loss

    def checkpoint(self):
        epoch, position = divmod(self.step, self.steps_per_epoch)
        save_checkpoint(self.checkpoint_path, self.wrapped, self.optimizer, self.runtime, self.trained_names,
                        train_config=asdict(self.config), step=self.step, epoch=epoch, step_in_epoch=position,
                        skipped_in_epoch=self.skipped_in_epoch, samples=len(self.dataset),
                        steps_per_epoch=self.steps_per_epoch, world_size=self.runtime.world_size)
        self.last_checkpoint = self.step


def resume_or_start(run, resumed):
    """Take up where --resume's checkpoint stopped (optimizer, RNG states, step), or start a new log."""
    if resumed is not None:
        if (resumed["samples"], resumed["steps_per_epoch"]) != (len(run.dataset), run.steps_per_epoch):
            raise Stop(f"--resume: {run.data_path} now gives {len(run.dataset)} samples in {run.steps_per_epoch} "
                       f"steps per epoch; {run.checkpoint_path} was made on {resumed['samples']} in "
                       f"{resumed['steps_per_epoch']}")
        load_optimizer(run.wrapped, run.optimizer, resumed["optimizer"])
        set_rng_states(resumed["rng"])
        run.step = run.last_checkpoint = resumed["step"]
        run.skipped_in_epoch = resumed["skipped_in_epoch"]
    elif run.runtime.master:
        if os.path.exists(run.checkpoint_path):  # make_config let it through: --overwrite true
            print(f"note: --overwrite: this run's first checkpoint replaces {run.checkpoint_path}")
        os.makedirs(run.config.out_dir, exist_ok=True)
        open(os.path.join(run.config.out_dir, "log.jsonl"), "w").close()


def describe(run, base, init, init_path, val_data_path, grad_accum, resumed):
    """The start-up lines: where it runs, what it trains, on what data, for how many steps."""
    config, runtime, raw = run.config, run.runtime, run.raw
    trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    print(f"stage {config.stage} | {runtime.device}, {runtime.autocast_dtype or torch.float32}"
          f"{' autocast' if runtime.autocast_dtype else ''} | {runtime.world_size} process(es)"
          f"{' (FSDP)' if config.fsdp else ' (DDP)' if runtime.distributed else ''}"
          + (" | compiled" if config.compile else "")
          + (" | gradient checkpointing" if config.gradient_checkpointing else ""))
    what = "W" if config.stage == 1 else "W and the LLM" if not config.lora_r else (
        f"W and LoRA adapters: r {config.lora_r}, alpha {raw.config.lora_alpha:g} on {config.lora_targets}")
    print(f"model: vision {config.vision_path}, LLM {config.llm_path}, projector {config.projector}"
          + (f", sitting on {base}" if base else "")
          + f" | {trainable:,} trainable parameters ({what})")
    if init is not None:
        print(describe_init(init, init_path))
    print(f"data: {run.data_path}, {len(run.dataset):,} samples, template {config.template}, image "
          f"{config.image_aspect} | " + (f"held out: {val_data_path}, {len(run.val_dataset):,} samples"
                                         if run.val_dataset else "no held-out data"))
    print(f"steps: {run.total_steps} ({run.steps_per_epoch} per epoch) | global batch {config.global_batch_size} = "
          f"{config.batch_size} x {runtime.world_size} process(es) x {grad_accum} accumulated | lr "
          f"{config.learning_rate:g}, {math.ceil(config.warmup_ratio * run.total_steps)} warmup steps, cosine to "
          f"{config.min_lr:g}" + (f" | resuming after step {run.step}" if resumed else "") + f" | {config.out_dir}")


def train(config, runtime, resumed=None, init=None):
    """The recipe: bases, data, model and optimizer, then the steps; returns the trained TinyLLaVA."""
    if config.global_batch_size % (config.batch_size * runtime.world_size):
        raise Stop(f"--global_batch_size {config.global_batch_size} is not a multiple of --batch_size "
                   f"{config.batch_size} x {runtime.world_size} process(es)")
    grad_accum = config.global_batch_size // (config.batch_size * runtime.world_size)
    tokenizer, images = read_bases(config)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    runtime.pad_token_id = next((tokenizer.token_to_id(t) for t in ("<pad>", "<unk>")
                                 if tokenizer.token_to_id(t) is not None), 0)
    data_path, dataset, val_data_path, val_dataset = load_data(config, runtime, tokenizer, images)
    questions = held_out_questions(config, runtime)  # None unless --eval_questions
    checkpoint_path = os.path.join(config.out_dir, "ckpt.pt")
    raw, base, init_path = load_model(config, runtime, resumed, init, checkpoint_path)
    max_length = min(config.max_length, raw.llm.config.max_position_embeddings)
    if max_length < config.max_length:
        print(f"note: max_length {config.max_length} capped at the LLM's context, {max_length}")
    trained_names = [name for name, p in raw.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(raw, config, runtime)
    wrapped = wrap(raw, config, runtime)
    steps_per_epoch = len(epoch_plan(dataset.lengths, config, 0, grad_accum, runtime))
    run = Run(config=config, runtime=runtime, raw=raw, wrapped=wrapped, optimizer=optimizer, tokenizer=tokenizer,
              model=torch.compile(wrapped) if config.compile else wrapped,  # what the steps call
              data_path=data_path, dataset=dataset, val_dataset=val_dataset, questions=questions,
              collator=Collator(runtime.pad_token_id, max_length, raw.num_image_tokens),
              steps_per_epoch=steps_per_epoch, total_steps=config.max_steps or config.epochs * steps_per_epoch,
              trained_names=trained_names, val_batches=validation_batches(val_dataset, config, runtime))
    resume_or_start(run, resumed)
    describe(run, base, init, init_path, val_data_path, grad_accum, resumed is not None)
    if run.step >= run.total_steps:
        print(f"{checkpoint_path} has finished its {run.total_steps} steps already")
        return raw

    if questions is not None and run.step == 0:
        run.evaluate_held_out()  # where stage 2 starts from: after stage 1 alone, zero-shot
    started = time.time()
    take_steps(run, grad_accum, max_length, started)
    run.checkpoint()
    if run.step < run.total_steps:
        print(f"stopped after step {run.step} of {run.total_steps} (--stop_at_step); {checkpoint_path} written; go "
              "on with --resume")
        return raw
    val_loss = run.evaluate_held_out()
    print(f"done: {run.total_steps} step{'s' if run.total_steps != 1 else ''} in {clock(time.time() - started)}"
          + (f", held-out loss {val_loss:.4f}" if val_loss is not None else "") + f" | {checkpoint_path}")
    return raw


def take_steps(run, grad_accum, max_length, started):
    """Optimizer steps up to --stop_at_step or the end, epoch by epoch, each on its global batch, with the progress
    line every log_interval steps, evals every eval_interval and checkpoints every checkpoint_interval."""
    config, dataset = run.config, run.dataset
    stop_step = min(run.total_steps, config.stop_at_step or run.total_steps)
    first_step, peak = run.step, peak_flops(config, run.runtime)
    interval = dict(losses=[], tokens=0, flops=0.0, time=started)
    while run.step < stop_step:
        epoch, position = divmod(run.step, run.steps_per_epoch)
        run.skipped_in_epoch = run.skipped_in_epoch if position else 0
        plan = epoch_plan(dataset.lengths, config, epoch, grad_accum, run.runtime)[position:]
        dataset.set_epoch(epoch)  # the image placement draws are seeded by (seed, epoch, sample)
        batches = iter(loader(dataset, [micro for step_plan in plan for micro in step_plan], run.collator, config,
                              run.runtime))
        for step_plan in plan[:stop_step - run.step]:
            micro_batches = [next(batches) for _ in step_plan]
            for message in (message for batch in micro_batches for message in batch["skipped"]):
                print(f"skipped: {message}")
            stats = train_step(run.model, run.optimizer, micro_batches,
                               learning_rate(run.step, run.total_steps, config), run.runtime, config.grad_clip)
            run.step += 1
            run.skipped_in_epoch += stats["skipped"]
            check_step(run, stats, epoch, max_length)
            if stats["loss"] is None:
                continue
            interval["losses"].append(stats["loss"])
            interval["tokens"] += stats["tokens"]
            interval["flops"] += stats["flops"]
            if run.step % config.log_interval == 0 or run.step in (first_step + 1, stop_step):
                report(run, interval, epoch, stats["grad_norm"], started, peak)
                interval = dict(losses=[], tokens=0, flops=0.0, time=time.time())
            if config.eval_interval and run.step % config.eval_interval == 0 and run.step < run.total_steps:
                run.evaluate_held_out()
            if config.checkpoint_interval and run.step % config.checkpoint_interval == 0 and run.step < stop_step:
                run.checkpoint()


def check_step(run, stats, epoch, max_length):
    """Stop on too many bad samples or a loss that is not finite; say so when a step had nothing to learn from."""
    records = len(run.dataset) + len(run.dataset.skipped)
    bad = run.skipped_in_epoch + len(run.dataset.skipped)
    if bad > run.config.max_bad_fraction * records:
        raise Stop(f"{bad} bad samples in epoch {epoch} of {run.data_path} (malformed, unreadable images, or cut by "
                   f"max_length {max_length}), more than --max_bad_fraction {run.config.max_bad_fraction} of its "
                   f"{records}; fix the data or raise it")
    if stats["loss"] is None:
        print(f"step {run.step}: no supervised token in the global batch ({stats['skipped']} samples skipped); "
              "no update")
    elif not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
        kept = (f"{run.checkpoint_path} (step {run.last_checkpoint})" if run.last_checkpoint
                else "none (none was written)")
        raise Stop(f"step {run.step}: loss {stats['loss']}, gradient norm {stats['grad_norm']}: not finite. The step "
                   f"was not applied and the run stops; the last good checkpoint is {kept}. Try a lower "
                   "--learning_rate, or look for bad samples in this step's data")


def report(run, interval, epoch, grad_norm, started, peak):
    """The progress line and its log.jsonl record: the mean loss since the last one, speed, time left, MFU."""
    now = time.time()
    seconds, elapsed, steps = now - interval["time"], now - started, len(interval["losses"])
    record = dict(kind="train", step=run.step, epoch=epoch, loss=sum(interval["losses"]) / steps,
                  lr=learning_rate(run.step - 1, run.total_steps, run.config), grad_norm=grad_norm,
                  tokens_per_s=interval["tokens"] / seconds, elapsed_s=elapsed)
    line = (f"step {run.step}/{run.total_steps} | epoch {epoch} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad norm {grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | {clock(elapsed)} elapsed, ETA "
            f"{clock(seconds / steps * (run.total_steps - run.step))}")
    if peak:  # model FLOP utilization: the FLOPs the model needs over what the GPUs could do meanwhile
        record["mfu"] = interval["flops"] / (seconds * peak * run.runtime.world_size)
        line += f" | MFU {100 * record['mfu']:.1f}%"
    print(line)
    run.log(record)


def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main(argv=None):
    """Train as the command line says; returns the trained TinyLLaVA (for tests). Errors exit with one message."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return None
    runtime = None
    try:
        config, resumed, init = make_config(argv)
        runtime = start_processes(config)
        with contextlib.redirect_stdout(sys.stdout if runtime.master else open(os.devnull, "w")):  # rank 0 speaks
            model = train(config, runtime, resumed, init)
        end_processes(runtime)
        return model
    except Stop as error:  # every process stops at the same point, for the same reason
        end_processes(runtime)
        if runtime is None or runtime.master:
            raise SystemExit(f"train.py: error: {error}") from None
        raise SystemExit(1) from None


def end_processes(runtime):
    if runtime is not None and runtime.distributed and dist.is_initialized():
        dist.barrier()  # nobody leaves while another still talks (gloo aborts a process whose peer is gone)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
