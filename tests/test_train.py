"""train.py on tiny models: what each stage trains, exact resume (also across process counts, sharding and batch
sizes), the same steps whatever the number of processes, gradient checkpointing and compile, length-grouped epochs,
the recipe's pieces, and the refusals (wrong bases, bad flags, NaN, bad data)."""
import dataclasses
import functools
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import evaluate
import tinyllava
import train
import world
from flags import explained_fields, parse as parse_flags
from helpers import TINY_LLAMA, TINY_VISION, randomize
from runtime import GracefulStop
from tinyllava import TinyLLaVA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny bases (a CLIP vision tower, two LLaMAs sharing a byte-level BPE tokenizer), a tiny shapes world and small
    data files cut from it: stage1/stage2 (16 and 12 records) and their held-out files (4 records each)."""
    root = tmp_path_factory.mktemp("train")
    directory = world.ensure_world(root=str(root / "world"), n_train=24, n_heldout=4, eval_per_type=1)
    texts = [turn["value"] for name in ("stage1.json", "stage2.json")
             for record in json.loads((directory / name).read_text()) for turn in record["conversations"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.logging.set_verbosity_error()
    randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)), 0).save_pretrained(
        str(root / "vision"))
    for name, seed in (("llm", 1), ("other_llm", 2)):
        config = transformers.LlamaConfig(**dict(TINY_LLAMA, vocab_size=VOCAB, max_position_embeddings=512))
        randomize(transformers.LlamaForCausalLM(config), seed).save_pretrained(str(root / name))
        tokenizer.save(str(root / name / "tokenizer.json"))
    for stage, count in ((1, 16), (2, 12)):
        for prefix, n in (("", count), ("val_", 4)):
            records = json.loads((directory / f"{prefix}stage{stage}.json").read_text())[:n]
            (directory / f"small_{prefix}stage{stage}.json").write_text(json.dumps(records))
    return dict(root=root, world=directory, vision=str(root / "vision"), llm=str(root / "llm"),
                other_llm=str(root / "other_llm"))


def flags(tiny, out_dir, stage=2, **overrides):
    """A short run on the tiny bases and data: global batch 4 in micro-batches of 2, every step logged."""
    settings = dict(stage=stage, vision_path=tiny["vision"], llm_path=tiny["llm"], out_dir=str(out_dir),
                    data_path=str(tiny["world"] / f"small_stage{stage}.json"),
                    val_data_path=str(tiny["world"] / f"small_val_stage{stage}.json"), global_batch_size=4,
                    batch_size=2, learning_rate=3e-3, log_interval=1, eval_interval=0, checkpoint_interval=0,
                    threads=1)
    settings.update(overrides)
    return [f"--{key}={value}" for key, value in settings.items()]


def train_log(out_dir, kind="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [record for record in map(json.loads, f) if record["kind"] == kind]


def checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def run_capturing_start(monkeypatch, argv):
    """train.main(argv) -> (the model's parameters just before the first step, the trained model)."""
    before = {}
    step = train.train_step

    def spy(model, *args, **kwargs):
        if not before:
            before.update({name: p.detach().clone() for name, p in train.unwrap(model).named_parameters()})
        return step(model, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", spy)
    model = train.main(argv)
    monkeypatch.setattr(train, "train_step", step)
    return before, model


def changed(before, model, prefix):
    """{name: whether it changed} for the parameters under prefix."""
    return {name: not torch.equal(before[name], p.detach()) for name, p in model.named_parameters()
            if name.startswith(prefix)}


def test_stage1_trains_only_w(tiny, tmp_path, monkeypatch):
    before, model = run_capturing_start(monkeypatch, flags(tiny, tmp_path, stage=1, max_steps=3))
    assert all(changed(before, model, "projector.").values())
    assert not any(changed(before, model, "llm.").values()) and not any(changed(before, model, "vision.").values())
    saved = checkpoint(tmp_path)
    assert sorted(saved["model"]) == sorted(n for n, _ in model.named_parameters() if n.startswith("projector."))
    assert saved["step"] == 3 and saved["config"]["template"] == "plain"


def test_stage2_trains_w_and_the_llm_from_the_stage1_w_never_vision(tiny, tmp_path, monkeypatch):
    train.main(flags(tiny, tmp_path / "stage1", stage=1, max_steps=2))
    stage1 = checkpoint(tmp_path / "stage1")
    before, model = run_capturing_start(monkeypatch, flags(tiny, tmp_path / "stage2", max_steps=3,
                                                           init=tmp_path / "stage1" / "ckpt.pt"))
    for name, tensor in stage1["model"].items():  # stage 2 starts from the stage-1 W
        assert torch.equal(before[name], tensor), name
    assert all(changed(before, model, "projector.").values())
    assert all(changed(before, model, "llm.layers.").values())  # every block's every tensor
    assert changed(before, model, "llm.norm.")["llm.norm.weight"]
    assert not any(changed(before, model, "vision.").values())
    saved = checkpoint(tmp_path / "stage2")
    assert {name.split(".")[0] for name in saved["model"]} == {"projector", "llm"}
    assert saved["config"]["template"] == "vicuna_v1"


def assert_same_optimizer_state(resumed, whole, steps, rtol):
    """Adam's moments of every trained tensor and its step count, and each group's learning rate, as the
    uninterrupted run left them (keyed by parameter name, whatever the wrapping)."""
    states, expected = resumed["optimizer"]["state"], whole["optimizer"]["state"]
    assert states.keys() == expected.keys() == resumed["model"].keys()
    for name, state in expected.items():
        assert int(states[name]["step"]) == int(state["step"]) == steps, name
        for key in ("exp_avg", "exp_avg_sq"):  # relative to each tensor's largest entry: both span many decades
            torch.testing.assert_close(states[name][key], state[key], rtol=rtol,
                                       atol=rtol * float(state[key].abs().max()), msg=f"{name} {key}")
    assert [g["lr"] for g in resumed["optimizer"]["param_groups"]] == pytest.approx(
        [g["lr"] for g in whole["optimizer"]["param_groups"]], rel=1e-12)


def test_stopped_and_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny, tmp_path):
    # 12 samples in global batches of 4: 3 steps per epoch, so the 5 steps cross an epoch boundary
    common = dict(max_steps=5, checkpoint_interval=2)
    train.main(flags(tiny, tmp_path / "whole", **common))
    train.main(flags(tiny, tmp_path / "parts", **common, stop_at_step=2))
    assert checkpoint(tmp_path / "parts")["step"] == 2
    train.main(flags(tiny, tmp_path / "parts", **common, resume=True))
    whole, parts = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parts")
    assert parts["step"] == whole["step"] == 5 and parts["epoch"] == 1
    assert whole["model"].keys() == parts["model"].keys()
    for name in whole["model"]:
        assert (whole["model"][name] - parts["model"][name]).abs().max() <= 1e-6, name
    assert_same_optimizer_state(parts, whole, steps=5, rtol=1e-6)
    losses = {r["step"]: r["loss"] for r in train_log(tmp_path / "whole")}
    resumed = {r["step"]: r["loss"] for r in train_log(tmp_path / "parts")}
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert resumed == pytest.approx(losses, rel=1e-6)


def test_tokens_per_second_counts_the_steps_not_the_evals_and_checkpoints_between_them(tiny, tmp_path, monkeypatch):
    """On a clock where a step takes 1 s, a held-out eval 100 s and a checkpoint 50 s, every progress line's tokens/s
    is its step's tokens over 1 s, the steps right after an eval and a checkpoint included."""
    clock, tokens = [0.0], []
    step, evaluate, save = train.train_step, train.Run.evaluate_held_out, train.checkpoints.save

    def taking(seconds, function, results=None):
        def run(*args, **kwargs):
            result = function(*args, **kwargs)
            clock[0] += seconds
            if results is not None:
                results.append(result["tokens"])
            return result
        return run
    monkeypatch.setattr(train, "train_step", taking(1.0, step, tokens))
    monkeypatch.setattr(train.Run, "evaluate_held_out", taking(100.0, evaluate))
    monkeypatch.setattr(train.checkpoints, "save", taking(50.0, save))
    monkeypatch.setattr(time, "time", lambda: clock[0])
    train.main(flags(tiny, tmp_path, max_steps=4, eval_interval=1, checkpoint_interval=1))
    assert [record["tokens_per_s"] for record in train_log(tmp_path)] == pytest.approx(tokens)


def test_resume_refuses_a_changed_recipe(tiny, tmp_path):
    train.main(flags(tiny, tmp_path, max_steps=2, stop_at_step=1))
    with pytest.raises(SystemExit, match=r"--learning_rate \(0\.003 in the checkpoint, 0\.01 given\)"):
        train.main(flags(tiny, tmp_path, max_steps=2, resume=True, learning_rate=0.01))


def test_accumulating_micro_batches_takes_the_step_of_the_whole_batch(tiny, tmp_path):
    """The loss is normalized by the global batch's token count: 4 samples at once, or 4 micro-batches of 1 whose
    token counts differ, give the same step (a mean of per-micro-batch means would not)."""
    for batch_size in (4, 1):
        train.main(flags(tiny, tmp_path / str(batch_size), max_steps=2, batch_size=batch_size))
    one, four = checkpoint(tmp_path / "4"), checkpoint(tmp_path / "1")
    # AdamW divides each gradient by its own running RMS, so the rounding of a near-zero gradient can move that one
    # weight by a sizeable part of a step (7e-6 seen on an AVX-512 Xeon, lr 3e-3); a mean of per-micro-batch means
    # instead moves 99% of W by up to 1.2e-2
    for name in one["model"]:
        torch.testing.assert_close(one["model"][name], four["model"][name], atol=1e-4, rtol=1e-4)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in train_log(tmp_path / "1")] == pytest.approx(
            [r[key] for r in train_log(tmp_path / "4")], rel=1e-5)


