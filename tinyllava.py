"""
tinyllava: the LLaVA model, the paper's Figure 1 in a few lines.

    Z_v = g(X_v)            a frozen CLIP ViT g encodes the image; penultimate layer, patch tokens only
    H_v = W · Z_v           the projection W maps them into the LLM's word-embedding space
    [H_q, H_v] or [H_v, H_q] the image tokens replace the <image> placeholder among the text embeddings
    p(X_a | X_v, X_q)       a LLaMA decoder predicts the answer; the loss covers answer tokens only

    from tinyllava import TinyLLaVA
    model = TinyLLaVA.from_pretrained("out/stage2/ckpt.pt")          # one of ours, or an HF LLaVA directory
    logits, loss = model(input_ids, pixel_values, labels)            # logits where labels are kept
    model.add_lora(r=128, alpha=256, dropout=0.05)                   # LoRA: the LLM frozen, adapters train
    model.merge_lora()                                               # the adapters folded into the LLM's weights

Token ids hold one IMAGE_TOKEN_INDEX placeholder per image, at any position; the vocabulary is never touched.
"""
import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIPVision, vision_config_from_hf, vision_key_map
from llama import LORA_TARGETS, Llama, LlamaConfig, LoRALinear, llama_key_map, lora_targets
from weights import (atomic_write, checkpoint_keys, empty_model, hf_state_dict, load_hf_weights, read_config,
                     safetensors_files, save_hf_weights, write_json)

IMAGE_TOKEN_INDEX = -200  # the image placeholder id in input_ids; never in the vocabulary
IGNORE_INDEX = -100  # label of positions that carry no loss
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TinyLLaVAConfig:
    vision_path: str = "bases/clip"  # a HF CLIP checkpoint directory: the vision tower g
    llm_path: str = "bases/llama"  # a HF LLaMA checkpoint directory (with its tokenizer.json)
    projector: str = "mlp2x_gelu"  # W: 'linear' (LLaVA) or 'mlp2x_gelu' (LLaVA-1.5)
    vision_feature_layer: int = -2  # the penultimate layer, as in the paper
    keep_class_token: bool = False  # LLaVA drops the CLS token and keeps the patch tokens
    template: str = "vicuna_v1"  # the conversation template the model is trained and prompted with
    image_aspect: str = "crop"  # 'crop' (CLIP) or 'pad' (LLaVA-1.5: expand to a square first)
    image_token_index: int | None = None  # the id HF LLaVA uses for image positions, once imported or exported
    # what the trained weights sit on, loaded whole first: '' (the towers above, W fresh), or one of our checkpoints or
    # an HF LLaVA directory whose LLM (and W, and vision tower) a LoRA run keeps
    base: str = ""
    lora_r: int = 0  # LoRA adapters' rank on the LLM's linear layers (0: no adapters)
    lora_alpha: float = 0.0  # the adapters add (lora_alpha / lora_r) B A x
    lora_dropout: float = 0.0  # on the adapters' input, in training
    lora_targets: str = ",".join(LORA_TARGETS)  # which linear layers of each block have adapters


class Projector(nn.Module):
    """W: vision features -> word embeddings. 'linear': one matrix (LLaVA); 'mlp2x_gelu': Linear, GELU, Linear."""

    def __init__(self, kind, vision_size, llm_size, bias=True):
        super().__init__()
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector {kind!r} unknown: use 'linear' or 'mlp2x_gelu'")
        self.linear_1 = nn.Linear(vision_size, llm_size, bias=bias)
        self.linear_2 = nn.Linear(llm_size, llm_size, bias=bias) if kind == "mlp2x_gelu" else None

    def forward(self, vision_features):
        hidden = self.linear_1(vision_features)
        if self.linear_2 is not None:
            hidden = self.linear_2(F.gelu(hidden))  # exact (erf) GELU, as LLaVA-1.5
        return hidden


