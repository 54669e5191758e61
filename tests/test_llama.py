"""llama.py against transformers' LlamaForCausalLM, on checkpoints transformers itself writes (random weights)."""
import json
import math
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import llama
from helpers import assert_bf16_parity, randomize
from llama import KVCache, Llama, LlamaConfig, next_token_probabilities, sample_next_token

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


def test_fp16_checkpoint_loads_into_float32_and_into_bfloat16_and_autocast_with_transformers_values(tmp_path):
    model, _ = make_hf_llama(tmp_path, "gqa_biases_headdim")
    path = str(tmp_path / "fp16")
    model.half().save_pretrained(path)
    assert next(iter(load_file(os.path.join(path, "model.safetensors")).values())).dtype == torch.float16
    theirs = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = Llama.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    assert_matches_transformers(ours, theirs, input_ids)
    ours_bf16 = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    theirs_bf16 = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in ours_bf16.parameters())
    with torch.no_grad():
        float32 = theirs(input_ids).logits
        logits = ours_bf16(input_ids)
        assert logits.dtype == torch.bfloat16
        assert_bf16_parity(logits, theirs_bf16(input_ids).logits, float32, "bfloat16 weights")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights, bf16 matmuls: training's default on CUDA
            assert_bf16_parity(ours(input_ids), theirs(input_ids).logits, float32, "float32 weights under autocast")


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


def counting_compiled_steps(model):
    """compile_decoding() on model; returns the list that gets an entry per call of its compiled decode step."""
    model.compile_decoding()
    calls, step = [], model.compiled_decode_step
    model.compiled_decode_step = lambda *args: calls.append(1) or step(*args)
    return calls


def record_sampled_logits(monkeypatch):
    """The logits every generation step samples from, (B, vocab) per step, as generate_stream hands them over."""
    steps = []

    def recording(logits, *args, **kwargs):
        steps.append(logits.clone())
        return sample_next_token(logits, *args, **kwargs)
    monkeypatch.setattr(llama, "sample_next_token", recording)
    return steps


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_left_padded_batch_has_at_every_step_the_logits_of_each_prompt_alone(tmp_path, monkeypatch, compiled):
    _, path = make_hf_llama(tmp_path, "gqa_tied_theta5e5", seed=4)
    ours = Llama.from_pretrained(path).eval()
    calls = counting_compiled_steps(ours) if compiled else []
    generator = torch.Generator().manual_seed(5)
    short, long = (torch.randint(3, 128, (1, n), generator=generator) for n in (5, 12))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long])  # left-padded
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :7] = False
    steps = record_sampled_logits(monkeypatch)
    together = ours.generate(batch, attention_mask=mask, max_new_tokens=10)
    batched = torch.stack(steps, 1)  # (B, 10, vocab)
    for row, prompt in enumerate((short, long)):
        steps.clear()
        assert torch.equal(together[row], ours.generate(prompt, max_new_tokens=10)[0])
        difference = (batched[row] - torch.stack(steps, 1)[0]).abs().max()
        assert difference <= 1e-5, f"row {row}: logits differ from the prompt's alone by {difference:.2e}"
    steps.clear()
    assert torch.equal(together, ours.generate(batch, attention_mask=mask, max_new_tokens=10, use_cache=False))
    assert (torch.stack(steps, 1) - batched).abs().max() <= 1e-5  # the uncached reference, at every step too
    assert len(calls) == (3 * 9 if compiled else 0)  # compiled: each token after the prefill's, batched and alone


@pytest.mark.parametrize("name", ["gqa_tied_theta5e5", "gqa_biases_headdim"])
def test_compiled_decoding_gives_eager_and_transformers_greedy_tokens_and_compiles_once(tmp_path, name):
    theirs, path = make_hf_llama(tmp_path, name, seed=3)
    eager, compiled = Llama.from_pretrained(path).eval(), Llama.from_pretrained(path).eval()
    calls = counting_compiled_steps(compiled)
    prompt = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    theirs.generation_config.eos_token_id = None  # generate(eos_token_id=None) would not turn EOS off
    expected = theirs.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[:, prompt.shape[1]:]
    assert torch.equal(eager.generate(prompt, max_new_tokens=32), expected)
    assert torch.equal(compiled.generate(prompt, max_new_tokens=32), expected)
    assert len(calls) == 31  # every token after the prefill's
    # the same compiled code for another prompt and answer length, and for a conversation going on in a cache
    with torch.compiler.set_stance("fail_on_recompile"):
        turns = {}
        for model in (eager, compiled):
            cache = KVCache(model.config, 1, model.config.max_position_embeddings)
            turns[model] = [model.generate(prompt[:, :4], max_new_tokens=9, cache=cache),
                            model.generate(prompt[:, 4:], max_new_tokens=20, cache=cache)]
    assert all(torch.equal(ours, reference) for ours, reference in zip(turns[compiled], turns[eager]))
    assert len(calls) == 31 + 8 + 19


