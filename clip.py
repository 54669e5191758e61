"""
CLIP written by hand: the vision tower g of LLaVA (Z_v = g(X_v)), and the text tower so a whole CLIP can be loaded
and trained contrastively (make_bases.py trains the shipped tiny one that way).

It computes what transformers' CLIPModel / CLIPVisionModel compute on the same checkpoint (tests/test_clip.py):

    from clip import CLIPVision
    vision = CLIPVision.from_pretrained("path/to/clip-vit-large-patch14-336")
    features = vision(pixel_values, layer=-2)[:, 1:]        # penultimate layer, patch tokens only: LLaVA's Z_v

The vision tower is a ViT: the image is cut into patch_size x patch_size patches, each linearly embedded (a conv
with stride = kernel = patch_size), a learned class token is prepended, learned position embeddings added, and
pre-norm transformer blocks follow. The text tower is a causal transformer pooled at the end-of-text token.
"""
import os
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from weights import checkpoint_keys, empty_model, hf_state_dict, load_hf_weights, read_config, save_hf_weights, write_json

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407  # the text is pooled at its first end-of-text token
    pad_token_id: int | None = 1


@dataclass
class CLIPConfig:
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07)


def _from_hf(config_class, hf, source):
    """A config dataclass from the matching keys of a transformers config dict, checking the activation."""
    known = {k: hf[k] for k in config_class.__dataclass_fields__ if k in hf}
    config = config_class(**known)
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {config.hidden_act!r} not supported ({', '.join(ACTIVATIONS)})")
    return config


def vision_config_from_hf(hf, source="config.json"):
    """CLIPVisionConfig from a CLIPVisionModel, CLIPModel or LLaVA config.json dict."""
    model_type = hf.get("model_type")
    if model_type in ("clip", "llava"):
        hf = hf["vision_config"]
        model_type = hf.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise ValueError(f"{source}: model_type is {model_type!r}, expected a CLIP vision tower "
                         "('clip_vision_model', or 'clip' holding a vision_config)")
    return _from_hf(CLIPVisionConfig, hf, source)


def clip_config_from_hf(hf, source="config.json"):
    if hf.get("model_type") != "clip":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'clip' (a CLIPModel)")
    return CLIPConfig(vision=vision_config_from_hf(hf, source), text=_from_hf(CLIPTextConfig, hf["text_config"], source),
                      projection_dim=hf.get("projection_dim", 512),
                      logit_scale_init_value=hf.get("logit_scale_init_value", 2.6592))


def encoder_key_map(num_layers, hidden_size, ours, hf):
    """Transformer blocks of either tower: our names -> transformers' CLIPEncoderLayer names (q/k/v fused here)."""
    key_map = {}
    for i in range(num_layers):
        o, h = f"{ours}layers.{i}.", f"{hf}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            key_map[o + f"attention_norm.{kind}"] = h + f"layer_norm1.{kind}"
            key_map[o + f"attention.qkv.{kind}"] = [(h + f"self_attn.{p}_proj.{kind}", hidden_size) for p in "qkv"]
            key_map[o + f"attention.out.{kind}"] = h + f"self_attn.out_proj.{kind}"
            key_map[o + f"mlp_norm.{kind}"] = h + f"layer_norm2.{kind}"
            key_map[o + f"mlp.fc1.{kind}"] = h + f"mlp.fc1.{kind}"
            key_map[o + f"mlp.fc2.{kind}"] = h + f"mlp.fc2.{kind}"
    return key_map


def vision_key_map(config, ours="", hf="vision_model."):
    """CLIPVision parameters -> transformers' CLIPVisionTransformer names under the prefix `hf`."""
    key_map = {
        ours + "class_embedding": hf + "embeddings.class_embedding",
        ours + "patch_embedding.weight": hf + "embeddings.patch_embedding.weight",
        ours + "position_embedding": hf + "embeddings.position_embedding.weight",
    }
    for kind in ("weight", "bias"):
        key_map[ours + f"pre_layernorm.{kind}"] = hf + f"pre_layrnorm.{kind}"  # sic: HF spells it 'layrnorm'
        key_map[ours + f"post_layernorm.{kind}"] = hf + f"post_layernorm.{kind}"
    key_map.update(encoder_key_map(config.num_hidden_layers, config.hidden_size, ours, hf))
    return key_map


def clip_key_map(config):
    """CLIP parameters -> transformers' CLIPModel names."""
    key_map = vision_key_map(config.vision, "vision.", "vision_model.")
    key_map.update(encoder_key_map(config.text.num_hidden_layers, config.text.hidden_size, "text.", "text_model."))
    key_map.update({
        "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "text.position_embedding": "text_model.embeddings.position_embedding.weight",
        "text.final_layer_norm.weight": "text_model.final_layer_norm.weight",
        "text.final_layer_norm.bias": "text_model.final_layer_norm.bias",
        "visual_projection.weight": "visual_projection.weight",
        "text_projection.weight": "text_projection.weight",
        "logit_scale": "logit_scale",
    })
    return key_map