class TinyLLaVA(nn.Module):
    def __init__(self, config, vision, llm, projector_bias=True):
        super().__init__()
        self.config = config
        self.vision = vision.requires_grad_(False).eval()  # g is frozen in both stages
        self.projector = Projector(config.projector, vision.config.hidden_size, llm.config.hidden_size, projector_bias)
        self.llm = llm
        self.lora_merged = False  # merge_lora() changed the LLM's weights

    @property
    def num_image_tokens(self):
        """How many embeddings one image becomes in the sequence."""
        return self.vision.config.num_patches + (1 if self.config.keep_class_token else 0)

    def train(self, mode=True):
        super().train(mode)
        self.vision.eval()  # frozen: always in inference mode
        return self

    def set_stage(self, stage):
        """Stage 1 (feature alignment) trains W only; stage 2 (end-to-end) trains W and the LLM, or W and the LLM's
        LoRA adapters when it has them (the LLM's own weights then stay frozen). g never trains."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.projector.requires_grad_(True)
        lora = self.llm.has_lora
        for name, param in self.llm.named_parameters():
            param.requires_grad_(stage == 2 and (".lora_" in name if lora else True))

    def add_lora(self, r, alpha, dropout=0.0, targets=",".join(LORA_TARGETS)):
        """LoRA: freeze the LLM and give the chosen linear layers of its blocks trainable adapters (targets: some of
        q, k, v, o, gate, up, down, comma-separated). The vision tower, W and lm_head get none; W trains on."""
        self.llm.add_lora(r, alpha, dropout, lora_targets(targets))
        self.config = replace(self.config, lora_r=r, lora_alpha=alpha, lora_dropout=dropout, lora_targets=targets)

    def store_frozen_linears_in(self, dtype):
        """Keep the frozen linear layers' weights (the vision tower's; the LLM's blocks' and lm_head under LoRA) in
        `dtype`. Autocast to that dtype rounds them to it for every matmul anyway, so the results are the same, bit
        for bit, in half the memory (LLaVA keeps its LoRA base in bf16 too). Embeddings (and an lm_head tied to
        them, whose lookups feed the float32 residual stream), norms and whatever trains keep their dtype."""
        embeddings = self.llm.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, LoRALinear)) and not module.weight.requires_grad \
                    and module.weight is not embeddings:
                for name in ("weight", "bias"):
                    if getattr(module, name) is not None:
                        setattr(module, name, nn.Parameter(getattr(module, name).detach().to(dtype),
                                                           requires_grad=False))

    def merge_lora(self):
        """Fold the adapters into the LLM's weights (W <- W + (alpha / r) B A) for inference or export; the model
        computes the same. Its LLM now differs from the base's, so save() keeps all of it."""
        if self.llm.has_lora:
            self.llm.merge_lora()
            self.config = replace(self.config, lora_r=0)
            self.lora_merged = True

    def image_features(self, pixel_values):
        """H_v = W · Z_v for a stack of images (N, 3, S, S) -> (N, num_image_tokens, llm hidden size)."""
        with torch.no_grad():
            vision_features = self.vision(pixel_values, layer=self.config.vision_feature_layer)  # Z_v = g(X_v)
            if not self.config.keep_class_token:
                vision_features = vision_features[:, 1:]  # (N, num_patches, vision hidden): patch tokens only
        return self.projector(vision_features.to(self.projector.linear_1.weight.dtype))  # H_v = W · Z_v

    def embed(self, input_ids, pixel_values=None, labels=None):
        """
        Splice image features into the word embeddings where the placeholders stand.

        input_ids (B, T), right-padded, with one IMAGE_TOKEN_INDEX per image; pixel_values (N, 3, S, S), the images
        in the order their placeholders appear (row by row). Returns embeddings (B, L, D), labels (B, L) with
        IGNORE_INDEX on image positions and on the new right padding (or None), and each row's length (B,).
        """
        is_image = input_ids == IMAGE_TOKEN_INDEX  # (B, T)
        num_images = int(is_image.sum())
        if num_images != (0 if pixel_values is None else len(pixel_values)):
            raise ValueError(f"{num_images} image placeholders in input_ids but "
                             f"{0 if pixel_values is None else len(pixel_values)} images given")
        text_embeds = self.llm.embed_tokens(input_ids.clamp(min=0))  # (B, T, D); placeholders get replaced below
        if num_images == 0:
            if self.training and self.projector.linear_1.weight.requires_grad:
                # no image in this batch: W still joins the graph (with zero weight), as DDP wants every trainable
                # parameter to receive a gradient on every rank
                text_embeds = text_embeds + 0 * self.projector(text_embeds.new_zeros(
                    1, self.projector.linear_1.in_features)).sum()
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
            return text_embeds, labels, lengths

        width = torch.where(is_image, self.num_image_tokens, 1)  # (B, T): how many positions each token becomes
        end = width.cumsum(dim=1)  # (B, T): where each token ends in the spliced sequence
        start = end - width
        batch, length = input_ids.shape[0], int(end[:, -1].max())
        embeds = text_embeds.new_zeros(batch, length, text_embeds.shape[-1])  # (B, L, D)
        rows, cols = (~is_image).nonzero(as_tuple=True)
        embeds[rows, start[rows, cols]] = text_embeds[rows, cols]
        image_rows, image_cols = is_image.nonzero(as_tuple=True)  # row-major: the images in order
        offsets = torch.arange(self.num_image_tokens, device=input_ids.device)
        image_positions = start[image_rows, image_cols][:, None] + offsets  # (N, num_image_tokens)
        embeds[image_rows[:, None], image_positions] = self.image_features(pixel_values).to(embeds.dtype)
        spliced_labels = None
        if labels is not None:
            spliced_labels = labels.new_full((batch, length), IGNORE_INDEX)  # image positions carry no loss
            spliced_labels[rows, start[rows, cols]] = labels[rows, cols]
        return embeds, spliced_labels, end[:, -1]

    def forward(self, input_ids, pixel_values=None, labels=None, samples=None):
        """
        input_ids (B, T) right-padded with one placeholder per image, pixel_values (N, 3, S, S), labels (B, T) with
        IGNORE_INDEX on everything but answer tokens -> (logits, loss). Without labels: logits (B, L, vocab) over the
        spliced sequence, loss None. With labels: the mean cross-entropy over supervised tokens, and the logits
        (N_supervised, vocab) of the positions predicting them, in order: the output head runs nowhere else.
        samples: packing: input_ids is one row (B = 1) of samples of these lengths laid end to end, each computed as
        if alone (its own positions, attention within itself).
        """
        embeds, labels, _ = self.embed(input_ids, pixel_values, labels)
        if samples is not None:  # lengths in the spliced row: each image placeholder became num_image_tokens
            ends = torch.tensor(samples, device=input_ids.device).cumsum(0) - 1  # each sample's last token
            images = (input_ids[0] == IMAGE_TOKEN_INDEX).long().cumsum(0)[ends]  # images up to it
            images = torch.diff(images, prepend=images.new_zeros(1))  # (N_samples,) images in each sample
            samples = [n + (self.num_image_tokens - 1) * k for n, k in zip(samples, images.tolist())]
        hidden = self.llm.hidden_states(inputs_embeds=embeds, samples=samples)  # (B, L, D); right padding: no mask
        if labels is None:
            return self.llm.head(hidden), None
        # position t predicts token t + 1: the one place the labels are shifted (the labels, not the hidden states)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, L): the last position predicts nothing
        supervised = targets != IGNORE_INDEX  # (B, L): the answers' positions; the image, prompt and padding not
        # logits only where the loss reads them: at a 32,000-word vocabulary a 2,048-token row's are 262 MB of float32
        logits = self.llm.head(hidden[supervised])  # (N_supervised, vocab)
        loss = F.cross_entropy(logits.float(), targets[supervised])  # -mean log p(x_i | ...), paper Eq. 3
        return logits, loss

    @torch.inference_mode()
    def generate_stream(self, prompts, pixel_values=None, cache=None, **sampling):
        """
        Yield the next token of every prompt, (B,), step by step (Llama.generate_stream's sampling arguments:
        max_new_tokens, temperature, top_k, top_p, stop_token_ids, use_cache, generator).

        prompts: a list of token-id lists (lengths may differ), each with its image placeholders, or a (B, T) tensor.
        The prompts are spliced, then left-padded so that every row's last token sits at the end (prefill), and
        decoding goes on from the KV cache. Pass a `cache` (llama.KVCache) to continue a conversation in it; the
        prompt is then only the new tokens.
        """
        device = self.llm.embed_tokens.weight.device
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        longest = max(len(p) for p in prompts)
        input_ids = torch.tensor([list(p) + [0] * (longest - len(p)) for p in prompts], device=device)  # right-padded
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        embeds, _, lengths = self.embed(input_ids, pixel_values)  # (B, L, D), right-padded
        for row, prompt in enumerate(prompts):  # the text padding of this row must not count as content
            lengths[row] -= longest - len(prompt)
        batch, length = embeds.shape[:2]
        shift = length - lengths  # (B,) how far each row moves right
        source = (torch.arange(length, device=device) - shift[:, None]) % length  # (B, L)
        embeds = embeds.gather(1, source[..., None].expand_as(embeds))  # (B, L, D), now left-padded
        attention_mask = torch.arange(length, device=device) >= shift[:, None]  # (B, L)
        if cache is not None:  # the cached conversation comes first
            attention_mask = torch.cat([attention_mask.new_ones(batch, cache.length), attention_mask], dim=1)
        yield from self.llm.generate_stream(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                                            **sampling)

    def generate(self, prompts, pixel_values=None, **sampling):
        """The new tokens (B, N) for each prompt; see generate_stream."""
        return torch.stack(list(self.generate_stream(prompts, pixel_values, **sampling)), dim=1)

    # ---- building, loading and saving ----

    @classmethod
    def from_bases(cls, config, dtype=torch.float32, device="cpu"):
        """Start from pretrained towers (HF CLIP and LLaMA directories) and a freshly initialized W."""
        vision = CLIPVision.from_pretrained(resolve(config.vision_path), dtype=dtype, device=device)
        llm = Llama.from_pretrained(resolve(config.llm_path), dtype=dtype, device=device)
        return cls(config, vision, llm).to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load one of our checkpoints (ckpt.pt, or a directory holding one) or an HF LLaVA directory."""
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            return cls.from_hf(path, dtype, device)
        checkpoint = read_checkpoint(path)
        config = TinyLLaVAConfig(**checkpoint["config"])
        check_bases(checkpoint, path, config.vision_path, config.llm_path)
        model = cls.from_config(config, dtype, device)
        model.load_trained_weights(checkpoint["model"], source=path)
        return model

    @classmethod
    def from_config(cls, config, dtype=torch.float32, device="cpu"):
        """The model trained weights go over: the towers with a fresh W, or config.base loaded whole (its own
        adapters, if any, merged in), then fresh LoRA adapters (B = 0) if config.lora_r."""
        if not config.base:
            model = cls.from_bases(config, dtype, device)
        else:
            model = cls.from_pretrained(resolve(config.base), dtype, device)
            model.merge_lora()
            fixed = {key: getattr(model.config, key) for key in ("vision_path", "llm_path", "projector",
                                                                  "vision_feature_layer", "keep_class_token")}
            for key, value in fixed.items():
                if getattr(config, key) != value:
                    raise ValueError(f"{config.base} has {key} {value!r}, not {getattr(config, key)!r}")
            model.config = replace(config, image_token_index=model.config.image_token_index, lora_r=0)
            model.lora_merged = False  # the merged LLM is the base's own: nothing to save of it
        if config.lora_r:
            model.add_lora(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
        return model

    def load_trained_weights(self, weights, source="checkpoint", with_adapters=True):
        """Overlay trained tensors (W, and the LLM or its LoRA adapters after stage 2) onto the model, strictly.
        with_adapters=False: the adapters are new (a LoRA run starting from a checkpoint that had none)."""
        params = dict(self.named_parameters())
        unexpected = [name for name in weights if name not in params or name.startswith("vision.")]
        misshaped = [f"{name}: found {tuple(t.shape)}, expected {tuple(params[name].shape)}"
                     for name, t in weights.items() if name in params and t.shape != params[name].shape]
        missing = [name for name in params if name not in weights
                   and (name.startswith("projector.") or (with_adapters and ".lora_" in name))]
        if unexpected or misshaped or missing:
            raise ValueError("\n".join([f"{source}: checkpoint does not match the model"]
                                       + [f"  unexpected tensor: {n}" for n in unexpected]
                                       + [f"  mis-shaped tensor: {n}" for n in misshaped]
                                       + [f"  missing tensor: {n}" for n in missing]))
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def trained_weights(self):
        """What training changed: W always, and whatever else trains (the LLM, or only its LoRA adapters); the rest
        comes from the bases. A merged LLM counts as changed."""
        return {name: p.detach().cpu() for name, p in self.named_parameters() if p.requires_grad
                or name.startswith("projector.") or (self.lora_merged and name.startswith("llm."))}

    def base_fingerprints(self):
        return base_fingerprints(self.config)

    def save(self, path, weights=None, **extra):
        """Our checkpoint, loadable with torch.load(weights_only=True): config, the bases' identity, trained weights,
        and whatever else the caller adds (optimizer state, step...). Written atomically. weights: the trained tensors
        by name when the caller gathered them itself (a sharded model); by default trained_weights()."""
        state = dict(config=asdict(self.config), bases=base_fingerprints(self.config),
                     model=self.trained_weights() if weights is None else weights, **extra)
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def hf_key_map(self, vision_prefix="vision_tower.vision_model.", projector_prefix="multi_modal_projector.",
                   llm_prefix="language_model.model.", lm_head="language_model.lm_head.weight"):
        """Our parameter names -> LlavaForConditionalGeneration names (the published llava-hf layout by default)."""
        key_map = vision_key_map(self.vision.config, "vision.", vision_prefix)
        key_map.update({f"projector.{n}": projector_prefix + n for n, _ in self.projector.named_parameters()})
        key_map.update({f"llm.{k}": v for k, v in llama_key_map(self.llm.config, llm_prefix, lm_head).items()})
        return key_map

    @staticmethod
    def hf_config(path):
        """Our config for a transformers LlavaForConditionalGeneration directory (both towers in it)."""
        hf = read_config(path)
        source = os.path.join(path, "config.json")
        if hf.get("model_type") != "llava":
            raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'llava' "
                             "(a LlavaForConditionalGeneration) or one of our ckpt.pt files")
        layer = hf.get("vision_feature_layer", -2)
        strategy = hf.get("vision_feature_select_strategy", "default")
        if not isinstance(layer, int) or strategy not in ("default", "full"):
            raise ValueError(f"{source}: vision_feature_layer {layer!r} / select strategy {strategy!r} not supported")
        if hf.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: projector_hidden_act {hf['projector_hidden_act']!r} not supported (gelu)")
        return TinyLLaVAConfig(vision_path=path, llm_path=path, projector="mlp2x_gelu", vision_feature_layer=layer,
                               keep_class_token=strategy == "full",
                               image_token_index=hf.get("image_token_index", hf.get("image_token_id")))

    @classmethod
    def from_hf(cls, path, dtype=torch.float32, device="cpu"):
        """Import a transformers LlavaForConditionalGeneration directory: the published llava-hf layout
        (vision_tower.vision_model.*, language_model.model.*) or transformers 5's (vision_tower.*,
        model.vision_tower.*, model.language_model.*, lm_head.weight)."""
        config = cls.hf_config(path)
        hf = read_config(path)
        source = os.path.join(path, "config.json")
        vision = empty_model(CLIPVision, vision_config_from_hf(hf, source), dtype, device)
        llm = empty_model(Llama, LlamaConfig.from_hf(hf["text_config"], source), dtype, device)
        llm.tie_weights()
        with torch.device("meta"):
            model = cls(config, vision, llm, projector_bias=hf.get("multimodal_projector_bias", True))
        model.projector.to(dtype).to_empty(device=device)

        keys = checkpoint_keys(path)
        if any(k.startswith("vision_tower.vision_model.") for k in keys):
            vision_prefix = "vision_tower.vision_model."
        else:
            vision_prefix = "model.vision_tower." if any(k.startswith("model.vision_tower.") for k in keys) \
                else "vision_tower."
        new_layout = any(k.startswith("model.language_model.") for k in keys)
        key_map = model.hf_key_map(
            vision_prefix, "model.multi_modal_projector." if new_layout else "multi_modal_projector.",
            "model.language_model." if new_layout else "language_model.model.",
            "lm_head.weight" if new_layout else "language_model.lm_head.weight")
        ignored = ("position_ids", "rotary_emb.inv_freq") + (("lm_head.weight",) if llm.config.tie_word_embeddings
                                                              else ())
        load_hf_weights(model, path, key_map, ignored_suffixes=ignored)
        return model

    def save_hf(self, path, tokenizer_path=None):
        """
        Export as a LlavaForConditionalGeneration directory (the published llava-hf layout), with tokenizer.json.
        LoRA adapters are folded into the LLM's weights on the way (the model itself keeps them): a plain LLaVA.
        transformers' LLaVA needs an in-vocabulary id for image positions: if the model has none yet, one row
        ('<image>') is appended to the embeddings and the output head, initialized to their means as llava-hf did.
        """
        if self.config.projector != "mlp2x_gelu":
            raise ValueError(f"HF LLaVA has only the mlp2x_gelu projector; this model uses {self.config.projector!r}")
        os.makedirs(path, exist_ok=True)
        weights = {name: p for name, p in self.named_parameters() if not name.startswith("llm.")}
        weights.update({f"llm.{name}": tensor for name, tensor in self.llm.plain_weights().items()})
        tensors = hf_state_dict(weights, self.hf_key_map())
        text_config = self.llm.config.to_hf()
        image_token_index = self.config.image_token_index
        if image_token_index is None:
            image_token_index = text_config["vocab_size"]
            text_config["vocab_size"] += 1
            for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
                if name in tensors:
                    tensors[name] = torch.cat([tensors[name], tensors[name].mean(0, keepdim=True)])
        save_hf_weights(tensors, path)
        dtype = str(self.llm.embed_tokens.weight.dtype).removeprefix("torch.")
        vision_config = dict(asdict(self.vision.config), model_type="clip_vision_model")
        write_json(dict(model_type="llava", architectures=["LlavaForConditionalGeneration"], dtype=dtype,
                        vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                        image_seq_length=self.num_image_tokens, projector_hidden_act="gelu",
                        multimodal_projector_bias=self.projector.linear_1.bias is not None,
                        vision_feature_layer=self.config.vision_feature_layer,
                        vision_feature_select_strategy="full" if self.config.keep_class_token else "default",
                        tie_word_embeddings=self.llm.config.tie_word_embeddings), os.path.join(path, "config.json"))
        tokenizer_file = os.path.join(tokenizer_path or resolve(self.config.llm_path), "tokenizer.json")
        if os.path.isfile(tokenizer_file):
            with open(tokenizer_file) as f:
                tokenizer = json.load(f)
            if self.config.image_token_index is None:  # name the new id, so HF processors find '<image>'
                tokenizer.setdefault("added_tokens", []).append(dict(
                    id=image_token_index, content="<image>", single_word=False, lstrip=False, rstrip=False,
                    normalized=False, special=True))
            write_json(tokenizer, os.path.join(path, "tokenizer.json"))


def resolve(path):
    """A base checkpoint path as given, or else relative to this repository (so the shipped bases are found from
    any working directory)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    in_repo = os.path.join(REPO_DIR, path)
    return in_repo if os.path.exists(in_repo) else path


