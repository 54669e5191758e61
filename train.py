"""
Train LLaVA in its two stages (Liu et al. 2023, Sec. 4.2), on one CPU or on many GPUs.

    stage 1, feature alignment: g (vision) and the LLM frozen, only W trains, on image-caption pairs
    stage 2, end-to-end:        W and the LLM train on instruction conversations, g stays frozen
    both maximize p(X_a | X_v, X_instruct) = prod_i p(x_i | X_v, X_instruct,<i, X_a,<i) over answer tokens only

    python train.py --stage 1                              # -> out/stage1/ckpt.pt (W, aligned on the bases)
    python train.py --stage 2 --init out/stage1            # -> out/stage2/ckpt.pt (W and the LLM)
    python train.py --stage 2 --resume                     # go on where Ctrl-C stopped it (--overwrite: start over)
    python train.py --stage 2 --out_dir out/stage2-alone   # stage 2 alone, W from scratch (the paper's ablation)
    python train.py --stage 2 --init out/stage1 --lora_r 16 --out_dir out/stage2-lora   # LoRA: W and adapters
    python train.py --stage 1 --max_steps 5 --log_interval 1 --out_dir /tmp/s1   # any TrainConfig field is a flag
    python train.py --stage 1 --threads 1                  # 1 thread when other programs load the cores
    torchrun --standalone --nproc_per_node=8 train.py --stage 2 --fsdp true   # 8 GPUs; real scale: docs/real_scale.md

Where each step of the paper happens:

    Eq. 2: the image before or after the first question     data._segments, drawn per sample and epoch (LLaVADataset)
    Eq. 3: the loss covers answers and their end of turn     data._encode (the labels), TinyLLaVA.forward (the shift)
    Eq. 1: H_v = W · Z_v, spliced where <image> stands       TinyLLaVA.image_features, TinyLLaVA.embed
    stage 1 trains W; stage 2 W and the LLM; g never         build_model -> TinyLLaVA.set_stage (below)
    AdamW (no decay on biases, norms), warmup then cosine    make_optimizer, learning_rate (below)
    one step over a global batch, weighted by answer token   train_step (below)

Below, in the order train() runs it: data, model and stage, optimizer and schedule, step, loop; then the plumbing,
most of it in flags.py, checkpoints.py (saving, resuming, --init), runtime.py (processes) and progress.py (printing).
Each step is one global batch, drawn from (seed, epoch, step) alone, and one loss over all its answer tokens.
"""
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

import checkpoints
import flags
import progress
import world
from data import Collator, LLaVADataset, modality_length_grouped_order
from llama import lora_targets
from runtime import GracefulStop, Runtime, all_reduce_sum, end_processes, start_processes, unwrap, wrap
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLLaVA, TinyLLaVAConfig


# Every field is a flag, explained here and only here: `python train.py --help` prints these comments (flags.py says
# how). The None defaults are set per stage by STAGE_DEFAULTS.
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
    projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"  # W: linear (LLaVA) or mlp2x_gelu (LLaVA-1.5)
    vision_feature_layer: int = -2  # the layer of g whose outputs W reads (-2: the penultimate, as the paper)
    keep_class_token: bool = False  # give W the class token too (LLaVA gives it the patch tokens only)
    # data: LLaVA JSON records and their images; with no --data_path, the shapes world (generated into cache/world)
    data_path: str = ""  # the training LLaVA JSON file ("": the world's stage1.json or stage2.json)
    image_folder: str = ""  # the folder the records' "image" paths are relative to ("": the data file's folder)
    val_data_path: str = ""  # held-out LLaVA JSON for the held-out loss ("": the world's, or none with --data_path)
    template: Literal["plain", "vicuna_v1"] | None = None  # the prompt format: plain (stage 1: image, then caption)
                                                           # or vicuna_v1 (stage 2: the system prompt, then USER: /
                                                           # ASSISTANT: turns)
    image_aspect: Literal["crop", "pad"] = "crop"  # non-square images: crop (CLIP's processor) or pad to a square
                                                   # (LLaVA-1.5 stage 2)
    max_length: int = 2048  # most tokens per sample, the image's included (capped at the LLM's context)
    image_first_prob: float = 0.5  # paper Eq. 2: how often the image goes before the first question, not after it
    max_bad_fraction: float = 0.01  # stop once more than this share of the records is bad (malformed, an
                                    # unreadable image, or no answer left within max_length); each is reported
                                    # and skipped
    group_by_modality_length: bool = False  # LLaVA's order: modalities apart, a step's micro-batches even in words
    pack: bool = True  # a micro-batch is one row of its samples end to end, each kept to itself (false: padded rows)
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
                             # (evaluate.py --plot draws it); 0: none
    checkpoint_interval: int = 200  # steps between checkpoints (0: only at the end)
    stop_at_step: int = 0  # end after this step with a checkpoint, the schedule unchanged; --resume goes on from
                           # there (0: run to the end)
    # system
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA if there is one
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU;
                                                            # bfloat16: autocast (on a CPU with avx512_bf16 the
                                                            # default's stage 2 ran 1.4x faster with 1 thread, 1.07x
                                                            # with 2; without it, bf16 is slower than float32)
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


