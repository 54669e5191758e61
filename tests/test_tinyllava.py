"""tinyllava.py: HF LLaVA checkpoints in and out (parity with transformers), the splice, the loss, the stages."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import llama
import train
from helpers import TINY_LLAMA, TINY_VISION, assert_bf16_parity, randomize, save_tiny_bases
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLLaVA, TinyLLaVAConfig

IMAGE_TOKEN = 63  # transformers' LLaVA marks image positions with an in-vocabulary id
NUM_PATCHES = 4  # (16 / 8)^2


def make_hf_llava(tmp_path, seed=0, layer=-2, strategy="default"):
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_VISION),
                                      text_config=transformers.LlamaConfig(**TINY_LLAMA),
                                      image_token_index=IMAGE_TOKEN, vision_feature_layer=layer,
                                      vision_feature_select_strategy=strategy, image_seq_length=NUM_PATCHES)
    model = randomize(transformers.LlavaForConditionalGeneration(config), seed).eval()
    path = str(tmp_path / "llava")
    model.save_pretrained(path)
    return model, path


def expand(ids, count=NUM_PATCHES):
    """Our placeholder -> transformers' convention of `count` copies of the image token."""
    out = []
    for token in ids:
        out += [IMAGE_TOKEN] * count if token == IMAGE_TOKEN_INDEX else [token]
    return out