LOGITS = [1.0, 3.0, 2.0, 0.0, -1.0]  # token 1 most likely, then 2, 0, 3, 4
E = math.exp


def normalized(weights):
    return [w / sum(weights) for w in weights]


SAMPLING_CASES = {  # (temperature, top_k, top_p): the distribution worked out by hand from LOGITS
    "temperature 2": ((2.0, 0, 1.0), normalized([E(0.5), E(1.5), E(1.0), E(0.0), E(-0.5)])),
    "temperature 0.5, top 2": ((0.5, 2, 1.0), [0, 1 / (1 + E(-2)), 1 / (1 + E(2)), 0, 0]),
    # e^z / S sorted: 0.636, 0.234, 0.086, ...; 0.636 + 0.234 = 0.870 reaches 0.8 but not 0.9
    "top_p 0.8": ((1.0, 0, 0.8), [0, E(3) / (E(3) + E(2)), E(2) / (E(3) + E(2)), 0, 0]),
    "top_p 0.9": ((1.0, 0, 0.9), normalized([E(1), E(3), E(2), 0, 0])),
    # at temperature 0.5 the top 3 are e^6, e^4, e^2 over their sum: 0.867, 0.117, 0.016; 0.867 + 0.117 reaches 0.9
    "temperature 0.5, top 3, top_p 0.9": ((0.5, 3, 0.9), [0, 1 / (1 + E(-2)), 1 / (1 + E(2)), 0, 0]),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_distribution_equals_the_hand_computed_one_and_draws_follow_it(case):
    (temperature, top_k, top_p), expected = SAMPLING_CASES[case]
    logits = torch.tensor([LOGITS])
    probabilities = next_token_probabilities(logits, temperature, top_k, top_p)[0]
    torch.testing.assert_close(probabilities, torch.tensor(expected), atol=1e-6, rtol=1e-5)
    # 20000 draws at once, seeded: each frequency within 5 standard errors, nothing outside the kept tokens
    draws = sample_next_token(logits.expand(20000, -1), temperature, top_k, top_p,
                              generator=torch.Generator().manual_seed(0))
    frequencies = (torch.bincount(draws, minlength=len(LOGITS)).double() / len(draws)).tolist()
    for token, p in enumerate(expected):
        assert abs(frequencies[token] - p) <= 5 * math.sqrt(p * (1 - p) / len(draws)), (token, frequencies, expected)


def test_top_p_keeps_the_smallest_set_reaching_it_even_at_the_exact_boundary_each_row_its_own():
    # probabilities exactly 1/8, 1/2, 1/8, 1/4: 1/2 + 1/4 reaches 0.75, so both 1/8 go (as transformers cuts)
    exact = [math.log(p) for p in (0.125, 0.5, 0.125, 0.25)]
    logits = torch.tensor([exact, LOGITS[:4]])  # a batch: each row is cut where its own probabilities say
    probabilities = next_token_probabilities(logits, 1.0, 0, 0.75)
    assert probabilities[0].tolist() == pytest.approx([0, 2 / 3, 0, 1 / 3])
    # row 1: e^z / S = 0.087, 0.644, 0.237, 0.032; 0.644 + 0.237 reaches 0.75
    assert probabilities[1].tolist() == pytest.approx([0, E(3) / (E(3) + E(2)), E(2) / (E(3) + E(2)), 0])
    assert next_token_probabilities(logits, 1.0, 0, 1e-9).tolist() == [[0, 1, 0, 0]] * 2  # the best always stays


def test_rows_of_a_batch_stop_at_different_steps_each_repeating_its_own_stop_token(tmp_path):
    _, path = make_hf_llama(tmp_path, "mha_untied", seed=5)
    ours = Llama.from_pretrained(path).eval()
    prompts = [torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 9)]
    alone = [ours.generate(prompt, max_new_tokens=12)[0].tolist() for prompt in prompts]
    # row 0 stops at its 2nd token, row 1 at its 5th, on another token; row 0's is the list's second, so a stopped
    # row that repeated the list's first stop token instead of its own would show
    stops = [alone[1][4], alone[0][1]]
    assert stops[1] not in alone[0][:1] + alone[1][:5] and stops[0] not in alone[0][:2] + alone[1][:4], alone
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), prompts[0]], 1), prompts[1]])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :5] = False
    expected = torch.tensor([alone[0][:2] + [stops[1]] * 3, alone[1][:5]])
    for sampling in (dict(), dict(temperature=0.7, top_k=1), dict(temperature=1.5, top_p=1e-6)):  # all greedy
        generated = ours.generate(batch, attention_mask=mask, max_new_tokens=12, stop_token_ids=stops,
                                  generator=torch.Generator().manual_seed(0), **sampling)
        assert torch.equal(generated, expected), (sampling, generated, expected)


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


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients_well_above_the_tolerance():
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = randomize(Llama(config))  # norms != 1: a block recomputed without its weights would show
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 32, (2, 10), generator=generator)
    directions = torch.randn(2, 10, 32, generator=generator)  # a loss that reaches every logit with weight ~1
    block_calls = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: block_calls.append(1))  # recomputation may stop early

    def gradients():
        model.zero_grad()
        block_calls.clear()
        (model(input_ids) * directions).sum().backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = gradients()
    assert len(block_calls) == 2  # each block once
    model.gradient_checkpointing = True
    checkpointed = gradients()
    assert len(block_calls) == 4  # each block again in backward: its activations were not kept
    for (name, _), a, b in zip(model.named_parameters(), plain, checkpointed):
        assert a.abs().max() >= 1e-2, f"{name}: gradient {a.abs().max():.1e} too small to tell anything apart"
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def causal_attention_by_hand(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v for q (heads, T, d), k and v (kv_heads, T, d): query head j reads kv
    head j // (heads / kv_heads)."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_packed_attention_on_the_cpu_in_bf16_computes_in_float32_under_autocast():
    """A bf16 packed row on the CPU (as bf16 autocast hands it over) is attended in float32, sample by sample, and
    comes back in bf16: each sample's output is its float32 causal attention, computed by hand, rounded once, so
    its gradient flows too. (SDPA's CPU backward in bf16 ran 4x slower than in float32 at stage 2's shape.)"""
    samples = [3, 5, 1, 4]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, sum(samples), 8, generator=generator).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 2, sum(samples), 8, generator=generator).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = llama.packed_attention(q, k, v, samples, gqa=True)
    assert y.dtype == torch.bfloat16
    start = 0
    for n in samples:
        expected = causal_attention_by_hand(*(t[0, :, start:start + n].float() for t in (q, k, v)))
        torch.testing.assert_close(y[0, :, start:start + n], expected.bfloat16(), atol=0, rtol=0)
        start += n
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