# Where the recipe differs between the stages; values for the shipped tiny default (real scale: docs/real_scale.md).
STAGE_DEFAULTS = {
    1: dict(out_dir="out/stage1", template="plain", learning_rate=1e-3, epochs=1, global_batch_size=32, batch_size=32),
    2: dict(out_dir="out/stage2", template="vicuna_v1", learning_rate=2e-4, epochs=1, max_steps=300,
            global_batch_size=32, batch_size=32),  # 300 steps: a quarter of an epoch of the world's mix
}

# ----------------------------------------------------------------------------------------------------------------------
# The recipe


def train(config, runtime, resumed=None, init=None):
    """The recipe, in the order it runs: data, model and stage, optimizer and schedule, then the loop of steps.
    resumed: the checkpoint --resume continues; init: --init's. Returns the trained TinyLLaVA."""
    tokenizer, preprocessing = checkpoints.read_bases(config)  # the LLM's tokenizer, the vision tower's image sizes
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    # 1. the data: LLaVA JSON conversations -> token ids with answer-only labels (Eq. 3), the image placed (Eq. 2)
    data_path, dataset, val_data_path, val_dataset = load_data(config, runtime, tokenizer, preprocessing)
    # 2. the model, set for the stage: g and the LLM from their checkpoints, W fresh or --init's (--resume: its own)
    weights, source, base, init_path = checkpoints.starting_weights(config, resumed, init)
    model = build_model(config, runtime, weights, source, base, with_adapters=resumed is not None)
    # 3. the optimizer over what trains (learning_rate gives each step its rate)
    optimizer = make_optimizer(model, config)
    # 4. the loop: the steps, with progress lines, held-out evals and checkpoints
    run = Run.start(config, runtime, model, optimizer, tokenizer, data_path, dataset, val_dataset, resumed)
    progress.describe(run, base, init, init_path, val_data_path, resumed is not None)
    if run.step >= run.total_steps:
        print(f"{run.checkpoint_path} has finished its {run.total_steps} steps already")
        return model
    if run.questions is not None and run.step == 0:
        run.evaluate_held_out()  # where stage 2 starts from: after stage 1 alone, zero-shot
    started = time.time()
    with GracefulStop() as stop:  # Ctrl-C or SIGTERM: the step in progress ends, then a checkpoint
        take_steps(run, started, stop)
        checkpoints.save(run)
    if run.step < run.total_steps:
        print(f"stopped at step {run.step} of {run.total_steps} ({stop.asked or '--stop_at_step'}); "
              f"{run.checkpoint_path} written; --resume continues")
        if stop.asked:
            raise SystemExit(130 if stop.asked == "SIGINT" else 143)  # what a shell expects of a process it stopped
        return model
    val_loss = run.evaluate_held_out()
    loss = "" if val_loss is None else f", held-out loss {val_loss:.4f}"
    print(f"done: {run.total_steps} step{'s' * (run.total_steps != 1)} in {progress.clock(time.time() - started)}"
          f"{loss} | {run.checkpoint_path}")
    return model


