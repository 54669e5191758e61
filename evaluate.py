"""
Evaluate a trained tinyllava model: the shapes world's held-out questions (exact match per question type), LLaVA's
question files answered into its answer files and scored by each benchmark's own rules, what the image tokens read as,
and the learning curves train.py logs.

Examples:

    python evaluate.py                                                  # the world's held-out questions, out/stage2
    python evaluate.py --ckpt out/stage1 --template vicuna_v1           # stage 1 alone, asked zero-shot
    python evaluate.py --limit 70                                       # 70 questions, spread over the types
    python evaluate.py --read_image photo.png                           # what each image token reads as
    python evaluate.py --questions q.jsonl --answers a.jsonl --image_folder DIR   # LLaVA's question file -> answers
    python evaluate.py --questions q.jsonl --answers a.jsonl --num_chunks 8 --chunk_idx 0  # one eighth of it
    python evaluate.py --score short --answers a.jsonl --truth t.jsonl  # GQA's short answers, exact match
    python evaluate.py --score choice --answers a.jsonl --truth problems.json  # ScienceQA's letters, SQA-IMG
    python evaluate.py --score pope --answers a.jsonl --truth t.jsonl   # POPE yes/no, per negative sampling
    python evaluate.py --score vqa --answers a.jsonl --truth TextVQA_0.5.1_val.json  # VQA accuracy, 10 humans
    python evaluate.py --plus --ckpt out/plus                           # LLaVA-Plus: tool calls and answers
    python evaluate.py --plot out/stage2-curve/log.jsonl --png curve.png  # held-out accuracy against the step
    python evaluate.py --plot out/stage2/log.jsonl --curve loss --png loss.png  # the training loss

The model is chosen as sample.py chooses it: --ckpt, --hf, or out/stage2, else out/stage1. LLaVA's evaluation files
are read and written as its model_vqa.py does (question lines {"question_id", "image", "text"[, "category"]}, a line
without "image" asked without one; answer lines {"question_id", "prompt", "text", "answer_id", "model_id",
"metadata"}), greedily, the image before the question. Results go to stdout, progress to stderr.
"""
import dataclasses
import json
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch

import ask
import flags
import plus
import scoring
import world
from data import IMAGE_TAG, ImageError, encode_prompt, load_image, question_ids
from tinyllava import fingerprint, read_checkpoint

USAGE = ("python evaluate.py [--ckpt PATH] [--limit N]   |   --questions FILE --answers FILE   |   --score KIND "
         "--answers FILE --truth PATH   |   --read_image FILE ...   |   --plot LOG ... --png FILE")