def torchrun(argv, processes=2):
    """train.py under torchrun on the CPU (gloo); fails the test with the run's output if it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               os.path.join(REPO, "train.py")] + argv
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.torchrun
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_under_torchrun_take_the_same_steps_as_one(tiny, tmp_path, sharding):
    """gloo on CPU: 2 processes x micro-batch 2 against 1 process x 2 micro-batches of 2, same global batch of 4.
    The images of process 0's first micro-batch are unreadable: it runs the empty-batch stand-in while process 1
    trains, and the step must still be the one process's. The two processes pack their micro-batches (--pack, the
    default), the one process pads them."""
    records = [r for r in json.loads((tiny["world"] / "small_stage2.json").read_text()) if "image" in r]
    shutil.copytree(tiny["world"] / "images", tmp_path / "images")
    config = train.TrainConfig(global_batch_size=4, batch_size=2)
    for index in train.epoch_plan([1] * len(records), config, 0, 1, train.Runtime(rank=0, world_size=2))[0][0]:
        (tmp_path / records[index]["image"]).write_bytes(truncated_jpeg())  # fails when it loads
    (tmp_path / "data.json").write_text(json.dumps(records))
    common = dict(max_steps=3, eval_interval=2, eval_samples=3, data_path=tmp_path / "data.json",
                  max_bad_fraction=0.6)
    train.main(flags(tiny, tmp_path / "one", **common, pack=False))
    printed = torchrun(flags(tiny, tmp_path / "two", **common, fsdp=sharding == "fsdp"))
    assert "2 process(es)" in printed and printed.count("step 3/3 | epoch") == 1  # rank 0 alone prints
    assert "skipped: sample" in printed
    for key in ("loss", "grad_norm"):  # the norm shows a gradient scaled wrong, which Adam and clipping would hide
        assert [r[key] for r in train_log(tmp_path / "two")] == pytest.approx(
            [r[key] for r in train_log(tmp_path / "one")], rel=1e-5)
    assert [r["val_loss"] for r in train_log(tmp_path / "two", "eval")] == pytest.approx(
        [r["val_loss"] for r in train_log(tmp_path / "one", "eval")], rel=1e-5)
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["model"].keys() == two["model"].keys()
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], atol=2e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def six_steps(tiny, tmp_path_factory):
    """An uninterrupted run of 6 steps (2 epochs of 3) in one process, micro-batches of 2, padded (--pack false): how
    resumed runs end."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    train.main(flags(tiny, out_dir, max_steps=6, pack=False))
    return out_dir