def pixels(count, seed=0):
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def assert_same_logits_as_transformers(ours, theirs, prompts, pixel_values, count=NUM_PATCHES):
    """Right-padded batch of prompts: logits at every real position equal transformers' on the expanded ids."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    with torch.no_grad():
        logits, _ = ours(input_ids, pixel_values)
        images = iter(pixel_values) if pixel_values is not None else iter(())
        for row, prompt in enumerate(prompts):
            expanded = torch.tensor([expand(prompt, count)])
            own_images = torch.stack([next(images) for _ in range(prompt.count(IMAGE_TOKEN_INDEX))]) \
                if IMAGE_TOKEN_INDEX in prompt else None
            expected = theirs(input_ids=expanded, pixel_values=own_images).logits[0]
            diff = (logits[row, :expected.shape[0]] - expected).abs().max()
            assert diff <= 1e-5, f"row {row}: logits differ by {diff:.2e}"


PROMPTS = [[1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8], [1, IMAGE_TOKEN_INDEX, 9, 10, 11, 12, 13, 14], [1, 20, 21, 22]]
TWO_IMAGES = [1, IMAGE_TOKEN_INDEX, 30, 31, IMAGE_TOKEN_INDEX, 32, 33]  # two images in one row, each its own


def test_hf_llava_loads_and_gives_transformers_logits_one_image_two_images_and_text_only_rows(tmp_path):
    theirs, path = make_hf_llava(tmp_path)
    ours = TinyLLaVA.from_pretrained(path).eval()
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[:1], pixels(1))
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[:2], pixels(2, seed=1))  # two images in a batch
    assert_same_logits_as_transformers(ours, theirs, PROMPTS, pixels(2, seed=2))  # mixed with a text-only sample
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[2:], None)  # text only
    assert_same_logits_as_transformers(ours, theirs, [PROMPTS[0], TWO_IMAGES, PROMPTS[2]], pixels(3, seed=3))


@pytest.mark.parametrize("layout", ["llava_hf_published", "transformers5_model_prefix"])
def test_other_hf_llava_key_layouts_load_the_same(tmp_path, layout):
    theirs, path = make_hf_llava(tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    if layout == "llava_hf_published":  # vision_tower.vision_model.*, language_model.model.*
        tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    else:  # model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
        renamed = {}
        for k, v in tensors.items():
            k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
                                                                                    "lm_head.")
            if k.startswith(("vision_tower.", "multi_modal_projector.")):
                k = "model." + k
            renamed[k] = v
        tensors = renamed
    save_file(tensors, file, metadata={"format": "pt"})
    ours = TinyLLaVA.from_pretrained(path).eval()
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[:2], pixels(2))


def test_last_layer_and_class_token_options_follow_the_hf_config(tmp_path):
    theirs, path = make_hf_llava(tmp_path, seed=3, layer=-1, strategy="full")
    ours = TinyLLaVA.from_pretrained(path).eval()
    assert ours.num_image_tokens == NUM_PATCHES + 1
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[:2], pixels(2), count=NUM_PATCHES + 1)


def test_greedy_20_tokens_equal_transformers_generate(tmp_path):
    theirs, path = make_hf_llava(tmp_path, seed=4)
    ours = TinyLLaVA.from_pretrained(path).eval()
    prompt, image = PROMPTS[0], pixels(1, seed=5)
    theirs.generation_config.eos_token_id = None
    expanded = torch.tensor([expand(prompt)])
    expected = theirs.generate(input_ids=expanded, pixel_values=image, max_new_tokens=20, do_sample=False,
                               min_new_tokens=20)[:, expanded.shape[1]:]
    assert torch.equal(ours.generate([prompt], image, max_new_tokens=20), expected)
    assert torch.equal(ours.generate([prompt], image, max_new_tokens=20, use_cache=False), expected)


def test_batch_of_prompts_of_different_lengths_has_at_every_step_the_logits_of_each_alone(tmp_path, monkeypatch):
    """Left padding inside generate: a batch mixing one image, two images in one row and text only samples at every
    step from the logits each prompt has alone (the two images spliced in their order)."""
    _, path = make_hf_llava(tmp_path, seed=6)
    ours = TinyLLaVA.from_pretrained(path).eval()
    prompts, images = [PROMPTS[0], TWO_IMAGES, PROMPTS[2]], pixels(3, seed=7)
    steps = []

    def recording(logits, *args, **kwargs):
        steps.append(logits.clone())
        return sample_next_token(logits, *args, **kwargs)
    sample_next_token = llama.sample_next_token
    monkeypatch.setattr(llama, "sample_next_token", recording)
    together = ours.generate(prompts, images, max_new_tokens=8)
    batched = torch.stack(steps, 1)  # (B, 8, vocab)
    for row, (prompt, own_images) in enumerate(zip(prompts, (images[:1], images[1:], None))):
        steps.clear()
        assert torch.equal(together[row], ours.generate([prompt], own_images, max_new_tokens=8)[0])
        difference = (batched[row] - torch.stack(steps, 1)[0]).abs().max()
        assert difference <= 1e-5, f"row {row}: logits differ from the prompt's alone by {difference:.2e}"
    steps.clear()
    ours.generate([TWO_IMAGES], images[[2, 1]], max_new_tokens=8)  # the row's images swapped: another answer
    assert (torch.stack(steps, 1)[0] - batched[1]).abs().max() > 1e-2


def test_export_to_hf_reloads_in_transformers_with_the_same_logits(tmp_path):
    vision_path, llm_path = save_tiny_bases(tmp_path)
    ours = TinyLLaVA.from_bases(TinyLLaVAConfig(vision_path=vision_path, llm_path=llm_path)).eval()
    randomize(ours.projector, seed=9)
    ours.save_hf(str(tmp_path / "exported"))
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "exported")).eval()
    image_token = theirs.config.image_token_index
    assert image_token == TINY_LLAMA["vocab_size"]  # a new '<image>' row: our vocabulary had none
    prompt, image = PROMPTS[1], pixels(1, seed=8)
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor([expand(prompt, NUM_PATCHES)]).masked_fill(
            torch.tensor([expand(prompt, NUM_PATCHES)]) == IMAGE_TOKEN, image_token), pixel_values=image).logits
        logits, _ = ours(torch.tensor([prompt]), image)
    assert (logits - expected[..., :TINY_LLAMA["vocab_size"]]).abs().max() <= 1e-5
    # and back: the exported directory imports again to the same model
    reimported = TinyLLaVA.from_pretrained(str(tmp_path / "exported")).eval()
    with torch.no_grad():
        assert (reimported(torch.tensor([prompt]), image)[0][..., :TINY_LLAMA["vocab_size"]]
                - logits).abs().max() <= 1e-6


def tiny_model(tmp_path, projector="mlp2x_gelu"):
    vision_path, llm_path = save_tiny_bases(tmp_path)
    return TinyLLaVA.from_bases(TinyLLaVAConfig(vision_path=vision_path, llm_path=llm_path, projector=projector))


@pytest.mark.parametrize("image_first", [True, False])
def test_image_features_land_exactly_where_the_placeholder_was(tmp_path, image_first):
    model = tiny_model(tmp_path).eval()
    question = [5, 6, 7]
    input_ids = [1] + ([IMAGE_TOKEN_INDEX] + question if image_first else question + [IMAGE_TOKEN_INDEX]) + [8]
    image = pixels(1)
    with torch.no_grad():
        embeds, _, lengths = model.embed(torch.tensor([input_ids]), image)
        words = model.llm.embed_tokens.weight
        patches = model.vision(image, layer=-2)[0, 1:]  # Z_v: penultimate layer without CLS
        features = model.projector.linear_2(F.gelu(model.projector.linear_1(patches)))  # H_v = W · Z_v
    expected = ([words[1]] + ([*features] + [words[t] for t in question] if image_first
                              else [words[t] for t in question] + [*features]) + [words[8]])
    assert embeds.shape == (1, 5 + NUM_PATCHES, 32) and int(lengths[0]) == 5 + NUM_PATCHES
    assert torch.allclose(embeds[0], torch.stack(expected), atol=1e-6)


def test_two_images_in_one_row_land_in_order_and_the_next_row_gets_the_third(tmp_path):
    model = tiny_model(tmp_path).eval()
    randomize(model.projector, seed=3)
    # row 0: bos <image> q q <image> a ; row 1: bos q <image> a, right-padded
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, IMAGE_TOKEN_INDEX, 20], [1, 7, IMAGE_TOKEN_INDEX, 21, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX] * 5 + [20], [IGNORE_INDEX] * 3 + [21, IGNORE_INDEX, IGNORE_INDEX]])
    images = pixels(3, seed=4)
    with torch.no_grad():
        embeds, spliced_labels, lengths = model.embed(input_ids, images, labels)
        words = model.llm.embed_tokens.weight
        patches = model.vision(images, layer=-2)[:, 1:]  # Z_v of each image: penultimate layer without CLS
        first, second, third = model.projector.linear_2(F.gelu(model.projector.linear_1(patches)))  # H_v = W · Z_v
    n = NUM_PATCHES
    rows = [[words[1], *first, words[5], words[6], *second, words[20]],
            [words[1], words[7], *third, words[21], words[0], words[0]] + [torch.zeros(32)] * (n - 1)]
    assert embeds.shape == (2, 4 + 2 * n, 32) and lengths.tolist() == [4 + 2 * n, 5 + n]
    for row, expected in enumerate(rows):
        assert torch.allclose(embeds[row], torch.stack(expected), atol=1e-6), f"row {row}"
    assert spliced_labels.tolist() == [[IGNORE_INDEX] * (3 + 2 * n) + [20],
                                       [IGNORE_INDEX] * (2 + n) + [21] + [IGNORE_INDEX] * (n + 1)]


def test_loss_covers_answer_tokens_only_hand_computed(tmp_path):
    model = tiny_model(tmp_path).eval()
    # row 0: bos q q <image> q | answer a a eos | pad pad ; row 1: text only, bos q | a eos | pad x5
    input_ids = torch.tensor([[1, 10, 11, IMAGE_TOKEN_INDEX, 12, 20, 21, 2, 0, 0],
                              [1, 13, 22, 2, 0, 0, 0, 0, 0, 0]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 5:8] = input_ids[0, 5:8]
    labels[1, 2:4] = input_ids[1, 2:4]
    with torch.no_grad():
        supervised_logits, loss = model(input_ids, pixel_values=pixels(1), labels=labels)
        logits, _ = model(input_ids, pixel_values=pixels(1))  # every position's
    n = NUM_PATCHES
    # row 0 spliced: bos q q [n image tokens] q a a eos: answer tokens at 4+n, 5+n, 6+n, predicted one step earlier
    targets = [(0, 3 + n, 20), (0, 4 + n, 21), (0, 5 + n, 2), (1, 1, 22), (1, 2, 2)]
    expected = torch.stack([-logits[b, p].log_softmax(-1)[t] for b, p, t in targets]).mean()
    assert abs(loss.item() - expected.item()) < 1e-6
    # with labels, the output head ran at those positions only, in order
    torch.testing.assert_close(supervised_logits, torch.stack([logits[b, p] for b, p, _ in targets]))


@pytest.mark.parametrize("stage", [1, 2])
def test_after_backward_only_the_stage_trainable_parts_hold_gradients(tmp_path, stage):
    model = tiny_model(tmp_path)
    model.set_stage(stage)
    model.train()
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 10, 20, 2]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 20, 2]])
    _, loss = model(input_ids, pixels(1), labels)
    loss.backward()
    for name, param in model.named_parameters():
        trainable = name.startswith("projector.") or (stage == 2 and name.startswith("llm."))
        assert (param.grad is not None and param.grad.abs().sum() > 0) == trainable, name
        assert param.requires_grad == trainable, name
    assert not model.vision.training


def gradients(model, input_ids, pixel_values, labels):
    model.zero_grad()
    _, loss = model(input_ids, pixel_values, labels)
    (loss * int((labels[:, 1:] != IGNORE_INDEX).sum())).backward()  # the summed loss: gradients of order 1
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_gives_w_and_the_llm_their_plain_gradients(tmp_path, stage):
    """Stage 1 sends W's gradient back through the frozen, recomputed LLM; stage 2 trains both."""
    model = tiny_model(tmp_path)  # bases with weights unlike transformers' init (helpers.randomize)
    randomize(model.projector, seed=5)
    model.set_stage(stage)
    model.train()
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 10, IMAGE_TOKEN_INDEX, 11, 20, 21, 2],
                              [1, 12, IMAGE_TOKEN_INDEX, 13, 22, 23, 2, 0]])
    labels = input_ids.masked_fill(torch.arange(8) < 5, IGNORE_INDEX).masked_fill(input_ids == 0, IGNORE_INDEX)
    images = pixels(3, seed=6)
    plain = gradients(model, input_ids, images, labels)
    model.llm.gradient_checkpointing = True
    checkpointed = gradients(model, input_ids, images, labels)
    assert {name.split(".")[0] for name in plain} == ({"projector"} if stage == 1 else {"projector", "llm"})
    for name, gradient in plain.items():
        if name != "llm.embed_tokens.weight":  # its rows of unused tokens get no gradient
            assert gradient.abs().max() >= 1e-2, f"{name}: gradient {gradient.abs().max():.1e} too small to test"
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_text_only_batch_still_reaches_the_projector_for_ddp(tmp_path):
    model = tiny_model(tmp_path)
    model.set_stage(1)
    model.train()
    _, loss = model(torch.tensor([[1, 10, 20, 2]]), None, torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 20, 2]]))
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_placeholder_and_image_counts_must_agree(tmp_path):
    model = tiny_model(tmp_path)
    with pytest.raises(ValueError, match="2 image placeholders in input_ids but 1 images given"):
        model(torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]]), pixels(1))


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_our_checkpoint_round_trips_and_holds_only_trained_weights(tmp_path, projector):
    model = tiny_model(tmp_path, projector)
    model.set_stage(1)
    randomize(model.projector, seed=11)
    model.save(str(tmp_path / "stage1" / "ckpt.pt"), step=3)
    saved = torch.load(str(tmp_path / "stage1" / "ckpt.pt"), weights_only=True)
    assert set(saved["model"]) == {n for n, _ in model.projector.named_parameters(prefix="projector")}
    assert saved["step"] == 3 and saved["bases"] == model.base_fingerprints()
    loaded = TinyLLaVA.from_pretrained(str(tmp_path / "stage1")).eval()
    input_ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 10, 11]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, pixels(1))[0], model.eval()(input_ids, pixels(1))[0])
    model.set_stage(2)
    randomize(model.llm, seed=12)  # the LLM as stage 2 leaves it: unlike its base
    model.save(str(tmp_path / "stage2.pt"))
    saved = torch.load(str(tmp_path / "stage2.pt"), weights_only=True)
    assert set(saved["model"]) == {n for n, _ in model.named_parameters() if not n.startswith("vision.")}
    loaded = dict(TinyLLaVA.from_pretrained(str(tmp_path / "stage2.pt")).named_parameters())
    base = dict(tiny_model(tmp_path / "again", projector).named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(loaded[name], param), name  # the trained values, the vision tower's from its base
        if name.startswith("llm."):
            assert not torch.equal(base[name], param), name


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    model = tiny_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing: no such file or directory"):
        TinyLLaVA.from_pretrained(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'llava'"):
        TinyLLaVA.from_pretrained(model.config.llm_path)
    weights = model.trained_weights()
    weights["projector.linear_1.weight"] = weights["projector.linear_1.weight"][:, :5]
    with pytest.raises(ValueError, match="mis-shaped tensor: projector.linear_1.weight"):
        model.load_trained_weights(weights)
    with pytest.raises(ValueError, match="unexpected tensor: vision.class_embedding"):
        model.load_trained_weights({"vision.class_embedding": model.vision.class_embedding.detach()})
    with pytest.raises(ValueError, match="HF LLaVA has only the mlp2x_gelu projector"):
        tiny_model(tmp_path, "linear").save_hf(str(tmp_path / "hf"))


def test_checkpoint_on_a_changed_llm_alone_is_refused_naming_the_llm(tmp_path):
    model = tiny_model(tmp_path)
    model.set_stage(1)
    model.save(str(tmp_path / "ckpt.pt"))
    other = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)), seed=7)
    other_path = model.config.llm_path
    other.save_pretrained(other_path)  # the same architecture, other weights; the vision tower unchanged
    with pytest.raises(ValueError, match=f"but the LLM at {other_path} differs"):
        TinyLLaVA.from_pretrained(str(tmp_path / "ckpt.pt"))


