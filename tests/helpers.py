"""Shared by the tests: weights unlike transformers' init, and tiny checkpoints transformers writes itself."""
import torch
import transformers

TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                   patch_size=8)
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)


def randomize(model, seed=0):
    """Weights unlike transformers' init (norm weights != 1, biases != 0), so a forgotten norm or bias shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "logit_scale" in name:
                param.fill_(2.0)
            elif ("norm" in name or "layrnorm" in name) and "bias" not in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.08 * noise)
    return model


def save_tiny_bases(directory, seed=0):
    """A tiny CLIPVisionModel and LlamaForCausalLM saved by transformers: (vision_path, llm_path)."""
    vision = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)), seed)
    llm = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)), seed + 1)
    vision.save_pretrained(str(directory / "vision"))
    llm.save_pretrained(str(directory / "llm"))
    return str(directory / "vision"), str(directory / "llm")
