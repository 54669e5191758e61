"""
LLaMA written by hand: the language model LLaVA puts after the vision tower (LLaMA, Vicuna, TinyLlama, Llama 3).

It computes what transformers' LlamaForCausalLM computes on the same checkpoint (tests/test_llama.py checks it):

    from llama import Llama
    model = Llama.from_pretrained("path/to/TinyLlama-1.1B-Chat-v1.0", dtype=torch.bfloat16)
    logits = model(input_ids)                                # (B, T, vocab_size)

A block is pre-norm: x = x + Attention(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)). Attention uses rotary position
embeddings and grouped-query attention (n_kv_head <= n_head key/value heads shared by groups of query heads).

LoRA (at the end of this file) freezes the model and trains low-rank adapters on the blocks' linear layers instead:

    model.add_lora(r=16, alpha=32, dropout=0.05, targets=("q", "v"))  # W x + (alpha / r) B A x on q and v
    model.merge_lora()                                               # W <- W + (alpha / r) B A: a plain Llama again
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from weights import (empty_model, hf_state_dict, load_hf_weights, read_config, save_hf_weights,
                     write_json)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """Build from a transformers LlamaConfig dict (config.json), checking it really is a LLaMA."""
        if hf.get("model_type") != "llama":
            raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'llama' (a LlamaForCausalLM)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        # transformers 5 may keep rope_theta and the scaling under rope_parameters; older files keep them at top level
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling, rope_type=scaling.get("rope_type", scaling.get("type")))
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] not in ("linear", "llama3"):
                raise ValueError(f"{source}: rope scaling {scaling['rope_type']!r} is not supported (linear, llama3)")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False), attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))

    def to_hf(self):
        """The config.json transformers reads as a LlamaForCausalLM."""
        hf = {k: v for k, v in asdict(self).items() if k != "rope_scaling"}
        hf.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(self.rope_scaling)
        return hf


def llama_key_map(config, prefix="model.", lm_head="lm_head.weight"):
    """Our parameter names -> transformers' LlamaForCausalLM names (q/k/v and gate/up are fused here)."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    key_map = {"embed_tokens.weight": prefix + "embed_tokens.weight", "norm.weight": prefix + "norm.weight"}
    if not config.tie_word_embeddings:
        key_map["lm_head.weight"] = lm_head
    for i in range(config.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"{prefix}layers.{i}."
        key_map[ours + "attention_norm.weight"] = hf + "input_layernorm.weight"
        key_map[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        kinds = ["weight", "bias"] if config.attention_bias else ["weight"]
        for kind in kinds:
            key_map[ours + f"attention.qkv.{kind}"] = [(hf + f"self_attn.q_proj.{kind}", q_rows),
                                                      (hf + f"self_attn.k_proj.{kind}", kv_rows),
                                                      (hf + f"self_attn.v_proj.{kind}", kv_rows)]
            key_map[ours + f"attention.out.{kind}"] = hf + f"self_attn.o_proj.{kind}"
        kinds = ["weight", "bias"] if config.mlp_bias else ["weight"]
        for kind in kinds:
            key_map[ours + f"mlp.gate_up.{kind}"] = [(hf + f"mlp.gate_proj.{kind}", config.intermediate_size),
                                                    (hf + f"mlp.up_proj.{kind}", config.intermediate_size)]
            key_map[ours + f"mlp.down.{kind}"] = hf + f"mlp.down_proj.{kind}"
    return key_map


def rope_inverse_frequencies(config, device=None):
    """inv_freq_i = 1 / theta^(2i / head_dim), with llama3 or linear context scaling when the config asks for it."""
    head_dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
    low_wavelen = old_context / scaling["low_freq_factor"]
    high_wavelen = old_context / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_i, x_{i + head_dim/2}) by position-dependent angles (transformers' rotate_half convention)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), in float32 whatever the model dtype; the weight applied after the cast back
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to max_length tokens."""

    def __init__(self, config, batch_size, max_length, device="cpu", dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        # plain tensors even in generate_stream's inference mode: a cache made outside it (sample.py's chat) is then of
        # the same kind, and one compiled decode step serves both
        with torch.inference_mode(False):
            self.keys = torch.zeros(shape, device=device, dtype=dtype)
            self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached so far; Llama.forward advances it after all layers have written

    def update(self, layer, keys, values):
        """Append (B, n_kv_head, T, head_dim) keys/values of one layer; return all of them so far."""
        start, end = self.length, self.check_room(keys.shape[2])
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # (B, n_kv_head, end, head_dim)

    def check_room(self, tokens):
        """The length after `tokens` more; an error if they do not fit."""
        end = self.length + tokens
        if end > self.keys.shape[3]:
            raise ValueError(f"KV cache full: {end} tokens do not fit in max_length {self.keys.shape[3]}")
        return end


class KVCacheSlot:
    """A KVCache as the compiled decode step sees it (static shapes): each layer's one new key/value written at
    `slot`, a (1,) tensor (so one compiled step serves every position), and the whole preallocated cache returned,
    its unfilled positions left for the attention mask to hide."""

    def __init__(self, cache, slot):
        self.cache, self.slot = cache, slot

    def update(self, layer, keys, values):
        """Write (B, n_kv_head, 1, head_dim) keys/values at the slot; return (B, n_kv_head, max_length, head_dim)."""
        # the layer as a tensor too, so this is one write in place: into cache.keys[layer], a view of an input,
        # inductor would copy the layer's whole cache there and back. cache.keys[at] is (1, B, n_kv_head, head_dim)
        at = (torch.full_like(self.slot, layer), slice(None), slice(None), self.slot)
        self.cache.keys[at] = rearrange(keys, "b h 1 d -> 1 b h d")
        self.cache.values[at] = rearrange(values, "b h 1 d -> 1 b h d")
        return self.cache.keys[layer], self.cache.values[layer]


def flash_varlen_runs(q):
    """Whether flash attention's variable-length kernel takes q's device and dtype: CUDA, 16 bits."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def packed_attention(q, k, v, samples, gqa):
    """Causal attention inside each sample of one packed row, q (1, n_head, T, head_dim), k and v (1, n_kv_head, T,
    head_dim), samples: the lengths of the samples laid end to end (summing to T). No sample sees another, as if each
    were alone: on CUDA in 16 bits flash attention's variable-length kernel over the whole row; elsewhere one SDPA per
    sample (on the CPU 2.3x faster at 2,048 tokens than one SDPA with a block-diagonal (T, T) mask, which computes
    every block), in float32 even under bf16 autocast: SDPA's CPU kernels are slower in bf16 on short samples (forward
    and backward, 2 threads, AVX-512 EPYC: 120 tokens, 4 heads of 32, 1.30 against 0.58 ms; 300 tokens, 16 heads of
    64, 13.3 against 9.7 ms; bf16 wins from about 1,000 tokens: 62 against 74 ms). The tiny default's bf16 stage 2
    ran 1.38x faster so (1 thread)."""
    if flash_varlen_runs(q):
        from torch.nn.attention.varlen import varlen_attn
        ends = torch.tensor([0] + samples, device=q.device).cumsum(0).to(torch.int32)  # (N + 1,) cumulative
        q, k, v = (rearrange(t, "1 h t d -> t h d") for t in (q, k, v))  # (T, heads, head_dim)
        y = varlen_attn(q, k, v, ends, ends, max(samples), max(samples), window_size=(-1, 0),  # (-1, 0): causal
                        enable_gqa=gqa)
        return rearrange(y, "t h d -> 1 h t d")
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):  # bf16 on the CPU: SDPA in float32 (docstring)
        pieces = zip(*(t.float().split(samples, dim=2) for t in (q, k, v)))  # each (1, heads, length, head_dim)
        y = torch.cat([F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                       for q, k, v in pieces], dim=2)  # (1, n_head, T, head_dim)
    return y.to(dtype)


def one_query_attention(q, k, v, mask):
    """Attention of one new position per row, q (B, n_head, 1, head_dim), over keys and values (B, n_kv_head, L,
    head_dim) where mask (B, 1, 1, L) is True, each kv head's group of query heads in one matrix product (query head
    j reads kv head j // group). Scores in the model's dtype, softmax in float32, as transformers' eager attention.
    On the CPU, for 2,048 keys (GQA 16/4, head_dim 64, 2 threads), SDPA's kernel under a mask took 2.0 ms in bf16
    and 0.40 ms in float32, this 0.24-0.29 ms in either, compiled or not."""
    groups = k.shape[1]
    q = rearrange(q, "b (g r) 1 d -> b g r d", g=groups)  # (B, n_kv_head, group, head_dim)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, n_kv_head, group, L)
    scores = scores.float().masked_fill(~mask, float("-inf"))  # the mask (B, 1, 1, L) over every group's rows
    y = scores.softmax(dim=-1).to(v.dtype) @ v  # (B, n_kv_head, group, head_dim)
    return rearrange(y, "b g r d -> b (g r) 1 d")  # (B, n_head, 1, head_dim)


class Linear(nn.Linear):
    """
    nn.Linear, but in compiled code on the CPU one position per row, (B, 1, in) -> (B, 1, out) as in a decode step,
    is a broadcast product and a sum (in float32): inductor compiles that into one vectorized pass over the weight,
    never holding the product. The realistic shape's 17 matrices (2 threads, the AVX-512 EPYC of docs/benchmarks.md)
    were read so at 28-31 GB/s, float32 or bf16; by F.linear at 12-16, by inductor's matrix kernels on frozen,
    prepacked weights at 17-22; a plain read of 512 MiB ran at 33 GB/s.
    """

    def forward(self, x):
        if torch.compiler.is_compiling() and x.shape[-2] == 1 and x.device.type == "cpu":
            # (B, 1, 1, in) times (out, in), summed over in: (B, 1, out)
            y = (x[..., None, :] * self.weight).sum(-1, dtype=torch.float32).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


class Attention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.split = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.qkv = Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.out = Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, cache, samples=None):
        qk, v = self.qkv(x).split([self.split[0] + self.split[1], self.split[2]], dim=-1)
        qk = rearrange(qk, "b t (h d) -> b h t d", d=self.head_dim)  # (B, n_head + n_kv_head, T, head_dim)
        q, k = apply_rotary(qk, cos, sin).split([self.n_head, self.n_kv_head], dim=1)  # both rotated in one go
        # v gets its own storage: attention keeps it for the backward pass, and a view would keep all of qkv alive
        v = rearrange(v, "b t (h d) -> b h t d", d=self.head_dim).contiguous()  # (B, n_kv_head, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, n_kv_head, T_past + T, head_dim)
        # softmax(q k^T / sqrt(head_dim)) v; query head j reads kv head j // (n_head / n_kv_head)
        gqa = self.n_kv_head != self.n_head
        if samples is not None:  # a packed row: each sample attends to itself alone
            y = packed_attention(q, k, v, samples, gqa)
        elif q.shape[2] == 1 and mask is not None:  # one new token under a mask: left padding, or the compiled step
            y = one_query_attention(q, k, v, mask)
        else:  # no mask: causal over the new tokens, or one new token that sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                               enable_gqa=gqa)
        y = rearrange(y, "b h t d -> b t (h d)")  # (B, T, n_head * head_dim)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)  # SwiGLU: W_down (silu(W_gate x) * W_up x)