@pytest.mark.torchrun
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_run_resumed_across_process_counts_batch_sizes_and_sharding_ends_as_an_uninterrupted_one(
        tiny, tmp_path, six_steps, sharding):
    """Steps 1-2 in one process with micro-batches of 2; 3-4 under torchrun in 2 processes (DDP or FSDP) with
    micro-batches of 1, crossing the epoch boundary; 5-6 in one process again with one micro-batch of 4. FSDP reloads
    optimizer state written without it, and writes state read without it."""
    train.main(flags(tiny, tmp_path, max_steps=6, stop_at_step=2, pack=False))  # as six_steps; --resume keeps it
    printed = torchrun(flags(tiny, tmp_path, max_steps=6, resume=True, stop_at_step=4, batch_size=1,
                             fsdp=sharding == "fsdp"))
    assert "resuming after step 2" in printed and "global batch 4 = 1 x 2 process(es) x 2 accumulated" in printed
    assert checkpoint(tmp_path)["step"] == 4 and checkpoint(tmp_path)["world_size"] == 2
    train.main(flags(tiny, tmp_path, max_steps=6, resume=True, batch_size=4, fsdp=False))  # fsdp: the checkpoint's
    resumed, whole = checkpoint(tmp_path), checkpoint(six_steps)
    assert resumed["step"] == 6 and resumed["model"].keys() == whole["model"].keys()
    for name in whole["model"]:
        torch.testing.assert_close(resumed["model"][name], whole["model"][name], atol=2e-6, rtol=1e-4, msg=name)
    assert_same_optimizer_state(resumed, whole, steps=6, rtol=1e-4)
    assert [r["step"] for r in train_log(tmp_path)] == [1, 2, 3, 4, 5, 6]  # each step of the three parts, once
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in train_log(tmp_path)] == pytest.approx([r[key] for r in train_log(six_steps)], rel=1e-5)


def test_packed_run_stopped_and_resumed_with_other_micro_batches_ends_as_the_padded_uninterrupted_one(
        tiny, tmp_path, six_steps):
    """--pack: each micro-batch one row of its samples end to end. Steps 1-3 in one micro-batch of 4, then resumed,
    4-6 in micro-batches of 2 whose token counts differ: the losses, gradient norms and weights of the padded run in
    micro-batches of 2 (six_steps), to float rounding (the global batch's token weighting is the same)."""
    train.main(flags(tiny, tmp_path, max_steps=6, stop_at_step=3, batch_size=4))  # --pack: the default
    train.main(flags(tiny, tmp_path, max_steps=6, resume=True, batch_size=2))
    packed, padded = checkpoint(tmp_path), checkpoint(six_steps)
    assert packed["step"] == 6 and packed["train_config"]["pack"] and not padded["train_config"]["pack"]
    for name in padded["model"]:  # AdamW amplifies the rounding of near-zero gradients: see the test above
        torch.testing.assert_close(packed["model"][name], padded["model"][name], atol=1e-4, rtol=1e-4, msg=name)
    assert [r["step"] for r in train_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in train_log(tmp_path)] == pytest.approx([r[key] for r in train_log(six_steps)], rel=1e-5)


def record_gradients(monkeypatch):
    """[{name: gradient}] of every optimizer step of the runs that follow, as train_step hands them to AdamW."""
    steps, make_optimizer = [], train.make_optimizer

    def recording(model, *args):
        optimizer = make_optimizer(model, *args)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        step = optimizer.step

        def recorded_step(*step_args, **kwargs):
            steps.append({name: p.grad.clone() for name, p in named})
            return step(*step_args, **kwargs)
        optimizer.step = recorded_step
        return optimizer
    monkeypatch.setattr(train, "make_optimizer", recording)
    return steps