@dataclass
class EvalConfig(ask.ModelFlags):
    # the world's eval: the mode when none of --score, --plot, --questions, --read_image, --plus is given; exact match
    # per type
    world: str = ""  # a world directory holding eval.json ("": the default shapes world, generated on first use)
    limit: int = 0  # only this many questions, taken evenly across the question types (0: all)
    plus: bool = False  # LLaVA-Plus: the world's held-out tool questions (shapes_plus.jsonl, python plus.py writes
                        # it) asked as the server asks them, the right tool and parameters and the final answer per
                        # task; then --limit (or all) of the ordinary questions: answered without a tool, and right
    # LLaVA's evaluation files: --questions writes answers (the flags through --max_bad_fraction); --score scores them
    questions: str = ""  # answer this question file: JSON lines {question_id, image (absent: text-only), text[,
                         # category]}, or a LLaVA JSON list of records (ScienceQA's llava_test_CQM-A.json); with
                         # --score pope, the question file a POPE annotation directory is read against
    answers: str = ""  # the answer file --questions appends to (a killed run resumes: question ids already in it
                       # are skipped) and --score reads
    image_folder: str = ""  # the folder the question file's image paths are relative to ("": the file's own)
    num_chunks: int = 1  # split the questions into this many contiguous chunks, as LLaVA does
    chunk_idx: int = 0  # answer this chunk of them, 0-based
    max_bad_fraction: float = 0.01  # stop once more than this share of the questions is bad (a malformed line, a
                                    # missing image); each is reported and skipped
    single_pred_prompt: bool = False  # end each question with LLaVA-1.5's "Answer with the option's letter from the
                                      # given choices directly." (model_vqa_science.py --single-pred-prompt, as its
                                      # sqa.sh asks ScienceQA's llava_test_CQM-A.json)
    score: Literal["short", "choice", "pope", "vqa"] | None = None  # score --answers against --truth by the rule of
                                      # LLaVA's script (scoring.py says each): short (GQA: trailing periods dropped,
                                      # lowercase, exact match), choice (ScienceQA: the letter A-E alone, 'X. ...' or
                                      # 'The answer is X'; anything else and a missing answer fail; IMG-accuracy),
                                      # pope (the first sentence: No/no/not means no; per category and their mean),
                                      # vqa (VQAv2/TextVQA accuracy against the ten human answers)
    split: str = "test"  # with ScienceQA's problems.json as --truth: score the problems of this split of the
                         # pid_splits.json beside it, as eval_science_qa.py does
    truth: str = ""  # the answer key: JSON lines {question_id, answer, label or answers (vqa: the list)[,
                     # category]}, or a benchmark's own: ScienceQA's problems.json, GQA's questions file, TextVQA's or
                     # VQAv2's annotations, POPE's annotation directory of coco_pope_{category}.json files (with
                     # --questions, whose order pairs questions and labels)
    # pictures: --read_image (with the model flags and --batch_size); --plot (with --png, --curve)
    read_image: list[str] = field(default_factory=list)  # show, for each of these image files, what each image token
                                                         # reads as in the LLM's word embeddings, as a grid: the
                                                         # nearest cell the tiny bases' scene words can write, else
                                                         # the nearest word
    plot: list[str] = field(default_factory=list)  # draw the held-out accuracy train.py logged (--eval_questions)
                                                   # against the step, one curve per log.jsonl (labelled by its
                                                   # directory), into --png
    png: str = "curve.png"  # the picture --plot draws
    curve: Literal["accuracy", "val_loss", "loss"] = "accuracy"  # what --plot draws against the step: the held-out
                                                                 # exact match (train.py --eval_questions), the
                                                                 # held-out loss or the training loss
    # generation: for the modes that ask the model questions (the world's eval, --questions)
    max_new_tokens: int = 256  # most tokens per answer
    batch_size: int = 32  # questions (or images) per generate call


# What each mode reads, beyond the model flags for the modes that load a model; any other flag given is refused.
MODES = {"score": {"score", "answers", "truth", "questions", "split"}, "plot": {"plot", "png", "curve"},
         "questions": {"questions", "answers", "image_folder", "num_chunks", "chunk_idx", "max_bad_fraction",
                       "single_pred_prompt", "max_new_tokens", "batch_size"},
         "read_image": {"read_image", "batch_size"}, "world": {"world", "limit", "max_new_tokens", "batch_size"},
         "plus": {"plus", "world", "limit", "max_new_tokens", "batch_size"}}
MODEL_FLAGS = {f.name for f in dataclasses.fields(ask.ModelFlags)}


def main(argv=None):
    """Evaluate as the command line says; a mistake ends it with one line (flags.one_line_errors)."""
    with flags.one_line_errors("evaluate.py", expected=(ImageError,)):
        given = flags.command_line(EvalConfig, argv, "evaluate.py", USAGE, __doc__)
        if given is None:  # --help
            return
        config, mode = checked(EvalConfig(**given), given)
        if mode == "score":
            figures = scoring.score(config.score, config.answers, config.truth, questions=config.questions,
                                    split=config.split)
            print("\n".join(f"{name}: {value:.4f}" for name, value in figures.items()))
        elif mode == "plot":
            plot_curves(config.plot, config.png, config.curve)
            print(f"wrote {config.png}", file=sys.stderr)
        elif mode == "questions":
            answer_question_file(config)
        elif mode == "plus":
            plus_eval(config)
        elif mode == "read_image":
            images = [load_image(path) for path in config.read_image]  # before the model: a typo costs no load
            model, tokenizer = ask.load(config)
            pixel_values = ask.to_pixels(model, images)
            for name, readings in zip(config.read_image, read_image_tokens(model, tokenizer, pixel_values)):
                print(f"{name}: what each image token reads as, row by row\n{draw_grid(readings)}")
        else:
            world_eval(config)