# ---- the data: the sample order of every step, as a function of (seed, epoch) alone


def load_data(config, runtime, tokenizer, preprocessing):
    """(data path, dataset, held-out data path, held-out dataset or None): --data_path's LLaVA JSON, or with none the
    shapes world, which one process generates while the others wait. Missing files and malformed data stop the run."""
    data_path, val_data_path = config.data_path, config.val_data_path
    if not data_path:
        if runtime.master:
            world_files(config.stage)
        if runtime.distributed:
            torch.distributed.barrier()
        data_path, world_val = world_files(config.stage)
        val_data_path = val_data_path or world_val
    settings = dict(image_folder=config.image_folder or os.path.dirname(os.path.abspath(data_path)),
                    tokenizer=tokenizer, template=config.template, image_size=preprocessing["size"],
                    aspect=config.image_aspect, mean=preprocessing["mean"], std=preprocessing["std"],
                    image_first_prob=config.image_first_prob, seed=config.seed,
                    max_bad_fraction=config.max_bad_fraction)
    datasets = []
    for flag, path in (("--data_path", data_path), ("--val_data_path", val_data_path)):
        try:  # a missing file or malformed data is the user's to fix: one line naming the flag, no traceback
            datasets.append(LLaVADataset(path, **settings) if path else None)
        except (OSError, ValueError) as error:
            raise flags.Stop(f"{flag} {error}") from None
    return data_path, datasets[0], val_data_path, datasets[1]


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
    length-grouped order (data.modality_length_grouped_order), its global batches of world_size x grad_accum
    micro-batches dealt to the processes in turn (micro-batch k to rank k % world_size).
    """
    if config.group_by_modality_length:
        chunks = runtime.world_size * grad_accum
        order = modality_length_grouped_order(lengths, config.batch_size, chunks,
                                              np.random.default_rng([config.seed, epoch]))
        micro_batches = [order[start:start + config.batch_size] for start in range(0, len(order), config.batch_size)]
        steps = [micro_batches[start:start + chunks] for start in range(0, len(micro_batches), chunks)]
        return [[step[k] if k < len(step) else [] for k in range(runtime.rank, chunks, runtime.world_size)]
                for step in steps]
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


def validation_batches(val_dataset, config, runtime):
    """This process's share of the first eval_samples held-out samples, in as many batches on every process."""
    if val_dataset is None:
        return []
    count = min(config.eval_samples or len(val_dataset), len(val_dataset))
    mine = list(range(runtime.rank, count, runtime.world_size))
    per_process = math.ceil(math.ceil(count / runtime.world_size) / config.batch_size)
    return [mine[k * config.batch_size:(k + 1) * config.batch_size] for k in range(per_process)]

# ---- the model and its stage


def build_model(config, runtime, weights=None, source="", base="", with_adapters=True):
    """The model, set for the stage: TinyLLaVA from the bases (or whole from `base`, the model a LoRA run sits on),
    with LoRA adapters if asked, and trained weights (W, or W and the LLM or its adapters) put over it."""
    torch.manual_seed(config.seed)  # W's and the adapters' initialization: the same in every process and every run
    model_config = TinyLLaVAConfig(
        vision_path=config.vision_path, llm_path=config.llm_path, projector=config.projector,
        vision_feature_layer=config.vision_feature_layer, keep_class_token=config.keep_class_token,
        template=config.template, image_aspect=config.image_aspect, base=base, lora_r=config.lora_r,
        lora_alpha=config.lora_alpha or 2 * config.lora_r, lora_dropout=config.lora_dropout,
        lora_targets=config.lora_targets)
    try:  # bases that do not load, or trained weights that do not fit them: one line
        # FSDP shards the model from the CPU onto the GPU block by block, so a model too big for one GPU can start
        model = TinyLLaVA.from_config(model_config, device="cpu" if config.fsdp else runtime.device)
        model.set_stage(config.stage)  # stage 1: W alone trains; stage 2: W and the LLM (or its LoRA adapters)
        if config.lora_r and runtime.autocast_dtype is not None and not config.fsdp:  # FSDP: one dtype per block
            model.store_frozen_linears_in(runtime.autocast_dtype)  # the same results in half the memory
        if weights is not None:
            model.load_trained_weights(weights, source=source, with_adapters=with_adapters)
    except (OSError, ValueError) as error:
        raise flags.Stop(str(error)) from None
    model.llm.gradient_checkpointing = config.gradient_checkpointing
    return model.train()