class Block(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, samples=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, samples)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.inverse_frequencies = None  # rope's, computed on first use (not a buffer: never saved or loaded)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,  # drawn by _init_weights alone
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing its activations
        self.compiled_decode_step = None  # compile_decoding's; None: generate_stream decodes eagerly
        self.apply(self._init_weights)
        self.tie_weights()

    @staticmethod
    def _init_weights(module):
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            return  # built to be loaded (weights.empty_model): nothing to draw, and normal_ on meta is slow to start
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None, cache=None,
                last_token_only=False):
        """
        input_ids (B, T), or inputs_embeds (B, T, hidden_size) as LLaVA feeds them -> logits (B, T, vocab_size),
        or (B, 1, vocab_size) for the last position only (generation). The arguments are hidden_states'.
        """
        x = self.hidden_states(input_ids, inputs_embeds, position_ids, attention_mask, cache)  # (B, T, hidden_size)
        return self.head(x[:, -1:] if last_token_only else x)

    def head(self, x):
        """The output head on final hidden states: logits = lm_head(RMSNorm(x)), (..., hidden_size) -> (..., vocab)."""
        return self.lm_head(self.norm(x))

    def hidden_states(self, input_ids=None, inputs_embeds=None, position_ids=None, attention_mask=None, cache=None,
                      samples=None):
        """
        The last block's output (B, T, hidden_size), before the final norm, for input_ids (B, T) or inputs_embeds.
        samples: packing: one row (B = 1) holding samples of these lengths end to end, each attending to itself alone
            with positions counted from its own start.
        position_ids (B, T): default 0.. T-1 after the cached tokens.
        attention_mask (B, T_past + T), True at real tokens: needed only for left padding (batched generation).
            Right padding needs none: causal attention never looks forward, and padded positions carry no loss.
        cache: a KVCache; the new keys/values are appended and the cached ones attended to.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden_size)
        length = x.shape[1]
        past = cache.length if cache is not None else 0
        if samples is not None:
            if x.shape[0] != 1 or sum(samples) != length or cache is not None:
                raise ValueError(f"packed samples of lengths {samples} must fill one row, without cache: got "
                                 f"{tuple(x.shape[:2])}")
            position_ids = torch.cat([torch.arange(n, device=x.device) for n in samples])[None]  # (1, T)
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device)[None]  # (1, T): shared by every row
        cos, sin = self.rotary_cos_sin(position_ids, x.dtype)
        mask = None  # None: plain causal attention (SDPA's is_causal, so CUDA may take the flash kernel)
        if attention_mask is not None or (past > 0 and length > 1):
            query_positions = torch.arange(past, past + length, device=x.device)[:, None]  # (T, 1)
            key_positions = torch.arange(past + length, device=x.device)[None, :]  # (1, T_past + T)
            mask = key_positions <= query_positions  # (T, T_past + T) causal
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T_past + T)
                mask = mask | (key_positions == query_positions)  # a pad position sees itself: no all-masked row
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, cache, samples, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, samples)
        if cache is not None:
            cache.length += length
        return x

    def rotary_cos_sin(self, position_ids, dtype):
        """cos and sin of the rotation angles position * inv_freq, (B or 1, 1, T, head_dim), computed in float32."""
        if self.inverse_frequencies is None or self.inverse_frequencies.device != position_ids.device:
            self.inverse_frequencies = rope_inverse_frequencies(self.config, device=position_ids.device)  # once
        inv_freq = self.inverse_frequencies  # (head_dim / 2,)
        angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @torch.inference_mode()
    def generate_stream(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=32,
                        temperature=0.0, top_k=0, top_p=1.0, stop_token_ids=(), cache=None, use_cache=True,
                        generator=None):
        """
        Yield the next token of every row, (B,), one step at a time, until every row has produced a stop token or
        max_new_tokens were made. Rows that stopped repeat their stop token.

        The prompt is input_ids (B, T) or inputs_embeds (B, T, D), left-padded when rows differ in length, with
        attention_mask (B, T) False on the padding. With use_cache, the prompt is run once (prefill) and each new
        token alone (decode), reading the keys/values of the past from `cache` (made here if not given; pass one to
        continue a conversation: then the prompt is only the new tokens and attention_mask, if given, covers the
        cached ones too). Without cache, the whole sequence is recomputed at every step (the slow reference). After
        compile_decoding(), the decode steps run compiled code (the same tokens; a cache made here then spans the
        whole context).
        """
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        batch, length = embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=embeds.device)
        attention_mask = attention_mask.bool()
        compiled = use_cache and self.compiled_decode_step is not None
        if use_cache and cache is None:  # compiled, it spans the whole context: one shape for every call
            capacity = max(length + max_new_tokens, self.config.max_position_embeddings if compiled else 0)
            cache = KVCache(self.config, batch, capacity, embeds.device, embeds.dtype)
        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=embeds.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
        token = None
        next_input = embeds
        padded = not bool(attention_mask.all())
        seen = past + length  # tokens so far; the mask and positions of the ones to come are made once, here
        attention_mask = F.pad(attention_mask, (0, max_new_tokens), value=True)  # (B, seen + max_new_tokens)
        # each row counts positions from its first real token, so left padding does not shift them
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, seen + max_new_tokens)
        if compiled:  # the compiled step's mask spans the whole cache (B, max_length), False past the call's tokens
            cache_mask = F.pad(attention_mask, (0, cache.keys.shape[3] - attention_mask.shape[1]), value=False)
        for step in range(max_new_tokens):
            if compiled and step > 0:  # the prompt (prefill) stays eager; each new token goes through compiled code
                logits = self.decode_compiled(next_input, cache_mask, cache)
            elif use_cache:
                logits = self(inputs_embeds=next_input, position_ids=positions[:, seen - next_input.shape[1]:seen],
                              cache=cache, attention_mask=attention_mask[:, :seen] if padded else None,
                              last_token_only=True)
            else:
                logits = self(inputs_embeds=embeds, position_ids=positions[:, :seen],
                              attention_mask=attention_mask[:, :seen], last_token_only=True)
            drawn = sample_next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (B,)
            token = drawn if token is None else torch.where(finished, token, drawn)  # stopped rows keep their stop
            yield token
            finished |= torch.isin(token, stop)
            if bool(finished.all()):
                return
            next_input = self.embed_tokens(token)[:, None]  # (B, 1, D)
            if not use_cache:
                embeds = torch.cat([embeds, next_input], dim=1)  # (B, T + 1, D): the whole sequence again
            seen += 1

    def compile_decoding(self):
        """
        From now on generate_stream decodes each new token (the prompt stays eager) through decode_step compiled by
        torch.compile: static shapes, the KV cache preallocated to the whole context (max_position_embeddings), so it
        compiles once per dtype and batch size, tens of seconds at the first call, then serves every token and call
        (the weights stay the model's: changing them later is seen). On the CPU its matrix-vector products are
        Linear's compiled form. Returns the model.
        """
        self.compiled_decode_step = torch.compile(self.decode_step, fullgraph=True, dynamic=False)
        return self

    def decode_compiled(self, embeds, cache_mask, cache):
        """One new token per row through the compiled decode_step, written at the cache's next position, which is
        then counted: embeds (B, 1, hidden_size) -> logits (B, 1, vocab_size)."""
        slot = torch.tensor([cache.length], device=embeds.device)
        cache.check_room(1)
        logits = self.compiled_decode_step(embeds, cache_mask, cache, slot)
        cache.length += 1
        return logits

    def decode_step(self, embeds, cache_mask, cache, slot):
        """
        One new token per row with static shapes, what compile_decoding compiles: embeds (B, 1, hidden_size), their
        keys/values written at position `slot`, a (1,) tensor, of the preallocated cache; attention reads the whole
        cache where cache_mask (B, max_length) is True, up to the slot -> logits (B, 1, vocab_size).
        """
        visible = cache_mask & (torch.arange(cache_mask.shape[1], device=slot.device) <= slot)  # (B, max_length)
        # each row's position counts its real tokens only, as generate_stream's positions: left padding shifts none
        cos, sin = self.rotary_cos_sin(visible.sum(-1, keepdim=True) - 1, embeds.dtype)  # positions (B, 1)
        mask = visible[:, None, None, :]  # (B, 1, 1, max_length): the one query's row
        x, cache = embeds, KVCacheSlot(cache, slot)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        return self.head(x)

    def generate(self, *args, **kwargs):
        """generate_stream collected: the new tokens (B, N)."""
        return torch.stack(list(self.generate_stream(*args, **kwargs)), dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a transformers LlamaForCausalLM directory (config.json + model.safetensors or sharded)."""
        config = LlamaConfig.from_hf(read_config(path), source=os.path.join(path, "config.json"))
        model = empty_model(cls, config, dtype, device)
        model.tie_weights()  # to_empty replaced the parameters, which unties them
        ignored = ("rotary_emb.inv_freq", "lm_head.weight") if config.tie_word_embeddings else ("rotary_emb.inv_freq",)
        load_hf_weights(model, path, llama_key_map(config), ignored_suffixes=ignored)
        return model

    def save_pretrained(self, path):
        """Write a directory transformers loads as a LlamaForCausalLM (LoRA adapters folded into the weights)."""
        os.makedirs(path, exist_ok=True)
        save_hf_weights(hf_state_dict(self.plain_weights(), llama_key_map(self.config)), path)
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        write_json(dict(self.config.to_hf(), dtype=dtype), os.path.join(path, "config.json"))

    # ---- LoRA ----

    @property
    def has_lora(self):
        return any(isinstance(module, LoRALinear) for module in self.modules())

    def add_lora(self, r, alpha, dropout, targets):
        """Freeze every weight and put trainable LoRA adapters on the chosen linear layers of every block (targets:
        names of LORA_TARGETS). Embeddings, norms and lm_head never get one."""
        if self.has_lora:
            raise ValueError("this Llama has LoRA adapters already: merge_lora() them first")
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.requires_grad_(False)
        rows = lora_rows(self.config)
        for block in self.layers:
            for layer_name in dict.fromkeys(rows[target][0] for target in targets):  # qkv once for q, k and v
                parent_name, name = layer_name.split(".")
                parent = block.get_submodule(parent_name)
                parts = {target: rows[target][1:] for target in targets if rows[target][0] == layer_name}
                setattr(parent, name, LoRALinear(getattr(parent, name), parts, r, alpha, dropout))

    def merge_lora(self):
        """Fold every adapter into its layer, W <- W + (alpha / r) B A: a plain Llama again, computing the same."""
        for block in self.layers:
            for parent in (block.attention, block.mlp):
                for name, layer in list(parent.named_children()):
                    if isinstance(layer, LoRALinear):
                        with torch.no_grad():
                            layer.weight.copy_(layer.merged_weight())
                        with torch.device("meta"):  # a shell; it takes the (merged) parameters themselves
                            plain = Linear(layer.weight.shape[1], layer.weight.shape[0], bias=layer.bias is not None)
                        plain.weight, plain.bias = layer.weight, layer.bias
                        setattr(parent, name, plain)

    def plain_weights(self):
        """The parameters by name as a plain Llama holds them: adapters folded into their layers' weights, and left
        out (what export writes)."""
        weights = {name: p for name, p in self.named_parameters() if ".lora_" not in name}
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                weights[f"{name}.weight"] = module.merged_weight()
        return weights


def next_token_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution a token is drawn from, (B, vocab): the softmax of logits / temperature, restricted to the top_k
    most likely tokens, then to the smallest set of the most likely whose probability reaches top_p, renormalized."""
    logits = logits / temperature
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before them already reach top_p
        outside[:, 0] = False  # the most likely token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits.softmax(dim=-1)


def sample_next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row from logits (B, vocab): greedy at temperature 0, else drawn from
    next_token_probabilities."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(next_token_probabilities(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): h = W x + (alpha / r) · B A x, W frozen, A (r, in) and B (out, r) trained, r << in, out

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # every linear layer of a block (peft's q_proj ... down_proj)


def lora_targets(text):
    """'q,v' (or transformers' 'q_proj,v_proj') -> ('q', 'v'); a name that matches no linear layer is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name.removesuffix("_proj") not in LORA_TARGETS]
    if unknown or not names:
        problem = f"{', '.join(map(repr, unknown))} matches no linear layer" if unknown else "names no linear layer"
        raise ValueError(f"{problem} of the LLM's blocks; they are {', '.join(LORA_TARGETS)} (comma-separated; the "
                         "vision tower, W, the embeddings and lm_head take no adapters)")
    return tuple(dict.fromkeys(name.removesuffix("_proj") for name in names))


def lora_rows(config):
    """Where each target lives: (our linear layer in a block, its first row, its rows). Our layers fuse transformers'
    matrices by rows: attention.qkv = q | k | v, mlp.gate_up = gate | up."""
    q, kv, ffn = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim,
                  config.intermediate_size)
    return {"q": ("attention.qkv", 0, q), "k": ("attention.qkv", q, kv), "v": ("attention.qkv", q + kv, kv),
            "o": ("attention.out", 0, config.hidden_size), "gate": ("mlp.gate_up", 0, ffn),
            "up": ("mlp.gate_up", ffn, ffn), "down": ("mlp.down", 0, config.hidden_size)}


class LoRALinear(nn.Module):
    """
    A frozen linear layer with trainable low-rank adapters: y = W x + b + (alpha / r) · B A dropout(x).

    On a fused layer every target has its own A and B, and B A writes only that target's rows of W: adapters on q and
    v are exactly peft's on transformers' q_proj and v_proj (k's rows untouched), and fold into those matrices.
    A starts as nn.Linear initializes its weights (Kaiming uniform), B at zero, so the layer first computes W x + b
    exactly. The weight and bias keep their names (and stay the same tensors), so checkpoints and key maps still fit.
    """

    def __init__(self, linear, parts, r, alpha, dropout):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # frozen
        self.parts = parts  # {target: (first row, rows)}
        self.r, self.scale = r, alpha / r
        # one dropout mask per input, shared by the adapters reading it (q, k, v read the same x): one saved copy
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.ParameterDict({target: nn.Parameter(torch.empty(r, linear.in_features, **factory))
                                        for target in parts})
        self.lora_B = nn.ParameterDict({target: nn.Parameter(torch.zeros(rows, r, **factory))
                                        for target, (_, rows) in parts.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's (and peft's) initialization

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (B, T, out): W x + b
        # A x for every target at once (their A stacked: one pass over x), then each target's B A x into its rows
        a_x = F.linear(self.dropout(x), torch.cat([self.lora_A[target] for target in self.parts]))  # (B, T, n * r)
        for (target, (start, rows)), target_a_x in zip(self.parts.items(), a_x.split(self.r, dim=-1)):
            b_a_x = F.linear(target_a_x, self.lora_B[target])  # (B, T, rows)
            y[..., start:start + rows].add_(b_a_x, alpha=self.scale)  # += (alpha / r) · B A x, on its rows only
        return y

    def merged_weight(self):
        """W + (alpha / r) · B A on each target's rows (summed in float32): the weight of the equivalent plain layer."""
        weight = self.weight.detach().to(torch.float32, copy=True)
        for target, (start, rows) in self.parts.items():
            weight[start:start + rows] += self.scale * (self.lora_B[target].detach().float()
                                                         @ self.lora_A[target].detach().float())
        return weight.to(self.weight.dtype)
