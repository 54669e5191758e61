"""
Regenerate the tiny pretrained bases shipped in bases/: a byte-level BPE tokenizer, a tiny CLIP (both towers) and a
tiny LLaMA, trained from scratch on the shapes world (world.py) and written in Hugging Face's layout, so that they load
through exactly the loaders real checkpoints use (CLIP.from_pretrained, Llama.from_pretrained, and transformers').

    python make_bases.py                                       # all of bases/ (time: docs/bases.md)
    python make_bases.py --resume                              # go on where an interrupted run stopped
    python make_bases.py --out /tmp/bases --clip_steps 20 --color_steps 5 --position_steps 5 --facts_steps 5 \
        --llm_steps 20                                         # a quick smoke run
    python -m pytest -q tests/test_make_bases.py

    bases/clip/    CLIPModel: config.json, model.safetensors, preprocessor_config.json, tokenizer(_config).json
    bases/llama/   LlamaForCausalLM: config.json, model.safetensors, tokenizer(_config).json

1. Tokenizer: byte-level BPE trained on every text of the world, in the pieces data.py encodes, until no merge is
   left: every word of the world is one token, and any other text still encodes (byte fallback is built in). Special
   ids: <unk> 0, <s> 1, </s> 2, <pad> 3, and <|endoftext|> 4, CLIP's end of text. No post-processor: data.py adds BOS.
2. CLIP: the world's 64 x 64 scene is cut into 21 x 21 patches, one per cell of its 3 x 3 grid (the conv drops pixel
   row and column 63, which lie in the cell margin), so LLaVA gets 9 image tokens. LLaVA reads the patch tokens of the
   penultimate layer, so each must say what its cell holds and which cell it is. Whole-image CLIP learns that slowly
   (it tells 256 scenes apart by colours and sizes alone, and positions not at all), so CLIP's contrastive loss is
   applied twice: to whole images against their caption or detailed description, and to each object's cell token
   against the description's sentence about it ("A large red circle is in the top left corner."), with that sentence
   at another cell or with another shape as a hard negative (as NegCLIP, Yuksekgonul et al. 2023).
3. LLaMA: from scratch, it learns to read scenes written in words. Where the image goes there is one position per
   grid cell (9, as CLIP's image tokens), each the mean of its words' embeddings, the very tokens the questions use
   (" top" " left" " white" " large" " red" " circle"; "light blue" and "empty" are the tokens <|light blue|> and
   <|empty|>, added to the BPE after its training: world.cell_words), so an image token reads back as a bag of words
   (evaluate.py --read_image). It learns to answer every question type and to write captions and descriptions from
   fresh train scenes, in stage 2's multi-turn template (distinct questions about one scene, as many as fit in 192
   tokens: the system prompt is paid once for ~5 answers) and stage 1's for captions. Four phases: the color lookup
   alone, loss on the color word (on whole answers of every type it did not form in 4,000 steps); color and position;
   every type, loss on the fact words; every type on whole answers, each scene's cells blurred by gaussian noise
   (scene_embeddings): a LLaMA trained on exact word means read any other vector arbitrarily, and stage 1's W found
   vectors that wrote the captions but that the questions did not read. This is LLaVA's premise made literal: the
   LLM can already read what W must learn to write (stage 1). The held-out exact match it prints, in this text form, on
   evaluate.py's questions, is the ceiling of stages 1 and 2; the bases ship only when it is at least 0.98.
The LLaMA's training state is checkpointed (OUT/build/llama_training.pt, every --checkpoint_every steps): a run cut
short goes on with --resume and ends with the bytes an uninterrupted run writes.
Weights are trained in float32 (under bf16 autocast with --dtype bfloat16) and stored in float16 (the loaders cast
on load); the quality figures printed at the end are measured on the stored files, loaded back.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn.attention import SDPBackend, sdpa_kernel

import flags
import world
from clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, contrastive_loss
from data import (BRIEF_DESCRIPTION_QUESTIONS, CLIP_MEAN, CLIP_STD, DETAILED_DESCRIPTION_QUESTIONS, IMAGE_TAG,
                  encode_conversation, load_image, process_image, question_ids, render_conversation)
from llama import Llama, LlamaConfig
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from weights import atomic_write, write_json

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>")  # ids 0..4, in this order
UNK, BOS, EOS, PAD, END_OF_TEXT = range(5)
SCENE_TOKENS = world.SCENE_TOKENS  # the scene's words that are no text token, added after the BPE's training
CELL_WORDS = 6  # the most tokens a cell is written in: " bottom", " right", " white", " large", " red", " circle"


# Every field is a flag, explained by its comment: `python make_bases.py --help` prints them (flags.py says how).
@dataclass
class Settings:
    # run: where the bases go, from which world, on what
    out: str = "bases"  # the directory that receives clip/ and llama/ (each replaced whole, only once it is finished)
    world_root: str = world.DEFAULT_ROOT  # where the shapes world is generated (once) and read
    world_seed: int = 0  # the default world train.py uses: the bases never see its held-out split
    n_train: int = world.N_TRAIN_IMAGES  # the world's training images
    n_heldout: int = world.N_HELDOUT_IMAGES  # the world's held-out images (scored, never trained on)
    seed: int = 0  # the seed of the initializations and the batches: the same seed gives the same files
    device: Literal["cpu", "cuda"] = "cpu"  # where the bases train
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast. At these widths it was slower on a 2-core
                                                       # AVX-512/AMX Xeon (train.py's stage 1: 11,700 tok/s against
                                                       # 16,200 in float32), faster on a 2-core AMD EPYC with
                                                       # avx512_bf16 (a LLaMA step 0.32 s against 0.50 s)
    threads: int = 2  # CPU threads torch uses
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # the dtype the weights are stored in (the
                                                                       # loaders cast)
    # CLIP: the vision tower g, and the text tower it is trained against
    patch_size: int = world.IMAGE_SIZE // world.GRID  # one patch per grid cell
    vision_width: int = 192  # the ViT's hidden size
    vision_layers: int = 4  # the ViT's blocks
    vision_heads: int = 6  # the ViT's attention heads
    text_width: int = 96  # the text tower's hidden size
    text_layers: int = 2  # the text tower's blocks
    text_heads: int = 3  # the text tower's attention heads
    text_context: int = 64  # the text tower's longest input, in tokens
    projection_dim: int = 128  # the shared image-text embedding's size
    position_std: float = 1.0  # init of the vision position embedding; at 0.02 positions were never learned
    clip_steps: int = 600  # contrastive training steps
    clip_batch: int = 128  # image-text pairs per step
    clip_lr: float = 1e-3  # peak learning rate (linear warmup, cosine decay)
    # LLaMA: from scratch, it learns to read scenes written in words (docstring, part 3), in four phases, one cosine
    llm_width: int = 128  # hidden size
    llm_layers: int = 4  # decoder blocks
    llm_heads: int = 4  # attention heads
    llm_kv_heads: int = 2  # key-value heads (grouped-query attention when fewer than the heads)
    llm_intermediate: int = 256  # the MLP's hidden size
    llm_context: int = 512  # the longest sequence, in tokens
    color_steps: int = 800  # phase 1: color questions about scenes of 2 or 3 objects, loss on the color word alone
    position_steps: int = 800  # phase 2: color and position questions, 2 or 3 objects, loss on every answer token
    facts_steps: int = 2400  # phase 3: every question type, captions, descriptions (color and position 3x), loss on
                             # the fact words alone
    llm_steps: int = 8000  # phase 4: every question type, captions, descriptions, loss on every answer token, the
                           # cells blurred by noise (cell_noise)
    cell_noise: float = 1.0  # phase 4: each scene's cells get gaussian noise whose norm is drawn uniformly up to this
                             # share of the cell's norm (0: none; see scene_embeddings)
    llm_batch: int = 32  # sequences per step
    llm_tokens: int = 192  # each sequence holds question-answer turns about one scene, as many as fit in this many
                           # tokens (1: a single question)
    llm_lr: float = 1e-3  # peak learning rate
    llm_eval_every: int = 1000  # print the held-out fact words right and exact match (the scenes in words) every this
                                # many steps (0: only the exact match at the end, on the stored weights)
    checkpoint_every: int = 500  # write the LLaMA's training state to OUT/build/llama_training.pt this often
    resume: bool = False  # take up the LLaMA's training where OUT/build/llama_training.pt stopped (and reuse a CLIP
                          # finished in OUT/build/clip): the result is bit-identical to an uninterrupted run

# ----------------------------------------------------------------------------------------------------------------------
# The world as data


def read_json(path):
    with open(path) as f:
        return json.load(f)


def cell_sentence(obj, row, col):
    """The detailed description's sentence about obj, placed at (row, col): 'A large red circle is on the left.'"""
    return world.capitalize(f"{world.with_article(world.phrase(obj.size, obj.color, obj.shape))} is "
                            f"{world.where(row, col)}.")


