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


def assert_bf16_parity(ours, theirs, theirs_fp32, what, multiple=0.5):
    """
    Ours in bfloat16 against transformers in the same setting, with a tolerance measured on these very inputs:
    transformers' own bf16 error, its bf16 result against its float32 one (the gap). In a forward pass both round the
    same operations in the same order (bitwise equal on this CPU), so a difference may only come from a kernel
    summing in another order, far below bf16's own error: half the gap is allowed (multiple=0.5). What is not the
    same bf16 computation fails: float32 throughout differs by the whole gap, a cast moved (the RMSNorm weight
    applied before it) by 1.25 of it. Callers whose two sides round differently by design say so and pass another
    multiple.
    """
    gap = (theirs.float() - theirs_fp32.float()).abs().max().item()
    difference = (ours.float() - theirs.float()).abs().max().item()
    assert gap > 1e-4 * theirs_fp32.abs().max().item(), f"{what}: bf16 changed nothing ({gap:.1e}): not bf16?"
    assert difference <= multiple * gap, (f"{what}: ours differs from transformers by {difference:.2e}, more than "
                                          f"{multiple} x transformers' own bf16 error {gap:.2e}")
