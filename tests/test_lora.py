"""LoRA: the adapters' arithmetic against hand-computed values, merging, export to transformers, and train.py's LoRA
runs from a stage-1 checkpoint, from one of our stage-2 checkpoints and from a transformers-built LLaVA directory:
what trains, what is saved, exact resume, and the refusals."""
import copy
import io
import os
from contextlib import redirect_stdout

import pytest
import torch
import transformers
from safetensors import safe_open

import ask
import sample
import train
from data import load_image, load_tokenizer, question_ids, stop_token_ids
from helpers import TINY_LLAMA, TINY_VISION, randomize
from llama import LoRALinear
from test_tinyllava import NUM_PATCHES, PROMPTS, pixels, tiny_model
from test_train import checkpoint, flags, run_capturing_start, tiny, train_log  # noqa: F401 (tiny: a fixture)
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLLaVA, fingerprint

ALL = "q,k,v,o,gate,up,down"


def lora_model(tmp_path, r=4, alpha=8.0, dropout=0.0, targets=ALL, seed=0):
    """A tiny TinyLLaVA with adapters whose B is random (as after training), so that they change the outputs."""
    model = tiny_model(tmp_path)
    model.add_lora(r, alpha, dropout, targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def logits_of(model, prompt=PROMPTS[0], image_seed=0):
    with torch.no_grad():
        return model(torch.tensor([prompt]), pixels(1, seed=image_seed))[0]


def test_before_any_step_the_lora_model_gives_exactly_the_base_models_logits(tmp_path):
    model = tiny_model(tmp_path).eval()
    base = logits_of(model)
    model.add_lora(4, 8.0, 0.5, ALL)
    assert torch.equal(logits_of(model), base)
    model.train()  # dropout on the adapters' input changes nothing either while B is zero
    assert torch.equal(logits_of(model), base)


def test_adapters_on_q_and_v_add_scaled_b_a_x_to_their_rows_of_the_fused_qkv_only(tmp_path):
    model = lora_model(tmp_path, r=3, alpha=6.0, targets="q_proj,v")  # transformers' names are accepted too
    qkv = model.llm.layers[0].attention.qkv
    assert isinstance(qkv, LoRALinear) and sorted(n for n, _ in qkv.named_parameters()) == [
        "lora_A.q", "lora_A.v", "lora_B.q", "lora_B.v", "weight"]
    assert not isinstance(model.llm.layers[0].attention.out, LoRALinear)  # o was not chosen
    hidden, q_rows, kv_rows = 32, 32, 16  # 4 heads and 2 key/value heads of 8
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(1))
    weight, a, b = qkv.weight.detach(), qkv.lora_A, qkv.lora_B
    w_q, w_k, w_v = weight[:q_rows], weight[q_rows:q_rows + kv_rows], weight[q_rows + kv_rows:]
    expected = torch.cat([x @ w_q.T + 2.0 * x @ a["q"].T @ b["q"].T,  # alpha / r = 2
                          x @ w_k.T,
                          x @ w_v.T + 2.0 * x @ a["v"].T @ b["v"].T], dim=-1)
    with torch.no_grad():
        assert (qkv(x) - expected).abs().max() <= 1e-6


def test_a_starts_as_nn_linear_initializes_and_b_at_zero(tmp_path):
    model = tiny_model(tmp_path)
    model.add_lora(4, 8.0, 0.0, ALL)
    down = model.llm.layers[1].mlp.down
    bound = 1 / 48 ** 0.5  # Kaiming uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), in = intermediate 48
    assert down.lora_A["down"].abs().max() <= bound and down.lora_A["down"].abs().max() > 0.8 * bound
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if ".lora_B." in n)