def world_texts(directory):
    """Every text the bases read, in the pieces data.py encodes: the train records in the vicuna_v1 template with the
    image before and after the question, cut at <image> and </s>; stage-1 captions as the plain template writes them;
    the CLIP texts (captions, detailed descriptions); the instructions of paper Tables 8 and 9. Sorted, no repeats."""
    texts = set()
    for name in ("stage1.json", "stage2.json"):
        for record in read_json(os.path.join(directory, name)):
            for image_first in (True, False):
                rendered = render_conversation(record["conversations"], "vicuna_v1", image_first)
                texts.update(piece for part in rendered.split(IMAGE_TAG) for piece in part.split("</s>") if piece)
            if name == "stage1.json":
                texts.add(record["conversations"][1]["value"] + "\n")
    for record in read_json(os.path.join(directory, "scenes.json")):
        if record["split"] == "train":
            texts.update((record["caption"], world.description(world.scene_from_json(record))))
    for question in BRIEF_DESCRIPTION_QUESTIONS + DETAILED_DESCRIPTION_QUESTIONS:
        texts.update((question, " " + question))
    return sorted(texts)

# ----------------------------------------------------------------------------------------------------------------------
# 1. Tokenizer


def train_tokenizer(texts):
    """Byte-level BPE: start from the 256 bytes, merge the most frequent pair within words until none is left."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's word split, spaces kept
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1 << 16, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    tokenizer.add_special_tokens(list(SCENE_TOKENS))  # the words a scene is written in for the LLaMA (part 3)
    return tokenizer


def save_tokenizer(tokenizer, directory, bos, eos, max_length):
    """tokenizer.json, and a tokenizer_config.json so that transformers' AutoTokenizer knows the special tokens."""
    atomic_write(os.path.join(directory, "tokenizer.json"), tokenizer.save)
    write_json(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=SPECIAL_TOKENS[bos],
                    eos_token=SPECIAL_TOKENS[eos], unk_token=SPECIAL_TOKENS[UNK], pad_token=SPECIAL_TOKENS[PAD],
                    model_max_length=max_length, clean_up_tokenization_spaces=False),
               os.path.join(directory, "tokenizer_config.json"))

# ----------------------------------------------------------------------------------------------------------------------
# Training, shared by both models