def checked(config, given):
    """(config, mode) once the flags make sense together: the mode is --score, --plot, --questions or --read_image
    if given (in that order), else the world's eval; a flag the mode does not read is refused, naming it."""
    mode = next((mode for mode in ("score", "plot", "questions", "read_image", "plus") if mode in given), "world")
    allowed = MODES[mode] | (MODEL_FLAGS if mode in ("questions", "read_image", "world", "plus") else set())
    stray = [f"--{key}" for key in given if key not in allowed]
    if stray:
        what = "the world's eval" if mode == "world" else f"--{mode}"
        raise flags.Stop(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not go with {what}; python "
                         "evaluate.py --help says which flags each mode reads")
    if mode == "score" and not (config.answers and config.truth):
        raise flags.Stop("--score reads --answers FILE and --truth FILE")
    if mode == "questions" and not config.answers:
        raise flags.Stop("--questions writes its answers to --answers FILE")
    flags.at_least(config, 1, "max_new_tokens", "batch_size", "num_chunks")
    flags.at_least(config, 0, "limit", "threads")
    if not 0 <= config.chunk_idx < config.num_chunks:
        raise flags.Stop(f"--chunk_idx {config.chunk_idx} must be in [0, --num_chunks {config.num_chunks})")
    if not 0 <= config.max_bad_fraction <= 1:
        raise flags.Stop(f"--max_bad_fraction must be in [0, 1], got {config.max_bad_fraction}")
    for flag in ("answers", "truth", "questions") if mode == "score" else ():
        if getattr(config, flag) and not os.path.exists(getattr(config, flag)):
            raise flags.Stop(f"--{flag} {getattr(config, flag)}: no such file")
    return config, mode

# ----------------------------------------------------------------------------------------------------------------------
# The world's held-out eval


def world_eval(config):
    """The world's eval.json questions (all, or --limit of them), answered greedily, scored by exact match; a table per
    type, the share of image tokens read as their cell, and 'accuracy: <fraction>' last."""
    directory = config.world or world.ensure_world()
    try:
        items = world.eval_items(directory, config.limit)
    except ValueError as error:
        raise flags.Stop(str(error)) from None
    images = [load_image(os.path.join(directory, item["image"])) for item in items]
    path = ask.find_model(config)
    ask.refuse_captioner(config, path, "the world's eval")
    model, tokenizer = ask.load(config, path)
    print(f"eval: {len(items)} questions from {os.path.join(directory, 'eval.json')}", file=sys.stderr)
    accuracy = exact_match_table(model, tokenizer, items, images, config.batch_size, config.max_new_tokens)
    share = share_read_right(model, tokenizer, directory, sorted({item["image"] for item in items}),
                             config.batch_size)
    if share is not None:
        print(f"image tokens read as their cell (nearest cell of the LLM's scene words): {share:.4f}")
    print(f"accuracy: {accuracy:.4f}")


def exact_match_table(model, tokenizer, items, images, batch_size, max_new_tokens, out=None):
    """Greedy answers to the items' questions, image first, in batches, with a progress line on stderr after each;
    exact match per question type and overall, printed as a table. Returns the overall accuracy."""
    out = out or sys.stdout
    correct, total, started = Counter(), Counter(), time.time()
    answers = ask.answer_batches(model, tokenizer, [item["question"] for item in items], images, batch_size,
                                 max_new_tokens)
    for start, texts in zip(range(0, len(items), batch_size), answers):
        for item, text in zip(items[start:], texts):
            total[item["type"]] += 1
            correct[item["type"]] += world.exact_match(text, item["answer"])
        print(f"eval: {min(start + batch_size, len(items))}/{len(items)} questions, {sum(correct.values())} right, "
              f"{time.time() - started:.1f}s", file=sys.stderr)
    for kind in total:
        print(f"{kind:<20} {correct[kind]:>5}/{total[kind]:<5} {correct[kind] / total[kind]:.4f}", file=out)
    accuracy = sum(correct.values()) / len(items)
    print(f"{'overall':<20} {sum(correct.values()):>5}/{len(items):<5} {accuracy:.4f}", file=out)
    return accuracy

