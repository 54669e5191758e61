"""sample.py: the CLI end to end on tiny checkpoints built here (ours and an HF LLaVA made by transformers), the chat's
KV-cache reuse, bad inputs, and the flags."""
import dataclasses
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ask
import flags
import sample
import tinyllava
from data import load_image, process_image
from llama import Llama
from tinyllava import IMAGE_TOKEN_INDEX, TinyLLaVA
from tiny_llava import (BOS, CONTEXT, EOS, FOLLOW_UP, HF_IMAGE_TOKEN, NUM_IMAGE_TOKENS, QUESTION, REPO, SYSTEM,
                        our_answer, tiny_llava, until_stop, vicuna_ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("sample"))


def run_cli(*args, stdin=None, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args], input=stdin, cwd=cwd,
                          capture_output=True, text=True, timeout=120)

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
    assert sample.main(args + ["--image", tiny.images[0]]) is None  # again, in this process (it is faster)
    assert capsys.readouterr().out == expected[0] + "\n"
    assert sample.main(args + ["--image", *tiny.images[:2]]) is None  # one batch, rows of different image sizes
    assert capsys.readouterr().out == "".join(f"{image}: {answer}\n" for image, answer in zip(tiny.images, expected))



def test_sampling_with_a_seed_is_reproducible_and_is_generate_with_that_seeded_generator(tiny, capsys):
    args = ["--ckpt", tiny.ckpt, "--image", tiny.images[0], "--prompt", QUESTION, "--max_new_tokens", "12",
            "--temperature", "1.5", "--top_k", "50", "--top_p", "0.95"]
    printed = []
    for seed in (7, 7, 8):
        assert sample.main(args + ["--seed", str(seed)]) is None
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
    assert sample.main(["--ckpt", tiny.plain, "--image", tiny.images[0], "--prompt", QUESTION]) is None
    printed = capsys.readouterr()
    assert printed.out == tiny.tokenizer.decode(generated[:-1]).strip() + "\n"
    assert "ignores --prompt" in printed.err

def test_template_vicuna_v1_asks_a_stage_1_model_the_question_zero_shot_instead_of_captioning(tiny, capsys):
    model = TinyLLaVA.from_pretrained(tiny.plain).eval()
    model.config.template = "vicuna_v1"
    expected = our_answer(tiny, model, QUESTION, tiny.images[0], 12)
    args = ["--ckpt", tiny.plain, "--image", tiny.images[0], "--prompt", QUESTION, "--max_new_tokens", "12"]
    assert sample.main(args + ["--template", "vicuna_v1"]) is None
    printed = capsys.readouterr()
    assert printed.out == expected + "\n" and "ignores --prompt" not in printed.err
    assert sample.main(args) is None  # its own template, plain: a caption
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


