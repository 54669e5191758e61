"""llama.py against transformers' LlamaForCausalLM, on checkpoints transformers itself writes (random weights)."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import randomize
from llama import Llama, LlamaConfig, sample_next_token

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa_tied_theta5e5": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    "gqa_biases_headdim": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, head_dim=24),
    "llama3_rope_scaling": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=1024,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear_rope_scaling": dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=4.0)),
}


def make_hf_llama(tmp_path, name, seed=0, **save_kwargs):
    config = transformers.LlamaConfig(**{**BASE, **CONFIGS[name]})
    model = randomize(transformers.LlamaForCausalLM(config), seed).eval()
    path = str(tmp_path / name)
    model.save_pretrained(path, **save_kwargs)
    return model, path


def our_hidden_states(model, input_ids):
    """Embeddings, every block's output and the final norm's output, as transformers' hidden_states lists them."""
    captured = []
    hooks = [model.embed_tokens.register_forward_hook(lambda m, i, o: captured.append(o))]
    hooks += [block.register_forward_hook(lambda m, i, o: captured.append(o)) for block in model.layers[:-1]]
    hooks.append(model.norm.register_forward_hook(lambda m, i, o: captured.append(o)))
    logits = model(input_ids)
    for hook in hooks:
        hook.remove()
    return captured, logits


def assert_matches_transformers(ours, theirs, input_ids):
    with torch.no_grad():
        expected = theirs(input_ids, output_hidden_states=True)
        hidden, logits = our_hidden_states(ours, input_ids)
    assert len(hidden) == len(expected.hidden_states)
    for index, (a, b) in enumerate(zip(hidden, expected.hidden_states)):
        assert (a - b).abs().max() <= 1e-5, f"hidden state {index} differs by {(a - b).abs().max():.2e}"
    assert (logits - expected.logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_every_hidden_state_equal_transformers(tmp_path, name):
    theirs, path = make_hf_llama(tmp_path, name)
    ours = Llama.from_pretrained(path).eval()
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    assert_matches_transformers(ours, theirs, input_ids)


def test_sharded_checkpoint_loads_equal_to_transformers(tmp_path):
    theirs, path = make_hf_llama(tmp_path, "gqa_biases_headdim", max_shard_size="50KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 3
    ours = Llama.from_pretrained(path).eval()
    assert_matches_transformers(ours, theirs, torch.randint(0, 128, (1, 17)))


def test_fp16_checkpoint_loads_into_float32_and_bfloat16(tmp_path):
    model, _ = make_hf_llama(tmp_path, "mha_untied")
    path = str(tmp_path / "fp16")
    model.half().save_pretrained(path)
    assert next(iter(load_file(os.path.join(path, "model.safetensors")).values())).dtype == torch.float16
    theirs = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = Llama.from_pretrained(path, dtype=torch.float32).eval()
    assert_matches_transformers(ours, theirs, torch.randint(0, 128, (2, 23)))
    ours_bf16 = Llama.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours_bf16.parameters())
    assert ours_bf16(torch.randint(0, 128, (1, 9))).dtype == torch.bfloat16


def test_rope_parameters_at_top_level_or_nested_give_the_same_config():
    nested = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=64))
    top = dict(nested, rope_theta=5e5, rope_scaling=dict(nested["rope_parameters"], type="llama3"))
    del top["rope_parameters"], top["rope_scaling"]["rope_type"], top["rope_scaling"]["rope_theta"]
    assert LlamaConfig.from_hf(nested) == LlamaConfig.from_hf(top)
    assert LlamaConfig.from_hf(nested).rope_theta == 5e5 and LlamaConfig.from_hf(nested).rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied_theta5e5"])
def test_greedy_32_tokens_cached_equals_uncached_equals_transformers_generate(tmp_path, name):
    theirs, path = make_hf_llama(tmp_path, name, seed=3)
    ours = Llama.from_pretrained(path).eval()
    prompt = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    theirs.generation_config.eos_token_id = None  # generate(eos_token_id=None) would not turn EOS off
    expected = theirs.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[:, prompt.shape[1]:]
    cached = ours.generate(prompt, max_new_tokens=32)
    uncached = ours.generate(prompt, max_new_tokens=32, use_cache=False)
    assert expected.shape == (1, 32)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    _, path = make_hf_llama(tmp_path, "gqa_tied_theta5e5", seed=4)
    ours = Llama.from_pretrained(path).eval()
    short, long = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 12))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long])  # left-padded
    mask = batch != 0
    mask[1] = True
    together = ours.generate(batch, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(together[0], ours.generate(short, max_new_tokens=10)[0])
    assert torch.equal(together[1], ours.generate(long, max_new_tokens=10)[0])
    assert torch.equal(together, ours.generate(batch, attention_mask=mask, max_new_tokens=10, use_cache=False))


def test_generation_stops_at_stop_token_and_sampling_respects_top_k_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits) == 1
    draws = {int(sample_next_token(logits, 1.0, top_k=2, generator=generator)) for _ in range(200)}
    assert draws == {1, 2}
    assert {int(sample_next_token(logits, 1.0, top_p=0.5, generator=generator)) for _ in range(50)} == {1}
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    model = Llama(config).eval()
    first = model.generate(torch.tensor([[3, 4]]), max_new_tokens=5)[0, 0]
    stopped = model.generate(torch.tensor([[3, 4]]), max_new_tokens=5, stop_token_ids=[int(first)])
    assert stopped.shape == (1, 1)


def rewrite_checkpoint(path, change):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_renamed_missing_or_misshaped_tensor_is_named_in_the_error(tmp_path):
    _, path = make_hf_llama(tmp_path, "mha_untied")
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_checkpoint(path, lambda t: t.__setitem__("model.layers.1.self_attn.key.weight", t.pop(name)))
    with pytest.raises(ValueError) as error:
        Llama.from_pretrained(path)
    assert f"missing tensor: {name}" in str(error.value)
    assert "unexpected tensor: model.layers.1.self_attn.key.weight" in str(error.value)

    rewrite_checkpoint(path, lambda t: t.pop("model.layers.1.self_attn.key.weight"))
    with pytest.raises(ValueError, match=f"missing tensor: {name}"):
        Llama.from_pretrained(path)

    rewrite_checkpoint(path, lambda t: t.__setitem__(name, torch.zeros(64, 64)))  # k_proj is (64, 64) here: fine
    Llama.from_pretrained(path)
    rewrite_checkpoint(path, lambda t: t.__setitem__("model.norm.weight", torch.zeros(63)))
    with pytest.raises(ValueError, match=r"mis-shaped tensor: model.norm.weight: found \(63,\), expected \(64,\)"):
        Llama.from_pretrained(path)


def test_other_architecture_is_refused_naming_its_model_type(tmp_path):
    _, path = make_hf_llama(tmp_path, "mha_untied")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "mistral"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="model_type is 'mistral'"):
        Llama.from_pretrained(path)


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    theirs, path = make_hf_llama(tmp_path, "llama3_rope_scaling")
    ours = Llama.from_pretrained(path).eval()
    ours.save_pretrained(str(tmp_path / "ours"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    input_ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        assert (reloaded(input_ids).logits - theirs(input_ids).logits).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Llama(config)
    input_ids = torch.randint(0, 32, (2, 10))
    model(input_ids).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(input_ids).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
