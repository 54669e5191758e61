"""
A training run's checkpoints, for train.py. The model's part (config, the bases' fingerprints, the trained tensors) is
TinyLLaVA.save's, read back by tinyllava.read_checkpoint; a training checkpoint adds what resuming needs to take the
steps an uninterrupted run takes (the optimizer's state, every random generator's state, the step and the data
position) and the run's own config. Here: writing and reading that state, the checkpoints a run starts from (the
bases, --init's: ours or an HF LLaVA), and the refusals that keep a run from silently replacing or reusing another's
work.
"""
import json
import os
import random
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist

from data import image_settings, load_tokenizer
from flags import Stop
from runtime import unwrap
from tinyllava import TinyLLaVA, TinyLLaVAConfig, base_fingerprints, check_bases, read_checkpoint, resolve
from weights import atomic_write, safetensors_files

# taken from --init's checkpoint unless given
INIT_FIELDS = ("vision_path", "llm_path", "projector", "vision_feature_layer", "keep_class_token")
# may differ on --resume without changing which steps are taken (beyond float rounding)
RESUMABLE_CHANGES = {"resume", "overwrite", "out_dir", "log_interval", "eval_interval", "eval_samples",
                     "eval_questions", "checkpoint_interval", "stop_at_step", "batch_size", "device", "dtype",
                     "compile", "gradient_checkpointing", "fsdp", "num_workers", "pin_memory", "threads", "peak_flops",
                     "pack"}