# ----------------------------------------------------------------------------------------------------------------------
# What the image tokens read as: H_v = W · Z_v against the LLM's word embeddings


def reading_vocabulary(model, tokenizer):
    """(names, vectors) the image tokens are read against. With the tiny bases' scene words in the vocabulary: every
    cell they can write (cell, background, then 'empty' or size color shape), as the mean of its words' embeddings,
    exactly as the LLM was pretrained to read a cell. Otherwise every single token of the vocabulary."""
    table = model.llm.embed_tokens.weight.detach().float()
    if not has_scene_words(tokenizer):
        return [tokenizer.id_to_token(i) for i in range(len(table))], table
    cells = world.possible_cells()
    return cells, torch.stack([table[world.cell_word_ids(cell, tokenizer)].mean(0) for cell in cells])


def has_scene_words(tokenizer):
    """Whether the tokenizer writes every cell of the shapes world in single tokens (the tiny bases' does)."""
    return tokenizer.token_to_id(world.SCENE_TOKENS[0]) is not None and \
        all(world.cell_word_ids(cell, tokenizer) is not None for cell in world.possible_cells())


def read_image_tokens(model, tokenizer, pixel_values):
    """For each image (N, 3, S, S), what each of its tokens reads as: the nearest entry of reading_vocabulary by
    cosine similarity, [N][tokens]."""
    names, vectors = reading_vocabulary(model, tokenizer)
    with torch.no_grad():
        tokens = model.image_features(pixel_values).float()  # (N, num_image_tokens, D): H_v = W · Z_v
    similarity = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(vectors, dim=-1).T
    return [[names[k] for k in row] for row in similarity.argmax(-1).tolist()]  # (N, num_image_tokens)


def draw_grid(readings):
    """The readings of one image's tokens as a square grid of text, row by row."""
    side = int(len(readings) ** 0.5)
    texts = [" ".join(reading) if isinstance(reading, list) else reading for reading in readings]
    width = max(map(len, texts)) + 2
    rule = "+" + "+".join(["-" * width] * side) + "+"
    lines = [rule]
    for row in range(0, len(texts) - len(texts) % side or len(texts), side):
        lines += ["|" + "|".join(f" {text:<{width - 1}}" for text in texts[row:row + side]) + "|", rule]
    return "\n".join(lines)


def share_read_right(model, tokenizer, world_dir, image_names, batch_size):
    """Of the image tokens of these world images, the share whose reading is exactly their cell (cell name,
    background, content), or None when the LLM has no scene words."""
    if not has_scene_words(tokenizer):
        return None
    with open(os.path.join(world_dir, "scenes.json")) as f:
        scenes = {record["image"]: world.scene_from_json(record) for record in json.load(f)}
    right = total = 0
    for start in range(0, len(image_names), batch_size):
        names = image_names[start:start + batch_size]
        pixel_values = ask.to_pixels(model, [load_image(os.path.join(world_dir, name)) for name in names])
        for name, readings in zip(names, read_image_tokens(model, tokenizer, pixel_values)):
            truth = world.cell_attributes(scenes[name])
            right += sum(reading == cell for reading, cell in zip(readings, truth))
            total += len(truth)
    return right / total

# ----------------------------------------------------------------------------------------------------------------------
# LLaVA's evaluation files: question lines in, answer lines out (as llava/eval/model_vqa.py), resumable and chunked