def test_compile_gives_the_chat_without_it_each_new_token_from_compiled_code(tiny, capsys, monkeypatch):
    steps = []  # a call of the compiled decode step each
    compile_decoding = Llama.compile_decoding

    def counting(llm):
        compile_decoding(llm)
        step = llm.compiled_decode_step
        llm.compiled_decode_step = lambda *args: steps.append(1) or step(*args)
    monkeypatch.setattr(Llama, "compile_decoding", counting)
    printed = []
    for compiled in ([], ["--compile"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n{FOLLOW_UP}\n"))
        args = ["--ckpt", tiny.ckpt, "--image", tiny.images[0], "--chat", "--max_new_tokens", "12"]
        assert sample.main(args + compiled) is None
        printed.append(capsys.readouterr().out)
    answers = printed[0].splitlines()
    assert len(answers) == 2 and all(len(answer) > 3 for answer in answers), answers
    assert printed[1] == printed[0]
    assert len(steps) >= 2  # in each turn, the tokens after the prefill's


def test_an_answer_left_midway_is_kept_as_one_cut_short_and_a_question_too_long_changes_nothing(tiny):
    """demo.py stops reading an answer when its client goes: the conversation goes on as if the answer had been cut
    at max_new_tokens there."""
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    pixel_values = process_image(load_image(tiny.images[0]), 16, "crop")[None]
    conversation = sample.Chat(model, tiny.tokenizer, pixel_values)
    tokens = conversation.ask(QUESTION, 12, dict(temperature=0.0))
    partial = [next(tokens) for _ in range(3)]
    tokens.close()
    assert conversation.turns == [(vicuna_ids(tiny.tokenizer, [QUESTION]), partial)] and EOS not in partial
    cached = conversation.cache.length
    with pytest.raises(flags.Stop, match="the conversation is too long"):
        next(conversation.ask("x" * CONTEXT, 12, dict(temperature=0.0)))
    assert len(conversation.turns) == 1 and conversation.cache.length == cached
    follow_up = list(conversation.ask(FOLLOW_UP, 12, dict(temperature=0.0)))
    whole = vicuna_ids(tiny.tokenizer, [QUESTION, partial, FOLLOW_UP])  # the 3 tokens, closed by the end of turn
    expected = model.generate([whole], pixel_values, max_new_tokens=12, stop_token_ids=[EOS], use_cache=False)[0]
    assert follow_up == expected.tolist()

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
            "--prompt"),
        "--chat with a stage-1 model, refused before loading it": (
            ["--image", image, "--ckpt", tiny.plain, "--chat"],
            "is a stage-1 model (plain template): it only captions; add --template vicuna_v1"),
        "--chat in the plain template": (["--image", image, "--ckpt", tiny.ckpt, "--chat", "--template", "plain"],
                                         "--template plain"),
        "a directory without ckpt.pt": (["--image", image, "--ckpt", str(tmp_path)], "no ckpt.pt"),
    }


