"""
Benchmarks, measured side by side in one run. This machine is shared and noisy, so each figure is a ratio of medians
over interleaved rounds (ours, theirs, ours, theirs, ...), never a bare time.

    python bench.py models    # LLaMA and CLIP vision tower: forward+backward time and peak memory, ours / transformers
    python bench.py llava     # TinyLLaVA vs LlavaForConditionalGeneration: stage-2 train step; greedy tokens/s;
                              # decoding against the memory-bandwidth roofline, eager and compiled
    python bench.py train     # train.py's stage-2 step: tokens/s, peak memory, FLOP/s over a plain matmul's
    python bench.py pack      # train.py's step on padded micro-batches and on the same packed (--pack): useful tokens/s
    python bench.py lora      # train.py's stage-2 step with LoRA against full fine-tuning: peak memory and time

Peak memory on the CPU is the rise of the process's peak resident memory during one step (Linux VmHWM, reset just
before it); the script re-runs itself with glibc returning large blocks to the system, so freed memory shows.
"""
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # every tensor of >= 64 KiB is its own mapping, freed for real
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import transformers  # noqa: E402

from clip import CLIPVision  # noqa: E402
from llama import Llama  # noqa: E402
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TinyLLaVA  # noqa: E402

ROUNDS = 5
BASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bases")  # the shipped tiny default
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama / Llama proportions, 4 layers
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16, image_size=224,
              patch_size=14)  # CLIP ViT-L/14 proportions, 4 layers