# ---- the optimizer and its schedule


def make_optimizer(model, config):
    """AdamW over the trainable parameters only (W, and the LLM or its LoRA adapters: the frozen weights get neither
    gradients nor optimizer state), weight decay on matrices only: no decay on biases and norm weights (all 1-D
    parameters). With --projector_lr, W's groups peak there instead (lr_scale), on the same schedule. Call it before
    FSDP wraps the model: it flattens the parameters it shards. Fused: no temporaries, 10x the loop's speed on a CPU."""
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
                             fused=True)


def learning_rate(step, total_steps, config):
    """The learning rate of optimizer step `step` (0-based): linear warmup over warmup_ratio of the steps, then a
    cosine from learning_rate down to min_lr, reached after the last step."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    done = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1 over the steps after warmup
    return config.min_lr + 0.5 * (config.learning_rate - config.min_lr) * (1 + math.cos(math.pi * done))

# ---- the step


def train_step(model, optimizer, micro_batches, lr, runtime, grad_clip=1.0):
    """
    One optimizer step on this process's micro-batches of one global batch (collated batches, CPU tensors).

    The loss is sum over the global batch's supervised tokens of -log p(token) / their number, however the global
    batch is split over processes and micro-batches: each micro-batch's mean loss is weighed by its token count over
    the global count (all-reduced once), and by world_size, which DDP's and FSDP's gradient averaging divide away.
    Returns dict(loss, grad_norm, and over all processes: tokens, supervised tokens, skipped samples, FLOPs (see
    progress.step_flops)); loss None when the global batch has no supervised token (no update); a non-finite loss or
    gradient is returned without being applied.
    """
    raw = unwrap(model)
    supervised = [supervised_tokens(batch) for batch in micro_batches]
    lengths = [length for batch in micro_batches for length in sequence_lengths(batch, raw.num_image_tokens)]
    num_images = sum(int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum()) for batch in micro_batches)
    counts = all_reduce_sum([sum(supervised), sum(len(b["skipped"]) for b in micro_batches), sum(lengths),
                             progress.step_flops(raw, lengths, num_images)], runtime)
    global_supervised = counts[0]
    stats = dict(loss=None, grad_norm=None, supervised=int(counts[0]), skipped=int(counts[1]), tokens=int(counts[2]),
                 flops=counts[3])
    if global_supervised == 0:
        return stats
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    for k, batch in enumerate(micro_batches):
        # gradients are averaged over the processes once, after the last micro-batch
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not runtime.distributed else model.no_sync():
            with runtime.autocast():  # Eq. 3, averaged over the micro-batch's answers
                _, loss = model(*model_inputs(batch, runtime))
            (loss * (supervised[k] * runtime.world_size / global_supervised)).backward()
            loss_sum += loss.detach().double() * supervised[k]
    stats["loss"] = all_reduce_sum([loss_sum.item()], runtime)[0] / global_supervised
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: only measure the norm
    norm = model.clip_grad_norm_(max_norm) if runtime.fsdp else torch.nn.utils.clip_grad_norm_(params, max_norm)
    stats["grad_norm"] = float(norm)  # FSDP's: the norm of the whole gradient, over every shard
    if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints from before --projector_lr have no lr_scale
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def model_inputs(batch, runtime):
    """(input_ids, pixel_values, labels, packed samples or None) on the device. An empty batch (every sample skipped)
    becomes a two-token stand-in the caller weighs 0: every process still runs the same passes, as DDP needs."""
    if batch["input_ids"].numel() == 0:
        pad = runtime.pad_token_id
        return (torch.tensor([[pad, pad]], device=runtime.device), None,
                torch.tensor([[IGNORE_INDEX, pad]], device=runtime.device), None)
    pixel_values = batch["pixel_values"]
    return (batch["input_ids"].to(runtime.device, non_blocking=True),
            None if pixel_values is None else pixel_values.to(runtime.device, non_blocking=True),
            batch["labels"].to(runtime.device, non_blocking=True), batch.get("samples"))


def supervised_tokens(batch):
    """How many tokens of a collated batch carry loss: the model predicts labels[:, 1:] (the BOS is never a target)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sequence_lengths(batch, num_image_tokens):
    """Each sample's length in the model: its text tokens, its image placeholder counted as num_image_tokens."""
    if batch.get("samples"):  # packed: the samples end to end in one row
        return [len(ids) + (num_image_tokens - 1) * int((ids == IMAGE_TOKEN_INDEX).sum())
                for ids in batch["input_ids"][0].split(batch["samples"])]
    num_images = (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1)
    return (batch["attention_mask"].sum(1) + (num_image_tokens - 1) * num_images).tolist()