def test_gradient_checkpointing_and_compile_give_w_and_the_llm_the_plain_gradients(tiny, tmp_path, monkeypatch,
                                                                                     capsys):
    """Stage 2 through train.py in micro-batches of 4: every trained tensor's gradient at both steps of a plain run and
    of a --gradient_checkpointing run, and at the one step of a --compile run (a second step would compile the model
    again for its other sequence length, as long again), must be the same. No clipping: it would hide a scale."""
    gradients = record_gradients(monkeypatch)
    runs = {}
    variants = [("plain", dict(max_steps=2)), ("checkpointed", dict(max_steps=2, gradient_checkpointing=True))]
    compiles = torch._dynamo.is_dynamo_supported()
    if compiles:
        variants.append(("compiled", dict(max_steps=1, compile=True)))
        # inductor's C++ code generation takes minutes for this model on 2 CPU cores; aot_eager captures the same
        # graphs (dynamo, then AOTAutograd's joint forward and backward) and runs them with eager kernels
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        with capsys.disabled():
            print("\n--compile tested with torch.compile(backend='aot_eager'): inductor's kernels are left out")
    for name, settings in variants:
        model = train.main(flags(tiny, tmp_path / name, batch_size=4, val_data_path="", grad_clip=0, **settings))
        assert model.llm.gradient_checkpointing == (name == "checkpointed"), name  # the same gradients, but is it on?
        runs[name], gradients[:] = list(gradients), []
    plain = runs.pop("plain")
    assert len(plain) == 2 and {name.split(".")[0] for name in plain[0]} == {"projector", "llm"}
    for step in plain:
        for name, gradient in step.items():
            assert gradient.abs().max() >= 1e-3, f"{name}: gradient {gradient.abs().max():.1e} too small to test"
    for run, steps in runs.items():
        assert len(steps) == (1 if run == "compiled" else 2), run
        for step, (expected, got) in enumerate(zip(plain, steps)):
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4,
                                           msg=f"{run}, step {step + 1}: {name}")
    if not compiles:
        pytest.skip(f"torch.compile cannot run here (Python {sys.version.split()[0]}, torch {torch.__version__}); "
                    "gradient checkpointing was checked")


def test_group_by_modality_length_sees_every_sample_once_per_epoch_in_one_modality_batches(tiny, tmp_path,
                                                                                           monkeypatch):
    records = [r for r in json.loads((tiny["world"] / "small_stage2.json").read_text()) if "image" in r]
    assert len(records) >= 9
    for record in records[::4]:  # a quarter of them become text-only
        del record["image"]
        record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>", "").strip()
    shutil.copytree(tiny["world"] / "images", tmp_path / "images")
    (tmp_path / "data.json").write_text(json.dumps(records))
    steps, train_step = [], train.train_step

    def recording(model, optimizer, micro_batches, *args, **kwargs):
        steps.append([(batch["ids"], batch["pixel_values"]) for batch in micro_batches])
        return train_step(model, optimizer, micro_batches, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording)
    train.main(flags(tiny, tmp_path / "out", data_path=tmp_path / "data.json", group_by_modality_length=True,
                     epochs=2, max_steps=0))
    per_epoch = checkpoint(tmp_path / "out")["steps_per_epoch"]
    assert len(steps) == 2 * per_epoch
    text_only = {record["id"] for record in records if "image" not in record}
    epochs = []
    for epoch in range(2):
        micro_batches = [micro for step in steps[epoch * per_epoch:(epoch + 1) * per_epoch] for micro in step]
        seen = [sample_id for ids, _ in micro_batches for sample_id in ids]
        assert sorted(seen) == sorted(record["id"] for record in records), f"epoch {epoch}"  # each once
        for k, (ids, pixel_values) in enumerate(micro_batches):
            assert (pixel_values is None) == all(sample_id in text_only for sample_id in ids)
            if 2 <= k < len(micro_batches) - 2:  # image and text-only samples share a micro-batch only in LLaVA's
                assert len({sample_id in text_only for sample_id in ids}) == 1  # remainder, first or last step
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order each epoch