def memory(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


def measure(step):
    """Seconds and peak extra bytes of one call of `step`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident memory to the current one
    before = memory("VmRSS")
    start = time.perf_counter()
    step()
    return time.perf_counter() - start, memory("VmHWM") - before


def compare(name, steps, unit="step"):
    """Run steps (label -> step, ours first) interleaved ROUNDS times after a warm-up; print medians and the ratios of
    ours over each other. Returns {label: (time ratio, peak memory ratio)} of ours over each other."""
    for step in steps.values():
        step()
    results = {label: [] for label in steps}
    for _ in range(ROUNDS):
        for label, step in steps.items():
            results[label].append(measure(step))
    times = {label: statistics.median(t for t, _ in rounds) for label, rounds in results.items()}
    peaks = {label: statistics.median(m for _, m in rounds) for label, rounds in results.items()}
    print(f"{name}: {unit} time " + ", ".join(f"{label} {times[label] * 1e3:.1f} ms" for label in steps)
          + " | peak memory " + ", ".join(f"{label} {peaks[label] / 2**20:.1f} MiB" for label in steps))
    ours, *others = steps
    ratios = {label: (times[ours] / times[label], peaks[ours] / max(peaks[label], 1)) for label in others}
    for label, (time_ratio, memory_ratio) in ratios.items():
        print(f"  {ours} / {label}: time ratio {time_ratio:.3f}, peak memory ratio {memory_ratio:.3f}")
    return ratios


def forward_backward(model, loss_of):
    def step():
        for p in model.parameters():
            p.grad = None
        loss_of(model).backward()
    return step


def bench_models(directory):
    torch.manual_seed(0)
    hf_llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, attn_implementation="sdpa"))
    hf_llama.save_pretrained(os.path.join(directory, "llama"))
    our_llama = Llama.from_pretrained(os.path.join(directory, "llama"))
    input_ids = torch.randint(0, LLAMA["vocab_size"], (2, 512))
    print(f"LLaMA: hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} layers, GQA "
          f"{LLAMA['num_attention_heads']}/{LLAMA['num_key_value_heads']}, vocab {LLAMA['vocab_size']}; "
          f"batch {tuple(input_ids.shape)}, fp32, {torch.get_num_threads()} threads")
    compare("LLaMA forward+backward", {
        "ours": forward_backward(our_llama, lambda m: m(input_ids).float().logsumexp(-1).mean()),
        "transformers": forward_backward(hf_llama, lambda m: m(input_ids).logits.float().logsumexp(-1).mean())})
    del hf_llama, our_llama

    hf_vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, attn_implementation="sdpa"))
    hf_vision.save_pretrained(os.path.join(directory, "vision"))
    our_vision = CLIPVision.from_pretrained(os.path.join(directory, "vision"))
    pixels = torch.randn(4, 3, VISION["image_size"], VISION["image_size"])
    print(f"CLIP vision: hidden {VISION['hidden_size']}, {VISION['num_hidden_layers']} layers, "
          f"{VISION['image_size']} px / {VISION['patch_size']} px patches; batch {pixels.shape[0]}")
    compare("CLIP vision forward+backward (penultimate layer)", {
        "ours": forward_backward(our_vision, lambda m: m(pixels, layer=-2).square().mean()),
        "transformers": forward_backward(hf_vision, lambda m: m(pixels, output_hidden_states=True).hidden_states[-2]
                                         .square().mean())})


def bench_llava(directory):
    torch.manual_seed(0)
    image_token = LLAMA["vocab_size"] - 1
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION),
                                      text_config=transformers.LlamaConfig(**LLAMA), image_token_index=image_token,
                                      image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2)
    hf = transformers.LlavaForConditionalGeneration(config)
    hf.save_pretrained(os.path.join(directory, "llava"))
    ours = TinyLLaVA.from_pretrained(os.path.join(directory, "llava"))
    num_image_tokens = ours.num_image_tokens
    batch, text_length = 2, 256
    text = torch.randint(3, image_token, (batch, text_length))
    our_ids = torch.cat([text[:, :8], torch.full((batch, 1), IMAGE_TOKEN_INDEX), text[:, 8:]], dim=1)
    hf_ids = torch.cat([text[:, :8], torch.full((batch, num_image_tokens), image_token), text[:, 8:]], dim=1)
    our_labels = our_ids.masked_fill(torch.arange(our_ids.shape[1]) < 100, IGNORE_INDEX)  # answers at the end
    hf_labels = hf_ids.masked_fill(torch.arange(hf_ids.shape[1]) < 100 + num_image_tokens - 1, IGNORE_INDEX)
    pixels = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"])
    supervised = int((our_labels[:, 1:] != IGNORE_INDEX).sum())
    print(f"LLaVA: vision as above, LLM as above; batch {batch}, {num_image_tokens} image + {text_length} text "
          f"tokens, {supervised} of {batch * (num_image_tokens + text_length)} supervised; stage 2 (vision frozen, W "
          f"and LLM train, AdamW)")

    def train_step(model, loss_of):
        """A step as train.py takes it: fused AdamW, the gradients freed after it (peak memory counts them)."""
        model.train()
        model.vision.requires_grad_(False) if model is ours else model.model.vision_tower.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

        def step():
            loss_of(model).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    # ours computes the output head where a label is kept only; "full logits" is the loss as it was before (and as
    # transformers computes it): logits at every position, then masked
    compare("stage-2 train step (forward+backward+AdamW)", {
        "ours": train_step(ours, lambda m: m(our_ids, pixels, our_labels)[1]),
        "ours with full logits": train_step(ours, lambda m: full_logits_loss(m, our_ids, pixels, our_labels)),
        "transformers": train_step(hf, lambda m: m(input_ids=hf_ids, pixel_values=pixels, labels=hf_labels).loss)})

    bench_generation("realistic", ours, hf, our_ids[0, :40].tolist(), pixels[:1])
    del hf, ours
    bench_roofline(directory, our_ids[0, :40].tolist(), pixels[:1])

    # the shipped tiny default's proportions (bases/*/config.json), the model sample.py runs out of the box
    with open(os.path.join(BASES, "llama", "config.json")) as f:
        tiny_llama = {k: v for k, v in json.load(f).items() if k in LLAMA or k == "head_dim"}
    with open(os.path.join(BASES, "clip", "config.json")) as f:
        tiny_vision = {k: v for k, v in json.load(f)["vision_config"].items() if k in VISION}
    tiny_image_token = tiny_llama["vocab_size"] - 1
    tiny = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**tiny_vision), text_config=transformers.LlamaConfig(**tiny_llama),
        image_token_index=tiny_image_token,
        image_seq_length=(tiny_vision["image_size"] // tiny_vision["patch_size"]) ** 2))
    tiny.save_pretrained(os.path.join(directory, "tiny-llava"))
    tiny_ours = TinyLLaVA.from_pretrained(os.path.join(directory, "tiny-llava"))
    tiny_text = torch.randint(5, tiny_image_token, (40,)).tolist()
    bench_generation("tiny default", tiny_ours, tiny, tiny_text[:8] + [IMAGE_TOKEN_INDEX] + tiny_text[8:],
                     torch.randn(1, 3, tiny_vision["image_size"], tiny_vision["image_size"]))


def full_logits_loss(model, input_ids, pixel_values, labels):
    """TinyLLaVA's loss as it was computed before issue 38, and as transformers computes it: the output head over every
    position (image, prompt and padding included), then the cross-entropy masked to the supervised ones."""
    embeds, labels, _ = model.embed(input_ids, pixel_values, labels)
    logits = model.llm(inputs_embeds=embeds)  # (B, L, vocab)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, L)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=IGNORE_INDEX)


def bench_generation(name, ours, hf, prompt, pixels, new_tokens=64):
    """Greedy generation, batch 1, ours against transformers' generate on the same weights: the whole call (prefill
    and new_tokens decoding steps), and the decoding rate alone (the call for new_tokens + 1 tokens minus the call
    for 1 token, so prefill and the vision tower cancel out)."""
    ours.eval(), hf.eval()
    hf.generation_config.eos_token_id = None
    image_token = hf.config.image_token_index
    at = prompt.index(IMAGE_TOKEN_INDEX)
    hf_prompt = torch.tensor([prompt[:at] + [image_token] * ours.num_image_tokens + prompt[at + 1:]])

    def call(model, tokens):
        if model is ours:
            return lambda: ours.generate([prompt], pixels, max_new_tokens=tokens)
        return lambda: hf.generate(input_ids=hf_prompt, pixel_values=pixels, max_new_tokens=tokens,
                                   min_new_tokens=tokens, do_sample=False)
    print(f"{name}: greedy generation, batch 1, {hf_prompt.shape[1]}-token prompt "
          f"({ours.num_image_tokens} image tokens), LLM hidden {ours.llm.config.hidden_size}, vocab "
          f"{ours.llm.config.vocab_size}")
    whole, _ = compare(f"  {new_tokens} new tokens, whole call", {
        "ours": call(ours, new_tokens), "transformers": call(hf, new_tokens)}, unit="call")["transformers"]
    times = {}
    for model in (ours, hf):
        call(model, 1)(), call(model, new_tokens + 1)()
    for _ in range(ROUNDS):
        for label, model in (("ours", ours), ("transformers", hf)):
            for tokens in (1, new_tokens + 1):
                start = time.perf_counter()
                call(model, tokens)()
                times.setdefault((label, tokens), []).append(time.perf_counter() - start)
    per_token = {label: (statistics.median(times[label, new_tokens + 1]) - statistics.median(times[label, 1]))
                 / new_tokens for label in ("ours", "transformers")}
    print(f"  decoding alone: ours {1 / per_token['ours']:.0f} tokens/s, transformers "
          f"{1 / per_token['transformers']:.0f} tokens/s")
    print(f"  generation speed (tokens/s), ours over transformers: whole call {1 / whole:.2f}, decoding alone "
          f"{per_token['transformers'] / per_token['ours']:.2f}")


def bench_roofline(directory, prompt, pixels, new_tokens=64):
    """Greedy decoding against the memory-bandwidth roofline, float32 and bf16 weights, eager and compiled
    (Llama.compile_decoding: the same tokens): each new token reads every weight of the LLM once (the embeddings but
    one row), so tokens/s can at best be the bandwidth over those bytes. The bandwidth: a plain read (sum) of a 512
    MiB tensor, measured in the same rounds, interleaved. The first call of each model (2 tokens; a compiled model
    compiles its decode step there) is timed apart and left out of the rounds."""
    path = os.path.join(directory, "llava")
    models = {f"{kind}{dtype}": TinyLLaVA.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
              for kind in ("", "compiled ") for dtype in ("float32", "bfloat16")}
    big = torch.ones(2 ** 27)

    def read_bytes(model):
        embeddings = model.llm.embed_tokens.weight
        return sum(p.numel() * p.element_size() for p in model.llm.parameters()
                   if p is not embeddings or model.llm.config.tie_word_embeddings)

    def seconds(step):
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    def call(model, tokens):
        return lambda: model.generate([prompt], pixels.to(model.llm.embed_tokens.weight.dtype), max_new_tokens=tokens)
    first_calls = {}
    for label, model in models.items():
        if label.startswith("compiled"):
            model.llm.compile_decoding()
        first_calls[label] = seconds(call(model, 2))
    times, bandwidths = {}, []
    for _ in range(ROUNDS):
        bandwidths.append(big.numel() * 4 / seconds(lambda: big.sum()))
        for label, model in models.items():
            for tokens in (1, new_tokens + 1):
                times.setdefault((label, tokens), []).append(seconds(call(model, tokens)))
    bandwidth = statistics.median(bandwidths)
    rates = {label: new_tokens / (statistics.median(times[label, new_tokens + 1]) - statistics.median(times[label, 1]))
             for label in models}
    print("  first call (2 tokens; compiled: compiling the decode step): "
          + ", ".join(f"{label} {first_calls[label]:.1f} s" for label in models))
    print_roofline(models, rates, bandwidth, {label: read_bytes(model) for label, model in models.items()})


def print_roofline(models, rates, bandwidth, read_bytes):
    """bench_roofline's figures: tokens/s and the fraction of the roofline of each model, then the ratios."""
    print(f"  roofline: a plain read of 512 MiB at {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    for label in models:
        roofline = bandwidth / read_bytes[label]
        print(f"  decoding, {label}: {rates[label]:.1f} tokens/s, {read_bytes[label] / 1e6:.0f} MB of weights read "
              f"per token, roofline {roofline:.1f} tokens/s: {rates[label] / roofline:.2f} of it")
    with open("/proc/cpuinfo") as f:
        bf16_instructions = "avx512_bf16" in f.read()
    print(f"  bf16 over float32 tokens/s: eager {rates['bfloat16'] / rates['float32']:.2f}, compiled "
          f"{rates['compiled bfloat16'] / rates['compiled float32']:.2f}, compiled bf16 over eager float32 "
          f"{rates['compiled bfloat16'] / rates['float32']:.2f} (this CPU {'has' if bf16_instructions else 'lacks'} "
          f"AVX512-bf16)")
    print(f"  compiled over eager tokens/s: float32 {rates['compiled float32'] / rates['float32']:.2f}, bf16 "
          f"{rates['compiled bfloat16'] / rates['bfloat16']:.2f}")


def bench_train(directory):
    """
    train.py's stage-2 step (train.train_step: forward, backward, clipping, AdamW) on this CPU: tokens/s, peak memory,
    and achieved FLOP/s as a fraction of a plain fp32 matmul's FLOP/s measured in the same rounds; float32 and
    bfloat16 autocast, interleaved. FLOPs per step: progress.step_flops (6 x weights x tokens for the LLM and W,
    attention terms, the frozen vision tower forward only), checked against torch's FlopCounterMode on one step.
    Two shapes: the realistic one above (CLIP ViT-L/14 proportions at 224 px, a TinyLlama-proportioned LLM), and the
    shipped tiny bases' own proportions (read from bases/*/config.json), which bf16 serves differently.
    """
    with open(os.path.join(BASES, "llama", "config.json")) as f:
        tiny_llama = {k: v for k, v in json.load(f).items() if k in LLAMA or k == "head_dim"}
    with open(os.path.join(BASES, "clip", "config.json")) as f:
        tiny_vision = {k: v for k, v in json.load(f)["vision_config"].items() if k in VISION}
    bench_train_shape(directory, "realistic", LLAMA, VISION, batch=2, text_length=256)
    bench_train_shape(directory, "tiny default", tiny_llama, tiny_vision, batch=16, text_length=200)


def random_micro_batch(batch, text_length, vocab_size, image_size):
    """A collated micro-batch as train.py's Collator gives it: random text with one image after 8 tokens, the loss on
    the second half (the answers come last), random pixels."""
    text = torch.randint(3, vocab_size, (batch, text_length))
    input_ids = torch.cat([text[:, :8], torch.full((batch, 1), IMAGE_TOKEN_INDEX), text[:, 8:]], dim=1)
    labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < text_length // 2, IGNORE_INDEX)
    return dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids).bool(),
                pixel_values=torch.randn(batch, 3, image_size, image_size), ids=[str(i) for i in range(batch)],
                skipped=[])