# ---- the loop


def take_steps(run, started, stop):
    """Optimizer steps up to --stop_at_step or the end, epoch by epoch, each on its global batch, with the progress
    line every log_interval steps, evals every eval_interval and checkpoints every checkpoint_interval; after a step
    in which a process was asked to stop (stop.agreed), none goes on."""
    config, dataset = run.config, run.dataset
    stop_step = min(run.total_steps, config.stop_at_step or run.total_steps)
    first_step, peak = run.step, progress.peak_flops(config, run.runtime)
    interval = dict(losses=[], tokens=0, flops=0.0, time=started)
    while run.step < stop_step:
        epoch, position = divmod(run.step, run.steps_per_epoch)
        run.skipped_in_epoch = run.skipped_in_epoch if position else 0
        plan = epoch_plan(dataset.lengths, config, epoch, run.grad_accum, run.runtime)[position:]
        dataset.set_epoch(epoch)  # the image placement draws are seeded by (seed, epoch, sample)
        batches = iter(loader(dataset, [micro for step_plan in plan for micro in step_plan], run.collator, config,
                              run.runtime))
        for step_plan in plan[:stop_step - run.step]:
            micro_batches = [next(batches) for _ in step_plan]
            progress.report_skipped(run, micro_batches)
            lr = learning_rate(run.step, run.total_steps, config)
            stats = train_step(run.model, run.optimizer, micro_batches, lr, run.runtime, config.grad_clip)
            run.step += 1
            run.skipped_in_epoch += stats["skipped"]
            progress.check_step(run, stats, epoch)
            if stats["loss"] is None:
                continue
            interval["losses"].append(stats["loss"])
            interval["tokens"] += stats["tokens"]
            interval["flops"] += stats["flops"]
            if run.step % config.log_interval == 0 or run.step in (first_step + 1, stop_step):
                progress.report(run, interval, epoch, lr, stats["grad_norm"], started, peak)
                interval = dict(losses=[], tokens=0, flops=0.0, time=time.time())
            paused = time.time()  # evals and checkpoints are left out of the next progress line's tokens/s
            if config.eval_interval and run.step % config.eval_interval == 0 and run.step < run.total_steps:
                run.evaluate_held_out()
            if config.checkpoint_interval and run.step % config.checkpoint_interval == 0 and run.step < stop_step:
                checkpoints.save(run)
            interval["time"] += time.time() - paused
            if stop.agreed(run.runtime):
                return


@torch.no_grad()
def held_out_loss(model, batches, runtime):
    """The mean loss over all supervised tokens of `batches` (this process's share) and the other processes'."""
    raw = unwrap(model)
    raw.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        with runtime.autocast():
            _, loss = model(*model_inputs(batch, runtime))
        n = supervised_tokens(batch)
        loss_sum, count = loss_sum + (loss.double().item() * n if n else 0.0), count + n
    raw.train()
    loss_sum, count = all_reduce_sum([loss_sum, count], runtime)
    return loss_sum / max(count, 1)


# ----------------------------------------------------------------------------------------------------------------------
# The run's state