def train(name, model, batch_loss, steps, lr, settings, warmup=0.05, checkpoint=None):
    """AdamW with linear warmup and cosine decay; batch_loss(step) -> loss, under bf16 autocast if settings.dtype
    says so. Prints step, loss, elapsed time and ETA ten times. checkpoint=(path, rng): every
    settings.checkpoint_every steps the model, optimizer, step and random states (rng's and torch's) go to path,
    atomically; with settings.resume the run takes up from there and ends as an uninterrupted run would."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms, biases, scales do not
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                                  lr=lr, betas=(0.9, 0.98), fused=settings.device == "cuda")
    first = resume_training(checkpoint, model, optimizer, settings)
    model.train()
    started = time.time()
    for step in range(first, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / (warmup * steps)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        # the CPU's flash-attention backward is slow on these short sequences: the plain math kernel ran ~2x faster
        with sdpa_kernel(SDPBackend.MATH) if settings.device == "cpu" else nullcontext():
            with torch.autocast(settings.device, dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16"):
                loss = batch_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            elapsed = time.time() - started
            print(f"{name} step {step + 1}/{steps}  loss {loss.item():.4f}  elapsed {elapsed:.0f}s  "
                  f"eta {elapsed / (step + 1 - first) * (steps - step - 1):.0f}s", flush=True)
        if checkpoint and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 \
                and step + 1 < steps:
            save_training(checkpoint, model, optimizer, step + 1, settings)
    return model.eval()


def save_training(checkpoint, model, optimizer, step, settings):
    path, rng = checkpoint
    version, state, gauss = rng.getstate()
    payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                   rng=dict(torch=torch.get_rng_state(), python=[version, list(state), gauss],
                            cuda=torch.cuda.get_rng_state() if settings.device == "cuda" else None),
                   settings=training_settings(settings))
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def training_settings(settings):
    """What a resumed run must share with the run that wrote the checkpoint (the run's place and pace may differ)."""
    return {k: v for k, v in dataclasses.asdict(settings).items()
            if k not in ("out", "resume", "checkpoint_every", "threads", "llm_eval_every")}


def resume_training(checkpoint, model, optimizer, settings):
    """The step to start from: 0, or with --resume the checkpoint's (its model, optimizer and random states
    loaded); a checkpoint of other settings stops with one line naming them."""
    if not (checkpoint and settings.resume):
        return 0
    path, rng = checkpoint
    if not os.path.exists(path):
        print(f"--resume: no LLaMA checkpoint in {path} yet: the LLaMA starts at step 0", flush=True)
        return 0
    saved = torch.load(path, weights_only=True)  # tensors, lists and numbers: no pickle
    differ = {k: (v, saved["settings"].get(k)) for k, v in training_settings(settings).items()
              if saved["settings"].get(k) != v}
    if differ:
        raise flags.Stop(f"--resume: {path} was written with other settings ("
                         + ", ".join(f"--{k} {old} there, {new} now" for k, (new, old) in differ.items())
                         + "); run without --resume to start again")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    version, state, gauss = saved["rng"]["python"]
    rng.setstate((version, tuple(state), gauss))
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] is not None:  # the cells' noise on a GPU draws from its generator
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    print(f"resumed from {path} at step {saved['step']}", flush=True)
    return saved["step"]

# ----------------------------------------------------------------------------------------------------------------------
# 2. CLIP


def load_scenes(directory, image_size):
    """(scenes, pixels (N, 3, S, S) exactly as data.process_image gives LLaVA, is_train (N,)) of the whole world."""
    records = read_json(os.path.join(directory, "scenes.json"))
    pixels = torch.stack([process_image(load_image(os.path.join(directory, r["image"])), image_size)
                          for r in records])
    is_train = torch.tensor([r["split"] == "train" for r in records])
    return [world.scene_from_json(r) for r in records], pixels, is_train


