"""
What a training run tells its user, for train.py: the start-up lines, the progress line (loss, speed, time left, MFU)
and its log.jsonl record, the held-out accuracy of the learning curve (--eval_questions), and the two reasons a run
stops on its own (too many bad samples, a loss that is not finite).
"""
import json
import math
import os
import time

import torch

import ask
import checkpoints
import world
from data import load_image
from flags import Stop

# dense bf16 tensor-core peaks (FLOP/s) for MFU, by GPU name; the first match wins
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12))


def report_skipped(run, micro_batches):
    """Print why each sample a step could not use was skipped (an image that did not load, a sample max_length cuts),
    once per sample, not once per epoch."""
    for message in (message for batch in micro_batches for message in batch["skipped"]):
        if message not in run.reported:
            run.reported.add(message)
            print(f"skipped: {message}")


def check_step(run, stats, epoch):
    """Stop on too many bad samples or a loss that is not finite; say so when a step had nothing to learn from."""
    records = len(run.dataset) + len(run.dataset.skipped)
    bad = run.skipped_in_epoch + len(run.dataset.skipped)
    if bad > run.config.max_bad_fraction * records:
        raise Stop(f"{bad} bad samples in epoch {epoch} of {run.data_path} (malformed, unreadable images, or cut by "
                   f"max_length {run.collator.max_length}), more than --max_bad_fraction {run.config.max_bad_fraction} "
                   f"of its {records} allows ({int(run.config.max_bad_fraction * records)}); fix the data, or skip "
                   f"them with --max_bad_fraction {bad / records:.2g}")
    if stats["loss"] is None:
        print(f"step {run.step}: no supervised token in the global batch ({stats['skipped']} samples skipped); "
              "no update")
    elif not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
        kept = (f"{run.checkpoint_path} (step {run.last_checkpoint})" if run.last_checkpoint
                else "none (none was written)")
        raise Stop(f"step {run.step}: loss {stats['loss']}, gradient norm {stats['grad_norm']}: not finite. The step "
                   f"was not applied and the run stops; the last good checkpoint is {kept}. Try a lower "
                   "--learning_rate, or look for bad samples in this step's data")


def report(run, interval, epoch, lr, grad_norm, started, peak):
    """The progress line and its log.jsonl record: the mean loss since the last one, speed, time left, MFU."""
    now = time.time()
    seconds, elapsed, steps = now - interval["time"], now - started, len(interval["losses"])
    record = dict(kind="train", step=run.step, epoch=epoch, loss=sum(interval["losses"]) / steps, lr=lr,
                  grad_norm=grad_norm, tokens_per_s=interval["tokens"] / seconds, elapsed_s=elapsed)
    line = (f"step {run.step}/{run.total_steps} | epoch {epoch} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad norm {grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | {clock(elapsed)} elapsed, ETA "
            f"{clock(seconds / steps * (run.total_steps - run.step))}")
    if peak:  # model FLOP utilization: the FLOPs the model needs over what the GPUs could do meanwhile
        record["mfu"] = interval["flops"] / (seconds * peak * run.runtime.world_size)
        line += f" | MFU {100 * record['mfu']:.1f}%"
    print(line)
    log(run, record)


def log(run, record):
    """One record (a dict) appended to the run's log.jsonl, by process 0."""
    if run.runtime.master:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def describe(run, base, init, init_path, val_data_path, resumed):
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
          + (f", sitting on {base}" if base else "") + f" | {trainable:,} trainable parameters ({what})")
    if init is not None:
        print(checkpoints.describe_init(init, init_path))
    print(f"data: {run.data_path}, {len(run.dataset):,} samples, template {config.template}, image "
          f"{config.image_aspect} | " + (f"held out: {val_data_path}, {len(run.val_dataset):,} samples"
                                         if run.val_dataset else "no held-out data"))
    print(f"steps: {run.total_steps} ({run.steps_per_epoch} per epoch) | global batch {config.global_batch_size} = "
          f"{config.batch_size} x {runtime.world_size} process(es) x {run.grad_accum} accumulated | lr "
          f"{config.learning_rate:g}, {math.ceil(config.warmup_ratio * run.total_steps)} warmup steps, cosine to "
          f"{config.min_lr:g}" + (f" | resuming after step {run.step}" if resumed else "") + f" | {config.out_dir}")


@torch.no_grad()
def held_out_accuracy(model, tokenizer, questions, config):
    """--eval_questions: the share of held-out questions answered exactly right, greedily, the image first (as
    evaluate.py asks them)."""
    items, images = questions
    model.eval()
    answers = [text for batch in ask.answer_batches(model, tokenizer, [item["question"] for item in items], images,
                                                    config.batch_size, 256) for text in batch]
    model.train()
    return sum(world.exact_match(text, item["answer"]) for text, item in zip(answers, items)) / len(items)


def held_out_questions(config, runtime, directory):
    """The first eval_questions questions of the world's eval.json in `directory` (every type in turn) and their
    images, or None when not asked."""
    if not config.eval_questions:
        return None
    if runtime.distributed:
        raise Stop(f"--eval_questions {config.eval_questions}: the held-out accuracy is measured in one process")
    try:
        items = world.eval_items(directory, config.eval_questions)
        return items, [load_image(os.path.join(directory, item["image"])) for item in items]
    except ValueError as error:  # data.ImageError is one
        raise Stop(f"--eval_questions: {error}") from None


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
    """The accelerator's peak FLOP/s for MFU: --peak_flops, else looked up by the GPU's name (0: no MFU shown)."""
    if config.peak_flops or runtime.device.type != "cuda":
        return config.peak_flops
    name = torch.cuda.get_device_name(runtime.device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), 0.0)


def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