def matmul_flops_per_s(dtype, size=2048, repeats=5):
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def bench_train_shape(directory, name, llama, vision, batch, text_length):
    import progress
    import train
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    paths = os.path.join(directory, name + "-vision"), os.path.join(directory, name + "-llama")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(paths[0])
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)).save_pretrained(paths[1])
    config = train.TrainConfig(stage=2, vision_path=paths[0], llm_path=paths[1], template="vicuna_v1",
                               learning_rate=2e-5)
    model = train.build_model(config, train.Runtime())
    optimizer = train.make_optimizer(model, config)
    micro_batch = random_micro_batch(batch, text_length, llama["vocab_size"], vision["image_size"])
    lengths = train.sequence_lengths(micro_batch, model.num_image_tokens)
    flops = progress.step_flops(model, lengths, batch)
    with FlopCounterMode(display=False) as counter:
        train.train_step(model, optimizer, [micro_batch], 2e-5, train.Runtime())
    print(f"{name}: LLM hidden {llama['hidden_size']} x {llama['num_hidden_layers']} layers, vocab "
          f"{llama['vocab_size']}; vision hidden {vision['hidden_size']} x {vision['num_hidden_layers']} layers at "
          f"{vision['image_size']} px; batch {batch} x {lengths[0]} tokens ({model.num_image_tokens} image); "
          f"{torch.get_num_threads()} threads")
    print(f"  FLOPs per step: progress.step_flops {flops / 1e9:.1f} G, torch's FlopCounterMode "
          f"{counter.get_total_flops() / 1e9:.1f} G")
    runtimes = {torch.float32: train.Runtime(), torch.bfloat16: train.Runtime(autocast_dtype=torch.bfloat16)}
    steps, matmuls = {dtype: [] for dtype in runtimes}, {dtype: [] for dtype in runtimes}
    for runtime in runtimes.values():  # warm-up
        train.train_step(model, optimizer, [micro_batch], 2e-5, runtime)
    for _ in range(ROUNDS):  # interleaved, the matmul ceiling too: the machine is shared
        for dtype, runtime in runtimes.items():
            steps[dtype].append(measure(lambda: train.train_step(model, optimizer, [micro_batch], 2e-5, runtime)))
            matmuls[dtype].append(matmul_flops_per_s(dtype))
    fp32_matmul = statistics.median(matmuls[torch.float32])
    for dtype in runtimes:
        seconds = statistics.median(t for t, _ in steps[dtype])
        peak_memory = statistics.median(m for _, m in steps[dtype])
        line = (f"  {'float32' if dtype == torch.float32 else 'bfloat16 autocast'}: step {seconds * 1e3:.0f} ms, "
                f"{sum(lengths) / seconds:,.0f} tokens/s, peak memory +{peak_memory / 2**20:.0f} MiB, "
                f"{flops / seconds / 1e9:.1f} GFLOP/s = {flops / seconds / fp32_matmul:.2f} of the fp32 "
                f"2048^3 matmul's {fp32_matmul / 1e9:.0f} GFLOP/s")
        if dtype != torch.float32:
            matmul = statistics.median(matmuls[dtype])
            line += f" ({flops / seconds / matmul:.2f} of the bf16 matmul's {matmul / 1e9:.0f})"
        print(line)