def test_each_bad_input_gives_one_error_line_naming_it_and_a_nonzero_exit(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/ here, nor in the repository, for the default checkpoint
    monkeypatch.setattr(ask, "REPO_DIR", str(tmp_path))
    for name, (args, culprit) in bad_inputs(tiny, tmp_path).items():
        with pytest.raises(SystemExit) as exit:  # the message is the one line the process prints, status 1
            sample.main(args)
        error, printed = str(exit.value), capsys.readouterr().err.splitlines()
        assert error.startswith("sample.py: error: ") and culprit in error and "\n" not in error, (name, error)
        assert not any("error" in line or "Traceback" in line for line in printed), name
        if "before" in name:  # nothing printed before the error: no loading line, no chat banner
            assert printed == [] and "missing.pt" not in error  # and no other model looked for
    # the prompt that exactly fills the context, image tokens included, is fine, and leaves room for one token
    fills = long_prompt(tiny, CONTEXT)
    assert sample.main(["--image", tiny.images[0], "--ckpt", tiny.ckpt, "--prompt", fills,
                        "--max_new_tokens", "5"]) is None
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
    (["--max-new-tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
    (["--threads", "-1"], "--threads must be at least 0, got -1"),
    (["--dtype", "float64"], "--dtype must be one of auto, float32, bfloat16, float16; got 'float64'"),
    (["--max_new"], "unknown flag --max_new (did you mean --max_new_tokens?)"),  # no abbreviations, as train.py
])
def test_flag_mistakes_are_one_line_naming_the_flag(tiny, args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        sample.main(["--image", tiny.images[0], "--ckpt", tiny.ckpt, *args])
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == "" and "\n" not in str(exit.value), str(exit.value)
    assert str(exit.value).startswith("sample.py: error: ") and message in str(exit.value)


def test_flags_are_spelled_as_train_py_spells_them(tiny, capsys, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # seen, not applied to the other tests
    common = ["--image", tiny.images[0], "--ckpt", tiny.ckpt, "--prompt", QUESTION]
    assert sample.main(common + ["--max_new_tokens", "6"]) is None
    expected = capsys.readouterr().out
    assert sample.main(common + ["--max-new-tokens=6", "--threads", "1", "--dtype", "auto", "--device", "cpu"]) is None
    assert capsys.readouterr().out == expected and threads == [1]


def test_checkpoints_are_found_in_the_repository_from_any_directory(tiny, tmp_path, monkeypatch, capsys):
    """out/ and --ckpt paths, as train.py's --init: relative to the working directory, else to the repository."""
    repository, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repository / "out" / "stage2").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(tiny.ckpt, repository / "out" / "stage2" / "ckpt.pt")
    monkeypatch.setattr(ask, "REPO_DIR", str(repository))
    monkeypatch.setattr(tinyllava, "REPO_DIR", str(repository))
    monkeypatch.chdir(elsewhere)
    for args in ([], ["--ckpt", "out/stage2"], ["--ckpt", "out/stage2/ckpt.pt"]):
        assert sample.main(["--image", tiny.images[0], "--max_new_tokens", "3", *args]) is None, args
        assert f"loading {repository}/out/stage2" in capsys.readouterr().err


def test_help_explains_every_flag_and_starts_with_the_examples(capsys):
    explained = {name: text for _, _, items in flags.explained_fields(sample.SampleConfig) for name, text in items}
    assert list(explained) == [f.name for f in dataclasses.fields(sample.SampleConfig)]
    assert all(text.strip() for text in explained.values()), explained
    assert sample.main(["--help"]) is None
    text = capsys.readouterr().out
    assert "--max_new_tokens INT" in text and "(default: 256)" in text and "--threads INT" in text
    examples = text.split("Examples:")[1].strip().split("\n\n")[0].splitlines()
    assert len(examples) >= 5 and all(line.strip().startswith("python sample.py ") for line in examples)
    assert text.index("Examples:") < text.index("--ckpt STR")


def test_a_prompt_without_an_image_is_answered_as_a_text_only_record_is_also_in_a_chat(tiny, capsys):
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    encode = lambda text: tiny.tokenizer.encode(text, add_special_tokens=False).ids
    prompt = [BOS] + encode(f"{SYSTEM} USER: {FOLLOW_UP} ASSISTANT:")  # no placeholder: the facts sheet's text-only
    expected = model.generate([prompt], None, max_new_tokens=12, stop_token_ids=[EOS])[0].tolist()
    assert sample.main(["--ckpt", tiny.ckpt, "--prompt", FOLLOW_UP, "--max_new_tokens", "12"]) is None
    assert capsys.readouterr().out == tiny.tokenizer.decode(until_stop(expected)).strip() + "\n"
    result = run_cli("--ckpt", tiny.ckpt, "--chat", "--max_new_tokens", "12", stdin=f"{FOLLOW_UP}\n")
    assert result.returncode == 0 and result.stdout == tiny.tokenizer.decode(until_stop(expected)).strip() + "\n"
    with pytest.raises(SystemExit, match="add --template vicuna_v1"):  # a captioner has nothing to caption
        sample.main(["--ckpt", tiny.plain, "--prompt", FOLLOW_UP])
    with pytest.raises(SystemExit, match=r"give an --image FILE, or a --prompt \(or --chat\)"):
        sample.main(["--ckpt", tiny.ckpt])


@pytest.mark.parametrize("flag", ["--top_k", "--top_p", "--seed"])
def test_sampling_flags_without_a_temperature_are_refused(tiny, flag):
    with pytest.raises(SystemExit, match=f"{flag} does nothing at --temperature 0"):
        sample.main(["--ckpt", tiny.ckpt, "--image", tiny.images[0], flag, "1"])


def test_an_empty_answer_is_printed_as_an_empty_line_with_a_note_on_stderr(capsys):
    from tiny_llava import byte_level_tokenizer
    tokenizer = byte_level_tokenizer()
    said = sample.stream_answer(iter([EOS]), tokenizer, [EOS], sys.stdout)  # the model ends its turn at once
    printed = capsys.readouterr()
    assert said == "" and printed.out == "\n"
    assert printed.err == "(the model's answer is empty: it ended its turn at once)\n"
    said = sample.stream_answer(iter(tokenizer.encode("Red.").ids + [EOS]), tokenizer, [EOS], sys.stdout)
    printed = capsys.readouterr()
    assert said == "Red." and printed.out == "Red.\n" and printed.err == ""