def answer_question_file(config):
    """Answer --questions' chunk into --answers, after the question ids already there; bad lines are reported and
    skipped, and the run stops once more than --max_bad_fraction of the questions were bad."""
    questions, bad = read_questions(config.questions)
    if config.single_pred_prompt:  # asked, and written in the answer's prompt, as model_vqa_science.py does
        for _, question in questions:
            question["text"] += f"\n{world.CHOICE_PROMPT}"
            question["prompt"] += f"\n{world.CHOICE_PROMPT}"
    for message in bad[:10]:
        print(f"skipped: {message}", file=sys.stderr)
    total = len(questions) + len(bad)
    if len(bad) > config.max_bad_fraction * total:
        raise flags.Stop(f"{len(bad)} bad lines of {total} in {config.questions}, more than --max_bad_fraction "
                         f"{config.max_bad_fraction}; first: {bad[0]}")
    mine = chunk(questions, config.num_chunks, config.chunk_idx)
    path = ask.find_model(config)
    settings = answer_settings(config, path)
    done = answered_ids(config.answers, settings)
    todo = [(number, q) for number, q in mine if q["question_id"] not in done]
    print(f"questions: {len(mine)} in chunk {config.chunk_idx} of {config.num_chunks} from {config.questions}, "
          f"{len(mine) - len(todo)} already in {config.answers}, {len(todo)} to answer", file=sys.stderr)
    if not todo:
        return
    ask.refuse_captioner(config, path, "--questions")
    model, tokenizer = ask.load(config, path)
    image_folder = config.image_folder or os.path.dirname(os.path.abspath(config.questions))
    answer_file(model, tokenizer, todo, image_folder, ask.model_id(path), config, bad, settings)


def answer_settings(config, path):
    """What decides the answers: the model, by content (its fingerprint: the same weights under any path), and how it
    is asked. Every answer line carries them (metadata "tinyllava"), so that a resumed file is never another's."""
    is_hf = os.path.isfile(os.path.join(path, "config.json"))
    try:
        saved = {} if is_hf else read_checkpoint(path, mmap=True)["config"]
    except (FileNotFoundError, ValueError) as error:
        raise flags.Stop(str(error)) from None
    return dict(model=path, fingerprint=fingerprint(path),
                template=config.template or ("vicuna_v1" if is_hf else saved.get("template")),
                aspect=config.aspect or ("pad" if is_hf else saved.get("image_aspect")),
                max_new_tokens=config.max_new_tokens, single_pred_prompt=config.single_pred_prompt)