def clip_ids(texts, tokenizer, context):
    """<s> text <|endoftext|>, right-padded with <pad> to the longest: (B, T) ids. The text tower pools at id 4."""
    rows = [[BOS] + e.ids + [END_OF_TEXT] for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    longest = max(len(row) for row in rows)
    if longest > context:
        raise ValueError(f"a CLIP text of {longest} tokens exceeds the text context {context}")
    return torch.tensor([row + [PAD] * (longest - len(row)) for row in rows])


def cell_pooling(config):
    """(GRID^2, num_patches): the mean over the patches whose centre lies in each grid cell (one patch per cell by
    default, then the identity)."""
    side = config.image_size // config.patch_size
    centres = torch.arange(side) * config.patch_size + config.patch_size // 2
    cell_of = (centres * world.GRID // world.IMAGE_SIZE).clamp(max=world.GRID - 1)  # (side,) cell row/col of a patch
    cells = (cell_of[:, None] * world.GRID + cell_of[None, :]).flatten()  # (num_patches,) row by row
    pooling = F.one_hot(cells, world.GRID ** 2).T.float()  # (GRID^2, num_patches)
    return pooling / pooling.sum(1, keepdim=True)


def altered(obj, rng):
    """A hard negative for obj's sentence: the same object at another cell, or with another shape."""
    if rng.random() < 0.5:
        return cell_sentence(dataclasses.replace(obj, shape=rng.choice([s for s in world.SHAPES if s != obj.shape])),
                             obj.row, obj.col)
    cells = [(row, col) for row in range(world.GRID) for col in range(world.GRID) if (row, col) != (obj.row, obj.col)]
    return cell_sentence(obj, *rng.choice(cells))


def clip_embeddings(model, pixels, pooling):
    """Unit vectors in the shared space (B, 1 + GRID^2, P): the image (class token, as CLIP.encode_image), then each
    cell (its patch tokens through the same post-norm and projection)."""
    hidden = model.vision.post_layernorm(model.vision(pixels))  # (B, 1 + num_patches, D)
    cells = torch.einsum("cp,bpd->bcd", pooling.to(hidden.dtype), hidden[:, 1:])  # (B, GRID^2, D)
    return F.normalize(model.visual_projection(torch.cat([hidden[:, :1], cells], dim=1)), dim=-1)


def train_clip(settings, tokenizer, scenes, pixels, is_train):
    vision = CLIPVisionConfig(hidden_size=settings.vision_width, intermediate_size=4 * settings.vision_width,
                              num_hidden_layers=settings.vision_layers, num_attention_heads=settings.vision_heads,
                              image_size=world.IMAGE_SIZE, patch_size=settings.patch_size)
    text = CLIPTextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=settings.text_width,
                          intermediate_size=4 * settings.text_width, num_hidden_layers=settings.text_layers,
                          num_attention_heads=settings.text_heads, max_position_embeddings=settings.text_context,
                          bos_token_id=BOS, eos_token_id=END_OF_TEXT, pad_token_id=PAD)
    model = CLIP(CLIPConfig(vision=vision, text=text, projection_dim=settings.projection_dim)).to(settings.device)
    with torch.no_grad():  # position strong enough to survive training: at 0.02 the cell tokens forgot their cell
        model.vision.position_embedding.normal_(0.0, settings.position_std)
    print(f"CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{vision.num_patches} image tokens of width {vision.hidden_size}")
    train_rows = is_train.nonzero()[:, 0].tolist()
    pooling = cell_pooling(vision).to(settings.device)
    rng = random.Random(settings.seed)

    def batch_loss(step):
        with torch.no_grad():  # CLIP clips the learned temperature: logit scale at most 100
            model.logit_scale.clamp_(0, math.log(100))
        rows = rng.sample(train_rows, min(settings.clip_batch, len(train_rows)))
        texts, picked, sentences, negatives = [], [], [], []
        for b, row in enumerate(rows):
            scene = scenes[row]
            texts.append((world.caption if rng.random() < 0.5 else world.description)(scene))
            obj = rng.choice(scene.objects)
            sentence = cell_sentence(obj, obj.row, obj.col)
            if sentence not in sentences:  # a sentence twice in a batch would be its own negative
                picked.append((b, 1 + obj.row * world.GRID + obj.col))
                sentences.append(sentence)
                negatives.append(altered(obj, rng))
        embeddings = clip_embeddings(model, pixels[rows].to(settings.device), pooling)  # (B, 1 + GRID^2, P)
        text_embeddings = model.encode_text(clip_ids(texts, tokenizer, settings.text_context).to(settings.device))
        sentence_embeddings = model.encode_text(clip_ids(sentences + negatives, tokenizer,
                                                         settings.text_context).to(settings.device))
        scale = model.logit_scale.exp()
        image_logits = scale * embeddings[:, 0] @ text_embeddings.T  # (B, B)
        b, cell = map(list, zip(*picked))
        cell_logits = scale * embeddings[b, cell] @ sentence_embeddings.T  # (n, 2n): sentences, then negatives
        n = len(picked)
        true_vs_altered = torch.stack([cell_logits[:, :n].diagonal(), cell_logits[:, n:].diagonal()], dim=1)
        return (contrastive_loss(image_logits.float()) + contrastive_loss(cell_logits[:, :n].float())
                + F.cross_entropy(true_vs_altered.float(), torch.zeros(n, dtype=torch.long, device=scale.device)))

    train("clip", model, batch_loss, settings.clip_steps, settings.clip_lr, settings)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return model


@torch.no_grad()
def clip_quality(model, tokenizer, scenes, pixels, is_train, settings):
    """Held-out figures: image->caption top-1 within batches of 256 pairs, and linear probes of the penultimate patch
    tokens (the features LLaVA reads), fitted on the train split: each cell's occupancy, shape, color and size read
    from all tokens concatenated ("all"), and from the cell's own token by one probe shared by all cells ("own"),
    and which cell a token belongs to, from that token alone."""
    device = settings.device
    held_out = (~is_train).nonzero()[:, 0].tolist()
    hits = 0
    for start in range(0, len(held_out), 256):
        rows = held_out[start:start + 256]
        captions = clip_ids([world.caption(scenes[r]) for r in rows], tokenizer, settings.text_context)
        logits = model(pixels[rows].to(device), captions.to(device))  # (B, B)
        hits += int((logits.argmax(dim=1) == torch.arange(len(rows), device=device)).sum())
    figures = {"retrieval": hits / len(held_out)}

    features = torch.cat([model.vision(pixels[i:i + 500].to(device), layer=-2)[:, 1:].float().cpu()
                          for i in range(0, len(pixels), 500)])  # (N, num_patches, D)
    features = (features - features.mean((0, 1))) / features.std((0, 1))
    token_cell = cell_pooling(model.config.vision).argmax(0)  # (num_patches,) the cell holding each patch's centre
    own_features = features.flatten(0, 1)  # (N * num_patches, D), one row per token
    own_is_train = is_train.repeat_interleave(len(token_cell))
    for name, values in (("shape", world.SHAPES), ("color", list(world.COLORS)), ("size", list(world.SIZES))):
        target = torch.zeros(len(scenes), world.GRID ** 2, dtype=torch.long)  # (N, cells): 0 = empty cell
        for n, scene in enumerate(scenes):
            for obj in scene.objects:
                target[n, obj.row * world.GRID + obj.col] = 1 + values.index(getattr(obj, name))
        all_tokens = features.flatten(1)  # (N, num_patches * D): a feature's place says which token it came from
        own_target = target[:, token_cell].reshape(-1, 1)  # (N * num_patches, 1): what the token's cell holds
        figures[f"{name} all"], figures["occupied all"] = probe(all_tokens, target, is_train)
        figures[f"{name} own"], figures["occupied own"] = probe(own_features, own_target, own_is_train)
    figures["cell own"], _ = probe(own_features, 1 + token_cell.repeat(len(scenes))[:, None], own_is_train)
    return figures


def probe(features, targets, is_train, ridge=1e-3):
    """A linear probe: least squares onto one-hot targets (ridge-regularized) on the train rows. features (N, F),
    integer targets (N, K), 0 meaning 'no object'. Held-out accuracy on the targets that are objects, and of telling
    object from no object."""
    classes = int(targets.max()) + 1
    one_hot = F.one_hot(targets, classes).flatten(1).float()  # (N, K * classes)
    x = torch.cat([features, torch.ones(len(features), 1)], dim=1)  # (N, F + 1): a bias column
    x_train = x[is_train]
    gram = x_train.T @ x_train
    weights = torch.linalg.solve(gram + ridge * len(x_train) * torch.eye(len(gram)), x_train.T @ one_hot[is_train])
    predicted = (x @ weights).view(len(x), targets.shape[1], classes).argmax(-1)  # (N, K)
    held_out = ~is_train[:, None].expand_as(targets)
    objects = held_out & (targets > 0)
    return (float((predicted == targets)[objects].float().mean()),
            float(((predicted > 0) == (targets > 0))[held_out].float().mean()))


def save_clip(model, tokenizer, directory, settings):
    model.to(getattr(torch, settings.save_dtype)).save_pretrained(directory)
    size = model.config.vision.image_size
    write_json(dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": size},
                    resample=3, do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                    rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                    do_convert_rgb=True), os.path.join(directory, "preprocessor_config.json"))
    save_tokenizer(tokenizer, directory, BOS, END_OF_TEXT, settings.text_context)