class Attention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, causal):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, n_head, T, head_dim)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, hidden_size)


class MLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size, activation):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x = x + Attention(LN(x)); x = x + MLP(LN(x))."""

    def __init__(self, config):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config.hidden_size, config.num_attention_heads)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x, causal=False):
        x = x + self.attention(self.attention_norm(x), causal)
        return x + self.mlp(self.mlp_norm(x))


class CLIPVision(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, width, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Parameter(torch.empty(config.num_patches + 1, width))
        if not self.class_embedding.is_meta:  # drawn for a tower trained from scratch (make_bases.py), not loaded
            nn.init.normal_(self.class_embedding, std=width ** -0.5)
            nn.init.normal_(self.position_embedding, std=0.02)
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, pixel_values, layer=-1):
        """
        pixel_values (B, 3, image_size, image_size) -> the hidden states (B, 1 + num_patches, hidden_size) at index
        `layer`, numbered as transformers' `hidden_states`: 0 = embeddings after pre_layernorm, i = output of block i,
        negative from the end (-1 = last block, -2 = the penultimate layer LLaVA uses). Runs only the blocks needed.
        """
        num_layers = len(self.layers)
        index = layer if layer >= 0 else num_layers + 1 + layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"layer {layer} out of range for a vision tower with {num_layers} blocks")
        size = self.config.image_size
        if tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}, expected (B, 3, {size}, {size})")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, H/P, W/P)
        patches = rearrange(patches, "b d h w -> b (h w) d")  # (B, num_patches, D), row by row
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([class_token, patches], dim=1) + self.position_embedding  # (B, 1 + num_patches, D)
        x = self.pre_layernorm(x)
        for block in self.layers[:index]:
            x = block(x)
        return x

    def pooled(self, pixel_values):
        """The image's summary vector: the class token of the last block, layer-normed (B, hidden_size)."""
        return self.post_layernorm(self(pixel_values)[:, 0])

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load the vision tower of a CLIPModel or CLIPVisionModel directory (single-file or sharded safetensors)."""
        config = vision_config_from_hf(read_config(path), source=os.path.join(path, "config.json"))
        # CLIPModel and older CLIPVisionModel files prefix the tower with 'vision_model.'; transformers 5 does not
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in checkpoint_keys(path)) else ""
        model = empty_model(cls, config, dtype, device)
        return load_hf_weights(model, path, vision_key_map(config, "", prefix), owned_prefixes=(prefix,),
                               ignored_suffixes=("position_ids",))


class CLIPText(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.randn(config.max_position_embeddings, config.hidden_size) * 0.01)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids):
        """
        input_ids (B, T) -> (hidden states (B, T, D) after the final norm, pooled (B, D) at the end-of-text token).
        Attention is causal, so padding after the end-of-text token cannot change the pooled vector.
        """
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:length]  # (B, T, D)
        for block in self.layers:
            x = block(x, causal=True)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # configs older than transformers PR #24773: EOS was the largest id
            eos_position = input_ids.argmax(dim=-1)
        else:  # the first end-of-text token of each row
            eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return x, x[torch.arange(x.shape[0], device=x.device), eos_position]


class CLIP(nn.Module):
    """Both towers and their projections into a shared embedding space, with a learned temperature."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = CLIPVision(config.vision)
        self.text = CLIPText(config.text)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def encode_image(self, pixel_values):
        return F.normalize(self.visual_projection(self.vision.pooled(pixel_values)), dim=-1)  # (B, projection_dim)

    def encode_text(self, input_ids):
        return F.normalize(self.text_projection(self.text(input_ids)[1]), dim=-1)  # (B, projection_dim)

    def forward(self, pixel_values, input_ids):
        """Cosine similarities scaled by exp(logit_scale): logits_per_image (B_images, B_texts)."""
        return self.logit_scale.exp() * self.encode_image(pixel_values) @ self.encode_text(input_ids).T

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a transformers CLIPModel directory (both towers)."""
        config = clip_config_from_hf(read_config(path), source=os.path.join(path, "config.json"))
        model = empty_model(cls, config, dtype, device)
        return load_hf_weights(model, path, clip_key_map(config), ignored_suffixes=("position_ids",))

    def save_pretrained(self, path):
        """Write a directory transformers loads as a CLIPModel."""
        os.makedirs(path, exist_ok=True)
        save_hf_weights(hf_state_dict(dict(self.named_parameters()), clip_key_map(self.config)), path)
        hf = dict(model_type="clip", architectures=["CLIPModel"], projection_dim=self.config.projection_dim,
                  logit_scale_init_value=self.config.logit_scale_init_value,
                  dtype=str(self.logit_scale.dtype).removeprefix("torch."),
                  vision_config=dict(asdict(self.config.vision), model_type="clip_vision_model"),
                  text_config=dict(asdict(self.config.text), model_type="clip_text_model"))
        write_json(hf, os.path.join(path, "config.json"))


def contrastive_loss(logits_per_image):
    """CLIP's symmetric cross-entropy: image i should pick text i among the batch, and text i image i."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2