def save(run):
    """Write a train.py run's checkpoint: every process helps gather (FSDP), process 0 writes, atomically: W (and the
    LLM), the model config, the bases' fingerprints, the optimizer (keyed by parameter name, whatever the wrapping),
    RNG states, the run's config and where it stands."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict
    runtime, model = run.runtime, run.wrapped
    options = StateDictOptions(full_state_dict=True, cpu_offload=runtime.device.type == "cuda")
    optimizer_state = get_optimizer_state_dict(model, run.optimizer, options=options)
    weights = None
    if runtime.fsdp:
        full = get_model_state_dict(model, options=options)
        weights = {name: full[name] for name in run.trained_names} if runtime.master else None
    if runtime.master:
        epoch, position = divmod(run.step, run.steps_per_epoch)
        unwrap(model).save(run.checkpoint_path, weights=weights, optimizer=optimizer_state, rng=rng_states(),
                           train_config=asdict(run.config), step=run.step, epoch=epoch, step_in_epoch=position,
                           skipped_in_epoch=run.skipped_in_epoch, samples=len(run.dataset),
                           steps_per_epoch=run.steps_per_epoch, world_size=runtime.world_size)
        final = os.path.join(run.config.out_dir, "log.jsonl")
        if run.log_path != final:  # a new run over an old one: its log replaces the old one's with its checkpoint
            os.replace(run.log_path, final)
            run.log_path = final
    if runtime.distributed:
        dist.barrier()
    run.last_checkpoint = run.step


def load_optimizer(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


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


def read(path, flag, mmap=False, in_repo=True):
    """One of our checkpoints named by a flag (a ckpt.pt or its directory, found as tinyllava.resolve finds paths;
    in_repo=False: only where the path says); anything else stops the run with one line naming the flag."""
    try:
        return read_checkpoint(resolve(path) if in_repo else path, mmap=mmap)
    except (FileNotFoundError, ValueError) as error:
        raise Stop(f"{flag} {error}") from None


def progress(checkpoint):
    """(stage, step, total steps) of the run that wrote a checkpoint, for messages."""
    saved = checkpoint.get("train_config", {})
    total = saved.get("max_steps") or saved.get("epochs", 0) * checkpoint.get("steps_per_epoch", 0)
    return saved.get("stage"), checkpoint.get("step", 0), total


def refuse_overwrite(path):
    """Stop a new run that would replace an existing checkpoint, saying what it holds and which flag to use."""
    try:
        stage, step, total = progress(read_checkpoint(path, mmap=True))
    except ValueError:
        raise Stop(f"{path} exists (not a tinyllava checkpoint): --overwrite true replaces it, or choose another "
                   "--out_dir") from None
    if step >= total:
        raise Stop(f"{path} holds a finished stage-{stage} run ({step} of {total} steps): --overwrite true trains a "
                   "new one over it, or choose another --out_dir")
    raise Stop(f"{path} holds a stage-{stage} run stopped at step {step} of {total}: --resume continues it, "
               "--overwrite true starts over and replaces it, or choose another --out_dir")


def resumed_or_new(config, overrides):
    """(config, the checkpoint --resume continues or None, --init's checkpoint or None). A resumed run keeps the
    config it started with, but for the flags given that do not change which steps are taken (RESUMABLE_CHANGES); a
    new one refuses to replace a checkpoint without --overwrite, and takes --init's model fields unless given."""
    path = os.path.join(config.out_dir, "ckpt.pt")
    if config.resume and config.overwrite:
        raise Stop(f"--resume continues {path} and --overwrite starts over: give one of them")
    resumed = init = None
    if config.resume:
        resumed = read(path, "--resume", in_repo=False)  # the run writes here: never resume the repository's run
        saved = resumed["train_config"]
        changed = [f"--{key} ({saved[key]!r} in the checkpoint, {value!r} given)" for key, value in overrides.items()
                   if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value]
        if changed:
            raise Stop(f"--resume continues {path} with the recipe it started with, but {', '.join(changed)}; start a "
                       "new run (with --init) to change the recipe")
        config = replace(config, **{**saved, "stop_at_step": 0, **overrides})  # --stop_at_step stops once
    elif os.path.exists(path) and not config.overwrite:
        refuse_overwrite(path)
    if config.init and config.stage == 2 and not config.resume:
        init = read_init(config.init)
        config = replace(config, **{key: init["config"][key] for key in INIT_FIELDS if key not in overrides})
    return config, resumed, init


def init_location(path):
    """--init's checkpoint as found on disk: an HF LLaVA directory (one with a config.json), else a ckpt.pt."""
    found = resolve(path)
    is_hf = os.path.isfile(os.path.join(found, "config.json"))
    return found if is_hf or not os.path.isdir(found) else os.path.join(found, "ckpt.pt")


def read_init(path):
    """--init's checkpoint: one of ours, or an HF LLaVA directory read as a checkpoint that trained nothing yet."""
    found = init_location(path)
    if not os.path.isdir(found):
        return read(path, "--init")
    try:
        model_config = TinyLLaVA.hf_config(found)
    except ValueError as error:
        raise Stop(f"--init {found}: {error}") from None
    return dict(config=asdict(model_config), bases=base_fingerprints(model_config), model={}, hf=True)


def describe_init(init, path):
    """The start-up line saying what --init took from its checkpoint: W, or W and the LLM, and from which run."""
    if init.get("hf"):
        return f"init: a LLaVA in Hugging Face's layout (its W and LLM), from {path}"
    took = "W and the LLM" if any(name.startswith("llm.") for name in init["model"]) else "W only"
    stage, step, total = progress(init)
    return f"init: {took}, from {path}" + (f" (a stage-{stage} checkpoint, step {step} of {total})" if stage else "")


def starting_weights(config, resumed, init):
    """Where the model starts: (the trained tensors to put over it, or None; the file they come from; the base the run
    sits on, "" for none; --init's path, or None). Trained weights only go on the bases they were trained on."""
    init_path = init_location(config.init) if init is not None else None
    if init is not None:
        refuse_other_bases(init, init_path, config, ": run stage 1 on these bases, or leave out --init to start W "
                                                    "fresh")
    checkpoint_path = os.path.join(config.out_dir, "ckpt.pt")
    if resumed is not None:
        refuse_other_bases(resumed, checkpoint_path, config)
    base = run_base(config, init, init_path, resumed)
    trained = resumed if resumed is not None else init if not base else None  # a base comes whole, nothing to add
    if config.stage == 2 and resumed is None and init is None:
        print("note: stage 2 without --init: W starts from scratch (the paper's ablation without stage 1)")
    return (trained and trained["model"]), checkpoint_path if resumed is not None else init_path, base, init_path


def refuse_other_bases(checkpoint, source, config, hint=""):
    """Stop when a checkpoint's trained weights were trained on other towers (or another base) than this run's."""
    try:
        check_bases(checkpoint, source, config.vision_path, config.llm_path)
    except (FileNotFoundError, ValueError) as error:
        raise Stop(f"{error}{hint}") from None


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


def start_or_resume(run, resumed):
    """Take up where --resume's checkpoint stopped (optimizer, RNG states, step; the log cut back to that step), or
    start a new log. Over an old run (--overwrite) the new log is log.jsonl.new until the first checkpoint replaces
    the old ckpt.pt and log.jsonl together (save): until then both are the old run's, whole."""
    final = os.path.join(run.config.out_dir, "log.jsonl")
    run.log_path = final
    if resumed is not None:
        if (resumed["samples"], resumed["steps_per_epoch"]) != (len(run.dataset), run.steps_per_epoch):
            raise Stop(f"--resume: {run.data_path} now gives {len(run.dataset)} samples in {run.steps_per_epoch} "
                       f"steps per epoch; {run.checkpoint_path} was made on {resumed['samples']} in "
                       f"{resumed['steps_per_epoch']}")
        load_optimizer(run.wrapped, run.optimizer, resumed["optimizer"])
        set_rng_states(resumed["rng"])
        run.step = run.last_checkpoint = resumed["step"]
        run.skipped_in_epoch = resumed["skipped_in_epoch"]
        if run.runtime.master and os.path.exists(final):
            cut_log(final, run.step)  # the steps after the checkpoint are taken again
    elif run.runtime.master:
        if os.path.exists(run.checkpoint_path):  # make_config let it through: --overwrite true
            run.log_path = final + ".new"
            print(f"note: --overwrite: this run's first checkpoint replaces {run.checkpoint_path} and {final} (its "
                  f"log is {run.log_path} until then)")
        os.makedirs(run.config.out_dir, exist_ok=True)
        open(run.log_path, "w").close()


def cut_log(path, step):
    """Keep the log.jsonl records up to `step`, dropping any line a kill cut short."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(kept)
    atomic_write(path, write)


def read_bases(config):
    """(the LLM's tokenizer, the vision tower's preprocessing: size, mean, std), once both base directories hold what a
    run reads (config.json, safetensors weights, the LLM's tokenizer.json); else one line naming the flag."""
    found = {}
    for key in ("vision_path", "llm_path"):
        given, path = getattr(config, key), resolve(getattr(config, key))
        if not os.path.isdir(path):
            shipped = given == getattr(TinyLLaVAConfig, key)
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