# ----------------------------------------------------------------------------------------------------------------------
# 3. LLaMA reads scenes written in words: where the image goes, one position per grid cell, each the mean of its
#    words' embeddings. LLaVA's stage 1 then only has to teach W to write each image token as its cell.

# the words that carry an answer's facts (a fact word its question already gives is not one)
FACT_WORDS = world.ATTRIBUTES + world.NUMBER_WORDS + ("yes", "no", "above", "below", "bigger", "smaller", "same",
                                                      "not")


def fact_ids(tokenizer):
    """Token ids of the fact words and digits, with and without a leading space, lower case and capitalized: the
    forms that are one token (a form split into pieces would mark pieces such as 'A' of 'Above')."""
    words = {part for word in FACT_WORDS for part in word.split()} | {str(n) for n in range(10)}
    forms = [prefix + form for word in words for form in (word, word.capitalize()) for prefix in ("", " ")]
    encoded = [tokenizer.encode(form, add_special_tokens=False).ids for form in forms]
    return {ids[0] for ids in encoded if len(ids) == 1}


def cell_ids(scene, tokenizer):
    """The scene's cells in reading order (the image tokens' order), each as the ids of its words (world.cell_words:
    cell name, background, size, color, shape, or "empty"), right-padded with PAD: (GRID^2, CELL_WORDS) lists."""
    rows = [world.cell_word_ids(cell, tokenizer) for cell in world.cell_attributes(scene)]
    if None in rows:
        raise ValueError(f"this tokenizer does not write every word of {world.cell_attributes(scene)} as one token")
    return [ids + [PAD] * (CELL_WORDS - len(ids)) for ids in rows]


def scene_embeddings(model, ids, cells, noise=0.0):
    """The word embeddings of ids (B, T) with each row's scene spliced in where its GRID^2 IMAGE_TOKEN_INDEX stand:
    cells (B, GRID^2, CELL_WORDS) word ids, PAD where a cell says fewer. Each cell reads as the mean of its words'
    embeddings: what W must learn to write. With noise, each row's cells get gaussian noise of norm about u times
    their own, u uniform in [0, noise] per row. A LLaMA that only ever read exact word means reads anything else
    arbitrarily: stage 1's W then captioned well from vectors no question reads (0.30 of the held-out questions'
    fact words right after stage 1, teacher-forced, against 0.94 once the LLaMA had read noisy cells)."""
    embeds = model.embed_tokens(ids.clamp(min=0))  # (B, T, D)
    said = (cells != PAD).unsqueeze(-1)  # (B, GRID^2, CELL_WORDS, 1)
    vectors = (model.embed_tokens(cells) * said).sum(2) / said.sum(2)  # (B, GRID^2, D)
    if noise:
        share = noise * torch.rand(len(vectors), 1, 1, device=vectors.device)  # (B, 1, 1)
        scale = share * vectors.norm(dim=-1, keepdim=True) / vectors.shape[-1] ** 0.5  # per dimension
        vectors = vectors + scale * torch.randn_like(vectors)  # (B, GRID^2, D)
    return embeds.masked_scatter((ids == IMAGE_TOKEN_INDEX).unsqueeze(-1), vectors.to(embeds.dtype))


def widened(ids, labels, fact):
    """The conversation's one IMAGE_TOKEN_INDEX widened to GRID^2, one per cell, in ids, labels and fact mask."""
    at, cells = ids.index(IMAGE_TOKEN_INDEX), world.GRID ** 2
    return (ids[:at] + [IMAGE_TOKEN_INDEX] * cells + ids[at + 1:],
            labels[:at] + [IGNORE_INDEX] * cells + labels[at + 1:], fact[:at] + [False] * cells + fact[at + 1:])