def test_checkpoint_on_changed_bases_is_refused_naming_the_tower(tmp_path):
    model = tiny_model(tmp_path)
    model.set_stage(1)
    model.save(str(tmp_path / "ckpt.pt"))
    save_tiny_bases(tmp_path, seed=5)  # the base directories now hold other weights
    with pytest.raises(ValueError, match=r"but the vision tower at \S+ (and the LLM at \S+ )?differ"):
        TinyLLaVA.from_pretrained(str(tmp_path / "ckpt.pt"))


# ----------------------------------------------------------------------------------------------------------------------
# bfloat16: the settings a GPU run uses, against transformers in the same setting


def right_padded(prompts, count=NUM_PATCHES):
    """(our input ids, transformers' expanded ids, each row's length once spliced), right-padded with 0."""
    expanded = [expand(p, count) for p in prompts]
    pad = lambda rows: torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])
    return pad(prompts), pad(expanded), [len(e) for e in expanded]


def test_bfloat16_weights_and_autocast_give_transformers_bfloat16_logits(tmp_path):
    theirs, path = make_hf_llava(tmp_path, seed=12)
    input_ids, expanded, lengths = right_padded([PROMPTS[0], TWO_IMAGES, PROMPTS[2]])
    images = pixels(3, seed=13)
    real = lambda logits: torch.cat([logits[row, :n] for row, n in enumerate(lengths)])  # the padding aside
    ours = TinyLLaVA.from_pretrained(path).eval()
    ours_bf16 = TinyLLaVA.from_pretrained(path, dtype=torch.bfloat16).eval()
    theirs_bf16 = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        float32 = real(theirs(input_ids=expanded, pixel_values=images).logits)
        logits = ours_bf16(input_ids, images)[0]
        assert logits.dtype == torch.bfloat16
        expected = real(theirs_bf16(input_ids=expanded, pixel_values=images.bfloat16()).logits)
        assert_bf16_parity(real(logits), expected, float32, "bfloat16 weights")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = real(theirs(input_ids=expanded, pixel_values=images).logits)
            assert_bf16_parity(real(ours(input_ids, images)[0]), expected, float32, "float32 weights under autocast")


