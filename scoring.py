"""
Scoring LLaVA's answer files by each benchmark's own rule, so that a figure here can stand beside a published one.
The rules are those of LLaVA's scripts (llava/eval/ and scripts/ of haotian-liu/LLaVA), quirks included:

    choice  ScienceQA, eval_science_qa.py: only the problems of one split (pid_splits.json's test); the letter is the
            answer itself if it is A-E, its first character if it starts "X. ", else X of the one match of
            'The answer is X.' (the dot matching any character: "The answer is A because" reads A); anything else,
            and a missing answer, counts wrong; IMG-Accuracy over the answers whose prompt holds <image>
    short   GQA, convert_gqa_for_eval.py then GQA's exact match: text.rstrip('.').lower() == the answer, over the
            balanced questions
    pope    eval_pope.py: the first sentence, commas dropped, words split on single spaces; No, no or not among them
            means no; accuracy, precision, recall, F1 and yes-ratio per category, and their mean over the categories
            (papers quote the mean F1)
    vqa     VQAv2 / TextVQA, m4c_evaluator.py: answers normalized (punctuation, articles, number words, contractions);
            a prediction scores min(1, humans agreeing / 3) averaged over the ten leave-one-out subsets of the humans

Where a damaged answer file makes those scripts score silently wrong (or crash), these say so and do the right thing:
a repeated question id is refused (LLaVA: ScienceQA and GQA keep the last line, POPE pairs both with labels); answers
are paired with POPE's labels by question id, not by line order (LLaVA pairs the n-th answer of a category with its
n-th label, so chunks concatenated out of order are scored against other questions' labels); a label file whose
length differs from its category's questions is refused (LLaVA zips, dropping the excess); a question without an
answer is counted wrong for ScienceQA and GQA (GQA's eval.py stops with a KeyError) and named for POPE and VQA (whose
scripts score only what was answered); an answer whose question id is not in the key is refused.
"""
import json
import os
import re
import sys
from collections import Counter, defaultdict

import flags

OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
CONTRACTIONS = {  # m4c_evaluator.py's EvalAIAnswerProcessor: an answer word written without its apostrophe...
    w.replace("'", ""): w for w in
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's isn't "
    "it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've shouldn't "
    "somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd there're there's "
    "they'd they'll they're they've wasn't we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're "
    "you've".split()}
CONTRACTIONS |= {  # ... and the two-apostrophe forms with one of theirs (and its one backwards entry, somebody'd)
    f"{a}{b}'{c}" if k else f"{a}'{b}{c}": f"{a}'{b}'{c}" for a, b, c in
    [("couldn", "t", "ve"), ("hadn", "t", "ve"), ("he", "d", "ve"), ("it", "d", "ve"), ("mightn", "t", "ve"),
     ("she", "d", "ve"), ("shouldn", "t", "ve"), ("somebody", "d", "ve"), ("someone", "d", "ve"),
     ("something", "d", "ve"), ("there", "d", "ve"), ("they", "d", "ve"), ("we", "d", "ve"), ("who", "d", "ve"),
     ("wouldn", "t", "ve"), ("y", "all", "ll"), ("y", "all", "d've"), ("you", "d", "ve")] for k in (0, 1)}
