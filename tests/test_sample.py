"""sample.py: the CLI end to end on tiny checkpoints built here (ours and an HF LLaVA made by transformers), the chat's
KV-cache reuse, bad inputs, and the held-out eval."""
import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

import sample
import tinyllava
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Our stage-2 and stage-1 ckpt.pt files on tiny bases saved by transformers, an HF LLaVA directory saved by
    transformers, and three images (two not square)."""
    root = tmp_path_factory.mktemp("sample")
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


def run_cli(*args, stdin=None, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args], input=stdin, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def our_answer(tiny, model, question, image, max_new_tokens):
    """What TinyLLaVA.generate answers (decoded) to the template's prompt about a crop-preprocessed image."""
    pixel_values = process_image(load_image(image), 16, "crop")[None]
    generated = model.generate([vicuna_ids(tiny.tokenizer, [question])], pixel_values, max_new_tokens=max_new_tokens,
                               stop_token_ids=[EOS])[0]
    return tiny.tokenizer.decode(until_stop(generated.tolist())).strip()

# ----------------------------------------------------------------------------------------------------------------------
# One-shot answers


def test_cli_greedy_answer_is_reproducible_and_equals_tinyllava_generate_also_batched(tiny, capsys):
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    expected = [our_answer(tiny, model, QUESTION, image, 20) for image in tiny.images[:2]]
    assert all(len(answer) > 3 for answer in expected)  # a real answer, not an immediate stop
    assert expected[0] != expected[1]  # the image matters
    args = ["--ckpt", tiny.ckpt, "--prompt", QUESTION, "--max_new_tokens", "20"]
    result = run_cli(*args, "--image", tiny.images[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n"
    assert sample.main(args + ["--image", tiny.images[0]]) == 0  # again, in this process (it is faster)
    assert capsys.readouterr().out == expected[0] + "\n"
    assert sample.main(args + ["--image", *tiny.images[:2]]) == 0  # one batch, rows of different image sizes
    assert capsys.readouterr().out == "".join(f"{image}: {answer}\n" for image, answer in zip(tiny.images, expected))


def test_batch_of_different_prompts_and_image_sizes_answers_each_row_as_it_alone(tiny, monkeypatch):
    """sample.py's batches of different questions (the eval's): the prompts differ in length, so the rows are
    left-padded, and each row must still generate, id for id, what its prompt generates alone."""
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    questions = ["Is it red?", "Describe it.", QUESTION + " " + FOLLOW_UP]
    images = [tiny.images[k] for k in (0, 2, 1)]  # 24x14, 18x18 and 13x21 pixels
    assert len({len(vicuna_ids(tiny.tokenizer, [q])) for q in questions}) == 3
    alone = []
    for question, image in zip(questions, images):
        pixel_values = process_image(load_image(image), 16, "crop")[None]
        generated = model.generate([vicuna_ids(tiny.tokenizer, [question])], pixel_values, max_new_tokens=10,
                                   stop_token_ids=[EOS])[0]
        alone.append(until_stop(generated.tolist()))
    assert all(len(ids) > 2 for ids in alone) and len({tuple(ids) for ids in alone}) == 3
    decoded, decode = [], sample.decode_answer

    def recording(ids, *rest):  # the ids each row generated, as evaluate decodes them
        decoded.append(until_stop(ids))
        return decode(ids, *rest)
    monkeypatch.setattr(sample, "decode_answer", recording)
    items = [dict(id=str(k), image=image, question=question, answer=tiny.tokenizer.decode(ids).strip(), type="any")
             for k, (question, image, ids) in enumerate(zip(questions, images, alone))]
    accuracy = sample.evaluate(model, tiny.tokenizer, items, [load_image(image) for image in images], "crop",
                               batch=3, max_new=10, out=io.StringIO())
    assert decoded == alone and accuracy == 1.0


def test_sampling_with_a_seed_is_reproducible_and_is_generate_with_that_seeded_generator(tiny, capsys):
    args = ["--ckpt", tiny.ckpt, "--image", tiny.images[0], "--prompt", QUESTION, "--max_new_tokens", "12",
            "--temperature", "1.5", "--top_k", "50", "--top_p", "0.95"]
    printed = []
    for seed in (7, 7, 8):
        assert sample.main(args + ["--seed", str(seed)]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[2] != printed[0]
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    pixel_values = process_image(load_image(tiny.images[0]), 16, "crop")[None]
    sampled = model.generate([vicuna_ids(tiny.tokenizer, [QUESTION])], pixel_values, max_new_tokens=12,
                             stop_token_ids=[EOS], temperature=1.5, top_k=50, top_p=0.95,
                             generator=torch.Generator().manual_seed(7))[0]
    assert printed[0] == tiny.tokenizer.decode(until_stop(sampled.tolist())).strip() + "\n"
    assert printed[0] != our_answer(tiny, model, QUESTION, tiny.images[0], 12) + "\n"  # not the greedy answer


def test_hf_llava_directory_gives_transformers_greedy_text_with_padded_images(tiny):
    prompt = vicuna_ids(tiny.tokenizer, [QUESTION])
    expanded = []
    for token in prompt:  # transformers wants num_image_tokens copies of its image token in place of the placeholder
        expanded += [HF_IMAGE_TOKEN] * NUM_IMAGE_TOKENS if token == IMAGE_TOKEN_INDEX else [token]

    def transformers_answer(aspect):
        pixel_values = process_image(load_image(tiny.images[0]), 16, aspect)[None]
        with torch.no_grad():
            generated = tiny.hf_model.generate(input_ids=torch.tensor([expanded]), pixel_values=pixel_values,
                                               max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=3)
        return tiny.tokenizer.decode(until_stop(generated[0, len(expanded):].tolist())).strip()

    expected = transformers_answer("pad")  # LLaVA-1.5 pads to a square
    assert expected != transformers_answer("crop")  # so this test sees which preprocessing the CLI used
    result = run_cli("--hf", tiny.llava, "--image", tiny.images[0], "--prompt", QUESTION, "--max_new_tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"

def test_stage_1_checkpoint_captions_the_image_whatever_the_prompt_and_stops_at_the_newline(tiny, capsys):
    model = TinyLLaVA.from_pretrained(tiny.plain).eval()
    newline = tiny.tokenizer.encode("\n").ids[0]
    pixel_values = process_image(load_image(tiny.images[0]), 16, "crop")[None]
    # plain: <image> then the caption, its end the newline; the instruction is dropped
    generated = model.generate([[BOS, IMAGE_TOKEN_INDEX]], pixel_values, max_new_tokens=30,
                               stop_token_ids=[newline, EOS])[0].tolist()
    assert generated[-1] == newline and len(generated) > 1
    assert sample.main(["--ckpt", tiny.plain, "--image", tiny.images[0], "--prompt", QUESTION]) == 0
    printed = capsys.readouterr()
    assert printed.out == tiny.tokenizer.decode(generated[:-1]).strip() + "\n"
    assert "ignores --prompt" in printed.err

def test_template_vicuna_v1_asks_a_stage_1_model_the_question_zero_shot_instead_of_captioning(tiny, capsys):
    model = TinyLLaVA.from_pretrained(tiny.plain).eval()
    model.config.template = "vicuna_v1"
    expected = our_answer(tiny, model, QUESTION, tiny.images[0], 12)
    args = ["--ckpt", tiny.plain, "--image", tiny.images[0], "--prompt", QUESTION, "--max_new_tokens", "12"]
    assert sample.main(args + ["--template", "vicuna_v1"]) == 0
    printed = capsys.readouterr()
    assert printed.out == expected + "\n" and "ignores --prompt" not in printed.err
    assert sample.main(args) == 0  # its own template, plain: a caption
    assert capsys.readouterr().out != expected + "\n"

# ----------------------------------------------------------------------------------------------------------------------
# Chat


def test_chat_second_turn_prefills_only_new_tokens_and_answers_as_the_whole_conversation_does(tiny, monkeypatch):
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    pixel_values = process_image(load_image(tiny.images[0]), 16, "crop")[None]
    calls = []  # (positions fed, positions already cached) of every cached LLaMA forward
    forward = model.llm.forward

    def counting_forward(*args, **kwargs):
        if kwargs.get("cache") is not None:  # the chat's calls, not the uncached reference below
            calls.append((kwargs["inputs_embeds"].shape[1], kwargs["cache"].length))
        return forward(*args, **kwargs)
    monkeypatch.setattr(model.llm, "forward", counting_forward)
    questions = iter([QUESTION, FOLLOW_UP, ""])
    printed = io.StringIO()
    turns = sample.chat(model, tiny.tokenizer, pixel_values, 12, dict(temperature=0.0),
                        read=lambda _: next(questions), out=printed)
    (fed_1, answer_1), (fed_2, answer_2) = turns
    assert fed_1 == vicuna_ids(tiny.tokenizer, [QUESTION])
    # turn 2 feeds the answer's last token (the stop token, never fed by generate) or, when the answer was cut at
    # max_new_tokens, that token and the end of turn; then "USER: {question} ASSISTANT:" and nothing else
    closing = [answer_1[-1]] if answer_1[-1] == EOS else [answer_1[-1], EOS]
    assert fed_2 == closing + tiny.tokenizer.encode(f"USER: {FOLLOW_UP} ASSISTANT:").ids
    turn_1_calls = len(answer_1)  # a prefill, then one call per answer token but the last
    assert calls[0] == (len(fed_1) - 1 + NUM_IMAGE_TOKENS, 0)
    cached = len(fed_1) - 1 + NUM_IMAGE_TOKENS + len(answer_1) - 1
    assert calls[turn_1_calls] == (len(fed_2), cached)  # the second prefill: only the new tokens, after the cache
    assert all(fed == 1 for fed, _ in calls[turn_1_calls + 1:])
    # the same conversation from scratch, without any cache
    whole = vicuna_ids(tiny.tokenizer, [QUESTION, until_stop(answer_1), FOLLOW_UP])
    assert whole == fed_1 + answer_1[:-1] + fed_2
    expected = model.generate([whole], pixel_values, max_new_tokens=12, stop_token_ids=[EOS], use_cache=False)[0]
    assert answer_2 == expected.tolist()
    decoded = [tiny.tokenizer.decode(until_stop(answer)).strip() for answer in (answer_1, answer_2)]
    assert printed.getvalue() == decoded[0] + "\n" + decoded[1] + "\n"
    # and the CLI, reading the questions from stdin, says the same
    result = run_cli("--ckpt", tiny.ckpt, "--image", tiny.images[0], "--chat", "--max_new_tokens", "12",
                     stdin=f"{QUESTION}\n{FOLLOW_UP}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed.getvalue()

# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the culprit, a non-zero exit, no traceback


def long_prompt(tiny, positions):
    """A question whose prompt takes exactly `positions` positions, the image's NUM_IMAGE_TOKENS included."""
    for n in range(1, 2 * CONTEXT):  # 'x' never merged in the tokenizer's corpus: one token each
        length = len(vicuna_ids(tiny.tokenizer, ["x" * n])) - 1 + NUM_IMAGE_TOKENS
        if length == positions:
            return "x" * n
    raise AssertionError(f"no prompt of {positions} positions")


def bad_inputs(tiny, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.pt").write_text("hello")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    image = tiny.images[0]
    return {  # name: (arguments, what the message must say)
        "missing image, checked before the (missing) model": (
            ["--image", str(tmp_path / "nope.png"), "--ckpt", str(tmp_path / "missing.pt")], "nope.png"),
        "unreadable image": (["--image", str(tmp_path / "broken.png"), "--ckpt", tiny.ckpt], "broken.png"),
        "missing checkpoint": (["--image", image, "--ckpt", str(tmp_path / "missing.pt")], "missing.pt"),
        "unknown checkpoint format": (["--image", image, "--ckpt", str(tmp_path / "notes.pt")],
                                      "unknown checkpoint format"),
        "torch file that is not ours": (["--image", image, "--ckpt", str(tmp_path / "other.pt")],
                                        "not a tinyllava checkpoint"),
        "--hf on a LLaMA directory": (["--image", image, "--hf", tiny.llm], "model_type is 'llama'"),
        "no checkpoint under out/": (["--image", image], "no checkpoint"),
        "prompt over the context by its image tokens": (
            ["--image", image, "--ckpt", tiny.ckpt, "--prompt", long_prompt(tiny, CONTEXT + 1)], "--prompt"),
        "chat question over the context by its image tokens": (  # --prompt is the chat's first question
            ["--image", image, "--ckpt", tiny.ckpt, "--chat", "--prompt", long_prompt(tiny, CONTEXT + 1)],
            "conversation is too long"),
        "--chat with a stage-1 model, refused before loading it": (
            ["--image", image, "--ckpt", tiny.plain, "--chat"], "drop --chat"),
        "--chat in the plain template": (["--image", image, "--ckpt", tiny.ckpt, "--chat", "--template", "plain"],
                                         "--template plain"),
        "a directory without ckpt.pt": (["--image", image, "--ckpt", str(tmp_path)], "no ckpt.pt"),
    }


def test_each_bad_input_gives_one_error_line_naming_it_and_a_nonzero_exit(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/ here, nor in the repository, for the default checkpoint
    monkeypatch.setattr(sample, "REPO_DIR", str(tmp_path))
    for name, (args, culprit) in bad_inputs(tiny, tmp_path).items():
        assert sample.main(args) == 1, name
        errors = capsys.readouterr().err.splitlines()
        assert errors[-1].startswith("sample.py: error: ") and culprit in errors[-1], (name, errors)
        assert sum("error" in line for line in errors) == 1 and not any("Traceback" in e for e in errors), name
        if "before" in name:  # nothing printed before the error: no loading line, no chat banner
            assert errors == [errors[-1]] and "missing.pt" not in errors[-1]  # and no other model looked for
    # the prompt that exactly fills the context, image tokens included, is fine, and leaves room for one token
    fills = long_prompt(tiny, CONTEXT)
    assert sample.main(["--image", tiny.images[0], "--ckpt", tiny.ckpt, "--prompt", fills,
                        "--max_new_tokens", "5"]) == 0
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    assert capsys.readouterr().out == our_answer(tiny, model, fills, tiny.images[0], 1) + "\n"
    assert our_answer(tiny, model, fills, tiny.images[0], 1) != our_answer(tiny, model, fills, tiny.images[0], 5)


@pytest.mark.parametrize("name", ["missing image, checked before the (missing) model",
                                  "prompt over the context by its image tokens"])
def test_bad_input_from_the_command_line_exits_nonzero_without_traceback(tiny, tmp_path, name):
    args, culprit = bad_inputs(tiny, tmp_path)[name]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("sample.py: error: ") and culprit in result.stderr

@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty: ask a question, or leave --prompt out for the default"),
    (["--prompt", "  \t "], "--prompt is empty"),
    (["--chat", "--prompt", " "], "--prompt is empty"),
    (["--temprature", "0.2"], "unknown flag --temprature (did you mean --temperature?)"),
    (["--max-new-tokens", "0"], "--max_new_tokens 0 is out of range"),
    (["--threads", "-1"], "--threads -1 is out of range"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--max_new"], "unknown flag --max_new (did you mean --max_new_tokens?)"),  # no abbreviations, as train.py
])
def test_flag_mistakes_are_one_line_naming_the_flag(tiny, args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        sample.main(["--image", tiny.images[0], "--ckpt", tiny.ckpt, *args])
    assert exit.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1, printed.err
    assert printed.err.startswith("sample.py: error: ") and message in printed.err


def test_flags_are_spelled_as_train_py_spells_them(tiny, capsys, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # seen, not applied to the other tests
    common = ["--image", tiny.images[0], "--ckpt", tiny.ckpt, "--prompt", QUESTION]
    assert sample.main(common + ["--max_new_tokens", "6"]) == 0
    expected = capsys.readouterr().out
    assert sample.main(common + ["--max-new-tokens=6", "--threads", "1", "--dtype", "auto", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected and threads == [1]


def test_checkpoints_are_found_in_the_repository_from_any_directory(tiny, tmp_path, monkeypatch, capsys):
    """out/ and --ckpt paths, as train.py's --init: relative to the working directory, else to the repository."""
    repository, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repository / "out" / "stage2").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(tiny.ckpt, repository / "out" / "stage2" / "ckpt.pt")
    monkeypatch.setattr(sample, "REPO_DIR", str(repository))
    monkeypatch.setattr(tinyllava, "REPO_DIR", str(repository))
    monkeypatch.chdir(elsewhere)
    for args in ([], ["--ckpt", "out/stage2"], ["--ckpt", "out/stage2/ckpt.pt"]):
        assert sample.main(["--image", tiny.images[0], "--max_new_tokens", "3", *args]) == 0, args
        assert f"loading {repository}/out/stage2" in capsys.readouterr().err


def test_help_explains_every_flag_and_ends_with_the_examples():
    parser = sample.make_parser()
    assert all(action.help for action in parser._actions)
    text = parser.format_help()
    assert "--max_new_tokens N" in text and "(default: 256)" in text and "--threads N" in text
    examples = text.split("Examples:")[1].strip().splitlines()
    assert len(examples) >= 5 and all(line.strip().startswith("python sample.py ") for line in examples)

# ----------------------------------------------------------------------------------------------------------------------
# Held-out eval


def test_eval_reports_each_type_and_ends_with_the_accuracy_line(tiny, tmp_path):
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    (tmp_path / "images").mkdir()
    items = []
    # file order: three color questions, then two count questions; right means the answer is the model's own
    for k, (kind, right) in enumerate([("color", True), ("color", False), ("color", True), ("count", True),
                                       ("count", False)]):
        image = f"images/{k}.png"
        Image.open(tiny.images[k % 3]).save(tmp_path / image)
        question = f"What {kind} is it?"
        answer = our_answer(tiny, model, question, tiny.images[k % 3], 8) if right else "a wrong answer"
        assert answer
        items.append({"id": f"eval-{k}", "image": image, "question": question, "answer": answer, "type": kind})
    (tmp_path / "eval.json").write_text(json.dumps(items))
    # --limit 4 takes questions evenly across types (color 0, count 0, color 1, count 1): 2 of 4 right. The first
    # four of the file would give 3 of 4, all five 3 of 5. Batches of 3 mix prompts of different lengths.
    result = run_cli("--eval", "--world", str(tmp_path), "--ckpt", tiny.ckpt, "--limit", "4", "--batch_size", "3",
                     "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "accuracy: 0.5000"
    assert lines[0].split() == ["color", "1/2", "0.5000"]
    assert lines[1].split() == ["count", "1/2", "0.5000"]
    assert lines[2].split() == ["overall", "2/4", "0.5000"]

# ----------------------------------------------------------------------------------------------------------------------
# LLaVA's evaluation files: question lines in, answer lines out, and the benchmarks' scoring rules


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def read_lines(path):
    return [json.loads(line) for line in open(path)]


def question_file(tiny, path):
    """Two image questions (images relative to the file's folder) and a text-only one."""
    return write_lines(path, [
        {"question_id": "q0", "image": os.path.basename(tiny.images[0]), "text": QUESTION, "category": "color"},
        {"question_id": 7, "text": FOLLOW_UP},
        {"question_id": "q2", "image": os.path.basename(tiny.images[1]), "text": FOLLOW_UP}])


def test_answer_file_has_llava_model_vqa_records_with_the_answers_generate_gives_text_only_without_an_image(tiny):
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    encode = lambda text: tiny.tokenizer.encode(text, add_special_tokens=False).ids
    text_only = model.generate([[BOS] + encode(f"{SYSTEM} USER: {FOLLOW_UP} ASSISTANT:")], None, max_new_tokens=12,
                               stop_token_ids=[EOS])[0].tolist()
    expected = [("q0", QUESTION, our_answer(tiny, model, QUESTION, tiny.images[0], 12), {"category": "color"}),
                (7, FOLLOW_UP, tiny.tokenizer.decode(until_stop(text_only)).strip(), {}),
                ("q2", FOLLOW_UP, our_answer(tiny, model, FOLLOW_UP, tiny.images[1], 12), {})]
    questions, answers = question_file(tiny, tiny.root / "q.jsonl"), str(tiny.root / "answers.jsonl")
    result = run_cli("--questions", questions, "--answers", answers, "--ckpt", tiny.ckpt, "--max_new_tokens", "12",
                     "--batch_size", "2")
    assert result.returncode == 0, result.stderr
    lines = read_lines(answers)
    assert [set(line) for line in lines] == [{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}] * 3
    assert [(line["question_id"], line["prompt"], line["text"], line["metadata"]) for line in lines] == expected
    assert all(line["model_id"] == os.path.basename(tiny.root) for line in lines)
    assert len({line["answer_id"] for line in lines}) == 3 and "ETA" in result.stderr


def test_killed_run_resumes_without_repeating_or_losing_a_question(tiny, tmp_path, monkeypatch):
    questions = question_file(tiny, tmp_path / "q.jsonl")
    flags = ["--questions", questions, "--image_folder", str(tiny.root), "--ckpt", tiny.ckpt, "--max_new_tokens", "8",
             "--batch_size", "1"]
    assert sample.main(flags + ["--answers", str(tmp_path / "whole.jsonl")]) == 0
    generate, calls = TinyLLaVA.generate, []

    def killed_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with open(tmp_path / "resumed.jsonl", "a") as f:
                f.write('{"question_id": 7, "pro')  # the kill also cut a line being written
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(TinyLLaVA, "generate", killed_on_the_second_batch)
    assert sample.main(flags + ["--answers", str(tmp_path / "resumed.jsonl")]) == 130
    assert open(tmp_path / "resumed.jsonl").read().startswith('{"question_id": "q0"')  # then the cut line
    monkeypatch.setattr(TinyLLaVA, "generate", generate)
    assert sample.main(flags + ["--answers", str(tmp_path / "resumed.jsonl")]) == 0
    fields = lambda lines: [(line["question_id"], line["text"]) for line in lines]
    assert fields(read_lines(tmp_path / "resumed.jsonl")) == fields(read_lines(tmp_path / "whole.jsonl"))


def test_chunks_partition_the_questions_in_order_as_llava_splits_them():
    items = list(range(10))
    for n in (1, 3, 4, 10, 12):
        chunks = [sample.chunk(items, n, k) for k in range(n)]
        assert sum(chunks, []) == items
        assert all(len(c) == -(-10 // n) for c in chunks[:10 // -(-10 // n)])  # LLaVA: chunks of ceil(len / n)
    assert sample.chunk(items, 3, 2) == [8, 9]


def test_bad_question_lines_and_missing_images_are_named_by_line_skipped_counted_and_stop_past_the_threshold(tiny,
                                                                                                            tmp_path):
    lines = [{"question_id": f"q{k}", "text": QUESTION, "image": os.path.basename(tiny.images[0])} for k in range(8)]
    lines[2] = "{not json"
    lines[5] = {"question_id": "q5", "text": QUESTION, "image": "missing.png"}
    questions = write_lines(tmp_path / "q.jsonl", lines)
    shutil.copy(tiny.images[0], tmp_path)
    flags = ["--questions", questions, "--answers", str(tmp_path / "a.jsonl"), "--ckpt", tiny.ckpt,
             "--max_new_tokens", "4"]
    result = run_cli(*flags, "--max_bad_fraction", "0.3")
    assert result.returncode == 0, result.stderr
    assert f"{questions}:3: not JSON" in result.stderr and f"{questions}:6: cannot load image" in result.stderr
    assert [line["question_id"] for line in read_lines(tmp_path / "a.jsonl")] == ["q0", "q1", "q3", "q4", "q6", "q7"]
    result = run_cli(*flags[:3], str(tmp_path / "b.jsonl"), *flags[4:], "--max_bad_fraction", "0.1")
    assert result.returncode == 1 and "bad" in result.stderr and "--max_bad_fraction" in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400


def score_lines(tmp_path, kind, answers, truth):
    """sample.py --score on hand-written answers ({id: text}) and truth ({id: answer or (answer, category)})."""
    answer_file = write_lines(tmp_path / "a.jsonl", [{"question_id": k, "text": v} for k, v in answers.items()])
    truth_file = write_lines(tmp_path / "t.jsonl", [
        {"question_id": k, ("label" if kind == "pope" else "answer"): v[0] if isinstance(v, tuple) else v}
        | ({"category": v[1]} if isinstance(v, tuple) else {}) for k, v in truth.items()])
    printed = io.StringIO()
    accuracy = sample.score(kind, answer_file, truth_file, out=printed)
    return accuracy, printed.getvalue()


def test_short_answers_are_lowercased_and_lose_a_trailing_period_then_must_match_exactly(tmp_path):
    answers = {1: "Red.", 2: "yes", 3: " Top Left. ", 4: "red circle", 5: "2.", 6: "The circle is red."}
    truth = {1: "red", 2: "yes", 3: "top left", 4: "red", 5: "2", 6: "red"}
    accuracy, table = score_lines(tmp_path, "short", answers, truth)
    assert accuracy == 4 / 6  # 1, 2, 3, 5 right; 4 and 6 are not a single matching word
    assert "overall" in table
    # format compliance: 1, 2, 3, 5 are among the key's answers (right or wrong); "red circle" and a sentence are not
    assert "format: 4 of 6 answers (66.7%) are a word or phrase among the key's answers" in table


def test_choices_are_read_as_scienceqa_reads_them_and_anything_else_fails(tmp_path):
    answers = {1: "A", 2: "B. blue", 3: "The answer is C.", 4: "I think it is A", 5: "D", 6: "a", 7: "C. red",
               8: "The answer is B. Because the circle is blue."}
    truth = {1: ("A", "image"), 2: ("B", "image"), 3: ("C", "text"), 4: ("A", "text"), 5: ("A", "image"),
             6: ("A", "text"), 7: ("A", "text"), 8: ("B", "image")}
    accuracy, table = score_lines(tmp_path, "choice", answers, truth)
    assert accuracy == 4 / 8  # 1, 2, 3, 8; 4 and 6 FAILED (no letter read), 5 and 7 wrong letters
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows["image"] == ["3", "4", "0.7500", "0"] and rows["text"] == ["1", "4", "0.2500", "2"]
    assert rows["overall"] == ["4", "8", "0.5000", "2"]
    assert "format: 2 of 8 answers (25.0%) are a bare letter" in table  # 1 and 5 ("a" is no capital letter)


def test_pope_reads_the_first_sentence_no_or_not_means_no_and_reports_precision_recall_f1_yes_ratio(tmp_path):
    answers = {1: "Yes", 2: "No, there is not.", 3: "There is not a red circle.", 4: "Yes. There is no square.",
               5: "yes", 6: "Yes, there is."}
    truth = {1: ("yes", "random"), 2: ("no", "random"), 3: ("yes", "random"), 4: ("yes", "adversarial"),
             5: ("no", "adversarial"), 6: ("no", "adversarial")}
    accuracy, table = score_lines(tmp_path, "pope", answers, truth)
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table.splitlines()[2:-1]}
    assert table.splitlines()[-1] == "format: 5 of 6 answers (83.3%) are yes or no first"  # not "There is not ..."
    # predicted yes, no, no, yes, yes, yes: right 1, 2, 4; true positives 1 and 4 of 4 predicted yes and 3 true yes
    assert accuracy == 3 / 6
    assert rows["overall"] == [6, 0.5, 0.5, round(2 / 3, 4), round(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), 4), round(4 / 6, 4)]
    assert rows["random"] == [3, round(2 / 3, 4), 1.0, 0.5, round(2 / 3, 4), round(1 / 3, 4)]


def test_scores_read_scienceqa_problems_json_and_refuse_answers_missing_from_the_key(tmp_path):
    answers = write_lines(tmp_path / "a.jsonl", [{"question_id": "4", "text": "B"}, {"question_id": "9", "text": "A"}])
    (tmp_path / "problems.json").write_text(json.dumps({"4": {"answer": 1, "split": "test"},
                                                        "9": {"answer": 2, "split": "test"}}))
    assert sample.score("choice", answers, str(tmp_path / "problems.json"), out=io.StringIO()) == 0.5
    with pytest.raises(sample.SampleError, match="no answer lines to score"):
        sample.score("choice", write_lines(tmp_path / "empty.jsonl", []), str(tmp_path / "problems.json"),
                     out=io.StringIO())
    with pytest.raises(sample.SampleError, match="not in --truth"):
        sample.score("choice", write_lines(tmp_path / "b.jsonl", [{"question_id": "5", "text": "A"}]),
                     str(tmp_path / "problems.json"), out=io.StringIO())


def test_pope_annotation_directory_pairs_labels_with_questions_by_category_and_file_order(tmp_path):
    # POPE's label files each number their questions from 1, so ids collide across categories; eval_pope.py pairs the
    # questions of a category, in the question file's order, with that category's labels, in order.
    questions = write_lines(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10, "image": "a.jpg", "text": "Is there a cat?", "category": "random"},
        {"question_id": 11, "image": "a.jpg", "text": "Is there a dog?", "category": "popular"},
        {"question_id": 12, "image": "b.jpg", "text": "Is there a car?", "category": "random"},
        {"question_id": 13, "image": "b.jpg", "text": "Is there a bus?", "category": "popular"}])
    (tmp_path / "coco").mkdir()
    write_lines(tmp_path / "coco" / "coco_pope_random.json", [{"question_id": 1, "label": "yes"},
                                                               {"question_id": 2, "label": "no"}])
    write_lines(tmp_path / "coco" / "coco_pope_popular.json", [{"question_id": 1, "label": "no"},
                                                                {"question_id": 2, "label": "no"}])
    answers = write_lines(tmp_path / "a.jsonl", [{"question_id": 13, "text": "No."}, {"question_id": 10, "text": "Yes"},
                                                 {"question_id": 12, "text": "No"}, {"question_id": 11, "text": "Yes"}])
    printed = io.StringIO()
    accuracy = sample.score("pope", answers, str(tmp_path / "coco"), out=printed, questions=questions)
    assert accuracy == 3 / 4  # 10 yes=yes, 12 no=no, 13 no=no; 11 yes against no
    rows = {line.split()[0]: line.split()[1:3] for line in printed.getvalue().splitlines()[2:]}
    assert rows["random"] == ["2", "1.0000"] and rows["popular"] == ["2", "0.5000"]
    with pytest.raises(sample.SampleError, match="needs --questions"):
        sample.score("pope", answers, str(tmp_path / "coco"), out=io.StringIO())
    with pytest.raises(sample.SampleError, match="read only as POPE's annotation directory"):
        sample.score("short", answers, str(tmp_path / "coco"), out=io.StringIO(), questions=questions)
    write_lines(tmp_path / "coco" / "coco_pope_random.json", [{"question_id": 1, "label": "yes"}])
    with pytest.raises(sample.SampleError, match="1 labels for the 2 'random' questions"):
        sample.score("pope", answers, str(tmp_path / "coco"), out=io.StringIO(), questions=questions)


def test_image_tokens_are_read_against_every_cell_as_the_mean_of_its_word_embeddings():
    """With the tiny bases' tokenizer (scene words one token each, <|light blue|> and <|empty|> added), the reading
    vocabulary is every possible cell, each the mean of its words' embeddings; with any other tokenizer (these special
    tokens absent) it is the whole vocabulary, one token per entry."""
    import make_bases
    import world
    tokenizer = make_bases.train_tokenizer(["a large small red green blue yellow purple orange circle square "
                                            "triangle top left right bottom center white gray", "USER: hi"])
    table = torch.nn.Embedding(tokenizer.get_vocab_size(), 4)
    model = SimpleNamespace(llm=SimpleNamespace(embed_tokens=table))
    names, vectors = sample.reading_vocabulary(model, tokenizer)
    assert names == world.possible_cells() and len(names) == 9 * 3 * (1 + 2 * 6 * 3)
    one = lambda word: table.weight[tokenizer.token_to_id(word)]
    k = names.index(["bottom right", "light blue", "small", "red", "triangle"])
    torch.testing.assert_close(vectors[k], (one("Ġbottom") + one("Ġright") + one("<|light blue|>") + one("Ġsmall")
                                            + one("Ġred") + one("Ġtriangle")) / 6)
    k = names.index(["center", "gray", "empty"])
    torch.testing.assert_close(vectors[k], (one("Ġcenter") + one("Ġgray") + one("<|empty|>")) / 3)
    plain = byte_level_tokenizer()
    table = torch.nn.Embedding(plain.get_vocab_size(), 4)
    names, vectors = sample.reading_vocabulary(SimpleNamespace(llm=SimpleNamespace(embed_tokens=table)), plain)
    assert names == [plain.id_to_token(i) for i in range(plain.get_vocab_size())] and vectors.shape == (len(names), 4)