def test_stage2_training_step_under_bf16_autocast_gives_transformers_loss_and_gradient_norms(tmp_path):
    """train.py's step (its Runtime's autocast, the loss over the batch's supervised tokens) against transformers'
    LLaVA under the same autocast, its vision tower frozen as ours is: the loss, the whole gradient's norm and each
    trained tensor's."""
    theirs, path = make_hf_llava(tmp_path, seed=14)
    prompts = [TWO_IMAGES + [40, 41, 2], PROMPTS[0] + [42, 2]]  # each ends with an answer and EOS
    input_ids, expanded, _ = right_padded(prompts)
    labels, expanded_labels = torch.full_like(input_ids, IGNORE_INDEX), torch.full_like(expanded, IGNORE_INDEX)
    for row, (prompt, answer) in enumerate(zip(prompts, (3, 2))):  # the answer: the last tokens of each row
        labels[row, len(prompt) - answer:len(prompt)] = torch.tensor(prompt[-answer:])
        end = len(expand(prompt))
        expanded_labels[row, end - answer:end] = torch.tensor(prompt[-answer:])
    images = pixels(3, seed=15)

    ours = TinyLLaVA.from_pretrained(path)
    ours.set_stage(2)
    ours.train()
    trained = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    optimizer = train.make_optimizer(ours, train.TrainConfig(learning_rate=1e-3))
    norms, step = [], optimizer.step

    def recording_step(*args, **kwargs):  # each trained tensor's gradient norm, as train_step leaves it
        norms.extend(p.grad.norm().item() for _, p in trained)
        return step(*args, **kwargs)
    optimizer.step = recording_step
    batch = dict(input_ids=input_ids, labels=labels, pixel_values=images, attention_mask=input_ids != 0, skipped=[])
    stats = train.train_step(ours, optimizer, [batch], 1e-3, train.Runtime(autocast_dtype=torch.bfloat16), 0)
    mine = torch.tensor([stats["loss"], stats["grad_norm"], *norms])

    theirs.train()
    theirs.model.vision_tower.requires_grad_(False)
    names = ours.hf_key_map(vision_prefix="model.vision_tower.", projector_prefix="model.multi_modal_projector.",
                            llm_prefix="model.language_model.", lm_head="lm_head.weight")  # transformers 5's, in memory
    parameters = dict(theirs.named_parameters())

    def transformers_step(autocast):
        theirs.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = theirs(input_ids=expanded, pixel_values=images, labels=expanded_labels).loss
        loss.backward()
        # our fused q/k/v and gate/up tensors are theirs stacked
        gradients = [torch.cat([parameters[n].grad for n, _ in names[name]]) if isinstance(names[name], list)
                     else parameters[names[name]].grad for name, _ in trained]
        whole = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients]))
        return torch.tensor([loss.item(), whole.item(), *[g.norm().item() for g in gradients]])
    float32, bf16 = transformers_step(False), transformers_step(True)
    assert mine[0] > 1 and mine[1] > 1 and len(mine) == len(bf16) == 2 + len(trained), mine
    # the forward pass rounds as transformers' does: the loss within half of transformers' own bf16 error on it
    assert_bf16_parity(mine[:1], bf16[:1], float32[:1], "loss")
    # backward: our fused q/k/v (and gate/up) matmuls sum the input's gradient inside one bf16 matmul where
    # transformers sums three rounded products: two roundings of the same sum, each within bf16's error of the float32
    # value, so they may differ by twice that error (triangle inequality). Relative, so that every norm weighs alike.
    assert_bf16_parity(mine[1:] / float32[1:], bf16[1:] / float32[1:], float32[1:] / float32[1:],
                       "gradient norms (the whole and each tensor's)", multiple=2)