def test_stage2_refuses_a_w_aligned_on_another_llm(tiny, tmp_path):
    train.main(flags(tiny, tmp_path / "stage1", stage=1, max_steps=1))
    init = str(tmp_path / "stage1" / "ckpt.pt")
    with pytest.raises(SystemExit) as error:
        train.main(flags(tiny, tmp_path / "stage2", init=init, llm_path=tiny["other_llm"], max_steps=1))
    message = str(error.value)
    assert f"{init} was trained on vision tower {tiny['vision']} and LLM {tiny['llm']}" in message
    assert f"but the LLM at {tiny['other_llm']} differs (by content)" in message
    assert "run stage 1 on these bases, or leave out --init" in message
    assert not (tmp_path / "stage2" / "ckpt.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate", "1e-3"], "unknown flag --lerning_rate (did you mean --learning_rate?)"),
    (["--max_steps=ten"], "--max_steps expects an int, got 'ten'"),
    (["--max-steps", "ten"], "--max_steps expects an int, got 'ten'"),
    (["--stage", "2", "--eval_questions", "-1"], "--eval_questions must be at least 0, got -1"),
    (["--compile", "maybe"], "--compile expects true/false/1/0, got 'maybe'"),
    (["--projector", "mlp3x"], "--projector must be one of linear, mlp2x_gelu; got 'mlp3x'"),
    (["--stage", "1", "--init", "x.pt"], "--init is for stage 2"),
    (["stage=2"], "unexpected argument 'stage=2'"),
    (["--stage", "2", "--init", "nowhere/ckpt.pt"], "--init nowhere/ckpt.pt: no such file or directory"),
    (["--stage", "2", "--init", os.path.join(REPO, "tests")], f"--init {REPO}/tests: no ckpt.pt in this directory"),
    (["--stage", "2", "--init", os.path.join(REPO, "README.md")], "README.md: not a tinyllava checkpoint"),
    (["--resume", "--overwrite"], "--resume continues out/stage1/ckpt.pt and --overwrite starts over: give one"),
    (["--resume"], "--resume out/stage1/ckpt.pt: no such file or directory"),
    (["--data_path", "nothere.json"], "--data_path nothere.json: no such file or directory"),
    (["--data_path", os.path.join(REPO, "bases", "clip", "model.safetensors")],
     "clip/model.safetensors: not a LLaVA JSON file (not UTF-8 text)"),
])
def test_bad_flags_fail_with_the_flag_named(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/ here
    with pytest.raises(SystemExit) as error:
        train.main(argv)
    assert str(error.value).startswith("train.py: error: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_resume_reads_the_out_dir_where_it_runs_never_the_repositorys(tmp_path, monkeypatch):
    """The shipped bases are found from any directory, but --resume must not take up the repository's own out/stage1
    (the run writes its checkpoints where it runs: it would go on from another run's weights)."""
    import tinyllava
    os.makedirs(tmp_path / "repo" / "out" / "stage1")
    shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "repo" / "out" / "stage1" / "ckpt.pt")
    monkeypatch.setattr(tinyllava, "REPO_DIR", str(tmp_path / "repo"))
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as error:
        train.main(["--resume"])
    assert str(error.value) == "train.py: error: --resume out/stage1/ckpt.pt: no such file or directory"


def test_flags_parse_to_the_field_types(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/stage2/ckpt.pt here to refuse to overwrite
    argv = ["--learning_rate=2e-5", "--resume", "--batch_size", "8", "--compile", "0", "--vision_feature_layer", "-1",
            "--fsdp", "--max-steps", "3"]
    assert parse_flags(train.TrainConfig, argv, "train.py") == dict(
        learning_rate=2e-5, resume=True, batch_size=8, compile=False, vision_feature_layer=-1, fsdp=True, max_steps=3)
    config, _, _ = train.make_config(["--stage=2", "--learning_rate", "1e-4"])
    assert (config.template, config.out_dir, config.learning_rate) == ("vicuna_v1", "out/stage2", 1e-4)


def test_stage2_runs_300_steps_on_the_world_but_its_epochs_on_your_data_or_when_epochs_are_given(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = lambda *flags: train.make_config(["--stage=2", *flags])[0].max_steps
    assert steps() == 300 and steps("--max_steps=20") == 20
    assert steps("--epochs=2") == 0 and steps("--data_path=mine.json") == 0  # 0: the epochs set the length
    assert train.make_config(["--stage=1"])[0].max_steps == 0


def test_help_explains_every_field_under_its_group_from_the_comments_in_trainconfig(capsys):
    groups = explained_fields(train.TrainConfig)
    names = [name for name, _, _ in groups]  # these five, in this order, and any a later feature adds
    assert [name for name in names if name in ("model", "data", "optimization", "progress and checkpoints",
                                               "system")] == ["model", "data", "optimization",
                                                              "progress and checkpoints", "system"]
    explained = {name: text for _, _, items in groups for name, text in items}
    assert list(explained) == [f.name for f in dataclasses.fields(train.TrainConfig)]  # each field, in order, once
    assert all(text.strip() for text in explained.values()), explained
    assert train.main(["--help"]) is None
    printed = capsys.readouterr().out
    flat = " ".join(printed.split())  # argparse wraps the columns
    flat = flat[flat.index("model: what trains"):]  # the flags, after the docstring
    for name, text in explained.items():
        assert f"--{name} " in printed and " ".join(text.split()) in flat, name
    # the defaults, per stage where the stage sets them, and the explanations a short run needs
    assert "(default: stage 1: 0, stage 2: 300)" in flat.split("--max_steps INT")[1].split("--global_batch_size")[0]
    assert "--stop_at_step instead" in explained["max_steps"] and "--resume" in explained["stop_at_step"]
    assert "(default: stage 1: out/stage1, stage 2: out/stage2)" in flat
    assert flat.index("model: what trains") < flat.index("--stage INT") < flat.index("data:") < flat.index(
        "--data_path") < flat.index("optimization:") < flat.index("--max_steps") < flat.index(
        "progress and checkpoints:") < flat.index("--overwrite BOOL") < flat.index("system:") < flat.index("--threads")


def test_a_finished_checkpoint_is_never_overwritten_without_overwrite(tiny, tmp_path):
    train.main(flags(tiny, tmp_path, max_steps=2))
    finished = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()
    for again in ([], ["--init", "", "--learning_rate=0.01"]):  # the same command, or another run into the same dir
        with pytest.raises(SystemExit) as error:
            train.main(flags(tiny, tmp_path, max_steps=2) + again)
        assert f"{tmp_path}/ckpt.pt holds a finished stage-2 run (2 of 2 steps): --overwrite true" in str(error.value)
        assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()) == finished
    train.main(flags(tiny, tmp_path, max_steps=2, learning_rate=0.01, overwrite=True))  # told to: it replaces it
    assert (tmp_path / "ckpt.pt").read_bytes() != finished[0]
    assert checkpoint(tmp_path)["train_config"]["learning_rate"] == 0.01


def test_a_stopped_run_is_refused_with_resume_offered(tiny, tmp_path):
    train.main(flags(tiny, tmp_path, stage=1, max_steps=2, stop_at_step=1))
    with pytest.raises(SystemExit, match="stage-1 run stopped at step 1 of 2: --resume continues it, --overwrite true"):
        train.main(flags(tiny, tmp_path, stage=1, max_steps=2))
    assert checkpoint(tmp_path)["step"] == 1


def test_init_takes_a_checkpoint_directory_and_says_what_it_took(tiny, tmp_path, monkeypatch, capsys):
    train.main(flags(tiny, tmp_path / "stage1", stage=1, max_steps=1))
    train.main(flags(tiny, tmp_path / "stage2", max_steps=1, init=tmp_path / "stage1"))  # a directory
    assert f"init: W only, from {tmp_path}/stage1/ckpt.pt (a stage-1 checkpoint, step 1 of 1)" in \
        capsys.readouterr().out
    stage2 = checkpoint(tmp_path / "stage2")
    before, _ = run_capturing_start(monkeypatch, flags(tiny, tmp_path / "again", max_steps=1,
                                                      init=tmp_path / "stage2"))
    assert f"init: W and the LLM, from {tmp_path}/stage2/ckpt.pt (a stage-2 checkpoint, step 1 of 1)" in \
        capsys.readouterr().out
    assert any(name.startswith("llm.") for name in stage2["model"])
    for name, tensor in stage2["model"].items():  # W and every LLM tensor start where stage 2 left them
        assert torch.equal(before[name], tensor), name
    # found as sample.py finds paths: relative to the working directory, else to the repository
    monkeypatch.setattr(tinyllava, "REPO_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path / "again")
    _, _, init = train.make_config(flags(tiny, tmp_path / "elsewhere", init="stage1"))
    assert init["train_config"]["stage"] == 1


def test_eval_questions_logs_the_held_out_accuracy_at_step_0_and_each_eval_for_sample_plot(tiny, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setattr(train, "world_files", lambda stage: (str(tiny["world"] / f"small_stage{stage}.json"),
                                                             str(tiny["world"] / f"small_val_stage{stage}.json")))
    asked = []

    def judge(prediction, answer):  # "right" when the expected answer names a color: a share known beforehand
        asked.append(answer)
        return any(color in answer for color in world.COLORS)
    monkeypatch.setattr(world, "exact_match", judge)
    train.main(flags(tiny, tmp_path, max_steps=2, eval_interval=1, data_path="", val_data_path="",
                     eval_questions=5))
    items = world.eval_items(str(tiny["world"]), 5)
    expected = sum(any(color in item["answer"] for color in world.COLORS) for item in items) / 5
    assert len(items) == 5 and 0 < expected < 1 and asked[:5] == [item["answer"] for item in items]
    assert [(r["step"], r["accuracy"]) for r in train_log(tmp_path, "eval") if "accuracy" in r] == \
        [(0, expected), (1, expected), (2, expected)]
    evaluate.main(["--plot", str(tmp_path / "log.jsonl"), "--png", str(tmp_path / "curve.png")])
    assert Image.open(tmp_path / "curve.png").size == (720, 440)
    with pytest.raises(SystemExit, match="--eval_questions 5: the held-out accuracy is measured in stage 2"):
        train.main(flags(tiny, tmp_path / "s1", stage=1, max_steps=1, eval_questions=5))


def test_a_base_without_tokenizer_json_is_one_line_naming_the_flag(tiny, tmp_path):
    shutil.copytree(tiny["llm"], tmp_path / "llm", ignore=shutil.ignore_patterns("tokenizer.json"))
    with pytest.raises(SystemExit) as error:
        train.main(flags(tiny, tmp_path / "out", stage=1, max_steps=1, llm_path=tmp_path / "llm"))
    assert str(error.value) == f"train.py: error: --llm_path: {tmp_path}/llm: no tokenizer.json here (only the " \
                               "fast-tokenizer file is read)"
    (tmp_path / "llm" / "tokenizer.model").write_bytes(b"")  # a sentencepiece checkpoint: the message says the fix
    with pytest.raises(SystemExit, match=r"only a sentencepiece tokenizer.model; write the tokenizer.json once with "
                                         r"transformers: python -c .*AutoTokenizer.from_pretrained\("):
        train.main(flags(tiny, tmp_path / "out", stage=1, max_steps=1, llm_path=tmp_path / "llm"))
    os.remove(tmp_path / "llm" / "model.safetensors")
    with pytest.raises(SystemExit, match=r"--llm_path: .*neither model.safetensors nor"):
        train.main(flags(tiny, tmp_path / "out", stage=1, max_steps=1, llm_path=tmp_path / "llm"))
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    forward, calls = TinyLLaVA.forward, []

    def poisoned(self, *args, **kwargs):  # the loss of the 5th training micro-batch (step 3) is NaN
        logits, loss = forward(self, *args, **kwargs)
        calls.append(self.training)
        return logits, loss * float("nan") if sum(calls) == 5 and self.training else loss
    monkeypatch.setattr(TinyLLaVA, "forward", poisoned)
    with pytest.raises(SystemExit) as error:
        train.main(flags(tiny, tmp_path, max_steps=5, checkpoint_interval=2))
    assert "step 3: loss nan" in str(error.value) and f"{tmp_path}/ckpt.pt (step 2)" in str(error.value)
    saved = checkpoint(tmp_path)
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert [r["step"] for r in train_log(tmp_path)] == [1, 2]


def truncated_jpeg():
    """The bytes of a JPEG cut short in its data: it opens, passes the check before training (data.check_image) and
    fails only when it loads, mid-run."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:800]


def test_unreadable_images_are_reported_skipped_and_stop_the_run_past_max_bad_fraction(tiny, tmp_path, capsys):
    records = json.loads((tiny["world"] / "small_stage1.json").read_text())
    shutil.copytree(tiny["world"] / "images", tmp_path / "images")
    (tmp_path / records[0]["image"]).write_bytes(b"not a png")  # found before training
    (tmp_path / records[1]["image"]).write_bytes(truncated_jpeg())  # found when it loads
    (tmp_path / "data.json").write_text(json.dumps(records))
    settings = dict(stage=1, data_path=tmp_path / "data.json", max_steps=8, out_dir=tmp_path / "out")  # 2 epochs
    train.main(flags(tiny, **settings, max_bad_fraction=0.2))
    printed = capsys.readouterr().out
    assert f"skipped 1 of 16 records:\n  sample {records[0]['id']}: cannot load image" in printed
    assert printed.count(f"skipped: sample {records[1]['id']}: cannot load image") == 1  # once, not once an epoch
    with pytest.raises(SystemExit, match=r"--data_path .*data.json: 1 of 16 records are malformed or have an "
                                         r"unreadable image, more than the 0 --max_bad_fraction 0.05 allows; "
                                         r"--max_bad_fraction 0.062 would skip them"):
        train.main(flags(tiny, **settings, max_bad_fraction=0.05, overwrite=True))
    with pytest.raises(SystemExit, match=r"2 bad samples in epoch 0 of .*more than --max_bad_fraction 0\.1 of its 16 "
                                         r"allows \(1\); fix the data, or skip them with --max_bad_fraction 0.12"):
        train.main(flags(tiny, **settings, max_bad_fraction=0.1, overwrite=True))


def test_every_step_sees_the_same_global_batch_whatever_the_processes_and_micro_batches():
    config = train.TrainConfig(global_batch_size=8, batch_size=1, seed=3)
    lengths = [1] * 21  # 2 full global batches and a short one

    def steps(world_size, batch_size, epoch):
        config.batch_size = batch_size
        accumulation = 8 // (batch_size * world_size)
        plans = [train.epoch_plan(lengths, config, epoch, accumulation, train.Runtime(rank=r, world_size=world_size))
                 for r in range(world_size)]
        return [[i for plan in plans for micro in plan[k] for i in micro] for k in range(len(plans[0]))]
    reference = steps(1, 8, 0)
    assert [len(s) for s in reference] == [8, 8, 5] and sorted(sum(reference, [])) == list(range(21))
    for world_size, batch_size in ((1, 1), (2, 2), (4, 1), (8, 1), (2, 4)):
        assert steps(world_size, batch_size, 0) == reference
    assert steps(2, 2, 1) != reference and steps(2, 2, 1) == steps(1, 4, 1)


def test_group_by_modality_length_deals_a_steps_micro_batches_to_the_processes_in_turn(monkeypatch):
    config = train.TrainConfig(batch_size=2, group_by_modality_length=True)
    calls = []

    def order(lengths, batch_size, chunks, rng):  # an order as data.modality_length_grouped_order gives it
        calls.append((batch_size, chunks))
        return [5, 6, 7, 4, 1, 2, 3, 0, 9, 10, 8]
    monkeypatch.setattr(train, "modality_length_grouped_order", order)

    def plans(world_size, accumulation):
        return [train.epoch_plan([1] * 11, config, 0, accumulation, train.Runtime(rank=r, world_size=world_size))
                for r in range(world_size)]
    # micro-batches [5 6] [7 4] [1 2] [3 0] [9 10] [8]; micro-batch k of a step to rank k % world_size
    assert plans(2, 1) == [[[[5, 6]], [[1, 2]], [[9, 10]]], [[[7, 4]], [[3, 0]], [[8]]]]
    assert plans(1, 2) == [[[[5, 6], [7, 4]], [[1, 2], [3, 0]], [[9, 10], [8]]]]
    assert plans(2, 2) == [[[[5, 6], [1, 2]], [[9, 10], []]], [[[7, 4], [3, 0]], [[8], []]]]
    assert set(calls) == {(2, 2), (2, 4)}


def test_learning_rate_warms_up_for_3_percent_then_follows_a_cosine_to_min_lr():
    config = train.TrainConfig(learning_rate=1e-3, min_lr=1e-5)
    lr = [train.learning_rate(step, 100, config) for step in range(100)]
    assert lr[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # ceil(0.03 * 100) = 3 warmup steps
    assert lr[3] == pytest.approx(1e-3)
    assert lr[3 + 97 // 2] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 48 / 97)))
    assert lr[99] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 96 / 97)))
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))


def test_weight_decay_spares_biases_and_norm_weights(tiny):
    config = train.TrainConfig(stage=2, vision_path=tiny["vision"], llm_path=tiny["llm"], learning_rate=1e-3,
                               weight_decay=0.1, template="vicuna_v1")
    model = train.build_model(config, train.Runtime())
    decayed, spared = train.make_optimizer(model, config).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert {names[id(p)] for p in spared["params"]} == {
        name for name, p in model.named_parameters() if p.requires_grad and (
            name.endswith("bias") or name.endswith("norm.weight"))}
    assert {names[id(p)] for p in decayed["params"]} >= {"projector.linear_1.weight", "llm.embed_tokens.weight",
                                                         "llm.layers.0.attention.qkv.weight", "llm.lm_head.weight"}


def test_default_tiny_pipeline_runs_from_the_command_line(tiny, tmp_path):
    """The CI's shortened pipeline: stage 1 then stage 2 --init on the shapes world, a few steps each, with the
    shipped bases (the tiny test bases until bases/ exists), then evaluate.py's held-out eval of the result."""
    shipped = all(os.path.isfile(os.path.join(REPO, "bases", name, "config.json")) for name in ("clip", "llama"))
    bases = [] if shipped else [f"--vision_path={tiny['vision']}", f"--llm_path={tiny['llm']}"]
    short = ["--max_steps=2", "--global_batch_size=4", "--batch_size=2", "--eval_samples=4", "--log_interval=1"]
    for stage, extra in ((1, []), (2, [f"--init={tmp_path}/stage1/ckpt.pt"])):
        command = [sys.executable, os.path.join(REPO, "train.py"), f"--stage={stage}",
                   f"--out_dir={tmp_path}/stage{stage}"] + bases + short + extra
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert f"stage{stage}.json" in result.stdout and "held-out loss" in result.stdout
        assert "step 2/2" in result.stdout and "done: 2 steps" in result.stdout
        assert "max_length" not in result.stdout  # capped at the LLM's context, as the default is: no note
    model = TinyLLaVA.from_pretrained(str(tmp_path / "stage2" / "ckpt.pt"))
    assert model.config.template == "vicuna_v1"
    command = [sys.executable, os.path.join(REPO, "evaluate.py"), f"--ckpt={tmp_path}/stage2/ckpt.pt",
               "--limit=14"]  # and the held-out eval, two questions of each type
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"overall\s+\d+/14\s+\d\.\d{4}", result.stdout), result.stdout[-2000:]

# ----------------------------------------------------------------------------------------------------------------------
# Signals: Ctrl-C or SIGTERM finishes the step, writes a checkpoint, and --resume goes on as if nothing happened


def start_run(argv, launcher=()):
    """train.py as a process of its own (under `launcher`, e.g. torchrun's), its output read line by line; killed
    with its children after 120 s, so that a run that hangs fails the test instead of stalling it."""
    process = subprocess.Popen([sys.executable, *launcher, os.path.join(REPO, "train.py")] + argv, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    watchdog = threading.Timer(120, kill_tree, [process.pid])
    watchdog.daemon = True
    watchdog.start()
    return process


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:  # gone already
        return []


def kill_tree(pid):
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(process, text):
    """The lines the process printed up to the first one holding `text`."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended (status {process.wait()}) before printing {text!r}:\n{''.join(lines)}")


@pytest.mark.parametrize("stage", [1, 2])
def test_ctrl_c_at_a_random_moment_then_resume_ends_as_an_uninterrupted_run(tiny, tmp_path, stage):
    common = dict(stage=stage, max_steps=60, checkpoint_interval=0)
    train.main(flags(tiny, tmp_path / "whole", **common))
    process = start_run(flags(tiny, tmp_path / "parts", **common))
    wait_for(process, "step 1/60 |")
    time.sleep(random.Random(stage).uniform(0, 0.3))  # somewhere in the steps that follow
    process.send_signal(signal.SIGINT)
    printed = "".join(wait_for(process, "stopped at step")) + process.stdout.read()
    assert process.wait() == 130 and "Traceback" not in printed, printed
    stopped = checkpoint(tmp_path / "parts")["step"]
    assert 1 <= stopped < 60 and f"stopped at step {stopped} of 60 (SIGINT)" in printed and "--resume" in printed
    assert [r["step"] for r in train_log(tmp_path / "parts")][-1] == stopped  # the log matches the checkpoint
    train.main(flags(tiny, tmp_path / "parts", **common, resume=True))
    whole, parts = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parts")
    assert parts["step"] == whole["step"] == 60
    for name in whole["model"]:
        assert (whole["model"][name] - parts["model"][name]).abs().max() <= 1e-6, name
    assert [r["step"] for r in train_log(tmp_path / "parts")] == list(range(1, 61))


def test_one_sigint_or_sigterm_only_asks_to_stop_a_second_sigint_stops_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's, or torchrun's after the terminal's Ctrl-C: still asking
        assert stop.asked == "SIGTERM" and stop.agreed(train.Runtime())
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.asked is None and not stop.agreed(train.Runtime())
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.asked == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back


def test_an_overwriting_run_killed_before_its_first_checkpoint_leaves_the_old_run_whole(tiny, tmp_path):
    train.main(flags(tiny, tmp_path, max_steps=2))
    old = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()
    process = start_run(flags(tiny, tmp_path, max_steps=500, checkpoint_interval=0, overwrite=True))
    assert "log.jsonl.new until then" in "".join(wait_for(process, "step 2/500 |"))
    process.kill()  # kill -9: no checkpoint, no cleanup
    process.wait()
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()) == old
    train.main(flags(tiny, tmp_path, max_steps=3, overwrite=True))  # a run that reaches its checkpoint replaces both
    assert [r["step"] for r in train_log(tmp_path)] == [1, 2, 3] and checkpoint(tmp_path)["step"] == 3
    assert not (tmp_path / "log.jsonl.new").exists()


def test_resume_cuts_the_log_back_to_the_checkpoint_and_drops_a_line_cut_short(tiny, tmp_path):
    train.main(flags(tiny, tmp_path, max_steps=4, stop_at_step=2))
    with open(tmp_path / "log.jsonl", "a") as f:  # what a kill -9 after step 3 leaves behind
        f.write('{"kind": "train", "step": 3, "loss": 1.0}\n{"kind": "train", "st')
    train.main(flags(tiny, tmp_path, max_steps=4, resume=True))
    assert [r["step"] for r in train_log(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.torchrun
def worker(agent, rank):
    """The pid of torchrun's process of that rank (read from /proc: the agent's children and their environment)."""
    for pid in children(agent):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no process of rank {rank} among torchrun's children {children(agent)}")


def test_sigterm_to_one_process_under_torchrun_stops_all_at_its_step_and_resume_ends_as_uninterrupted(tiny, tmp_path):
    common = dict(max_steps=60, checkpoint_interval=0)
    train.main(flags(tiny, tmp_path / "whole", **common))
    process = start_run(flags(tiny, tmp_path / "parts", **common),
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    wait_for(process, "step 2/60 |")
    os.kill(worker(process.pid, rank=1), signal.SIGTERM)  # one process alone is asked: both must stop at its step
    printed = "".join(wait_for(process, "stopped at step")) + process.stdout.read()
    process.wait()
    stopped = checkpoint(tmp_path / "parts")["step"]
    assert 2 <= stopped < 60 and f"stopped at step {stopped} of 60 (SIGTERM to another process)" in printed, printed
    train.main(flags(tiny, tmp_path / "parts", **common, resume=True))  # in one process: the same steps
    whole, parts = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parts")
    for name in whole["model"]:
        assert (whole["model"][name] - parts["model"][name]).abs().max() <= 1e-5, name
