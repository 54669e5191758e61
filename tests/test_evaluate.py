"""evaluate.py: the world's held-out eval, LLaVA's question and answer files (resumable, chunked, bad lines named)
and the benchmarks' scoring rules on hand-written answers, and what image tokens read as."""
import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import ask
import evaluate
from data import load_image, process_image
from tinyllava import TinyLLaVA, fingerprint
from tiny_llava import (BOS, EOS, FOLLOW_UP, QUESTION, REPO, SYSTEM, byte_level_tokenizer, our_answer, tiny_llava,
                        until_stop, vicuna_ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("evaluate"))


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)

# ----------------------------------------------------------------------------------------------------------------------
# Held-out eval


def test_batch_of_different_prompts_and_image_sizes_answers_each_row_as_it_alone(tiny, monkeypatch):
    """evaluate.py's batches of different questions: the prompts differ in length, so the rows are
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
    decoded, decode = [], ask.decode_answer

    def recording(ids, *rest):  # the ids each row generated, as evaluate decodes them
        decoded.append(until_stop(ids))
        return decode(ids, *rest)
    monkeypatch.setattr(ask, "decode_answer", recording)
    items = [dict(id=str(k), image=image, question=question, answer=tiny.tokenizer.decode(ids).strip(), type="any")
             for k, (question, image, ids) in enumerate(zip(questions, images, alone))]
    accuracy = evaluate.exact_match_table(model, tiny.tokenizer, items, [load_image(image) for image in images],
                                          batch_size=3, max_new_tokens=10, out=io.StringIO())
    assert decoded == alone and accuracy == 1.0


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
    result = run_cli("--world", str(tmp_path), "--ckpt", tiny.ckpt, "--limit", "4", "--batch_size", "3",
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
    ours = {"model": tiny.ckpt, "fingerprint": fingerprint(tiny.ckpt), "template": "vicuna_v1", "aspect": "crop",
            "max_new_tokens": 12, "single_pred_prompt": False}  # what decides the answers: resuming never mixes
    assert [line["metadata"].pop("tinyllava") for line in lines] == [ours] * 3
    assert [(line["question_id"], line["prompt"], line["text"], line["metadata"]) for line in lines] == expected
    assert all(line["model_id"] == os.path.basename(tiny.root) for line in lines)
    assert len({line["answer_id"] for line in lines}) == 3 and "ETA" in result.stderr


def test_a_scienceqa_list_is_answered_as_model_vqa_science_with_image_in_the_prompt_and_the_letter_prompt(tiny):
    """model_vqa_science.py with --single-pred-prompt: the question is the first human turn without <image>, asked
    with "Answer with the option's letter ..." on a line of its own; the answer's prompt starts "<image>\n" where the
    record has an image (eval_science_qa.py counts those for IMG-Accuracy)."""
    model = TinyLLaVA.from_pretrained(tiny.ckpt).eval()
    letter_prompt = "Answer with the option's letter from the given choices directly."
    records = [{"id": "11", "image": os.path.basename(tiny.images[0]),
                "conversations": [{"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": "A"}]},
               {"id": "12", "conversations": [{"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": "B"}]}]
    (tiny.root / "sqa.json").write_text(json.dumps(records))
    answers = str(tiny.root / "sqa_answers.jsonl")
    result = run_cli("--questions", str(tiny.root / "sqa.json"), "--answers", answers, "--ckpt", tiny.ckpt,
                     "--max_new_tokens", "6", "--single_pred_prompt")
    assert result.returncode == 0, result.stderr
    lines = read_lines(answers)
    assert [line["prompt"] for line in lines] == [f"<image>\n{QUESTION}\n{letter_prompt}", f"{FOLLOW_UP}\n{letter_prompt}"]
    assert lines[0]["text"] == our_answer(tiny, model, f"{QUESTION}\n{letter_prompt}", tiny.images[0], 6)
    assert lines[0]["metadata"]["tinyllava"]["single_pred_prompt"] is True


def test_killed_run_resumes_without_repeating_or_losing_a_question(tiny, tmp_path, monkeypatch):
    questions = question_file(tiny, tmp_path / "q.jsonl")
    argv = ["--questions", questions, "--image_folder", str(tiny.root), "--ckpt", tiny.ckpt, "--max_new_tokens", "8",
             "--batch_size", "1"]
    assert evaluate.main(argv + ["--answers", str(tmp_path / "whole.jsonl")]) is None
    generate, calls = TinyLLaVA.generate, []

    def killed_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with open(tmp_path / "resumed.jsonl", "a") as f:
                f.write('{"question_id": 7, "pro')  # the kill also cut a line being written
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(TinyLLaVA, "generate", killed_on_the_second_batch)
    with pytest.raises(SystemExit) as exit:
        evaluate.main(argv + ["--answers", str(tmp_path / "resumed.jsonl")])
    assert exit.value.code == 130
    assert open(tmp_path / "resumed.jsonl").read().startswith('{"question_id": "q0"')  # then the cut line
    monkeypatch.setattr(TinyLLaVA, "generate", generate)
    assert evaluate.main(argv + ["--answers", str(tmp_path / "resumed.jsonl")]) is None
    fields = lambda lines: [(line["question_id"], line["text"]) for line in lines]
    assert fields(read_lines(tmp_path / "resumed.jsonl")) == fields(read_lines(tmp_path / "whole.jsonl"))


def test_chunks_partition_the_questions_in_order_as_llava_splits_them():
    items = list(range(10))
    for n in (1, 3, 4, 10, 12):
        chunks = [evaluate.chunk(items, n, k) for k in range(n)]
        assert sum(chunks, []) == items
        assert all(len(c) == -(-10 // n) for c in chunks[:10 // -(-10 // n)])  # LLaVA: chunks of ceil(len / n)
    assert evaluate.chunk(items, 3, 2) == [8, 9]


def test_bad_question_lines_and_missing_images_are_named_by_line_skipped_counted_and_stop_past_the_threshold(tiny,
                                                                                                            tmp_path):
    lines = [{"question_id": f"q{k}", "text": QUESTION, "image": os.path.basename(tiny.images[0])} for k in range(8)]
    lines[2] = "{not json"
    lines[5] = {"question_id": "q5", "text": QUESTION, "image": "missing.png"}
    questions = write_lines(tmp_path / "q.jsonl", lines)
    shutil.copy(tiny.images[0], tmp_path)
    argv = ["--questions", questions, "--answers", str(tmp_path / "a.jsonl"), "--ckpt", tiny.ckpt,
             "--max_new_tokens", "4"]
    result = run_cli(*argv, "--max_bad_fraction", "0.3")
    assert result.returncode == 0, result.stderr
    assert f"{questions}:3: not JSON" in result.stderr and f"{questions}:6: cannot load image" in result.stderr
    assert [line["question_id"] for line in read_lines(tmp_path / "a.jsonl")] == ["q0", "q1", "q3", "q4", "q6", "q7"]
    result = run_cli(*argv[:3], str(tmp_path / "b.jsonl"), *argv[4:], "--max_bad_fraction", "0.1")
    assert result.returncode == 1 and "bad" in result.stderr and "--max_bad_fraction" in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400


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
    names, vectors = evaluate.reading_vocabulary(model, tokenizer)
    assert names == world.possible_cells() and len(names) == 9 * 3 * (1 + 2 * 6 * 3)
    one = lambda word: table.weight[tokenizer.token_to_id(word)]
    k = names.index(["bottom right", "light blue", "small", "red", "triangle"])
    torch.testing.assert_close(vectors[k], (one("Ġbottom") + one("Ġright") + one("<|light blue|>") + one("Ġsmall")
                                            + one("Ġred") + one("Ġtriangle")) / 6)
    k = names.index(["center", "gray", "empty"])
    torch.testing.assert_close(vectors[k], (one("Ġcenter") + one("Ġgray") + one("<|empty|>")) / 3)
    plain = byte_level_tokenizer()
    table = torch.nn.Embedding(plain.get_vocab_size(), 4)
    names, vectors = evaluate.reading_vocabulary(SimpleNamespace(llm=SimpleNamespace(embed_tokens=table)), plain)
    assert names == [plain.id_to_token(i) for i in range(plain.get_vocab_size())] and vectors.shape == (len(names), 4)


@pytest.mark.parametrize("argv, message", [
    (["--questions", "q.jsonl", "--answers", "a.jsonl", "--limit", "20"], "--limit does not go with --questions"),
    (["--score", "short", "--answers", "a.jsonl", "--truth", "t.jsonl", "--ckpt", "x"],
     "--ckpt does not go with --score"),
    (["--plot", "log.jsonl", "--world", "w", "--batch_size", "2"], "--world, --batch_size do not go with --plot"),
    (["--truth", "t.jsonl"], "--truth does not go with the world's eval"),
    (["--score", "pope", "--answers", "a.jsonl"], "--score reads --answers FILE and --truth FILE"),
    (["--questions", "q.jsonl"], "--questions writes its answers to --answers FILE"),
    (["--questions", "q.jsonl", "--answers", "a.jsonl", "--num_chunks", "2", "--chunk_idx", "2"],
     "--chunk_idx 2 must be in [0, --num_chunks 2)"),
    (["--limit", "-1"], "--limit must be at least 0, got -1"),
])
def test_a_flag_the_mode_does_not_read_is_refused_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(argv)
    assert str(exit.value) == f"evaluate.py: error: {message}" + (
        "; python evaluate.py --help says which flags each mode reads" if "does not go" in message or
        "do not go" in message else "")
    assert capsys.readouterr().err == ""  # nothing loaded, nothing generated


def test_a_stage_1_model_is_not_asked_questions_in_its_caption_template_the_fix_is_named(tiny, tmp_path, capsys):
    questions = question_file(tiny, tmp_path / "q.jsonl")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--questions", questions, "--answers", str(tmp_path / "a.jsonl"), "--ckpt", tiny.plain])
    assert "--questions asks questions, but" in str(exit.value) and "add --template vicuna_v1" in str(exit.value)
    assert not (tmp_path / "a.jsonl").exists() and "loading" not in capsys.readouterr().err  # refused before loading
    assert evaluate.main(["--questions", questions, "--answers", str(tmp_path / "a.jsonl"), "--ckpt", tiny.plain,
                          "--template", "vicuna_v1", "--max_new_tokens", "2", "--image_folder", str(tiny.root)]) is None


def test_an_answer_file_of_another_model_or_setting_is_refused_naming_both(tiny, tmp_path):
    questions = question_file(tiny, tmp_path / "q.jsonl")
    argv = ["--questions", questions, "--image_folder", str(tiny.root), "--max_new_tokens", "4"]
    assert evaluate.main(argv + ["--answers", str(tmp_path / "a.jsonl"), "--ckpt", tiny.ckpt]) is None
    kept = (tmp_path / "a.jsonl").read_text()
    for other, says in ((["--ckpt", tiny.plain, "--template", "vicuna_v1"], f"not by {tiny.plain} (fingerprint"),
                        (["--ckpt", tiny.ckpt, "--aspect", "pad"], "aspect pad"),
                        (["--hf", tiny.llava], f"not by {tiny.llava}")):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(argv + ["--answers", str(tmp_path / "a.jsonl"), *other])
        assert f"a.jsonl:1 was answered by {tiny.ckpt} (fingerprint {fingerprint(tiny.ckpt)}" in str(exit.value)
        assert says in str(exit.value) and "give another --answers file" in str(exit.value)
    assert (tmp_path / "a.jsonl").read_text() == kept
    (tmp_path / "llava.jsonl").write_text(json.dumps({"question_id": "q0", "text": "A", "metadata": {}}) + "\n")
    with pytest.raises(SystemExit, match="answered by another program"):
        evaluate.main(argv + ["--answers", str(tmp_path / "llava.jsonl"), "--ckpt", tiny.ckpt])


def test_plot_draws_each_curve_train_py_logs_in_a_font_whose_spaces_show(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(record) + "\n" for record in [
        {"kind": "eval", "step": 0, "accuracy": 0.5}, {"kind": "train", "step": 1, "loss": 2.0},
        {"kind": "train", "step": 2, "loss": 1.0}, {"kind": "eval", "step": 2, "val_loss": 1.5, "accuracy": 0.75}]))
    assert [evaluate.read_curve(str(log), curve)[1] for curve in ("accuracy", "val_loss", "loss")] == [
        [(0, 0.5), (2, 0.75)], [(2, 1.5)], [(1, 2.0), (2, 1.0)]]
    for curve in ("accuracy", "loss"):
        assert evaluate.main(["--plot", str(log), "--curve", curve, "--png", str(tmp_path / f"{curve}.png")]) is None
        assert Image.open(tmp_path / f"{curve}.png").size == (720, 440)
    font = evaluate.plot_font()
    assert font.getlength("held out") - font.getlength("heldout") >= 3  # "held-outexact-matchaccuracy" no more
    (tmp_path / "quiet.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(SystemExit, match="no held-out exact-match accuracy logged .train stage 2 with --eval_questions"):
        evaluate.main(["--plot", str(tmp_path / "quiet.jsonl")])