@pytest.mark.parametrize("packed", [False, True])
def test_stage2_loss_and_gradients_equal_transformers_full_logits_loss_in_float32(tmp_path, packed):
    """Our loss computes the output head only where a label is kept; transformers' LLaVA computes the logits of every
    position and masks them in the loss. Same weights and batch: the same loss and the same gradient of every trained
    tensor, to float32 rounding. Packed: our batch is one row of the three samples end to end (train.py --pack),
    transformers' the right-padded rows."""
    theirs, path = make_hf_llava(tmp_path, seed=16)
    prompts = [TWO_IMAGES + [40, 41, 2], PROMPTS[0] + [42, 2], PROMPTS[2] + [43, 44, 45, 2]]
    input_ids, expanded, _ = right_padded(prompts)
    labels, expanded_labels = torch.full_like(input_ids, IGNORE_INDEX), torch.full_like(expanded, IGNORE_INDEX)
    for row, (prompt, answer) in enumerate(zip(prompts, (3, 2, 4))):  # the answer: the last tokens of each row
        labels[row, len(prompt) - answer:len(prompt)] = torch.tensor(prompt[-answer:])
        end = len(expand(prompt))
        expanded_labels[row, end - answer:end] = torch.tensor(prompt[-answer:])
    samples = None
    if packed:
        samples = [len(prompt) for prompt in prompts]
        input_ids, labels = (torch.cat([t[row, :n] for row, n in enumerate(samples)])[None] for t in (input_ids, labels))
    images = pixels(3, seed=17)
    ours = TinyLLaVA.from_pretrained(path)
    ours.set_stage(2)
    ours.train()
    _, loss = ours(input_ids, images, labels, samples)
    loss.backward()
    theirs.train()
    theirs.model.vision_tower.requires_grad_(False)
    expected = theirs(input_ids=expanded, pixel_values=images, labels=expanded_labels).loss
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item(), (loss.item(), expected.item())
    names = ours.hf_key_map(vision_prefix="model.vision_tower.", projector_prefix="model.multi_modal_projector.",
                            llm_prefix="model.language_model.", lm_head="lm_head.weight")
    parameters = dict(theirs.named_parameters())
    trained = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == 4 + 3 + 6 * TINY_LLAMA["num_hidden_layers"]  # W; embeddings, norm, head; the blocks
    for name, p in trained:  # our fused q/k/v and gate/up tensors are theirs stacked
        their_gradient = torch.cat([parameters[n].grad for n, _ in names[name]]) if isinstance(names[name], list) \
            else parameters[names[name]].grad
        assert p.grad.abs().max() > 1e-3, f"{name}: gradient too small to test"
        torch.testing.assert_close(p.grad, their_gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_a_packed_row_gives_each_sample_its_logits_alone_in_transformers(tmp_path):
    """One row of three samples end to end (two images, one, none): each sample's logits are transformers' for it
    alone, so no sample sees another and each counts its positions from 0."""
    theirs, path = make_hf_llava(tmp_path, seed=18)
    ours = TinyLLaVA.from_pretrained(path).eval()
    prompts = [PROMPTS[2], TWO_IMAGES, PROMPTS[0]]
    images = pixels(3, seed=19)
    with torch.no_grad():
        logits, _ = ours(torch.tensor([sum(prompts, [])]), images, samples=[len(p) for p in prompts])
        expected = [theirs(input_ids=torch.tensor([expand(PROMPTS[2])])).logits[0],
                    theirs(input_ids=torch.tensor([expand(TWO_IMAGES)]), pixel_values=images[:2]).logits[0],
                    theirs(input_ids=torch.tensor([expand(PROMPTS[0])]), pixel_values=images[2:]).logits[0]]
    assert logits.shape[:2] == (1, sum(map(len, expected)))
    for each, alone in zip(logits[0].split([len(e) for e in expected]), expected):
        torch.testing.assert_close(each, alone, atol=1e-5, rtol=0)