@dataclass
class Run:
    """One run's parts and its progress: what its steps, evals and checkpoints share."""
    config: TrainConfig
    runtime: Runtime
    raw: TinyLLaVA  # the model itself
    wrapped: torch.nn.Module  # DDP, FSDP or the model itself: what checkpoints read
    model: torch.nn.Module  # wrapped, compiled with --compile: what the steps call
    optimizer: torch.optim.Optimizer
    tokenizer: object
    data_path: str
    dataset: LLaVADataset
    val_dataset: LLaVADataset | None
    collator: Collator
    questions: tuple | None  # --eval_questions: held-out eval.json items and their images
    grad_accum: int  # micro-batches per optimizer step in each process
    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimizer steps taken
    skipped_in_epoch: int = 0  # samples of this epoch skipped by the collator (malformed or cut by max_length)
    last_checkpoint: int | None = None  # the step of the last checkpoint written
    reported: set = field(default_factory=set)  # the messages of the samples skipped so far, each printed once
    checkpoint_path: str = ""  # <out_dir>/ckpt.pt
    log_path: str = ""  # <out_dir>/log.jsonl (log.jsonl.new while an old run's files wait to be replaced)
    trained_names: list = field(default_factory=list)
    val_batches: list = field(default_factory=list)

    @classmethod
    def start(cls, config, runtime, model, optimizer, tokenizer, data_path, dataset, val_dataset, resumed):
        """The run, its model wrapped for the processes, where --resume's checkpoint stopped or at step 0."""
        max_length = min(config.max_length, model.llm.config.max_position_embeddings)
        if max_length < config.max_length != TrainConfig.max_length:  # said when it was asked for
            print(f"note: max_length {config.max_length} capped at the LLM's context, {max_length}")
        runtime.pad_token_id = next((tokenizer.token_to_id(t) for t in ("<pad>", "<unk>")
                                     if tokenizer.token_to_id(t) is not None), 0)
        grad_accum = config.global_batch_size // (config.batch_size * runtime.world_size)
        steps_per_epoch = len(epoch_plan(dataset.lengths, config, 0, grad_accum, runtime))
        trained_names = [name for name, p in model.named_parameters() if p.requires_grad]  # before FSDP renames them
        wrapped = wrap(model, config, runtime)  # DDP or FSDP across processes
        run = cls(config=config, runtime=runtime, raw=model, wrapped=wrapped, optimizer=optimizer,
                  model=torch.compile(wrapped) if config.compile else wrapped, tokenizer=tokenizer,
                  data_path=data_path, dataset=dataset, val_dataset=val_dataset,
                  collator=Collator(runtime.pad_token_id, max_length, model.num_image_tokens, config.pack),
                  questions=progress.held_out_questions(config, runtime, os.path.dirname(data_path)),
                  grad_accum=grad_accum, steps_per_epoch=steps_per_epoch,
                  total_steps=config.max_steps or config.epochs * steps_per_epoch, trained_names=trained_names,
                  val_batches=validation_batches(val_dataset, config, runtime),
                  checkpoint_path=os.path.join(config.out_dir, "ckpt.pt"))
        checkpoints.start_or_resume(run, resumed)
        return run

    def evaluate_held_out(self):
        """--eval_questions' accuracy, then the held-out loss, printed and logged; returns the loss (None: no data)."""
        if self.questions is not None:
            accuracy = progress.held_out_accuracy(self.raw, self.tokenizer, self.questions, self.config)
            print(f"step {self.step}/{self.total_steps} | held-out accuracy {accuracy:.4f} "
                  f"({len(self.questions[0])} questions)")
            progress.log(self, dict(kind="eval", step=self.step, accuracy=accuracy))
        if not self.val_batches:
            return None
        loss = held_out_loss(self.model, loader(self.val_dataset, self.val_batches, self.collator, self.config,
                                                self.runtime), self.runtime)
        print(f"step {self.step}/{self.total_steps} | held-out loss {loss:.4f}")
        progress.log(self, dict(kind="eval", step=self.step, val_loss=loss))
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: the command line and the processes