def llava_665k_like_lengths(count, image_tokens, rng):
    """(tokens in the model, words) of `count` samples of a LLaVA-665K-like mix, assumed (not read from the file): 40%
    short image samples, the image + 20-60 words (LLaVA-Pretrain-like captions and 665K's one-word VQA turns); 54% image
    conversations, the image + log-normal text (median 250 tokens, to 2,048 in all); 6% text-only conversations,
    log-normal (median 600, to 2,048). 1.3 tokens a word. Words are what group_by_modality_length sorts by (LLaVA's
    modality lengths: negative for text-only samples)."""
    tokens, words = [], []
    for kind in rng.choice(3, size=count, p=[0.40, 0.54, 0.06]):
        text = int(rng.integers(20, 61) * 1.3) if kind == 0 else int(rng.lognormal(math.log((250, 600)[kind - 1]), 0.9))
        text = max(16, min(text, 2048 - (image_tokens if kind < 2 else 0)))
        tokens.append(text + (image_tokens if kind < 2 else 0))
        words.append(max(1, int(text / 1.3)) * (1 if kind < 2 else -1))
    return tokens, words


def bench_pack(directory):
    """
    train.py's step on padded micro-batches against the same micro-batches packed (--pack: one row, each sample to
    itself), at the realistic shape, on a LLaVA-665K-like mix of lengths (llava_665k_like_lengths): an epoch of 2,000
    samples in micro-batches of 8, in the exact (shuffled) order and in group_by_modality_length's (LLaVA's rule at
    LLaVA-1.5's global batch of 128: 16 micro-batches a step, as 8 processes x 2 accumulation steps deal them); 3
    micro-batches of each order drawn at random, each padded and packed, interleaved. Useful tokens: the samples' own.
    """
    import numpy as np
    import train
    from data import Collator
    torch.manual_seed(0)
    paths = os.path.join(directory, "vision"), os.path.join(directory, "llama")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(paths[0])
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(paths[1])
    config = train.TrainConfig(stage=2, vision_path=paths[0], llm_path=paths[1], template="vicuna_v1",
                               learning_rate=2e-5, batch_size=8, global_batch_size=8)
    model = train.build_model(config, train.Runtime())
    optimizer = train.make_optimizer(model, config)
    image_tokens, rng = model.num_image_tokens, np.random.default_rng(0)
    tokens, words = llava_665k_like_lengths(2000, image_tokens, rng)
    grouped = dataclasses.replace(config, group_by_modality_length=True, global_batch_size=128)
    orders = {order: [micro for step in train.epoch_plan(words, plan_config, 0, plan_config.global_batch_size // 8,
                                                         train.Runtime()) for micro in step if micro]
              for order, plan_config in (("group_by_modality_length", grouped), ("exact order", config))}

    def useful_share(batches):
        return sum(tokens[i] for b in batches for i in b) / sum(len(b) * max(tokens[i] for i in b) for b in batches)
    measured = {order: [batches[k] for k in sorted(rng.choice(len(batches), 3, replace=False))]
                for order, batches in orders.items()}
    print(f"realistic shape ({image_tokens} image tokens); LLaVA-665K-like lengths: mean {np.mean(tokens):.0f}, median "
          f"{np.median(tokens):.0f}, 99th percentile {np.percentile(tokens, 99):.0f}, longest {max(tokens)} tokens; "
          f"micro-batches of {config.batch_size}; {torch.get_num_threads()} threads")
    print("  useful share of the padded tokens over the epoch (in the 3 micro-batches measured): " + ", ".join(
        f"{order} {useful_share(batches):.3f} ({useful_share(measured[order]):.3f})"
        for order, batches in orders.items()))

    def sample(index):
        """Random text of the sample's length, the image after 8 tokens, the loss on the second half of the text."""
        text = tokens[index] - (image_tokens if words[index] > 0 else 0)
        ids = torch.randint(3, LLAMA["vocab_size"], (text,))
        labels = ids.masked_fill(torch.arange(text) < text // 2, IGNORE_INDEX)
        if words[index] > 0:
            ids = torch.cat([ids[:8], torch.tensor([IMAGE_TOKEN_INDEX]), ids[8:]])
            labels = torch.cat([labels[:8], torch.tensor([IGNORE_INDEX]), labels[8:]])
        pixels = torch.randn(3, VISION["image_size"], VISION["image_size"]) if words[index] > 0 else None
        return dict(id=str(index), input_ids=ids, labels=labels, pixel_values=pixels)
    steps, useful = {}, {}
    for order, batches in measured.items():
        for pack in (False, True):
            collated = [Collator(0, 2048, image_tokens, pack)([sample(i) for i in b]) for b in batches]
            useful[order, pack] = [sum(train.sequence_lengths(batch, image_tokens)) for batch in collated]
            steps[order, pack] = [lambda batch=batch: train.train_step(model, optimizer, [batch], 2e-5,
                                                                       train.Runtime()) for batch in collated]
    print_pack(steps, useful, orders)


def print_pack(steps, useful, orders):
    """bench_pack's rounds, interleaved, and its lines: useful tokens/s padded and packed, per order, and the ratios."""
    for key in steps:
        steps[key][0]()  # warm-up
    seconds = {key: [] for key in steps}
    for k in range(3):
        for key in steps:
            seconds[key].append(measure(steps[key][k])[0])
    rate = {key: sum(useful[key]) / sum(seconds[key]) for key in steps}
    for order in orders:
        print(f"  {order}: useful tokens/s padded {rate[order, False]:.0f}, packed {rate[order, True]:.0f}, ratio "
              f"{rate[order, True] / rate[order, False]:.2f}")
    print(f"  packed in the exact order over padded with group_by_modality_length: "
          f"{rate['exact order', True] / rate['group_by_modality_length', False]:.2f}")


def bench_lora(directory):
    """
    train.py's stage-2 step with LoRA (LLaVA-1.5's finetune_lora.sh: r 128, alpha 256, dropout 0.05, adapters on every
    linear layer of the LLM's blocks; W trains too) against full fine-tuning (W and the whole LLM), at the realistic
    shape, interleaved: float32 without and with gradient checkpointing, and bf16 autocast with it (the recipe's
    setting, where LoRA keeps its frozen linear weights in bf16). Peak memory of training: the weights and the AdamW
    state (their tensors' bytes; both live between steps) plus the rise of the process's peak resident memory during
    a step (gradients, activations; measured); also without the weights, what training adds to the model.
    """
    import train
    torch.manual_seed(0)
    paths = os.path.join(directory, "vision"), os.path.join(directory, "llama")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(paths[0])
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(paths[1])
    common = dict(stage=2, vision_path=paths[0], llm_path=paths[1], template="vicuna_v1")
    configs = {"LoRA": train.TrainConfig(**common, learning_rate=2e-4, projector_lr=2e-5, lora_r=128, lora_alpha=256),
               "full": train.TrainConfig(**common, learning_rate=2e-5)}
    settings = {"float32": (train.Runtime(), False), "float32, gradient checkpointing": (train.Runtime(), True),
                "bf16 autocast, gradient checkpointing": (train.Runtime(autocast_dtype=torch.bfloat16), True)}
    rounds = ROUNDS
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # no fast bf16 matmul: minutes a bf16 step
        rounds = 1
        print(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) multiplies bf16 slowly (minutes a step): one "
              "round, not medians of five")
    models, optimizers = {}, {}
    for name, config in configs.items():  # LoRA under bf16 autocast is its own model: frozen linears stored in bf16
        for dtype in ((None, torch.bfloat16) if name == "LoRA" else (None,)):
            runtime = train.Runtime(autocast_dtype=dtype)
            models[name, dtype] = train.build_model(config, runtime)
            optimizers[name, dtype] = train.make_optimizer(models[name, dtype], config)
    batch, text_length = 2, 256
    micro_batch = random_micro_batch(batch, text_length, LLAMA["vocab_size"], VISION["image_size"])
    lengths = train.sequence_lengths(micro_batch, models["full", None].num_image_tokens)

    def instance(name, setting):
        return (name, settings[setting][0].autocast_dtype if name == "LoRA" else None)

    def step(name, setting):
        runtime, checkpointing = settings[setting]
        model, optimizer = models[instance(name, setting)], optimizers[instance(name, setting)]

        def run():
            model.llm.gradient_checkpointing = checkpointing
            train.train_step(model, optimizer, [micro_batch], configs[name].learning_rate, runtime)
        return run
    runs = {(name, setting): step(name, setting) for setting in settings for name in configs}
    for run in runs.values():  # warm-up; AdamW makes its state on the first step
        run()
    results = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            results[key].append(measure(run))
    print_lora(models, optimizers, results, configs, settings, batch, lengths, instance)