def read_questions(path):
    """[(line number, {question_id, image or None, text, category or None})] of a question file, and the bad lines
    as messages. JSON lines, or a JSON list of LLaVA records (the question is the first human turn, <image> taken
    out; the answer's prompt starts "<image>\n" where there is an image, as model_vqa_science.py writes it)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except OSError as error:
        raise flags.Stop(f"--questions {path}: {error.strerror}") from None
    if content.lstrip().startswith("["):  # a LLaVA JSON list (ScienceQA's llava_test_CQM-A.json)
        try:
            lines = [(k + 1, {"question_id": r.get("id"), "image": r.get("image"), "category": r.get("category"),
                              "text": r["conversations"][0]["value"].replace("<image>", "").strip(),
                              "multimodal_prompt": "image" in r}) for k, r in enumerate(json.loads(content))]
        except (json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError) as error:
            raise flags.Stop(f"--questions {path}: not a JSON list of LLaVA records ({error})") from None
    else:
        lines = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    lines.append((number, f"not JSON ({error.msg})"))
    questions, bad, seen = [], [], set()
    for number, line in lines:
        if isinstance(line, dict) and line.get("question_id") is not None and isinstance(line.get("text"), str) \
                and isinstance(line.get("image") or "", str) and line["question_id"] not in seen:
            seen.add(line["question_id"])
            prompt = ("<image>\n" if line.get("multimodal_prompt") else "") + line["text"]
            questions.append((number, {"question_id": line["question_id"], "image": line.get("image") or None,
                                       "text": line["text"], "category": line.get("category"), "prompt": prompt}))
        else:
            reason = line if isinstance(line, str) else "a repeated question_id" if isinstance(line, dict) and \
                line.get("question_id") in seen else "not {question_id, text[, image, category]}"
            bad.append(f"{path}:{number}: {reason}")
    return questions, bad


def chunk(items, num_chunks, index):
    """Chunk `index` of `num_chunks` contiguous chunks of ceil(len / num_chunks) items (LLaVA's split_list)."""
    size = -(-len(items) // num_chunks)
    return items[index * size:(index + 1) * size]


def answered_ids(path, settings):
    """The question ids already in an answer file: a run killed halfway goes on after them, if they were answered
    with these settings (answer_settings; else the file is refused, naming both). A last line the kill cut short is
    removed first (its question is asked again), so that appending starts on a line of its own."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb+") as f:
        content = f.read()
        if content and not content.endswith(b"\n"):
            whole = content.rfind(b"\n") + 1  # the end of the last whole line
            f.truncate(whole)
            print(f"{path}: removed a last line cut short: {content[whole:][:60]!r}", file=sys.stderr)
            content = content[:whole]
    done = set()
    for number, line in enumerate(content.decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            done.add(record["question_id"])
            written = record.get("metadata", {}).get("tinyllava")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise flags.Stop(f"--answers {path}:{number}: not an answer line; give another --answers file") from None
        if written is None or {k: v for k, v in written.items() if k != "model"} != \
                {k: v for k, v in settings.items() if k != "model"}:
            raise flags.Stop(f"--answers {path}:{number} was answered by {describe_settings(written)}, not by "
                             f"{describe_settings(settings)}: give another --answers file, or remove it to start over")
    return done


def describe_settings(settings):
    if settings is None:
        return "another program (no tinyllava settings in its metadata)"
    return (f"{settings['model']} (fingerprint {settings['fingerprint']}, template {settings['template']}, aspect "
            f"{settings['aspect']}, max_new_tokens {settings['max_new_tokens']}, single_pred_prompt "
            f"{settings.get('single_pred_prompt', False)})")


def batch_images(questions, image_folder, config, bad, total):
    """(the questions whose image loaded, or that have none; the images, in order). A missing image is reported with
    its line, added to `bad`, and its question skipped; past max_bad_fraction of `total` the run stops."""
    kept, images = [], []
    for number, question in questions:
        if question["image"] is not None:
            try:
                images.append(load_image(os.path.join(image_folder, question["image"])))
            except ImageError as error:
                bad.append(f"{config.questions}:{number}: {error}")
                print(f"skipped: {bad[-1]}", file=sys.stderr)
                if len(bad) > config.max_bad_fraction * total:
                    raise flags.Stop(f"{len(bad)} bad questions of {total} in {config.questions}, more than "
                                     f"--max_bad_fraction {config.max_bad_fraction}; first: {bad[0]}") from None
                continue
        kept.append(question)
    return kept, images


def answer_file(model, tokenizer, questions, image_folder, model_name, config, bad, settings):
    """Answer the questions greedily in batches (the image before the question, as model_vqa; text-only ones without
    one), appending each batch's answer lines to --answers as it is done, with an ETA."""
    total, started = len(questions) + len(bad), time.time()
    with open(config.answers, "a", encoding="utf-8") as out:
        for start in range(0, len(questions), config.batch_size):
            batch, images = batch_images(questions[start:start + config.batch_size], image_folder, config, bad, total)
            for has_image in (True, False):  # a batch of one kind: images spliced in order, or none at all
                group = [q for q in batch if (q["image"] is not None) == has_image]
                if not group:
                    continue
                prompts = [question_ids(q["text"], tokenizer, model.config.template, image=has_image) for q in group]
                texts = ask.greedy_answers(model, tokenizer, prompts, ask.to_pixels(model, images) if has_image
                                           else None, config.max_new_tokens, f"question {group[0]['question_id']}")
                for question, text in zip(group, texts):
                    out.write(json.dumps({"question_id": question["question_id"], "prompt": question["prompt"],
                                          "text": text, "answer_id": uuid.uuid4().hex[:22], "model_id": model_name,
                                          "metadata": ({"category": question["category"]} if question["category"]
                                                       else {}) | {"tinyllava": settings}}) + "\n")
            out.flush()
            done, elapsed = min(start + config.batch_size, len(questions)), time.time() - started
            print(f"answers: {done}/{len(questions)}, {elapsed:.0f}s, ETA "
                  f"{elapsed / done * (len(questions) - done):.0f}s", file=sys.stderr)

# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-Plus: the held-out tool questions, asked as the server asks them


def plus_eval(config):
    """Per tool task: the share of questions where the model called the right tool with the right parameters (the
    tool, run on the image with the model's parameters, gives what the teacher's call gives) and where its final
    answer is the teacher's, numbers copied exactly; then the ordinary questions: answered without a tool, and right.
    """
    directory = str(config.world or world.ensure_world())
    try:
        plus.ensure_plus_data(directory)
    except ValueError as error:
        raise flags.Stop(f"--world {error}") from None
    with open(os.path.join(directory, "shapes_plus.jsonl")) as f:
        questions = [json.loads(line) for line in f]
    with open(os.path.join(directory, "shapes_plus_truth.jsonl")) as f:
        keys = {key["question_id"]: key for key in map(json.loads, f)}
    path = ask.find_model(config)
    ask.refuse_captioner(config, path, "--plus")
    model, tokenizer = ask.load(config, path)
    tally = defaultdict(Counter)  # task -> n, right call, right answer
    for start in range(0, len(questions), config.batch_size):
        batch = questions[start:start + config.batch_size]
        images = [load_image(os.path.join(directory, q["image"])) for q in batch]
        for q, image, (first, _, final) in zip(batch, images, tool_dialogues(
                model, tokenizer, [q["text"] for q in batch], images, config.max_new_tokens)):
            key, row = keys[q["question_id"]], tally[q["category"]]
            row["n"] += 1
            row["right call"] += same_call(first, key["action"], image)
            row["right answer"] += final is not None and world.exact_match(read_reply(final)[1], key["answer"])
        print(f"tool questions: {min(start + config.batch_size, len(questions))}/{len(questions)}", file=sys.stderr)
    tally["overall"] = sum(tally.values(), Counter())
    print(f"{'task':<10} {'n':>5} {'right call':>11} {'right answer':>13}")
    for task, row in tally.items():
        print(f"{task:<10} {row['n']:>5} {row['right call'] / row['n']:>11.4f} {row['right answer'] / row['n']:>13.4f}")
    items = world.eval_items(directory, config.limit)
    firsts = [read_reply(text) for batch in ask.answer_batches(
        model, tokenizer, [item["question"] for item in items],
        [load_image(os.path.join(directory, item["image"])) for item in items], config.batch_size,
        config.max_new_tokens) for text in batch]
    no_tool = sum(not actions for actions, _ in firsts)  # a malformed call runs no tool either
    right = sum(world.exact_match(value, item["answer"]) for (_, value), item in zip(firsts, items))
    print(f"ordinary questions: {no_tool / len(items):.4f} answered without a tool, {right / len(items):.4f} right "
          f"({len(items)} of eval.json)")


def read_reply(text):
    """(the actions, the value) of a reply; a reply whose actions do not parse has ([], '') and is wrong."""
    try:
        return plus.parse_turn(text)[1:]
    except plus.ToolError:
        return [], ""


def tool_dialogues(model, tokenizer, questions, images, max_new_tokens):
    """[(first reply, the tool's output or why it did not run, final reply or None)] for one question about each
    image: greedy replies, and where the first names a tool, the tool run and its output handed back."""
    template = model.config.template
    firsts = ask.greedy_answers(model, tokenizer, [question_ids(q, tokenizer, template) for q in questions],
                                ask.to_pixels(model, images), max_new_tokens, "a tool question")
    results, seconds = [], []
    for k, (question, image, first) in enumerate(zip(questions, images, firsts)):
        try:
            turn = plus.tool_turn(first, image, question)
        except plus.ToolError as error:
            turn = str(error)
        results.append([first, turn if turn is None or isinstance(turn, str) else turn[1], None])
        if isinstance(turn, tuple):
            seconds.append((k, encode_prompt([{"from": "human", "value": f"{IMAGE_TAG}\n{question}"},
                                              {"from": "gpt", "value": first}, {"from": "human", "value": turn[0]}],
                                             tokenizer, template)))
    if seconds:
        finals = ask.greedy_answers(model, tokenizer, [prompt for _, prompt in seconds],
                                    ask.to_pixels(model, [images[k] for k, _ in seconds]), max_new_tokens,
                                    "a tool question's second turn")
        for (k, _), final in zip(seconds, finals):
            results[k][2] = final
    return results


def same_call(reply, action, image):
    """Whether a reply calls the key's tool with parameters that do what the key's do on this image: the same
    output, or for the editor the same objects read back from the edited image."""
    try:
        _, actions, _ = plus.parse_turn(reply)
        if len(actions) != 1 or actions[0]["API_name"] != action["API_name"]:
            return False
        ours, theirs = plus.run_tool(actions[0], image)[1], plus.run_tool(action, image)[1]
    except plus.ToolError:
        return False
    if action["API_name"] == "editor":
        return plus.detect(ours["edited_image"], "object") == plus.detect(theirs["edited_image"], "object")
    return {k: v for k, v in ours.items() if k != "masks"} == {k: v for k, v in theirs.items() if k != "masks"}

# ----------------------------------------------------------------------------------------------------------------------
# Learning curves: held-out accuracy against the step, from train.py's logs


CURVES = {"accuracy": "held-out exact-match accuracy", "val_loss": "held-out loss", "loss": "training loss"}


def read_curve(path, curve):
    """(the run's name: its directory, [(step, value)]) of one curve of a train.py log.jsonl."""
    try:
        with open(path) as f:
            points = [(r["step"], r[curve]) for r in map(json.loads, f) if curve in r]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise flags.Stop(f"--plot {path}: cannot read a train.py log ({error})") from None
    if not points:
        raise flags.Stop(f"--plot {path}: no {CURVES[curve]} logged" + (
            " (train stage 2 with --eval_questions N)" if curve == "accuracy" else ""))
    return os.path.basename(os.path.dirname(os.path.abspath(path))), points


def plot_font():
    """Pillow's scalable default font (Pillow 10.1+); its bitmap one draws spaces one pixel wide."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=13)
    except TypeError:
        return ImageFont.load_default()


def plot_curves(logs, png, curve="accuracy"):
    """One curve of each log.jsonl (step on x; accuracy from 0 to 1, or a loss from 0 to its largest value, on y),
    drawn into a PNG."""
    curves = [read_curve(path, curve) for path in logs]
    top = 1.0 if curve == "accuracy" else max(value for _, points in curves for _, value in points) * 1.05
    draw_curves(curves, png, CURVES[curve], top)


def draw_curves(curves, png, title, top, size=(720, 440), margin=60):
    """Curves [(label, [(step, value)])] into a PNG: the step on x, the value from 0 to `top` on y, the legend (each
    curve's last point) above."""
    from PIL import Image, ImageDraw
    font = plot_font()
    width, height = size
    last = max(step for _, points in curves for step, _ in points) or 1
    above = 36 + 16 * len(curves)  # the title and the legend, one line per run, above the plot
    to_xy = lambda step, value: (margin + (width - 2 * margin) * step / last,
                                 height - margin - (height - margin - above) * value / top)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for tick in range(6):  # the value grid, 0 to top
        x0, y = to_xy(0, top * tick / 5)
        draw.line([(x0, y), (width - margin, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{top * tick / 5:.2f}", fill="black", font=font)
    draw.line([to_xy(0, 0), to_xy(last, 0)], fill="black")
    draw.line([to_xy(0, 0), to_xy(0, top)], fill="black")
    for step in (0, last // 2, last):
        x, y = to_xy(step, 0)
        draw.text((x - 10, y + 8), str(step), fill="black", font=font)
    draw.text((width // 2 - 50, height - 25), "optimizer step", fill="black", font=font)
    draw.text((margin, 10), title, fill="black", font=font)
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for k, (label, points) in enumerate(curves):
        color = colors[k % len(colors)]
        draw.line([to_xy(*point) for point in points], fill=color, width=3)
        for point in points:
            x, y = to_xy(*point)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        draw.line([(margin, 37 + 16 * k), (margin + 24, 37 + 16 * k)], fill=color, width=3)
        draw.text((margin + 32, 30 + 16 * k), f"{label}: {points[-1][1]:.3f} at step {points[-1][0]}",
                  fill=color, font=font)
    image.save(png)


if __name__ == "__main__":
    main()
