"""Tiny LLaVA checkpoints built here, shared by test_sample.py and test_evaluate.py: our stage-2 and stage-1 ckpt.pt
files on tiny bases saved by transformers, an HF LLaVA directory saved by transformers, a byte-level BPE tokenizer,
three images; and the vicuna_v1 prompt written from the facts sheet, independently of data.py."""
import os
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data import load_image, process_image
from helpers import TINY_LLAMA, TINY_VISION, randomize
from tinyllava import IMAGE_TOKEN_INDEX, TinyLLaVA, TinyLLaVAConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4; '<image>' is the HF LLaVA's image token
BOS, EOS, HF_IMAGE_TOKEN = 1, 2, 4
CONTEXT = 200  # the tiny LLaMA's max_position_embeddings
NUM_IMAGE_TOKENS = 4  # (16 / 8)^2 patches
QUESTION, FOLLOW_UP = "What color is the ball?", "Where is it?"


def byte_level_tokenizer():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = SYSTEM + " USER: ASSISTANT: What color is the ball? The ball is red. Where is it? It is on the left."
    tokenizer.train_from_iterator([corpus] * 3, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert [tokenizer.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    return tokenizer


def vicuna_ids(tokenizer, turns):
    """The vicuna_v1 prompt ids written from the facts sheet, independently of data.py: BOS, the text chunks around
    the image each tokenized alone (LLaVA's tokenizer_image_token), the placeholder, and each answer's ids then EOS.
    turns: [question, answer_ids, question, ...], ending with a question."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    ids = [BOS] + encode(SYSTEM + " USER: ") + [IMAGE_TOKEN_INDEX] + encode("\n" + turns[0] + " ASSISTANT:")
    for answer, question in zip(turns[1::2], turns[2::2]):
        ids += list(answer) + [EOS] + encode(f"USER: {question} ASSISTANT:")
    return ids


def until_stop(ids, stops=(EOS,)):
    ids = list(ids)
    return next((ids[:k] for k, t in enumerate(ids) if t in stops), ids)


def tiny_llava(root):
    """Our stage-2 and stage-1 ckpt.pt files on tiny bases saved by transformers, an HF LLaVA directory saved by
    transformers, and three images (two not square)."""
    tokenizer = byte_level_tokenizer()
    llama = transformers.LlamaConfig(**dict(TINY_LLAMA, vocab_size=tokenizer.get_vocab_size(),
                                            max_position_embeddings=CONTEXT, pad_token_id=3))
    randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)), 0).save_pretrained(
        root / "vision")
    randomize(transformers.LlamaForCausalLM(llama), 1).save_pretrained(root / "llm")
    tokenizer.save(str(root / "llm" / "tokenizer.json"))
    model = TinyLLaVA.from_bases(TinyLLaVAConfig(vision_path=str(root / "vision"), llm_path=str(root / "llm")))
    randomize(model.projector, 2)
    model.save(str(root / "ckpt.pt"))
    # a stage-1 model (plain template) whose greedy caption ends, as captions do, with a newline after a few tokens:
    # the newline's output row becomes 1.01 times the row of a token it says, so it wins where that token would
    plain = TinyLLaVA.from_bases(TinyLLaVAConfig(vision_path=str(root / "vision"), llm_path=str(root / "llm"),
                                                 template="plain"))
    plain.projector.load_state_dict(model.projector.state_dict())
    images = write_images(root)
    pixel_values = process_image(load_image(images[0]), 16, "crop")[None]
    caption = plain.generate([[BOS, IMAGE_TOKEN_INDEX]], pixel_values, max_new_tokens=6)[0].tolist()
    newline, rows = tokenizer.encode("\n").ids[0], plain.llm.lm_head.weight
    for token in caption[1:]:
        with torch.no_grad():
            rows[newline] = 1.01 * rows[token]
        ended = plain.generate([[BOS, IMAGE_TOKEN_INDEX]], pixel_values, max_new_tokens=6, stop_token_ids=[newline])
        if ended.shape[1] > 1 and ended[0, -1] == newline:
            break
    plain.save(str(root / "plain.pt"))

    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_VISION), text_config=llama,
                                      image_token_index=HF_IMAGE_TOKEN, image_seq_length=NUM_IMAGE_TOKENS)
    # seed 4: a model whose greedy answer depends on the image (checked in the test)
    hf_model = randomize(transformers.LlavaForConditionalGeneration(config), 4).eval()
    hf_model.save_pretrained(root / "llava")
    tokenizer.save(str(root / "llava" / "tokenizer.json"))
    return SimpleNamespace(root=root, ckpt=str(root / "ckpt.pt"), plain=str(root / "plain.pt"),
                           llava=str(root / "llava"), llm=str(root / "llm"), hf_model=hf_model, tokenizer=tokenizer,
                           images=images)


def write_images(root):
    """Random-pixel PNGs, two of them not square (crop and pad differ)."""
    rng = np.random.default_rng(0)
    images = []
    for k, (width, height) in enumerate([(24, 14), (13, 21), (18, 18)]):
        images.append(str(root / f"image{k}.png"))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images[-1])
    return images


def our_answer(tiny, model, question, image, max_new_tokens):
    """What TinyLLaVA.generate answers (decoded) to the template's prompt about a crop-preprocessed image."""
    pixel_values = process_image(load_image(image), 16, "crop")[None]
    generated = model.generate([vicuna_ids(tiny.tokenizer, [question])], pixel_values, max_new_tokens=max_new_tokens,
                               stop_token_ids=[EOS])[0]
    return tiny.tokenizer.decode(until_stop(generated.tolist())).strip()
