"""tinyllava.py: HF LLaVA checkpoints in and out (parity with transformers), the splice, the loss, the stages."""
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from helpers import TINY_LLAMA, TINY_VISION, randomize, save_tiny_bases
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


def test_hf_llava_loads_and_gives_transformers_logits_one_image_two_images_and_text_only(tmp_path):
    theirs, path = make_hf_llava(tmp_path)
    ours = TinyLLaVA.from_pretrained(path).eval()
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[:1], pixels(1))
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[:2], pixels(2, seed=1))  # two images in a batch
    assert_same_logits_as_transformers(ours, theirs, PROMPTS, pixels(2, seed=2))  # mixed with a text-only sample
    assert_same_logits_as_transformers(ours, theirs, PROMPTS[2:], None)  # text only


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


def test_batch_of_prompts_of_different_lengths_generates_what_each_alone_does(tmp_path):
    _, path = make_hf_llava(tmp_path, seed=6)
    ours = TinyLLaVA.from_pretrained(path).eval()
    images = pixels(2, seed=7)
    together = ours.generate(PROMPTS, images, max_new_tokens=8)
    assert torch.equal(together[0], ours.generate([PROMPTS[0]], images[:1], max_new_tokens=8)[0])
    assert torch.equal(together[1], ours.generate([PROMPTS[1]], images[1:], max_new_tokens=8)[0])
    assert torch.equal(together[2], ours.generate([PROMPTS[2]], None, max_new_tokens=8)[0])


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


def test_loss_covers_answer_tokens_only_hand_computed(tmp_path):
    model = tiny_model(tmp_path).eval()
    # row 0: bos q q <image> q | answer a a eos | pad pad ; row 1: text only, bos q | a eos | pad x5
    input_ids = torch.tensor([[1, 10, 11, IMAGE_TOKEN_INDEX, 12, 20, 21, 2, 0, 0],
                              [1, 13, 22, 2, 0, 0, 0, 0, 0, 0]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 5:8] = input_ids[0, 5:8]
    labels[1, 2:4] = input_ids[1, 2:4]
    with torch.no_grad():
        logits, loss = model(input_ids, pixel_values=pixels(1), labels=labels)
    n = NUM_PATCHES
    # row 0 spliced: bos q q [n image tokens] q a a eos: answer tokens at 4+n, 5+n, 6+n, predicted one step earlier
    targets = [(0, 3 + n, 20), (0, 4 + n, 21), (0, 5 + n, 2), (1, 1, 22), (1, 2, 2)]
    expected = torch.stack([-logits[b, p].log_softmax(-1)[t] for b, p, t in targets]).mean()
    assert abs(loss.item() - expected.item()) < 1e-6


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
    model.save(str(tmp_path / "stage2.pt"))
    assert any(k.startswith("llm.") for k in torch.load(str(tmp_path / "stage2.pt"), weights_only=True)["model"])


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    model = tiny_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
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


def test_checkpoint_on_changed_bases_is_refused_naming_the_tower(tmp_path):
    model = tiny_model(tmp_path)
    model.set_stage(1)
    model.save(str(tmp_path / "ckpt.pt"))
    save_tiny_bases(tmp_path, seed=5)  # the base directories now hold other weights
    with pytest.raises(ValueError, match="trained on another vision checkpoint"):
        TinyLLaVA.from_pretrained(str(tmp_path / "ckpt.pt"))