def test_packed_attention_hands_flash_varlen_each_sample_as_a_sequence_of_its_own(monkeypatch):
    """The CUDA path of a packed row (run here on the CPU with a stand-in kernel that computes what varlen_attn's
    documentation says it computes): the row becomes (T, heads, head_dim) with cumulative sample ends, and each
    sample's output is its own causal attention, computed by hand."""
    from torch.nn.attention import varlen
    samples = [3, 5, 1, 4]
    calls = []

    def documented_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size, enable_gqa):
        calls.append((cu_seq_q.tolist(), cu_seq_q.dtype, max_q, max_k, window_size, enable_gqa))
        ends = cu_seq_q.tolist()
        pieces = [causal_attention_by_hand(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                  for a, b in zip(ends, ends[1:])]  # each (length, heads, head_dim)
        return torch.cat(pieces)
    monkeypatch.setattr(varlen, "varlen_attn", documented_varlen_attn)
    monkeypatch.setattr(llama, "flash_varlen_runs", lambda q: True)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, sum(samples), 8, generator=generator)
    k, v = (torch.randn(1, 2, sum(samples), 8, generator=generator) for _ in range(2))
    y = llama.packed_attention(q, k, v, samples, gqa=True)
    assert calls == [([0, 3, 8, 9, 13], torch.int32, 5, 5, (-1, 0), True)]
    start = 0
    for n in samples:
        expected = causal_attention_by_hand(q[0, :, start:start + n], k[0, :, start:start + n], v[0, :, start:start + n])
        torch.testing.assert_close(y[0, :, start:start + n], expected)
        start += n