CONTRACTIONS |= {"y'all'dve": "y'all'd've", "somebody'd": "somebodyd", "twas": "'twas", "ow's'at": "'ow's'at",
                 "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"


def choice_letter(text):
    """ScienceQA's letter (eval_science_qa.py), or None: FAILED, counted wrong."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)  # the dot unescaped, as there
    return found[0] if len(found) == 1 else None


def short_answer(text):
    """GQA's prediction (convert_gqa_for_eval.py): every trailing period removed, then lowercase; no other change."""
    return text.rstrip(".").lower()


def yes_or_no(text):
    """POPE's reading (eval_pope.py): the first sentence, commas dropped, split on single spaces."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def vqa_normalize(answer):
    """An answer as m4c_evaluator.py compares it: lowercase, commas, question marks and the ends' spaces gone,
    punctuation removed (next to a space) or made a space, periods not before a digit removed (its first 32: the
    count re.sub was handed there), number words as digits, no articles, contractions given their apostrophe."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for mark in PUNCTUATION:
        text = text.replace(mark, "" if mark + " " in spaced or " " + mark in spaced else " ")
    text = re.sub(r"\.(?!\d)", "", text, count=32)
    words = [NUMBERS.get(word, word) for word in text.split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ("a", "an", "the"))


def vqa_accuracy(prediction, human_answers):
    """VQA accuracy: min(1, matching humans / 3), averaged over the subsets that leave one human out."""
    humans, predicted = [vqa_normalize(a) for a in human_answers], vqa_normalize(prediction)
    matches = sum(human == predicted for human in humans)
    return sum(min(1.0, (matches - (human == predicted)) / 3) for human in humans) / len(humans)


def read_text(path, flag):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as error:
        raise flags.Stop(f"{flag} {path}: {error.strerror}") from None


def read_answers(path):
    """({question_id: answer line}, the ids in the file's order) of an answer file; a repeated id is refused."""
    answers, lines = {}, {}
    for number, line in enumerate(read_text(path, "--answers").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["question_id"]
            if not isinstance(record["text"], str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise flags.Stop(f"--answers {path}:{number}: not an answer line {{question_id, text, ...}}") from None
        if key in answers:
            raise flags.Stop(f"--answers {path}:{number}: question_id {key!r} again (first at line {lines[key]}); "
                             "LLaVA's scripts would score one of them or misalign the rest: remove the repeat")
        answers[key], lines[key] = record, number
    if not answers:
        raise flags.Stop(f"--answers {path}: no answer lines to score")
    return answers, list(answers)


def read_key(kind, path, questions=None, split="test"):
    """({question_id: (answer, category or None)}, the ids the file holds but leaves out of the score). The answer
    key is JSON lines {question_id, answer, label or answers[, category]}, or one of the benchmarks' own files:
    ScienceQA's problems.json (the problems of --split of pid_splits.json beside it, the answer an index, by
    subject), GQA's questions file (its balanced questions), TextVQA's annotation file ({"data": [...]}), VQAv2's
    ({"annotations": [...]}), or POPE's annotation directory (read_pope_key)."""
    if os.path.isdir(path):
        if kind != "pope":
            raise flags.Stop(f"--truth {path}: a directory is read only as POPE's annotation directory (--score pope)")
        return read_pope_key(path, questions), set()
    content = read_text(path, "--truth")
    try:
        try:
            whole = json.loads(content)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, dict) and "question_id" not in whole:
            return read_benchmark_key(path, whole, split)
        key = {}
        for line in filter(str.strip, content.splitlines()):
            record = json.loads(line)
            answer = next(record[name] for name in ("answer", "label", "answers") if name in record)
            key[record["question_id"]] = (answer, record.get("category"))
        return key, set()
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, StopIteration) as error:
        raise flags.Stop(f"--truth {path}: not an answer key ({type(error).__name__}: {error})") from None


def read_benchmark_key(path, whole, split):
    """read_key for a benchmark's own file, a JSON object."""
    if "data" in whole or "annotations" in whole:  # TextVQA's, VQAv2's
        return {a["question_id"]: ([h["answer"] if isinstance(h, dict) else h for h in a["answers"]], None)
                for a in whole.get("data", whole.get("annotations"))}, set()
    if all(isinstance(v.get("answer"), int) and "choices" in v for v in whole.values()):  # ScienceQA's problems.json
        splits = os.path.join(os.path.dirname(path), "pid_splits.json")
        try:
            with open(splits, encoding="utf-8") as f:
                kept = set(json.load(f)[split])
        except OSError:
            raise flags.Stop(f"--truth {path}: ScienceQA's pid_splits.json is not beside it (eval_science_qa.py "
                             f"scores only the problems of the split it names)") from None
        except KeyError:
            raise flags.Stop(f"--split {split}: not a split of {splits}") from None
        return ({k: (OPTIONS[v["answer"]], v.get("subject")) for k, v in whole.items() if k in kept},
                set(whole) - kept)
    balanced = {k for k, v in whole.items() if v.get("isBalanced", True)}  # GQA's questions file
    return {k: (whole[k]["answer"], None) for k in balanced}, set(whole) - balanced


def read_pope_key(directory, questions):
    """POPE's key as eval_pope.py reads it: coco_pope_{category}.json holds one label line per question of that
    category, in the order of the question file (whose question ids are unique; the label files' are not)."""
    if not questions:
        raise flags.Stop(f"--truth {directory}: a POPE annotation directory needs --questions (the question file "
                         "llava_pope_test.jsonl), whose categories and order pair each question with its label")
    order = defaultdict(list)  # category -> question ids, in the question file's order
    for number, line in enumerate(read_text(questions, "--questions").splitlines(), 1):
        try:
            if line.strip():
                record = json.loads(line)
                order[record["category"]].append(record["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise flags.Stop(f"--questions {questions}:{number}: not a POPE question line") from None
    key = {}
    for category, ids in order.items():
        path = os.path.join(directory, f"coco_pope_{category}.json")
        try:
            with open(path, encoding="utf-8") as f:
                labels = [json.loads(line)["label"] for line in filter(str.strip, f)]
        except OSError as error:
            raise flags.Stop(f"--truth {path}: {error.strerror} (category {category!r} of --questions)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise flags.Stop(f"--truth {path}: not a POPE label file ({type(error).__name__}: {error})") from None
        if len(labels) != len(ids):
            raise flags.Stop(f"--truth {path}: {len(labels)} labels for the {len(ids)} {category!r} questions of "
                             f"--questions {questions}")
        key.update({k: (label, category) for k, label in zip(ids, labels)})
    return key


def score(kind, answers_path, truth_path, out=None, questions=None, split="test"):
    """Score an answer file by the rule of `kind` (choice, short, pope, vqa): a table per category, the share of
    answers in the asked format, and what was not scored; returns the headline figures, {name: value}."""
    out = out or sys.stdout
    key, left_out = read_key(kind, truth_path, questions, split)
    answers, order = read_answers(answers_path)
    unknown = [k for k in answers if k not in key and k not in left_out]
    if unknown:
        raise flags.Stop(f"--answers {answers_path}: {len(unknown)} question ids are not in --truth {truth_path}, "
                         f"e.g. {unknown[0]!r}")
    ignored, missing = sum(k in left_out for k in answers), [k for k in key if k not in answers]
    if ignored:
        print(f"{ignored} answers are to questions the key leaves out (not in ScienceQA's {split} split, or not "
              f"one of GQA's balanced questions): not scored, as LLaVA's scripts do", file=out)
    if missing:
        counted = "counted wrong" if kind in ("choice", "short") else "left out, as LLaVA's script does"
        print(f"{len(missing)} questions of the key have no answer ({counted}), e.g. {missing[0]!r}", file=out)
    scored = {k: r for k, r in answers.items() if k in key}
    if kind == "pope":
        figures = score_pope(key, scored, order, out)
    else:
        figures = score_accuracy(kind, key, scored, out)
    print(format_compliance(kind, key, scored), file=out)
    return figures


def score_accuracy(kind, key, answers, out):
    """ScienceQA, GQA or VQA accuracy per category; the key's questions without an answer count wrong (choice,
    short: they score its text 'FAILED', as eval_science_qa.py) or are left out (vqa)."""
    groups, failed = defaultdict(list), Counter()  # category -> [(score, is the prompt multimodal)]; FAILED letters
    for question_id, (right, category) in key.items():
        if kind == "vqa" and question_id not in answers:
            continue
        record = answers.get(question_id, {"text": "FAILED", "prompt": "Unknown"})
        category = category or record.get("metadata", {}).get("category") or "all"
        if kind == "choice":
            letter = choice_letter(record["text"])
            failed[category] += letter is None
            value = float(letter == right)
        elif kind == "short":
            value = float(short_answer(record["text"]) == right)
        else:
            if not isinstance(right, list):
                raise flags.Stop(f"--score vqa needs each question's human answers, a list (ten in VQAv2 and "
                                 f"TextVQA); question {question_id!r} has {right!r}: --score short scores one answer")
            value = vqa_accuracy(record["text"], [h["answer"] if isinstance(h, dict) else h for h in right])
        groups[category].append((value, "<image>" in record.get("prompt", "")))
    if not groups:
        raise flags.Stop("no answer to a question of the key")
    groups = dict(sorted(groups.items())) | {"overall": [pair for pairs in groups.values() for pair in pairs]}
    failed["overall"] = sum(failed.values())
    print(f"{'category':<20} {'right':>8} {'n':>6} {'accuracy':>9}" + ("  failed" if kind == "choice" else ""),
          file=out)
    for category, pairs in groups.items():
        right = sum(value for value, _ in pairs)
        print(f"{category:<20} {right:>8.{1 if kind == 'vqa' else 0}f} {len(pairs):>6} {right / len(pairs):>9.4f}"
              + (f"  {failed[category]:>6}" if kind == "choice" else ""), file=out)
    overall = groups["overall"]
    figures = {"accuracy": sum(value for value, _ in overall) / len(overall)}
    multimodal = [value for value, has_image in overall if has_image]
    if kind == "choice" and multimodal:  # eval_science_qa.py's IMG-Accuracy, the SQA-IMG figure LLaVA publishes
        figures["IMG-accuracy"] = sum(multimodal) / len(multimodal)
        print(f"IMG: {sum(multimodal):.0f} of the {len(multimodal)} answers whose prompt holds <image> are right",
              file=out)
    return figures


def score_pope(key, answers, order, out):
    """POPE per category: accuracy, precision, recall, F1 and the share of yes answers, then their mean over the
    categories. Paired by question id; a category whose answers are out of the question file's order is named,
    since eval_pope.py would pair them with other questions' labels."""
    groups, position = defaultdict(list), {k: n for n, k in enumerate(key)}
    for question_id in order:
        if question_id in answers:
            groups[key[question_id][1] or "all"].append((yes_or_no(answers[question_id]["text"]),
                                                         "no" if key[question_id][0] == "no" else "yes", question_id))
    print(f"{'category':<14} {'n':>6} {'accuracy':>9} {'precision':>10} {'recall':>8} {'F1':>8} {'yes':>8}", file=out)
    rows = []
    for category, triples in sorted(groups.items()):
        places = [position[question_id] for _, _, question_id in triples]
        if places != sorted(places):
            print(f"note: the {category!r} answers are not in the question file's order; scored by question id "
                  "(eval_pope.py would pair them with other questions' labels)", file=out)
        tp = sum(p == t == "yes" for p, t, _ in triples)
        precision = tp / max(1, sum(p == "yes" for p, _, _ in triples))
        recall = tp / max(1, sum(t == "yes" for _, t, _ in triples))
        rows.append((category, len(triples), sum(p == t for p, t, _ in triples) / len(triples), precision, recall,
                     2 * precision * recall / max(1e-12, precision + recall),
                     sum(p == "yes" for p, _, _ in triples) / len(triples)))
    if len(rows) > 1:  # the figure papers quote: the mean over the categories (random, popular, adversarial)
        rows.append(("mean", sum(row[1] for row in rows), *(sum(col) / len(rows) for col in list(zip(*rows))[2:])))
    for category, n, *values in rows:
        print(f"{category:<14} {n:>6} " + " ".join(f"{v:>{w}.4f}" for v, w in zip(values, (9, 10, 8, 8, 8))), file=out)
    return {"accuracy": rows[-1][2], "F1": rows[-1][5]}


def format_compliance(kind, key, answers):
    """The share of answers in the response format the prompt asked for, right or wrong: a word or phrase among the
    key's answers (short), a bare letter (choice), yes or no first (pope), a single word or phrase (vqa)."""
    texts = [record["text"] for record in answers.values()]
    if kind == "short":
        vocabulary = {right for right, _ in key.values()}
        n, what = sum(short_answer(text) in vocabulary for text in texts), "a word or phrase among the key's answers"
    elif kind == "choice":
        n, what = sum(text.strip() in OPTIONS for text in texts), "a bare letter"
    elif kind == "pope":
        n = sum(text.split(".")[0].replace(",", " ").split()[:1] in (["Yes"], ["No"], ["yes"], ["no"])
                for text in texts)
        what = "yes or no first"
    else:
        n, what = sum(len(vqa_normalize(text).split()) <= 3 for text in texts), "three words or fewer"
    return f"format: {n} of {len(texts)} answers ({n / max(1, len(texts)):.1%}) are {what}"