def test_merged_and_unmerged_logits_agree_and_merging_leaves_a_plain_model(tmp_path):
    model = lora_model(tmp_path, targets="q,k,v,o,gate,up,down")
    plain_names = {n for n, _ in tiny_model(tmp_path).named_parameters()}
    unmerged = logits_of(model)
    assert (unmerged - logits_of(tiny_model(tmp_path).eval())).abs().max() > 1e-2  # the adapters do something
    model.merge_lora()
    assert (logits_of(model) - unmerged).abs().max() <= 1e-5
    assert {n for n, _ in model.named_parameters()} == plain_names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_lora_model_exported_with_save_hf_gives_transformers_the_same_logits(tmp_path):
    model = lora_model(tmp_path, targets="q,v,gate,down")
    model.save_hf(str(tmp_path / "exported"))
    with safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # a plain LLaVA: the adapters folded in
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "exported")).eval()
    prompt = PROMPTS[1]
    with torch.no_grad():
        expected = theirs(input_ids=hf_ids(prompt, theirs.config.image_token_index), pixel_values=pixels(1, seed=8)
                          ).logits
    ours = logits_of(model, prompt, image_seed=8)  # unmerged: export did not change the model
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    assert (ours - expected[..., :TINY_LLAMA["vocab_size"]]).abs().max() <= 1e-5

# ----------------------------------------------------------------------------------------------------------------------
# train.py


def lora_flags(tiny, out_dir, towers=True, **overrides):
    """flags() for a short LoRA run; towers=False: no tower flags (an HF LLaVA --init brings its own)."""
    argv = flags(tiny, out_dir, **dict(dict(lora_r=4, lora_alpha=8, lora_dropout=0.1, max_steps=3), **overrides))
    return [arg for arg in argv if towers or not arg.startswith(("--vision_path", "--llm_path"))]


def hf_ids(prompt, image_token):
    """Our prompt with its placeholder -> transformers' convention: NUM_PATCHES copies of the image token."""
    return torch.tensor([sum(([image_token] * NUM_PATCHES if t == IMAGE_TOKEN_INDEX else [t] for t in prompt), [])])


def test_lora_run_trains_and_saves_only_the_adapters_and_w_and_leaves_every_base_tensor_bit_identical(
        tiny, tmp_path, monkeypatch):
    train.main(flags(tiny, tmp_path / "stage1", stage=1, max_steps=2))
    stage1 = checkpoint(tmp_path / "stage1")
    before, model = run_capturing_start(monkeypatch, lora_flags(tiny, tmp_path / "lora",
                                                                init=tmp_path / "stage1" / "ckpt.pt"))
    for name, tensor in stage1["model"].items():  # W starts from stage 1's
        assert torch.equal(before[name], tensor), name
    adapters = sorted(n for n, _ in model.named_parameters() if ".lora_" in n)
    assert len(adapters) == 2 * 7 * TINY_LLAMA["num_hidden_layers"]  # an A and a B per target per block
    for name, param in model.named_parameters():
        trains = name.startswith("projector.") or ".lora_" in name
        assert param.requires_grad == trains, name
        assert torch.equal(before[name], param.detach()) != trains, name  # the base: bit-identical; the rest moved
    saved = checkpoint(tmp_path / "lora")
    trained = sorted(n for n, _ in model.named_parameters() if n.startswith("projector.")) + adapters
    assert sorted(saved["model"]) == sorted(trained)
    assert sorted(saved["optimizer"]["state"]) == sorted(trained)  # AdamW state only for what trains
    # and gradients reach only the adapters and W
    model.train()
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 10, 20, 2]])
    _, loss = model(input_ids, torch.randn(1, 3, 16, 16), torch.tensor([[IGNORE_INDEX] * 3 + [20, 2]]))
    loss.backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == sorted(trained)


def test_lora_resume_after_a_stop_equals_an_uninterrupted_run(tiny, tmp_path):
    # dropout draws and W's own learning rate (--projector_lr) must both come back exactly
    common = dict(max_steps=5, checkpoint_interval=2, projector_lr=1e-3)
    train.main(lora_flags(tiny, tmp_path / "whole", **common))
    train.main(lora_flags(tiny, tmp_path / "parts", **common, stop_at_step=2))
    assert checkpoint(tmp_path / "parts")["step"] == 2
    train.main(lora_flags(tiny, tmp_path / "parts", **common, resume=True))
    whole, parts = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parts")
    assert parts["step"] == whole["step"] == 5 and whole["model"].keys() == parts["model"].keys()
    for name in whole["model"]:
        assert (whole["model"][name] - parts["model"][name]).abs().max() <= 1e-6, name
    assert [r["loss"] for r in train_log(tmp_path / "parts")] == pytest.approx(
        [r["loss"] for r in train_log(tmp_path / "whole")], rel=1e-6)
    rates = {round(group["lr"] / group["lr_scale"], 12) for group in whole["optimizer"]["param_groups"]}
    assert len(rates) == 1 and {group["lr_scale"] for group in whole["optimizer"]["param_groups"]} == {1.0, 1e-3 / 3e-3}