def reading_caption(scene, tokenizer, facts):
    """(ids with GRID^2 IMAGE_TOKEN_INDEX where the scene goes, labels, fact mask) of its caption, as stage 1 encodes
    it (plain template)."""
    turns = [{"from": "human", "value": IMAGE_TAG}, {"from": "gpt", "value": world.caption(scene)}]
    ids, labels = encode_conversation(turns, tokenizer, "plain")
    return widened(ids, labels, [label in facts for label in labels])


def reading_conversation(turns, tokenizer, facts, image_first):
    """(ids, labels, fact mask) of question-answer turns [(question, answer)] about one scene, as stage 2 encodes
    them (vicuna_v1, the scene with the first question, before or after it). The fact mask marks each answer's fact
    words that its own question does not give."""
    conversation = []
    for i, (question, answer) in enumerate(turns):
        conversation += [{"from": "human", "value": (IMAGE_TAG + "\n" if i == 0 else "") + question},
                         {"from": "gpt", "value": answer}]
    ids, labels = encode_conversation(conversation, tokenizer, "vicuna_v1", image_first)
    given = [{i for text in (question, " " + question) for i in tokenizer.encode(text).ids} for question, _ in turns]
    fact, answer, inside = [], -1, False
    for label in labels:  # the answers are the runs of labels that are not IGNORE_INDEX, in order
        answer += label != IGNORE_INDEX and not inside
        inside = label != IGNORE_INDEX
        fact.append(inside and label in facts and label not in given[answer])
    return widened(ids, labels, fact)


def scene_turn(kind, scene, rng):
    """(question, answer) of this kind (a world.ask kind, or "description") about the scene, or None."""
    if kind == "description":
        return rng.choice(DETAILED_DESCRIPTION_QUESTIONS), world.description(scene)
    qa = world.ask(kind, scene, rng)
    return None if qa is None else (qa.question, qa.answer)


def reading_example(mix, scene, tokenizer, facts, rng, budget, image_first=None):
    """One training sequence about the scene, each kind drawn from mix {kind: weight}: its caption alone (stage 1's
    template) when the first kind is "caption", else question-answer turns (stage 2's), as many as fit in `budget`
    tokens (at least one) and never a question twice (it would be answered by copying); None when the scene gives
    no question of the first kind. Several turns per scene spread the system prompt over several answers."""
    kinds, weights = list(mix), list(mix.values())
    kind = rng.choices(kinds, weights)[0]
    if kind == "caption":
        return reading_caption(scene, tokenizer, facts)
    turns = [scene_turn(kind, scene, rng)]
    if turns[0] is None:
        return None
    image_first = rng.random() < 0.5 if image_first is None else image_first
    example, misses = reading_conversation(turns, tokenizer, facts, image_first), 0
    while misses < 20:
        kind = rng.choices(kinds, weights)[0]
        turn = None if kind == "caption" else scene_turn(kind, scene, rng)
        if turn is None or turn[0] in {question for question, _ in turns}:
            misses += 1
            continue
        longer = reading_conversation(turns + [turn], tokenizer, facts, image_first)
        if len(longer[0]) > budget:
            break
        turns, example = turns + [turn], longer
    return example


def reading_batch(settings, tokenizer, mix, only_facts, fewest, facts, held_out, rng):
    """A batch of fresh train scenes of at least `fewest` objects (never a held-out one: a single object needs no
    lookup), one sequence about each (reading_example): ids (B, T) right-padded, labels (B, T), loss weights (B, T)
    (fact words alone, or every answer token), cells (B, GRID^2, CELL_WORDS)."""
    rows = []
    while len(rows) < settings.llm_batch:
        scene = world.sample_scene(rng)
        image_first = True if set(mix) == {"color"} else None  # the first lookup is learned image first
        unwanted = scene.key() in held_out or len(scene.objects) < fewest
        example = None if unwanted else reading_example(mix, scene, tokenizer, facts, rng, settings.llm_tokens,
                                                        image_first)
        if example is not None:
            rows.append((*example, cell_ids(scene, tokenizer)))
    longest = max(len(ids) for ids, *_ in rows)
    pad = lambda row, value: row + [value] * (longest - len(row))
    ids = torch.tensor([pad(ids, PAD) for ids, *_ in rows])
    labels = torch.tensor([pad(labels, IGNORE_INDEX) for _, labels, *_ in rows])
    weights = torch.tensor([pad(fact, False) for _, _, fact, _ in rows]).float() if only_facts \
        else (labels != IGNORE_INDEX).float()
    cells = torch.tensor([row[3] for row in rows])
    return [tensor.to(settings.device) for tensor in (ids, labels, weights, cells)]


def reading_loss(model, ids, labels, weights, cells, noise=0.0):
    """Cross-entropy of each next token, weighted (fact words, or every answer token) and averaged."""
    logits = model(inputs_embeds=scene_embeddings(model, ids, cells, noise))  # (B, T, vocab)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                             ignore_index=IGNORE_INDEX, reduction="none")  # (B * (T - 1),)
    weights = weights[:, 1:].flatten()
    return (losses * weights).sum() / weights.sum().clamp(min=1)