def print_lora(models, optimizers, results, configs, settings, batch, lengths, instance):
    """bench_lora's table: trainable parameters, AdamW state and weights, then time and peak memory per setting."""
    def tensor_bytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    weights = {key: tensor_bytes(model.parameters()) for key, model in models.items()}
    state = {key: tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
             for key, optimizer in optimizers.items()}
    trainable = {name: sum(p.numel() for p in models[name, None].parameters() if p.requires_grad) for name in configs}
    print(f"realistic shape: LLM hidden {LLAMA['hidden_size']} x {LLAMA['num_hidden_layers']} layers, vocab "
          f"{LLAMA['vocab_size']}; vision hidden {VISION['hidden_size']} x {VISION['num_hidden_layers']} layers at "
          f"{VISION['image_size']} px; batch {batch} x {lengths[0]} tokens; {torch.get_num_threads()} threads")
    print(f"  trainable: LoRA {trainable['LoRA'] / 1e6:.1f} M parameters (adapters r 128 on q,k,v,o,gate,up,down, "
          f"and W), full {trainable['full'] / 1e6:.1f} M (W and the LLM) | AdamW state LoRA "
          f"{state['LoRA', None] / 2**20:.0f} MiB, full {state['full', None] / 2**20:.0f} MiB | weights LoRA "
          f"{weights['LoRA', None] / 2**20:.0f} MiB ({weights['LoRA', torch.bfloat16] / 2**20:.0f} MiB with its "
          f"frozen linears in bf16), full {weights['full', None] / 2**20:.0f} MiB")
    for setting in settings:
        seconds = {name: statistics.median(t for t, _ in results[name, setting]) for name in configs}
        rise = {name: statistics.median(m for _, m in results[name, setting]) for name in configs}
        training = {name: state[instance(name, setting)] + rise[name] for name in configs}
        peak = {name: weights[instance(name, setting)] + training[name] for name in configs}
        print(f"  {setting}: step LoRA {seconds['LoRA'] * 1e3:.0f} ms, full {seconds['full'] * 1e3:.0f} ms, ratio "
              f"{seconds['LoRA'] / seconds['full']:.3f} | peak memory (weights + AdamW state + step peak rise) LoRA "
              f"{peak['LoRA'] / 2**20:.0f} MiB, full {peak['full'] / 2**20:.0f} MiB, ratio "
              f"{peak['LoRA'] / peak['full']:.3f} | without the weights LoRA {training['LoRA'] / 2**20:.0f} MiB "
              f"(step +{rise['LoRA'] / 2**20:.0f}), full {training['full'] / 2**20:.0f} MiB "
              f"(step +{rise['full'] / 2**20:.0f}), ratio {training['LoRA'] / training['full']:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    transformers.logging.set_verbosity_error()
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    benches = {"models": bench_models, "llava": bench_llava, "train": bench_train, "pack": bench_pack,
               "lora": bench_lora}
    if which not in benches:
        sys.exit(f"usage: python bench.py {{{','.join(benches)}}}")
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode(False):
        benches[which](directory)