def test_lora_on_our_stage2_checkpoint_sits_on_it_and_is_refused_once_it_changed(tiny, tmp_path):
    stage2 = tmp_path / "stage2" / "ckpt.pt"
    train.main(flags(tiny, tmp_path / "stage2", max_steps=2))
    trained = train.main(lora_flags(tiny, tmp_path / "lora", init=stage2, max_steps=2, checkpoint_interval=1,
                                    stop_at_step=1))
    saved = checkpoint(tmp_path / "lora")
    assert saved["config"]["base"] == str(stage2) and saved["bases"]["base"] == fingerprint(str(stage2))
    assert not [n for n in saved["model"] if n.startswith("llm.") and ".lora_" not in n]  # the LLM is the base's
    loaded = TinyLLaVA.from_pretrained(str(tmp_path / "lora")).eval()
    assert torch.equal(logits_of(loaded), logits_of(trained.eval()))
    train.main(flags(tiny, tmp_path / "stage2", max_steps=2, seed=1, overwrite=True))  # the base trained again: new weights
    with pytest.raises(ValueError, match=f"lora sits on {stage2}, which changed since"):
        TinyLLaVA.from_pretrained(str(tmp_path / "lora"))
    with pytest.raises(SystemExit, match=f"ckpt.pt sits on {stage2}, which changed since"):
        train.main(lora_flags(tiny, tmp_path / "lora", init=stage2, max_steps=2, checkpoint_interval=1,
                              resume=True))