def train_llama(settings, tokenizer, held_out, directory, checkpoint):
    """A fresh LLaMA through the four phases. From scratch: after 800 steps of the world's conversations with the
    image left out (guessing answers blind), the color lookup formed more slowly (0.70 of held-out color questions
    after 500 steps of phase 1, against 0.88 after 250 from scratch)."""
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=settings.llm_width,
                         intermediate_size=settings.llm_intermediate, num_hidden_layers=settings.llm_layers,
                         num_attention_heads=settings.llm_heads, num_key_value_heads=settings.llm_kv_heads,
                         head_dim=settings.llm_width // settings.llm_heads,
                         max_position_embeddings=settings.llm_context, tie_word_embeddings=True,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = Llama(config).to(settings.device)
    print(f"LLaMA: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    facts, rng = fact_ids(tokenizer), random.Random(settings.seed)
    every_kind = dict.fromkeys(world.EVAL_TYPES + ("caption", "description"), 1)
    phases = (({"color": 1}, True, 2, 0.0, settings.color_steps),  # (mix, fact words only, fewest objects,
              ({"color": 1, "position": 1}, False, 2, 0.0, settings.position_steps),  # cell noise, steps)
              (every_kind | {"color": 3, "position": 3}, True, 1, 0.0, settings.facts_steps),
              (every_kind, False, 1, settings.cell_noise, settings.llm_steps))
    ends = [sum(phase[-1] for phase in phases[:k + 1]) for k in range(len(phases))]

    def batch_loss(step):
        phase = next(k for k, end in enumerate(ends) if step < end)
        mix, only_facts, fewest, noise, _ = phases[phase]
        if settings.llm_eval_every and step and step % settings.llm_eval_every == 0:
            for what, score in (("fact words right (teacher-forced)", reading_facts),
                                ("exact match", reading_accuracy)):
                figures = score(model, tokenizer, directory, settings)
                print(f"llama step {step}: held-out {what} "
                      + ", ".join(f"{kind} {value:.3f}" for kind, value in figures.items()), flush=True)
        if step == ends[phase] - phases[phase][-1]:
            print(f"llama phase {phase + 1} from step {step + 1}: {', '.join(mix)}; loss on "
                  f"{'the fact words' if only_facts else 'every answer token'}; scenes of {fewest} to "
                  f"{world.MAX_OBJECTS} objects" + (f"; cells blurred by noise up to {noise:g} of their norm"
                                                   if noise else ""))
        batch = reading_batch(settings, tokenizer, mix, only_facts, fewest, facts, held_out, rng)
        return reading_loss(model, *batch, noise)
    return train("llama", model, batch_loss, ends[-1], settings.llm_lr, settings, checkpoint=(checkpoint, rng))


def reading_prompt(question, tokenizer):
    """evaluate.py's prompt (vicuna_v1, image first), its image placeholder widened to the GRID^2 cells."""
    ids = question_ids(question, tokenizer)
    at = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:at] + [IMAGE_TOKEN_INDEX] * world.GRID ** 2 + ids[at + 1:]


def held_out_questions(directory):
    """evaluate.py's questions (eval.json, about held-out scenes), and the scenes by image name."""
    scenes = {r["image"]: world.scene_from_json(r) for r in read_json(os.path.join(directory, "scenes.json"))}
    return read_json(os.path.join(directory, "eval.json")), scenes


@torch.no_grad()
def reading_facts(model, tokenizer, directory, settings, batch=64):
    """The share of the held-out questions whose fact words the LLaMA predicts right, teacher-forced (the scene in
    words, image first), per question type and overall: what the fact phases train, which exact match cannot see
    while the rest of each answer is untrained."""
    items, scenes = held_out_questions(directory)
    facts, right = fact_ids(tokenizer), {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        rows = [reading_conversation([(item["question"], item["answer"])], tokenizer, facts, True) for item in chunk]
        longest = max(len(ids) for ids, _, _ in rows)
        pad = lambda row, value: row + [value] * (longest - len(row))
        ids, labels, fact = (torch.tensor([pad(row[k], value) for row in rows], device=settings.device)
                             for k, value in enumerate((PAD, IGNORE_INDEX, False)))
        cells = torch.tensor([cell_ids(scenes[item["image"]], tokenizer) for item in chunk], device=settings.device)
        logits = model(inputs_embeds=scene_embeddings(model, ids, cells))  # (B, T, vocab)
        missed = ((logits[:, :-1].argmax(-1) != labels[:, 1:]) & fact[:, 1:]).any(1)  # (B,)
        for item, miss in zip(chunk, missed.tolist()):
            right.setdefault(item["type"], []).append(not miss)
    figures = {kind: sum(marks) / len(marks) for kind, marks in right.items()}
    figures["overall"] = sum(map(sum, right.values())) / len(items)
    return figures


@torch.no_grad()
def reading_accuracy(model, tokenizer, directory, settings, batch=64):
    """Held-out exact match per question type and overall: evaluate.py's questions, with each scene written in
    words where its image goes, image first, greedy."""
    items, scenes = held_out_questions(directory)
    right, total = {}, {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        prompts = [reading_prompt(item["question"], tokenizer) for item in chunk]
        longest = max(map(len, prompts))
        ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts], device=settings.device)  # left-padded
        cells = torch.tensor([cell_ids(scenes[item["image"]], tokenizer) for item in chunk], device=settings.device)
        answers = torch.stack(list(model.generate_stream(
            inputs_embeds=scene_embeddings(model, ids, cells), attention_mask=ids != PAD, max_new_tokens=64,
            stop_token_ids=[EOS])), dim=1).tolist()  # (B, new tokens)
        for item, answer in zip(chunk, answers):
            answer = answer[:answer.index(EOS)] if EOS in answer else answer
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            right[item["type"]] = right.get(item["type"], 0) + world.exact_match(text, item["answer"])
            total[item["type"]] = total.get(item["type"], 0) + 1
    figures = {kind: right[kind] / total[kind] for kind in total}
    figures["overall"] = sum(right.values()) / sum(total.values())
    return figures

def save_llama(model, tokenizer, directory, settings):
    model.to(getattr(torch, settings.save_dtype)).save_pretrained(directory)
    save_tokenizer(tokenizer, directory, BOS, EOS, settings.llm_context)

# ----------------------------------------------------------------------------------------------------------------------


