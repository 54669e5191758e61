"""clip.py against transformers' CLIPModel / CLIPVisionModel, on checkpoints transformers itself writes."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from clip import CLIP, CLIPVision
from helpers import assert_bf16_parity, randomize

VISION = {
    "224_patch16_quick_gelu": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=64, patch_size=16, hidden_act="quick_gelu"),
    "336_like_patch14_gelu": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                  image_size=42, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6),
}
TEXT = dict(vocab_size=100, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=20, bos_token_id=98, eos_token_id=50, pad_token_id=0)  # EOS not the largest id


def make_hf_clip(tmp_path, vision_name, seed=0, **save_kwargs):
    config = transformers.CLIPConfig(vision_config=VISION[vision_name], text_config=TEXT, projection_dim=24)
    model = randomize(transformers.CLIPModel(config), seed).eval()
    path = str(tmp_path / f"clip_{vision_name}")
    model.save_pretrained(path, **save_kwargs)
    return model, path


def pixels(vision_name, batch=2, seed=0):
    size = VISION[vision_name]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_every_hidden_state_equal(ours, hf_vision_model, pixel_values):
    with torch.no_grad():
        expected = hf_vision_model(pixel_values=pixel_values, output_hidden_states=True)
        num_layers = len(ours.layers)
        assert len(expected.hidden_states) == num_layers + 1
        for index in range(num_layers + 1):
            for layer in (index, index - num_layers - 1):  # the same state by its positive and negative index
                diff = (ours(pixel_values, layer=layer) - expected.hidden_states[index]).abs().max()
                assert diff <= 1e-5, f"hidden state {layer} differs by {diff:.2e}"
        assert (ours.pooled(pixel_values) - expected.pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("vision_name", list(VISION))
def test_vision_tower_from_clipmodel_equals_transformers_at_every_hidden_state(tmp_path, vision_name):
    theirs, path = make_hf_clip(tmp_path, vision_name)
    ours = CLIPVision.from_pretrained(path).eval()
    assert_every_hidden_state_equal(ours, theirs.vision_model, pixels(vision_name))


@pytest.mark.parametrize("vision_name", list(VISION))
def test_clipvisionmodel_unprefixed_and_prefixed_files_load_equal_to_transformers(tmp_path, vision_name):
    theirs = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION[vision_name]))).eval()
    path = str(tmp_path / "vision")
    theirs.save_pretrained(path)
    file = os.path.join(path, "model.safetensors")
    assert not any(k.startswith("vision_model.") for k in load_file(file))  # transformers 5 writes no prefix
    assert_every_hidden_state_equal(CLIPVision.from_pretrained(path).eval(), theirs, pixels(vision_name))
    # files from older transformers keep the 'vision_model.' prefix and a stored position_ids buffer
    tensors = {f"vision_model.{k}": v for k, v in load_file(file).items()}
    tensors["vision_model.embeddings.position_ids"] = torch.arange(theirs.config.image_size)[None]
    save_file(tensors, file, metadata={"format": "pt"})
    assert_every_hidden_state_equal(CLIPVision.from_pretrained(path).eval(), theirs, pixels(vision_name))


def test_sharded_clip_loads_equal_to_transformers(tmp_path):
    theirs, path = make_hf_clip(tmp_path, "224_patch16_quick_gelu", max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert_every_hidden_state_equal(CLIPVision.from_pretrained(path).eval(), theirs.vision_model,
                                    pixels("224_patch16_quick_gelu"))


@pytest.mark.parametrize("vision_name", list(VISION))
def test_whole_clip_logits_and_text_tower_equal_transformers(tmp_path, vision_name):
    theirs, path = make_hf_clip(tmp_path, vision_name, seed=5)
    ours = CLIP.from_pretrained(path).eval()
    input_ids = torch.randint(51, 98, (3, 12), generator=torch.Generator().manual_seed(3))
    input_ids[0, 5], input_ids[1, 11], input_ids[2, 8] = 50, 50, 50  # the end-of-text token, then padding
    input_ids[0, 6:], input_ids[2, 9:] = 0, 0
    pixel_values = pixels(vision_name, batch=2)
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        hidden, pooled = ours.text(input_ids)
        assert (hidden - expected.text_model_output.last_hidden_state).abs().max() <= 1e-5
        assert (pooled - theirs.text_model(input_ids=input_ids).pooler_output).abs().max() <= 1e-5
        assert (ours(pixel_values, input_ids) - expected.logits_per_image).abs().max() <= 1e-5


def test_fp16_checkpoint_loads_into_float32_and_into_bfloat16_and_autocast_with_transformers_values(tmp_path):
    theirs, path = make_hf_clip(tmp_path, "224_patch16_quick_gelu")
    theirs.half().save_pretrained(path)
    reference = transformers.CLIPModel.from_pretrained(path, dtype=torch.float32).eval().vision_model
    pixel_values = pixels("224_patch16_quick_gelu")
    assert_every_hidden_state_equal(CLIPVision.from_pretrained(path).eval(), reference, pixel_values)
    ours_bf16 = CLIPVision.from_pretrained(path, dtype=torch.bfloat16).eval()
    theirs_bf16 = transformers.CLIPModel.from_pretrained(path, dtype=torch.bfloat16).eval().vision_model
    ours = CLIPVision.from_pretrained(path).eval()
    with torch.no_grad():
        for layer in (-2, -1):  # LLaVA's features, and the last block
            float32 = reference(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
            features = ours_bf16(pixel_values, layer=layer)
            assert features.dtype == torch.bfloat16
            expected = theirs_bf16(pixel_values=pixel_values.bfloat16(), output_hidden_states=True).hidden_states[layer]
            assert_bf16_parity(features, expected, float32, f"bfloat16 weights, layer {layer}")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = reference(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
                assert_bf16_parity(ours(pixel_values, layer=layer), expected, float32,
                                   f"float32 weights under autocast, layer {layer}")


def test_forward_runs_only_the_blocks_the_layer_index_needs(tmp_path):
    _, path = make_hf_clip(tmp_path, "336_like_patch14_gelu")
    vision = CLIPVision.from_pretrained(path).eval()
    calls = []
    for i, block in enumerate(vision.layers):
        block.register_forward_hook(lambda m, inputs, output, i=i: calls.append(i))
    vision(pixels("336_like_patch14_gelu"), layer=-2)
    assert calls == [0, 1, 2]
    calls.clear()
    vision(pixels("336_like_patch14_gelu"), layer=0)
    assert calls == []
    with pytest.raises(ValueError, match="layer 5 out of range"):
        vision(pixels("336_like_patch14_gelu"), layer=5)


def test_renamed_missing_or_misshaped_tensor_is_named_in_the_error(tmp_path):
    _, path = make_hf_clip(tmp_path, "224_patch16_quick_gelu")
    file = os.path.join(path, "model.safetensors")
    good = load_file(file)
    name = "vision_model.encoder.layers.2.self_attn.v_proj.bias"
    tensors = dict(good)
    tensors["vision_model.encoder.layers.2.self_attn.value.bias"] = tensors.pop(name)
    save_file(tensors, file)
    with pytest.raises(ValueError) as error:
        CLIPVision.from_pretrained(path)
    assert f"missing tensor: {name}" in str(error.value)
    assert "unexpected tensor: vision_model.encoder.layers.2.self_attn.value.bias" in str(error.value)
    with pytest.raises(ValueError, match=f"missing tensor: {name}"):
        CLIP.from_pretrained(path)
    tensors = dict(good, **{"vision_model.embeddings.position_embedding.weight": torch.zeros(16, 48)})
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"mis-shaped tensor: vision_model.embeddings.position_embedding.weight: "
                                         r"found \(16, 48\), expected \(17, 48\)"):
        CLIPVision.from_pretrained(path)


def test_other_architecture_is_refused_naming_its_model_type(tmp_path):
    _, path = make_hf_clip(tmp_path, "224_patch16_quick_gelu")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, model_type="siglip"), f)
    with pytest.raises(ValueError, match="model_type is 'siglip'"):
        CLIPVision.from_pretrained(path)
    with pytest.raises(ValueError, match="model_type is 'siglip'"):
        CLIP.from_pretrained(path)


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    theirs, path = make_hf_clip(tmp_path, "336_like_patch14_gelu")
    CLIP.from_pretrained(path).save_pretrained(str(tmp_path / "ours"))
    reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "ours")).eval()
    input_ids = torch.randint(51, 99, (2, 7))
    input_ids[:, -1] = 50
    pixel_values = pixels("336_like_patch14_gelu")
    with torch.no_grad():
        diff = reloaded(input_ids=input_ids, pixel_values=pixel_values).logits_per_image - theirs(
            input_ids=input_ids, pixel_values=pixel_values).logits_per_image
    assert diff.abs().max() <= 1e-5