def make_config(argv):
    """(TrainConfig, the resumed checkpoint or None, the --init checkpoint or None) from the command line: stage
    defaults, then a resumed run's own config, then the --init checkpoint's model fields, then the flags."""
    overrides = flags.parse(TrainConfig, argv, "train.py")
    stage = overrides.get("stage", TrainConfig.stage)
    if stage not in STAGE_DEFAULTS:
        raise flags.Stop(f"--stage must be 1 or 2, got {stage}")
    for key in (key for key in overrides if key.startswith("lora_")):
        if stage == 1:
            raise flags.Stop(f"--{key}: LoRA adapts the LLM, which stage 1 keeps frozen (only W trains); use it in "
                             "stage 2")
        if key != "lora_r" and not overrides.get("lora_r"):
            raise flags.Stop(f"--{key} does nothing without --lora_r (the adapters' rank; 0 turns LoRA off)")
    defaults = dict(STAGE_DEFAULTS[stage])
    if "epochs" in overrides or overrides.get("data_path"):  # the default step count is the shapes world's: on
        defaults.pop("max_steps", None)                      # your data, or with --epochs, the epochs set the length
    config, resumed, init = checkpoints.resumed_or_new(TrainConfig(**{**defaults, **overrides}), overrides)
    check_config(config)
    return config, resumed, init


def check_config(config):
    """Refuse values that make no sense, naming the flag (the choices are the flags' own Literal types)."""
    flags.at_least(config, 1, "epochs", "global_batch_size", "batch_size", "max_length", "log_interval")
    flags.at_least(config, 0, "max_steps", "eval_interval", "eval_samples", "eval_questions", "checkpoint_interval",
                   "stop_at_step", "num_workers", "threads", "grad_clip", "weight_decay", "min_lr", "lora_r",
                   "lora_alpha", "projector_lr")
    if config.eval_questions and (config.stage != 2 or config.data_path):  # said before any data loads
        raise flags.Stop(f"--eval_questions {config.eval_questions}: the held-out accuracy is measured in stage 2 on "
                         "the shapes world (no --data_path), in one process")
    if not 0 < config.learning_rate >= config.min_lr:
        raise flags.Stop(f"--learning_rate must be positive and at least --min_lr; got {config.learning_rate}, "
                         f"--min_lr {config.min_lr}")
    if config.stage == 1 and config.init:
        raise flags.Stop("--init is for stage 2 (a checkpoint to start from); stage 1 starts W from scratch")
    for key in ("warmup_ratio", "lora_dropout"):
        if not 0 <= getattr(config, key) < 1:
            raise flags.Stop(f"--{key} must be in [0, 1), got {getattr(config, key)}")
    try:
        lora_targets(config.lora_targets)
    except ValueError as error:
        raise flags.Stop(f"--lora_targets {config.lora_targets!r}: {error}") from None


def main(argv=None):
    """Train as the command line says; returns the trained TinyLLaVA (for tests). A mistake ends it with one line."""
    argv = sys.argv[1:] if argv is None else argv
    if flags.wants_help(argv):
        print(flags.help_text(TrainConfig, "train.py", "python train.py [--field value ...]   (or --field=value; "
                              "--field-name spells --field_name too; a true/false field alone means true)", __doc__,
                              {f"stage {stage}": defaults for stage, defaults in STAGE_DEFAULTS.items()}))
        return None
    runtime = None
    try:
        config, resumed, init = make_config(argv)
        runtime = start_processes(config)
        if config.global_batch_size % (config.batch_size * runtime.world_size):
            raise flags.Stop(f"--global_batch_size {config.global_batch_size} is not a multiple of --batch_size "
                             f"{config.batch_size} x {runtime.world_size} process(es)")
        with contextlib.redirect_stdout(sys.stdout if runtime.master else open(os.devnull, "w")):  # rank 0 speaks
            model = train(config, runtime, resumed, init)
        end_processes(runtime)
        return model
    except flags.Stop as error:  # every process stops at the same point, for the same reason
        end_processes(runtime)
        raise SystemExit(f"train.py: error: {error}" if runtime is None or runtime.master else 1) from None
    except SystemExit:  # a signal stopped the run, its checkpoint written (train): every process leaves together
        end_processes(runtime)
        raise
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C: the step in progress is not kept
        print("\ntrain.py: stopped at once; the last checkpoint written, if any, is kept", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
