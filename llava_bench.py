"""
LLaVA-Bench in miniature: the first paper's own benchmark (its Table 4) on the shapes world, with a rule-based judge.

    python llava_bench.py                                         # out/stage2 (else out/stage1), 90 questions
    python llava_bench.py --ckpt out/stage2                       # the model of the two commands
    python llava_bench.py --ckpt out/stage1 --template vicuna_v1  # stage 1 alone: no instruction tuning
    python llava_bench.py --images 10 --out_dir out/llava_bench_10  # 10 images, 30 questions

The teacher (world.py) writes what GPT-4 wrote for LLaVA-Bench (COCO): about each of 30 held-out images one question
of each category (conv: a conversation question, detail: a detailed description, complex: complex reasoning), the
context (the scene in words, with its boxes) and a reference answer. The model answers the question file (evaluate.py's
answering of LLaVA question files); the judge reads the facts each answer states, checks them against the scene, and
scores the reference (Assistant 1) and the model (Assistant 2) from 1 to 10 in LLaVA's review format. The relative
score of a category is mean(model) / mean(reference) x 100, as LLaVA's summarize_gpt_review.py gives it. The judge's
rules: docs/evaluation.md, "LLaVA-Bench in miniature".

It writes into --out_dir LLaVA-Bench's files: questions.jsonl {question_id, image, text, category}, context.jsonl
{id, image, captions, instances: [{category, bbox}], caption: [lines]}, answers_teacher.jsonl (the references, as
qa90_gpt4_answer.jsonl), and per model (named by its directory, as answer files name it) answers_<model>.jsonl and
review_<model>.jsonl {id, question_id, answer1_id, answer2_id, category: llava_bench_<category>, content: "s1 s2"
then why, tuple: [s1, s2]}, as eval_gpt_review_bench.py writes it; LLaVA's `summarize_gpt_review.py -d DIR` reads
them unchanged. It prints the relative score per category, then `relative score: xx.x` (all questions) last.
Progress goes to stderr.
"""
import dataclasses
import json
import math
import os
import random
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

import ask
import evaluate
import flags
import plus
import world
from data import DETAILED_DESCRIPTION_QUESTIONS, ImageError

USAGE = "python llava_bench.py [--ckpt PATH | --hf DIR] [--template vicuna_v1] [--images N] [--out_dir DIR]"
CATEGORIES = ("conv", "detail", "complex")  # LLaVA-Bench's, in its order: one question of each per image


@dataclass
class BenchConfig(ask.ModelFlags):
    # the benchmark: which held-out images are asked about, and where its files go
    world: str = ""  # a world directory holding scenes.json ("": the default shapes world, generated on first use)
    images: int = 30  # held-out images, each asked one question per category (LLaVA-Bench COCO: 30, 90 questions)
    out_dir: str = "out/llava_bench"  # where the questions, context, references, answers and reviews are written
    # generation: how the model answers
    max_new_tokens: int = 256  # most tokens per answer
    batch_size: int = 32  # questions per generate call


def main(argv=None):
    """Write the benchmark, have the model answer it, judge the answers, print the relative scores."""
    with flags.one_line_errors("llava_bench.py", expected=(ImageError,)):
        given = flags.command_line(BenchConfig, argv, "llava_bench.py", USAGE, __doc__)
        if given is None:  # --help
            return
        config = BenchConfig(**given)
        flags.at_least(config, 1, "images", "max_new_tokens", "batch_size")
        flags.at_least(config, 0, "threads")
        path = ask.find_model(config)
        ask.refuse_captioner(config, path, "llava_bench.py")
        directory = config.world or str(world.ensure_world())
        items = bench_items(directory, config.images)
        os.makedirs(config.out_dir, exist_ok=True)
        write_bench(items, config.out_dir)
        name = ask.model_id(path)
        if name == "teacher":  # its answers would overwrite the references' file
            raise flags.Stop(f"{path}: a model in a directory named teacher; move it to another name")
        answers = model_answers(config, directory, name)
        reviews = [review(k, item, answers.get(item["question"]["question_id"])) for k, item in enumerate(items)]
        write_jsonl(os.path.join(config.out_dir, f"review_{name}.jsonl"), reviews)
        unread = sum(not reference_read_whole(item) for item in items)
        if unread:  # the teacher wrote what the rules do not read: world.py's phrasing changed
            print(f"warning: {unread} reference answers hold a clause the judge cannot read or a claim it finds "
                  "untrue; their reviews say which", file=sys.stderr)
        print_summary(summarize(reviews), path, len(items))