@pytest.fixture(scope="module")
def hf_llava(tiny, tmp_path_factory):
    """A LlavaForConditionalGeneration built and saved by transformers (random weights) with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "llava"
    vocab = load_tokenizer(tiny["llm"]).get_vocab_size()
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**TINY_VISION), image_seq_length=NUM_PATCHES,
        text_config=transformers.LlamaConfig(**dict(TINY_LLAMA, vocab_size=vocab + 1, max_position_embeddings=512)),
        image_token_index=vocab)
    randomize(transformers.LlavaForConditionalGeneration(config), seed=3).save_pretrained(str(path))
    os.link(os.path.join(tiny["llm"], "tokenizer.json"), path / "tokenizer.json")
    return path


def test_lora_from_a_transformers_llava_directory_lowers_held_out_loss_and_runs_in_sample_and_transformers(
        tiny, hf_llava, tmp_path):
    common = dict(eval_samples=0, learning_rate=1e-2)
    train.main(lora_flags(tiny, tmp_path / "untrained", towers=False, init=hf_llava, max_steps=1, **dict(common,
                                                                                           learning_rate=1e-12)))
    train.main(lora_flags(tiny, tmp_path / "lora", towers=False, init=hf_llava, max_steps=16, **common))
    untrained, trained = (train_log(tmp_path / name, "eval")[-1]["val_loss"] for name in ("untrained", "lora"))
    assert trained < untrained - 0.25, (untrained, trained)  # 6.10 -> 5.74 on world v2 (8 steps: 6.10 -> 5.88)
    saved = checkpoint(tmp_path / "lora")
    assert saved["config"]["base"] == str(hf_llava) and saved["bases"]["base"] == fingerprint(str(hf_llava))
    assert {n.split(".")[0] for n in saved["model"]} == {"projector", "llm"}
    assert all(n.startswith("projector.") or ".lora_" in n for n in saved["model"])

    # sample.py --ckpt answers with the adapters merged, as the unmerged model does
    model = TinyLLaVA.from_pretrained(str(tmp_path / "lora")).eval()
    image = str(tiny["world"] / "images" / "val_00000.png")
    tokenizer = load_tokenizer(str(hf_llava))
    prompt = question_ids("What color is the circle?", tokenizer, "vicuna_v1")
    pixel_values = ask.to_pixels(model, [load_image(image)])  # the checkpoint's crop
    stops = stop_token_ids(tokenizer, "vicuna_v1")
    expected = ask.decode_answer(model.generate([prompt], pixel_values, max_new_tokens=6, stop_token_ids=stops)[0]
                                 .tolist(), tokenizer, stops)
    out = io.StringIO()
    with redirect_stdout(out):
        assert sample.main(["--ckpt", str(tmp_path / "lora"), "--image", image, "--prompt",
                            "What color is the circle?", "--max_new_tokens", "6"]) is None
    assert out.getvalue().strip() == expected

    # exported merged, transformers computes what the LoRA checkpoint does
    model.save_hf(str(tmp_path / "exported"))
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "exported")).eval()
    image_token = theirs.config.image_token_index
    assert image_token == model.config.image_token_index  # the base's own image id, no row added
    with torch.no_grad():
        expected_logits = theirs(input_ids=hf_ids(prompt, image_token), pixel_values=pixel_values).logits
        ours = model(torch.tensor([prompt]), pixel_values)[0]
    assert (ours - expected_logits).abs().max() <= 1e-5


def test_lora_checkpoint_on_an_hf_llava_directory_that_changed_is_refused_naming_it(tiny, hf_llava, tmp_path):
    base = tmp_path / "llava"
    transformers.LlavaForConditionalGeneration.from_pretrained(str(hf_llava)).save_pretrained(str(base))
    os.link(hf_llava / "tokenizer.json", base / "tokenizer.json")
    train.main(lora_flags(tiny, tmp_path / "lora", towers=False, init=base, max_steps=1))
    randomize(transformers.LlavaForConditionalGeneration.from_pretrained(str(base)), seed=9).save_pretrained(str(base))
    with pytest.raises(ValueError, match=f"sits on {base}, which changed since"):
        TinyLLaVA.from_pretrained(str(tmp_path / "lora"))


@pytest.mark.parametrize("argv, message", [
    (["--stage", "2", "--lora_r", "-1"], "--lora_r must be at least 0, got -1"),
    (["--stage", "2", "--lora_r", "8", "--lora_targets", "q,qq,lm_head"],
     "'qq', 'lm_head' matches no linear layer of the LLM's blocks; they are q, k, v, o, gate, up, down"),
    (["--stage", "1", "--lora_r", "8"], "--lora_r: LoRA adapts the LLM, which stage 1 keeps frozen (only W trains)"),
    (["--stage", "2", "--lora_r", "8", "--lora_targets", " , "], "' , ': names no linear layer of the LLM's blocks"),
    (["--stage", "2", "--lora_alpha", "32"], "--lora_alpha does nothing without --lora_r"),
    (["--stage", "2", "--lora_r", "8", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
    (["--stage", "2", "--projector_lr", "-1e-3"], "--projector_lr must be at least 0"),
])
def test_bad_lora_flags_fail_with_one_line_naming_the_flag(argv, message, tmp_path):
    with pytest.raises(SystemExit) as error:  # a missing refusal fails fast too: there is no data to train on
        train.main(argv + ["--data_path", str(tmp_path / "missing.json"), "--out_dir", str(tmp_path / "out")])
    assert str(error.value).startswith("train.py: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_frozen_linears_stored_in_bf16_give_the_same_logits_and_gradients_under_bf16_autocast(tmp_path):
    model = lora_model(tmp_path, dropout=0.0).train()
    stored = copy.deepcopy(model)
    stored.store_frozen_linears_in(torch.bfloat16)
    assert stored.llm.layers[0].attention.qkv.weight.dtype == torch.bfloat16
    assert stored.vision.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert stored.llm.layers[0].attention.qkv.lora_A["q"].dtype == torch.float32  # what trains stays float32
    input_ids = torch.tensor([PROMPTS[0]])
    labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < 4, IGNORE_INDEX)
    results = []
    for each in (model, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = each(input_ids, pixels(1), labels)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in each.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])