def read_checkpoint(path, mmap=False):
    """One of our checkpoints (a ckpt.pt, or the directory holding one), read without pickle: a dict of config, bases
    (their fingerprints), model (the trained tensors) and whatever training added. mmap: tensors are read from the file
    only when used. Anything else raises FileNotFoundError or ValueError, naming the path and saying why."""
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: " + ("no ckpt.pt in this directory" if os.path.isdir(path) else
                                               "no such file or directory"))
    not_ours = f"{file}: not a tinyllava checkpoint"
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive
        raise ValueError(f"{not_ours} (unknown checkpoint format: not a file torch.save wrote)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"{not_ours} ({str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or not {"config", "bases", "model"} <= checkpoint.keys():
        raise ValueError(f"{not_ours} (no config, bases and model entries)")
    return checkpoint


def fingerprint(path):
    """A short identity of a checkpoint: for an HF directory its config and the first megabyte of its weights, for one
    of ours (ckpt.pt or its directory) its config and the first 4096 values of every trained tensor, hashed.
    Two different fine-tunes of one architecture differ in the weights, so they get different fingerprints."""
    digest = hashlib.sha256()
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), "rb") as f:
            digest.update(f.read())
        with open(safetensors_files(path)[0], "rb") as f:
            digest.update(f.read(1 << 20))
        return digest.hexdigest()[:16]
    checkpoint = read_checkpoint(path, mmap=True)  # reads only what is hashed
    digest.update(json.dumps(checkpoint["config"], sort_keys=True).encode())
    for name, tensor in sorted(checkpoint["model"].items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.flatten()[:4096].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprints(config):
    """The identities of what a model's trained weights sit on: its base if it has one, and its towers."""
    found = {"base": fingerprint(resolve(config.base))} if config.base else {}
    return dict(found, vision=fingerprint(resolve(config.vision_path)), llm=fingerprint(resolve(config.llm_path)))


def check_bases(checkpoint, source, vision_path, llm_path):
    """Refuse a checkpoint's trained weights (W; the LLM or its adapters) on other weights than they were trained on:
    the towers at vision_path and llm_path, and the base a LoRA run sits on, compared by content (fingerprint)."""
    was = checkpoint["config"]
    base = was.get("base", "")
    if base and not os.path.exists(resolve(base)):
        raise FileNotFoundError(f"{source} sits on {base}, which is not there any more")
    if base and checkpoint["bases"].get("base") != fingerprint(resolve(base)):
        raise ValueError(f"{source} sits on {base}, which changed since (by content): its trained weights only fit "
                         "the base they were trained on")
    here = {"vision tower": (vision_path, "vision"), "LLM": (llm_path, "llm")}
    different = [f"the {tower} at {path}" for tower, (path, key) in here.items()
                 if checkpoint["bases"].get(key) != fingerprint(resolve(path))]
    if different:
        raise ValueError(f"{source} was trained on vision tower {was['vision_path']} and LLM {was['llm_path']}, but "
                         f"{' and '.join(different)} {'differs' if len(different) == 1 else 'differ'} (by content): "
                         "its trained weights only fit the towers they were trained on")