def replace_directory(build, final):
    """Move a finished directory into place, so that bases/clip is always a whole checkpoint, old or new."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(build, final)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    """Make the bases as the command line says; returns (CLIP's figures, the LLaMA's) for tests."""
    with flags.one_line_errors("make_bases.py"):
        given = flags.command_line(Settings, argv, "make_bases.py", "python make_bases.py [--field value ...]", __doc__)
        if given is None:  # --help
            return None
        settings = checked(Settings(**given))
        try:
            return make_bases(settings)
        except KeyboardInterrupt:
            print(f"\nstopped; the same command with --resume goes on from the last checkpoint in "
                  f"{os.path.join(settings.out, 'build')}", file=sys.stderr)
            raise


def checked(settings):
    """The settings, once every count is in range and the shapes fit together; else one line naming the flag."""
    flags.at_least(settings, 1, "threads", "llm_batch", "llm_tokens", "clip_batch")
    flags.at_least(settings, 0, "clip_steps", "color_steps", "position_steps", "facts_steps", "llm_steps",
                   "llm_eval_every", "cell_noise", "checkpoint_every")
    for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads"), ("llm_width", "llm_heads")):
        if getattr(settings, heads) < 1 or getattr(settings, width) % getattr(settings, heads):
            raise flags.Stop(f"--{width} {getattr(settings, width)} --{heads} {getattr(settings, heads)}: the heads "
                             "must split the width evenly")
    if (settings.llm_width // settings.llm_heads) % 2:  # rotary embeddings turn pairs of each head's channels
        raise flags.Stop(f"--llm_width {settings.llm_width} --llm_heads {settings.llm_heads}: each head's width must "
                         "be even")
    if settings.llm_kv_heads < 1 or settings.llm_heads % settings.llm_kv_heads:
        raise flags.Stop(f"--llm_kv_heads {settings.llm_kv_heads}: it must divide --llm_heads {settings.llm_heads}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise flags.Stop("--device cuda: torch sees no CUDA device on this machine")
    build = os.path.join(settings.out, "build")
    if settings.resume and not any(os.path.exists(os.path.join(build, name))
                                   for name in ("llama_training.pt", os.path.join("clip", "model.safetensors"))):
        raise flags.Stop(f"--resume: nothing to resume in {build} (no llama_training.pt, no finished CLIP); run "
                         "without --resume to start")
    try:  # now, not after the CLIP's training
        os.makedirs(settings.out, exist_ok=True)
    except OSError as error:
        raise flags.Stop(f"--out {settings.out}: cannot make it a directory ({error.strerror})") from None
    return settings


def make_bases(settings):
    """The tokenizer, the CLIP and the LLaMA, each scored on the stored files, then moved into place whole."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    started = time.time()
    timings = {}
    directory = world.ensure_world(settings.world_root, settings.world_seed, settings.n_train, settings.n_heldout)
    build = os.path.join(settings.out, "build")
    if not settings.resume:
        shutil.rmtree(build, ignore_errors=True)

    tokenizer = train_tokenizer(world_texts(directory))
    timings["tokenizer"] = time.time() - started
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens in {timings['tokenizer']:.0f}s")

    part = time.time()
    scenes, pixels, is_train = load_scenes(directory, world.IMAGE_SIZE)
    if settings.resume and os.path.exists(os.path.join(build, "clip", "model.safetensors")):
        print(f"CLIP: the one finished in {build}/clip (--resume)")
    else:
        clip = train_clip(settings, tokenizer, scenes, pixels, is_train)
        save_clip(clip, tokenizer, os.path.join(build, "clip"), settings)
    clip = CLIP.from_pretrained(os.path.join(build, "clip"), device=settings.device)  # score what was stored
    clip_figures = clip_quality(clip, tokenizer, scenes, pixels, is_train, settings)
    timings["clip"] = time.time() - part

    part = time.time()
    held_out_scenes = {scene.key() for scene, train_scene in zip(scenes, is_train.tolist()) if not train_scene}
    llama = train_llama(settings, tokenizer, held_out_scenes, directory, os.path.join(build, "llama_training.pt"))
    save_llama(llama, tokenizer, os.path.join(build, "llama"), settings)
    llama = Llama.from_pretrained(os.path.join(build, "llama"), device=settings.device)
    llama_figures = reading_accuracy(llama, tokenizer, directory, settings)
    timings["llama"] = time.time() - part

    for name in ("clip", "llama"):
        replace_directory(os.path.join(build, name), os.path.join(settings.out, name))
    shutil.rmtree(build)
    print_figures(settings, clip_figures, llama_figures, timings, time.time() - started)
    return clip_figures, llama_figures


def print_figures(settings, clip_figures, llama_figures, timings, seconds):
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(settings.out) for f in files)
    print(f"CLIP, held out: image->caption top-1 within batches of 256 pairs {clip_figures['retrieval']:.3f}")
    columns = ("occupied", "shape", "color", "size", "cell")
    print(f"  {'linear probes of the penultimate patch tokens':48s}" + "".join(f"{c:>9s}" for c in columns))
    for kind, text in (("all", "all tokens concatenated"), ("own", "the cell's own token, one probe for all cells")):
        print(f"  {text:48s}" + "".join(f"{clip_figures[f'{c} {kind}']:9.3f}" if f"{c} {kind}" in clip_figures
                                        else f"{'-':>9s}" for c in columns))
    print("LLaMA, held-out scenes written in words, exact match: "
          + ", ".join(f"{kind} {value:.3f}" for kind, value in llama_figures.items()))
    if llama_figures["overall"] < 0.98:
        print("  below the 0.98 the shipped bases must reach: do not ship these")
    print(f"wrote {settings.out}/clip and {settings.out}/llama ({size / 1e6:.1f} MB); times: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {seconds:.0f}s")


if __name__ == "__main__":
    main()