# ----------------------------------------------------------------------------------------------------------------------
# The benchmark: the teacher plays GPT-4, writing questions, context and reference answers from the symbolic scene


def bench_items(directory, n_images):
    """One item per question, image by image ({question: LLaVA question line, reference, scene, context}): `n_images`
    held-out scenes drawn with the world's seed, each asked a conversation question (its type cycling through
    world.CONVERSATION_TYPES), a detailed-description question and a complex-reasoning one."""
    try:
        with open(os.path.join(directory, "world.json")) as f:
            seed = json.load(f)["seed"]
        with open(os.path.join(directory, "scenes.json")) as f:
            held_out = [record for record in json.load(f) if record["split"] == "val"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise flags.Stop(f"--world {directory}: not a world directory world.py wrote ({error})") from None
    rng, chosen = random.Random(f"{seed}:llava_bench"), []
    for index in rng.sample(range(len(held_out)), len(held_out)):
        if len(chosen) == n_images:
            break
        scene = world.scene_from_json(held_out[index])
        kind = world.CONVERSATION_TYPES[len(chosen) % len(world.CONVERSATION_TYPES)]
        conv, reasoning = world.ask(kind, scene, rng), world.ask("reasoning", scene, rng)
        if conv is not None and reasoning is not None:  # a one-object scene has no relative position
            detail = (rng.choice(DETAILED_DESCRIPTION_QUESTIONS), world.description(scene))
            chosen.append((index, scene, [conv[:2], detail, reasoning[:2]]))
    if len(chosen) < n_images:
        raise flags.Stop(f"--images {n_images}: {directory} has only {len(chosen)} held-out images to ask about")
    items = []
    for number, (index, scene, qas) in enumerate(sorted(chosen, key=lambda chosen: chosen[0])):
        image = held_out[index]["image"]
        for category, (question, reference) in zip(CATEGORIES, qas):
            items.append({"question": {"question_id": len(items), "image": image, "text": question,
                                       "category": category},
                          "reference": reference, "scene": scene, "context": context(number, image, scene)})
    return items


def context(number, image, scene):
    """LLaVA-Bench's context line for an image, what GPT-4 was shown of it: captions and instances (each object's
    kind and box, x0 y0 x1 y1 in [0, 1]) as LLaVA-Bench COCO's caps_boxes file has them (eval_gpt_review_visual.py
    reads those), and both as the lines of `caption` (which eval_gpt_review_bench.py reads)."""
    captions = [world.caption(scene), world.description(scene)]
    instances = [{"category": world.phrase(o.size, o.color, o.shape),
                  "bbox": [round(v / world.IMAGE_SIZE, 3) for v in o.box]} for o in scene.objects]
    return {"id": number, "image": image, "captions": captions, "instances": instances,
            "caption": captions + [f"{instance['category']}: {instance['bbox']}" for instance in instances]}


def write_jsonl(path, lines):
    """JSON lines that appear whole or not at all (plus.write_json's)."""
    plus.write_json(path, lines, lines=True)


def write_bench(items, out_dir):
    """questions.jsonl, context.jsonl (one line per image) and answers_teacher.jsonl (the references)."""
    write_jsonl(os.path.join(out_dir, "questions.jsonl"), [item["question"] for item in items])
    write_jsonl(os.path.join(out_dir, "context.jsonl"), list({item["context"]["id"]: item["context"]
                                                              for item in items}.values()))
    write_jsonl(os.path.join(out_dir, "answers_teacher.jsonl"), [
        {"question_id": item["question"]["question_id"], "prompt": item["question"]["text"], "text": item["reference"],
         "answer_id": f"teacher-{item['question']['question_id']}", "model_id": "teacher",
         "category": item["question"]["category"], "metadata": {"category": item["question"]["category"]}}
        for item in items])


def model_answers(config, directory, name):
    """{question_id: answer line}: the model's answers to questions.jsonl, written by evaluate.py's answering of
    LLaVA question files into answers_<name>.jsonl, afresh (a model retrained under the same name is asked again)."""
    path = os.path.join(config.out_dir, f"answers_{name}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    model_flags = {f.name: getattr(config, f.name) for f in dataclasses.fields(ask.ModelFlags)}
    evaluate.answer_question_file(evaluate.EvalConfig(
        **model_flags, questions=os.path.join(config.out_dir, "questions.jsonl"), answers=path,
        image_folder=directory, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        max_bad_fraction=0))
    with open(path, encoding="utf-8") as f:
        return {line["question_id"]: line for line in map(json.loads, f)}

# ----------------------------------------------------------------------------------------------------------------------
# The judge: the facts an answer states, read clause by clause in the world's words and checked against the scene


def alternatives(words):
    """A regex alternation of the words, longest first (so 'in the top left corner' wins over 'on the left')."""
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


CELLS = {(row, col): world.CELL_NAMES[row][col] for row in range(world.GRID) for col in range(world.GRID)}
PLACES = {world.where(row, col): name for (row, col), name in CELLS.items()}  # 'in the top left corner': 'top left'
RELATIONS = {world.relation(SimpleNamespace(row=r, col=c), SimpleNamespace(row=r2, col=c2))
             for r, c in CELLS for r2, c2 in CELLS if (r, c) != (r2, c2)}  # 'above and to the left of', 'below', ...
DIRECTIONS = sorted(relation for relation in RELATIONS if " and " not in relation)
NUMBERS = {word: n for n, word in enumerate(world.NUMBER_WORDS)}  # 'no': 0, 'one': 1, ...
NUMBER = rf"(?:{alternatives(NUMBERS)}|\d+)"
ATTRIBUTE_WORDS = {**{w: "size" for w in world.SIZES}, **{w: "color" for w in world.COLORS},
                   **{w: "shape" for w in world.SHAPES}}
NAME = re.compile(rf"(?:(?P<article>the|a|an) )?(?:(?P<size>{alternatives(world.SIZES)}) )?"
                  rf"(?:(?P<color>{alternatives(world.COLORS)}) )?(?P<shape>{alternatives(world.SHAPES)}|object)s?"
                  rf"(?: (?P<place>{alternatives(PLACES)}))?")
BACKGROUND = re.compile(rf"(.*?) ?\bon (?:a|an) ({alternatives(world.BACKGROUNDS)}) background")


class Ref(NamedTuple):
    """What a name in an answer refers to."""
    obj: object  # the scene's object, or None
    label: str  # the object as the scene has it ('the large red circle at the top'), or the answer's words
    status: str  # "object"; "missing": the scene has no such object; "unclear": several objects fit


class Claim(NamedTuple):
    subject: str  # a Ref's label, "the image" or "the answer"
    attribute: str
    value: object
    true: object  # True, False, or None: about an unclear object, neither right nor wrong
    actual: object = None  # what the scene holds instead, for the explanation


def attributes_of(name):
    return {key: name[key] for key in ("size", "color", "shape") if name[key] and name[key] != "object"}


def label(o):
    return f"the {world.phrase(o.size, o.color, o.shape)} {world.where(o.row, o.col)}"


def pick(found, words):
    if len(found) == 1:
        return Ref(found[0], label(found[0]), "object")
    return Ref(None, f"'{words}' ({'no such object' if not found else f'{len(found)} objects fit'})",
               "missing" if not found else "unclear")


def about(refs, attribute, value, read):
    """A claim about one object (or a pair: its attribute names the second); read(*objects) is the scene's value."""
    subject, attribute = refs[0].label, " ".join([attribute] + [ref.label for ref in refs[1:]])
    if all(ref.status == "object" for ref in refs):
        actual = read(*(ref.obj for ref in refs))
        return Claim(subject, attribute, value, actual == value, actual)
    return Claim(subject, attribute, value, False if any(ref.status == "missing" for ref in refs) else None)


def resolve(words, scene, subjects):
    """(Ref, the claims the name itself makes) of a name, or (None, []) if it is none. 'it': the last subject; 'the
    object below X': the one object that way of X; a name with a place ('a large red circle at the top'): the object
    there, each attribute it is given a claim; a name without ('the small circle'): the one object it fits, its
    attributes claims only when none does (an object the scene does not have)."""
    if words == "it":
        return (subjects[-1] if subjects else Ref(None, "'it'", "unclear")), []
    match = re.fullmatch(rf"the object ({alternatives(DIRECTIONS)}) (.+)", words)
    if match:
        anchor, claims = resolve(match[2], scene, subjects)
        if anchor is None or anchor.status != "object":
            return (None, []) if anchor is None else (Ref(None, f"'{words}'", anchor.status), claims)
        return pick([o for o in scene.objects if o is not anchor.obj and match[1] in
                     world.relation(o, anchor.obj).split(" and ")], words), claims
    name = NAME.fullmatch(words)
    if not name:
        return None, []
    attributes = attributes_of(name)
    if name["place"]:
        here = [o for o in scene.objects if CELLS[o.row, o.col] == PLACES[name["place"]]]
        ref = pick(here, words) if here else Ref(None, f"'{words}' ({PLACES[name['place']]} is empty)", "missing")
        return ref, [about([ref], key, value, lambda o, key=key: getattr(o, key)) for key, value in attributes.items()]
    ref = pick([o for o in scene.objects if all(getattr(o, k) == v for k, v in attributes.items())], words)
    return ref, [about([ref], key, value, lambda o: None) for key, value in attributes.items()] \
        if ref.status == "missing" else []


def count_claim(scene, attributes, claimed, besides=None):
    """'there are two circles' (claimed 2), 'there is a circle' ('at least one'), 'no other red objects' (besides:
    the subject named before)."""
    n = world.count(scene, **attributes)
    if besides is not None and besides.obj is not None:
        n -= all(getattr(besides.obj, k) == v for k, v in attributes.items())
    noun = world.phrase(**attributes) + "s" + (f" besides {besides.label}" if besides else "")
    true = None if besides is not None and besides.status == "unclear" else \
        n >= 1 if claimed == "at least one" else n == claimed
    return Claim("the image", f"number of {noun}", claimed, true, n)


def predicate_claims(ref, predicate, scene, subjects):
    """The claims of '<ref> is <predicate>', or None when the predicate is not one the judge reads."""
    if predicate in PLACES:
        return [about([ref], "place", PLACES[predicate], lambda o: CELLS[o.row, o.col])]
    match = re.fullmatch(r"(bigger|smaller) than (.+)", predicate) or \
        re.fullmatch(rf"({alternatives(RELATIONS)}) (.+)", predicate)
    if match:
        other, claims = resolve(match[2], scene, subjects)
        if other is None:
            return None
        attribute, read = ("relative to", world.relation) if match[1] in RELATIONS else ("size next to", size_next_to)
        return claims + [about([ref, other], attribute, match[1], read)]
    words = predicate.split()
    words = words[1:] if words and words[0] in ("a", "an") else words
    kinds = [ATTRIBUTE_WORDS.get(word) for word in words]
    if not words or None in kinds or len(set(kinds)) < len(kinds):
        return None
    return [about([ref], kind, word, lambda o, kind=kind: getattr(o, kind)) for kind, word in zip(kinds, words)]


def number_value(word):
    return NUMBERS[word] if word in NUMBERS else int(word)


def size_next_to(a, b):
    return "bigger" if world.SIZES[a.size] > world.SIZES[b.size] else \
        "smaller" if world.SIZES[a.size] < world.SIZES[b.size] else "the same size"


def read_clause(clause, scene, subjects, yes):
    """The claims of one clause (lowercase, no punctuation), or None when the judge cannot read it. subjects: the
    objects the clauses before were about, for 'it' and 'they'; yes: the question's answer if it is a yes/no one."""
    claims, background = [], BACKGROUND.fullmatch(clause)
    if background:  # '... on a gray background'
        claims.append(Claim("the image", "background", background[2], background[2] == scene.background,
                            scene.background))
        clause = background[1]
        if not clause:
            return claims
    for reader in (image_clause, count_clause, pair_clause, statement_clause):
        found = reader(clause, scene, subjects, yes)
        if found is not None:
            return claims + found
    return None


def image_clause(clause, scene, subjects, yes):
    """'yes', 'no', 'the background is gray', 'the image shows three objects', 'there is nothing red'."""
    if clause in ("yes", "no"):
        return [Claim("the answer", "yes or no", clause, yes and clause == yes, yes)]
    match = re.fullmatch(rf"the background is ({alternatives(world.BACKGROUNDS)})", clause)
    if match:
        return [Claim("the image", "background", match[1], match[1] == scene.background, scene.background)]
    match = re.fullmatch(rf"(?:the|this) (?:image|picture|drawing) shows ({NUMBER}) objects?", clause)
    if match:
        return [count_claim(scene, {}, number_value(match[1]))]
    match = re.fullmatch(rf"there is (something|nothing) ({alternatives(world.COLORS)})", clause)
    if match:
        return [count_claim(scene, {"color": match[2]}, "at least one" if match[1] == "something" else 0)]
    return None


def count_clause(clause, scene, subjects, yes):
    """'there are two circles', 'there is a circle', 'there are no other red objects' (other than the subject
    before), and a list going on: '(there is one circle,) two squares'."""
    match = re.fullmatch(rf"(?:there (?:is|are) )?({NUMBER}|a|an) (other )?(.+)", clause)
    name = match and NAME.fullmatch(match[3])
    if not name or name["article"] or name["place"]:
        return None
    besides = (subjects[-1] if subjects else Ref(None, "'other'", "unclear")) if match[2] else None
    claimed = "at least one" if match[1] in ("a", "an") else number_value(match[1])
    return [count_claim(scene, attributes_of(name), claimed, besides)]


def pair_clause(clause, scene, subjects, yes):
    """'they are the same size', 'they are (not) the same color': the last two objects the clauses were about."""
    match = re.fullmatch(r"they are (not )?the same (color|size)", clause)
    pair = list(dict.fromkeys(subjects))[-2:]
    if not match or len(pair) < 2 or (match[1] and match[2] == "size"):
        return None
    if match[2] == "size":
        return [about(pair, "size next to", "the same size", size_next_to)]
    return [about(pair, "same color as", "no" if match[1] else "yes",
                  lambda a, b: "yes" if a.color == b.color else "no")]


def statement_clause(clause, scene, subjects, yes):
    """'<name> is <predicate>' ('the small circle is green'), and a name with its place, alone or after 'there is'
    (as captions list objects: 'a large red circle in the top left corner'), or with 'is' ('a large red circle is at
    the top'): the object at that place, each attribute it is given a claim."""
    subject, is_, predicate = clause.partition(" is ")
    if is_ and re.match(r"an? ", subject) and predicate in PLACES:
        subject, is_ = f"{subject} {predicate}", ""
    if not is_:
        name = NAME.fullmatch(re.sub(r"^there (?:is|are) (?=an? )", "", subject))
        if not name or not name["place"]:
            return None
        subject = name[0]
    ref, claims = resolve(subject, scene, subjects)
    if ref is None:
        return None
    subjects.append(ref)
    said = predicate_claims(ref, predicate, scene, subjects) if is_ else []
    return None if said is None else claims + said


def yes_or_no(question, scene):
    """'yes' or 'no', as the scene answers a yes/no question of the world; None for any other question."""
    question = question.lower().strip().rstrip("?")
    match = re.fullmatch(r"is there (.+) in the (?:image|picture|drawing)", question)
    if match and NAME.fullmatch(match[1]):
        return "yes" if world.count(scene, **attributes_of(NAME.fullmatch(match[1]))) else "no"
    match = re.fullmatch(rf"is anything ({alternatives(world.COLORS)})", question)
    if match:
        return "yes" if world.count(scene, color=match[1]) else "no"
    match = re.fullmatch(r"is (.+) bigger than (.+)|are (.+) and (.+) the same color", question)
    if not match:
        return None
    a, b = (resolve(words, scene, [])[0] for words in (match[1] or match[3], match[2] or match[4]))
    if a is None or b is None or a.status != "object" or b.status != "object":
        return None
    same = a.obj.color == b.obj.color if match[3] else size_next_to(a.obj, b.obj) == "bigger"
    return "yes" if same else "no"


def clauses(text):
    """An answer cut into clauses, lowercase: at sentence ends, commas, and 'and'/'so' before a new subject."""
    parts = []
    for sentence in re.split(r"[.!?]+", " ".join(text.lower().split())):
        for part in re.split(rf",\s*|\s+(?=(?:and|so)\s+(?:the|a|an|there|it|they|yes|{NUMBER})\b)", sentence):
            part = re.sub(r"^(?:and|so)\s+", "", part.strip())
            if part:
                parts.append(part)
    return parts


def reference_read_whole(item):
    """Whether the judge reads every clause of an item's reference and finds each of its claims true."""
    claims, unread = read_answer(item["reference"], item["scene"], item["question"]["text"])
    return not unread and all(claim.true for claim in claims)


def read_answer(text, scene, question):
    """(the claims an answer states, the clauses the judge could not read)."""
    yes, subjects, claims, unread = yes_or_no(question, scene), [], [], []
    for clause in clauses(text):
        found = read_clause(clause, scene, subjects, yes)
        if found is None:
            unread.append(clause)
        else:
            claims += [claim for claim in found if claim[:3] not in [known[:3] for known in claims]]
    return claims, unread


def score(facts, claims):
    """(1-10, right, missing, wrong) of an answer's claims against the facts asked for (the reference's claims):
    1 if it states nothing the judge reads; else 2 + 8 x right / (asked + wrong), rounded half up."""
    stated = {claim[:3] for claim in claims}
    right = [fact for fact in facts if fact[:3] in stated]
    missing = [fact for fact in facts if fact[:3] not in stated]
    wrong = [claim for claim in claims if claim.true is False]
    if not claims:
        return 1, right, missing, wrong
    if not facts and not wrong:
        return 10, right, missing, wrong
    return math.floor(2 + 8 * len(right) / (len(facts) + len(wrong)) + 0.5), right, missing, wrong


def said(claim):
    value = f"{claim.attribute} {claim.value}"
    return f"{claim.subject}: {value}" + (f" (the scene: {claim.actual})" if claim.true is False and
                                          claim.actual is not None else "")


def explain(who, result, facts, unread, claims):
    """One paragraph of the review: what the answer got right, missed and claimed wrongly, and its score's sum."""
    points, right, missing, wrong = result
    if not claims:
        return f"{who} states nothing about the scene that the rules read" + (
            f" (not read: {'; '.join(unread)})" if unread else " (an empty answer)") + f". Score {points}."
    parts = [f"{who} states {len(right)} of the {len(facts)} facts asked for" +
             (f" ({'; '.join(map(said, right))})" if right else "")]
    if missing:
        parts.append(f"misses {'; '.join(map(said, missing))}")
    parts.append(f"claims {len(wrong)} thing{'s' * (len(wrong) != 1)} the scene does not hold" +
                 (f" ({'; '.join(map(said, wrong))})" if wrong else ""))
    unclear = [claim for claim in claims if claim.true is None]
    if unclear:
        parts.append(f"says what it cannot tell apart ({'; '.join(map(said, unclear))})")
    if unread:
        parts.append(f"says what the rules do not read ({'; '.join(unread)})")
    sum_ = f"2 + 8 x {len(right)} / ({len(facts)} + {len(wrong)})" if facts or wrong else "nothing asked, nothing wrong"
    return "; ".join(parts) + f". Score {points} ({sum_})."


def judge(scene, question, reference, answer):
    """(reference's score, answer's score, the review's content): 's1 s2' on the first line, as GPT-4 writes it, then
    why. The facts asked for are those the reference states (the teacher's answer, from the scene)."""
    facts, reference_unread = read_answer(reference, scene, question)
    claims, unread = read_answer(answer, scene, question)
    first, second = score(facts, facts), score(facts, claims)
    content = f"{first[0]} {second[0]}\n" + explain("Assistant 1 (the reference)", first, facts, reference_unread,
                                                     facts) + "\n" + explain("Assistant 2", second, facts, unread,
                                                                             claims)
    return first[0], second[0], content

# ----------------------------------------------------------------------------------------------------------------------
# Reviews and the summary, as LLaVA's eval_gpt_review_bench.py writes them and summarize_gpt_review.py reads them


def review(number, item, answer):
    """The review line of one question (number: its 0-based place): the model's answer (None: not answered, judged
    as empty) against the reference."""
    question = item["question"]
    s1, s2, content = judge(item["scene"], question["text"], item["reference"], answer["text"] if answer else "")
    return {"id": number + 1, "question_id": question["question_id"],
            "answer1_id": f"teacher-{question['question_id']}",
            "answer2_id": answer["answer_id"] if answer else None, "category": f"llava_bench_{question['category']}",
            "content": content, "tuple": [float(s1), float(s2)]}


def summarize(reviews):
    """{category (and 'all'): (mean reference, mean model, relative)} as summarize_gpt_review.py computes it: the
    tuples' means per category ([-1, -1] included), each rounded to 3 decimals, then model / reference x 100 to 1."""
    scores = defaultdict(list)
    for line in reviews:
        scores[line["category"]].append(line["tuple"])
        scores["all"].append(line["tuple"])
    summary = {}
    for category, tuples in sorted(scores.items()):
        reference, model = [round(x, 3) for x in np.asarray(tuples).mean(0).tolist()]
        summary[category.removeprefix("llava_bench_")] = (reference, model, round(model / reference * 100, 1))
    return summary


def print_summary(summary, path, n_questions):
    counts = n_questions // len(CATEGORIES)
    print(f"LLaVA-Bench (shapes world): {n_questions} questions about {counts} held-out images, {path} against the "
          "teacher, judged by rules")
    print(f"{'category':<10} {'reference':>10} {'model':>8} {'relative':>9}")
    for category in (*CATEGORIES, "all"):
        if category in summary:
            reference, model, relative = summary[category]
            print(f"{category:<10} {reference:>10.3f} {model:>8.3f} {relative:>9.1f}")
    print(f"relative score: {summary['all'][2]:.1f}")


if __name__ == "__main__":
    main()
