"""
The papers' ablations in miniature, by one command: each row an ordinary run of train.py with flags a user could type,
scored by evaluate.py or llava_bench.py; this script only orchestrates them and tabulates what they print.

    python ablations.py                      # every table into docs/ablations.md (and docs/ablations_sqa.png)
    python ablations.py --tables format      # one table: LLaVA-1.5's response-format prompt
    python ablations.py --seeds 3 --jobs 2   # every stage-2 row with seeds 0, 1, 2; two runs side by side

The tables (the papers' figures beside ours):
    data    LLaVA Table 4: stage 2 on the world's conversations only, on its detailed descriptions and complex
            reasoning only, on all three (LLaVA-Instruct-158K's kinds), and no instruction tuning (stage 1 alone);
            LLaVA-Bench's relative score per category (llava_bench.py)
    format  LLaVA-1.5's response-format prompt: stage 2 on the world's data (the default), and on the same with the
            short-answer records' "Answer the question using a single word or phrase." taken out; shapes-VQA and the
            full-sentence eval
    sqa     LLaVA Table 7 on shapes-SQA: the penultimate layer (the default) against the last, no stage 1, and the
            answer's order (reasoning first against answer first) as accuracy against the step

Every run writes into --out_dir/<row> (ckpt.pt, log.jsonl, what its commands printed); each command is printed as it
starts. A row that finished before with the same commands, world and bases is read back, not run again (--fresh
runs it again); one that was interrupted runs again from its start. Runs go --jobs at a time, each with its share
of the CPU threads.
"""
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import evaluate
import flags
import plus
import runtime
import weights
import world
from tinyllava import REPO_DIR as REPO, fingerprint

USAGE = "python ablations.py [--tables data format sqa] [--seeds N] [--data_seeds N] [--jobs N] [--out_dir DIR]"
PY = sys.executable
TABLES = ("data", "format", "sqa")
RUNNING = set()  # the commands running now (subprocess.Popen), ended with this script
CATEGORIES = ("conv", "detail", "complex", "all")  # LLaVA-Bench's, then all questions
INSTRUCT_KINDS = ("conversation", "description+reasoning", "conversation+description+reasoning")  # Table 4's data


@dataclass
class AblationsConfig:
    # what runs: the tables, and how many seeds of each stage-2 row
    tables: list[str] = field(default_factory=lambda: list(TABLES))  # which tables (data, format, sqa); see above
    seeds: int = 1  # seeds of each stage-2 row (0, 1, ...): its figures' mean and range (stage 1 is seed 0's)
    data_seeds: int = 3  # seeds of LLaVA Table 4's rows, whose differences are small (one seed: 0.4 to 5 points)
    steps: int = 300  # stage 2's optimizer steps in every row but the answer-order ones (the default's 300)
    order_every: int = 100  # the answer-order runs: scored after this many steps, 4 times (docs/evaluation.md: 400)
    stage1_steps: int = 0  # stage 1's optimizer steps (0: its epoch, as the default recipe; fewer for a quick look)
    # where and how
    out_dir: str = "out/ablations"  # the runs' directories, one per row
    docs: str = ""  # where ablations.md and ablations_sqa.png are written ("": docs/ with the default --out_dir,
                    # else --out_dir itself, so that a run elsewhere never replaces docs/'s tables)
    jobs: int = 2  # runs side by side (each with os.cpu_count() // jobs threads, at least 1)
    fresh: bool = False  # run every row again, even one that finished before with the same commands


class Run(NamedTuple):
    """A row's work: commands run in order after the runs named in `after`, and how to read their outputs."""
    commands: list  # [argv], the first trains (or writes a world), the rest evaluate
    after: tuple = ()  # runs that must have finished first
    read: tuple = ()  # (command index, kind) pairs: which outputs hold figures, read by read_figures


def main(argv=None):
    with flags.one_line_errors("ablations.py", expected=(OSError,)):  # a file it cannot write or read, named
        given = flags.command_line(AblationsConfig, argv, "ablations.py", USAGE, __doc__)
        if given is None:  # --help
            return
        config = AblationsConfig(**given)
        config.docs = docs_directory(config)
        flags.at_least(config, 1, "seeds", "data_seeds", "steps", "jobs", "order_every")
        flags.at_least(config, 0, "stage1_steps")
        unknown = set(config.tables) - set(TABLES)
        if unknown:
            raise flags.Stop(f"--tables: no table {', '.join(sorted(unknown))} (the tables: {', '.join(TABLES)})")
        stop_on_sigterm()
        started, directory = time.time(), str(world.ensure_world())
        write_data(directory, config.out_dir)
        inputs = {"world": directory, "bases": {name: fingerprint(os.path.join(REPO, "bases", name))
                                                for name in ("clip", "llama")}}  # what every row reads besides
        figures, ran = run_all(plan(config, directory, config.tables), config, inputs)
        for name, run in plan(config, directory, TABLES).items():  # the other tables' rows, where they finished
            if name not in figures:  # (on a run that did not run again since)
                figures[name] = None if ran & set(run.after) else read_back(name, run, config, inputs)
        write_docs(config, directory, figures, ran, time.time() - started)


def docs_directory(config):
    """--docs, or docs/ for the default --out_dir, or --out_dir itself: a run elsewhere never replaces docs/."""
    return config.docs or ("docs" if config.out_dir == AblationsConfig.out_dir else config.out_dir)

# ----------------------------------------------------------------------------------------------------------------------
# The rows: which runs each table needs, as the commands a user would type


def plan(config, directory, tables):
    """{run name: Run} of the tables' rows and the runs they start from, each once."""
    out = config.out_dir

    def train(name, *flags_, seed=0):
        return [PY, "train.py", *flags_, "--seed", str(seed), "--out_dir", f"{out}/{name}", "--overwrite"]

    def answered(name, world_dir, bench, score, answers=""):  # answer a benchmark's questions, then score them
        answers = answers or f"{out}/{name}/{bench}_answers.jsonl"
        return [[PY, "evaluate.py", "--ckpt", f"{out}/{name}", "--questions", f"{world_dir}/shapes_{bench}.jsonl",
                 "--answers", answers, "--image_folder", world_dir],
                [PY, "evaluate.py", "--score", score, "--answers", answers, "--truth",
                 f"{world_dir}/shapes_{bench}_truth.jsonl"]]

    def llava_bench(name, *extra):
        return [PY, "llava_bench.py", "--ckpt", f"{out}/{name}", "--out_dir", f"{out}/{name}/llava_bench", *extra]

    def sentence(name):  # the world's held-out questions, answered in full sentences
        return [PY, "evaluate.py", "--ckpt", f"{out}/{name}"]
    stage1 = ("--stage", "1") + (("--max_steps", str(config.stage1_steps)) if config.stage1_steps else ())
    runs = {"stage1": Run([train("stage1", *stage1)])}
    stage2 = ("--stage", "2", "--init", f"{out}/stage1", "--max_steps", str(config.steps))
    world_data = lambda path: ("--data_path", path, "--image_folder", directory)
    for seed in range(config.data_seeds if "data" in tables else 0):
        for kinds in INSTRUCT_KINDS:
            name = f"data_{kinds.replace('+', '_')}_s{seed}"
            runs[name] = Run([train(name, *stage2, *world_data(f"{out}/data/{kinds}.json"), seed=seed),
                              llava_bench(name)], ("stage1",), ((1, "llava_bench"),))
    for seed in range(config.seeds):
        if "format" in tables or "sqa" in tables:  # the default recipe: both tables' reference row
            name = f"default_s{seed}"
            runs[name] = Run([train(name, *stage2, seed=seed), sentence(name), *answered(name, directory, "vqa",
                                                                                          "short"),
                              *answered(name, directory, "sqa", "choice")],
                             ("stage1",), ((1, "sentence"), (3, "vqa"), (5, "sqa")))
        if "format" in tables:
            name = f"without_format_prompt_s{seed}"
            runs[name] = Run([train(name, *stage2, *world_data(f"{out}/data/without_format_prompt.json"), seed=seed),
                              sentence(name), *answered(name, directory, "vqa", "short")],
                             ("stage1",), ((1, "sentence"), (3, "vqa")))
        if "sqa" in tables:
            name = f"last_layer_s{seed}"
            runs[name] = Run([train(name, "--stage", "2", "--init", f"{out}/stage1_last_layer", *stage2[4:],
                                    seed=seed), *answered(name, directory, "sqa", "choice")],
                             ("stage1_last_layer",), ((2, "sqa"),))
            name = f"no_stage1_s{seed}"
            runs[name] = Run([train(name, "--stage", "2", *stage2[4:], seed=seed),
                              *answered(name, directory, "sqa", "choice")], (), ((2, "sqa"),))
    if "data" in tables:
        runs["no_instruction_tuning"] = Run([llava_bench("stage1", "--template", "vicuna_v1", "--out_dir",
                                                         f"{out}/no_instruction_tuning/llava_bench")],
                                            ("stage1",), ((0, "llava_bench"),))
    if "sqa" in tables:
        runs["stage1_last_layer"] = Run([train("stage1_last_layer", *stage1, "--vision_feature_layer", "-1")])
        for order in ("reasoning_first", "answer_first"):
            runs[f"order_{order}"] = answer_order_run(order, f"{out}/order_{order}", stage2[:4],
                                                      order_steps(config), answered)
    return runs


def order_steps(config):
    """The steps after which the answer-order runs are scored."""
    return [config.order_every * k for k in (1, 2, 3, 4)]


def answer_order_run(order, run_dir, from_stage1, steps, answered):
    """The world whose choices are answered `order`, and stage 2 on it, scored on its shapes-SQA after each of
    `steps`: each stretch a train.py --stop_at_step, the next one --resume."""
    world_dir = str(world.world_directory(choice_answer=order))
    commands, read = [[PY, "world.py", "--choice_answer", order]], []
    for stop in steps:
        commands.append([PY, "train.py", *from_stage1, "--max_steps", str(steps[-1]), "--stop_at_step", str(stop),
                         "--data_path", f"{world_dir}/stage2.json", "--val_data_path", f"{world_dir}/val_stage2.json",
                         "--out_dir", run_dir] + (["--overwrite"] if stop == steps[0] else ["--resume"]))
        commands += answered(os.path.basename(run_dir), world_dir, "sqa", "choice",
                             f"{run_dir}/sqa_answers_{stop}.jsonl")
        read.append((len(commands) - 1, f"sqa@{stop}"))
    return Run(commands, ("stage1",), tuple(read))


def write_data(directory, out):
    """The data files the rows train on, cut from the world's stage2.json (the images stay in the world)."""
    with open(os.path.join(directory, "stage2.json")) as f:
        records = json.load(f)
    kind = lambda record: record["id"].split("-", 1)[1]  # train_00012-conversation -> conversation
    for kinds in INSTRUCT_KINDS:
        chosen = [record for record in records if kind(record) in kinds.split("+")]
        plus.write_json(f"{out}/data/{kinds}.json", chosen)
        print(f"data: {out}/data/{kinds}.json, the {len(chosen):,} {kinds.replace('+', ', ')} records of "
              f"{directory}/stage2.json")
    prompt = "\n" + world.SHORT_ANSWER_PROMPT
    without = [dict(record, conversations=[dict(turn, value=turn["value"].replace(prompt, ""))
                                           for turn in record["conversations"]]) for record in records]
    plus.write_json(f"{out}/data/without_format_prompt.json", without)
    print(f"data: {out}/data/without_format_prompt.json, {directory}/stage2.json without {prompt.strip()!r} "
          f"({sum(kind(record) == 'vqa' for record in records):,} short-answer records)")

# ----------------------------------------------------------------------------------------------------------------------
# Running the rows, side by side, and reading what they print


def run_all(runs, config, inputs):
    """({name: figures}, the names of those that ran) of every run, each started once the runs it needs have finished,
    config.jobs at a time."""
    assert all(needed in runs for run in runs.values() for needed in run.after)
    figures, running, waiting, ran = {}, {}, dict(runs), set()
    with concurrent.futures.ThreadPoolExecutor(config.jobs) as pool, ending_what_runs():
        while waiting or running:
            ready = [name for name, run in waiting.items() if all(needed in figures for needed in run.after)]
            for name in ready[:config.jobs - len(running)]:
                run = waiting.pop(name)  # run again after a run it starts from ran again
                again = any(needed in ran for needed in run.after)
                running[pool.submit(run_one, name, run, config, inputs, again)] = name
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                figures[name], did_run = future.result()  # a failed run raises here, naming itself
                ran.update([name] if did_run else [])
    return figures, ran


@contextlib.contextmanager
def ending_what_runs():
    """On the way out through an error (a failed run, Ctrl-C, SIGTERM), the commands still running are ended too
    (SIGTERM: train.py saves a checkpoint first) rather than left behind writing into the runs' directories."""
    try:
        yield
    except BaseException:
        for child in list(RUNNING):
            child.terminate()
        raise


def stop_on_sigterm():
    """SIGTERM ends this script as Ctrl-C does (flags.one_line_errors: exit status 130), its commands with it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def run_one(name, run, config, inputs, again):
    """(figures, whether it ran): one row's commands run in order, or the figures of an earlier run of the same
    commands on the same inputs (the world, the bases) read back (unless --fresh, or `again`)."""
    directory, commands = os.path.join(config.out_dir, name), [shown(command) for command in run.commands]
    earlier = None if config.fresh or again else read_back(name, run, config, inputs)
    if earlier is not None:
        print(f"{name}: finished before (the same commands, world and bases): {directory}/done.json read back")
        return earlier, False
    os.makedirs(directory, exist_ok=True)
    started = time.time()
    outputs = []
    for k, command in enumerate(run.commands):
        print(f"{name}: {commands[k]}", flush=True)
        log = os.path.join(directory, f"progress{k}.txt")
        with open(log, "w") as progress:
            script = os.path.join(REPO, command[1])  # the repository's scripts, wherever this one is run from
            argv = [command[0], script, *command[2:]] if os.path.isfile(script) else command
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=progress, text=True, env=dict(
                os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // config.jobs))))
            RUNNING.add(child)
            printed = child.communicate()[0]
            RUNNING.discard(child)
        with open(os.path.join(directory, f"output{k}.txt"), "w") as f:
            f.write(printed)
        if child.returncode != 0:
            with open(log) as f:
                last = (f.read().strip().splitlines() or ["(nothing)"])[-1]
            raise flags.Stop(f"{name}: `{commands[k]}` failed (exit {child.returncode}): {last} (see {log})")
        outputs.append(printed)
    figures = {kind: read_figures(kind, outputs[k], f"{directory}/output{k}.txt") for k, kind in run.read}
    seconds = round(time.time() - started)
    plus.write_json(os.path.join(directory, "done.json"), {"commands": commands, "inputs": inputs,
                                                           "figures": figures, "seconds": seconds})
    print(f"{name}: finished in {seconds} s", flush=True)
    return figures, True


def read_back(name, run, config, inputs):
    """The figures of an earlier run of the row that finished with the same commands on the same inputs, else None."""
    done = done_record(config, name)
    same = done.get("commands") == [shown(command) for command in run.commands] and done.get("inputs") == inputs
    return done["figures"] if same else None


def done_record(config, name):
    """What a finished run left in its done.json (commands, figures, seconds), or {}."""
    try:
        with open(os.path.join(config.out_dir, name, "done.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def shown(command):
    """A command as a user types it: python, the script and its flags."""
    return " ".join(["python"] + command[1:])


def read_figures(kind, text, path):
    """The figures a scoring command printed: LLaVA-Bench's relative score per category ('llava_bench'), shapes-SQA's
    accuracy overall and on image and text-only questions ('sqa...'), or an evaluation's last 'accuracy: x' line."""
    if kind == "llava_bench":
        found = dict(re.findall(r"^(conv|detail|complex|all) +[\d.]+ +[\d.]+ +([\d.]+)$", text, flags=re.M))
        wanted = CATEGORIES
    elif kind.startswith("sqa"):
        found = dict(re.findall(r"^(overall|image|text) +\d+ +\d+ +([\d.]+)", text, flags=re.M))
        wanted = ("overall", "image", "text")
    else:
        found = dict(re.findall(r"^(accuracy): ([\d.]+)$", text, flags=re.M))
        wanted = ("accuracy",)
    if set(found) != set(wanted):
        raise flags.Stop(f"{path}: expected {', '.join(wanted)} in what it printed, found {', '.join(found) or 'none'}")
    return {key: float(value) for key, value in found.items()}

# ----------------------------------------------------------------------------------------------------------------------
# The tables: docs/ablations.md and the answer-order curve


def write_docs(config, directory, figures, ran, seconds):
    """docs/ablations.md: each table, its rows' figures where they ran (a missing row says how to run it), with the
    papers' figures beside them; docs/ablations_sqa.png: the answer-order curves."""
    def cell(row, kind, key, digits=3):  # the mean over the seeds (and their range), or "-" where a seed is missing
        seeds = config.data_seeds if row.startswith("data_") else config.seeds
        values = [(figures.get(f"{row}_s{seed}") or {}).get(kind, {}).get(key) for seed in range(seeds)]
        if None in values:
            return "-"
        mean = sum(values) / len(values)
        spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
        return f"{mean:.{digits}f}{spread}"
    command = " ".join(["python ablations.py"] + sys.argv[1:])
    os.makedirs(config.docs, exist_ok=True)
    finished = [name for name, figure in figures.items() if figure]
    run_time = sum(done_record(config, name).get("seconds", 0) for name in finished)
    ran_here = f"{len(ran)} runs in {seconds / 60:.0f} min" if ran else "no run"
    read_back_here = f", {len(finished) - len(ran)} read back from earlier calls" if len(finished) > len(ran) else ""
    lines = ["# Ablations in miniature", "", "Back to the [README](../README.md).", "",
             f"Written by `{command}` on {runtime.cpu_name()}, {os.cpu_count()} cores, {config.jobs} run(s) side by side: "
             f"{ran_here}{read_back_here}; the {len(finished)} runs' own times add up to {run_time / 60:.0f} min, "
             f"about {run_time / 60 / config.jobs:.0f} min {config.jobs} at a time. Stage 2 runs {config.steps} steps "
             f"from the same stage 1 in every row but the answer-order ones, with {config.seeds} seed(s), LLaVA Table "
             f"4's rows with {config.data_seeds}; over several seeds a cell gives the mean, then the lowest and the "
             "highest. A cell is \"-\" where its run has not finished. What each row ran and printed: "
             f"`{config.out_dir}/<row>/` (done.json: the commands and how long they took).", ""]
    lines += data_table(cell, figures) + format_table(cell) + sqa_table(cell, figures, config, directory)
    path = os.path.join(config.docs, "ablations.md")

    def write(tmp_path):
        with open(tmp_path, "w") as f:
            f.write("\n".join(lines) + "\n")
    weights.atomic_write(path, write)
    print(f"wrote {path}")


def data_table(cell, figures):
    """LLaVA Table 4: LLaVA-Bench's relative score per category for each choice of instruction data."""
    lines = ["## LLaVA Table 4: the instruction data", "",
             "Stage 2 on kinds of the world's records (its 158K-like part), then LLaVA-Bench in miniature "
             "(`llava_bench.py`): the relative score, the model's mean judge score over the teacher's, x 100.", "",
             "| stage 2 on | conv | detail | complex | all | paper (all) |", "|---|---|---|---|---|---|"]
    paper = {"conversation+description+reasoning": "85.1 (83.1 / 75.3 / 96.5)", "description+reasoning": "",
             "conversation": "73.8"}
    for kinds in reversed(INSTRUCT_KINDS):
        row = f"data_{kinds.replace('+', '_')}"
        lines.append(f"| {kinds.replace('+', ' + ')} | " + " | ".join(
            cell(row, "llava_bench", category, 1) for category in CATEGORIES) + f" | {paper[kinds]} |")
    none = figures.get("no_instruction_tuning")
    lines.append("| no instruction tuning (stage 1 alone, asked in vicuna_v1) | " + " | ".join(
        f"{none['llava_bench'][category]:.1f}" if none else "-" for category in CATEGORIES) + " | 21.5 |")
    return lines + [""]


def format_table(cell):
    """LLaVA-1.5's response-format prompt: with and without it in the short-answer records."""
    return ["## LLaVA-1.5's response-format prompt", "",
            f"Stage 2 on the world's data, its short-answer records with \"{world.SHORT_ANSWER_PROMPT}\" (the "
            "default) or without it; scored on shapes-VQA (the prompt asked, one word or phrase) and on the world's "
            "full-sentence questions (exact match). LLaVA-1.5's point: without the prompt, short and long answers "
            "conflict.", "",
            "| stage 2 | shapes-VQA | full-sentence eval |", "|---|---|---|",
            f"| with the prompt (the default) | {cell('default', 'vqa', 'accuracy')} | "
            f"{cell('default', 'sentence', 'accuracy')} |",
            f"| without it | {cell('without_format_prompt', 'vqa', 'accuracy')} | "
            f"{cell('without_format_prompt', 'sentence', 'accuracy')} |", ""]


def sqa_table(cell, figures, config, directory):
    """LLaVA Table 7 on shapes-SQA: the vision layer, stage 1, and the answer order against the step (and its PNG)."""
    with open(os.path.join(directory, "shapes_sqa.jsonl")) as f:
        options = [len(re.findall(r"^[A-Z]\. ", json.loads(line)["text"], flags=re.M)) for line in f]
    chance = sum(1 / n for n in options) / len(options)
    lines = ["## LLaVA Table 7 on shapes-SQA", "",
             "ScienceQA's rule on the world's multiple-choice questions (`evaluate.py --score choice`); chance is "
             f"{chance:.3f} (1 / the options, averaged over the questions).", "",
             "| | shapes-SQA | image | text-only | paper (ScienceQA) |", "|---|---|---|---|---|"]
    for row, label, paper in (("default", "the penultimate layer, with stage 1 (the default)", "90.92"),
                              ("last_layer", "the last layer", "89.96"), ("no_stage1", "no stage 1", "85.81")):
        lines.append(f"| {label} | " + " | ".join(cell(row, "sqa", key) for key in ("overall", "image", "text"))
                     + f" | {paper} |")
    lines += ["", "The answer's order: stage 2 from the same stage 1 on a world whose multiple-choice records are "
              f"answered with the explanation first, or the letter first, scored every {config.order_every} steps (the "
              "paper: reasoning first reached 89.77 % in 6 epochs, answer first in 12).", "",
              "| step | " + " | ".join(map(str, order_steps(config))) + " |", "|---" * 5 + "|"]
    curves = []
    for order in ("reasoning_first", "answer_first"):
        run = figures.get(f"order_{order}")
        lines.append(f"| {order.replace('_', ' ')} | " + " | ".join(
            f"{run[f'sqa@{step}']['overall']:.3f}" if run else "-" for step in order_steps(config)) + " |")
        if run:
            curves.append((order.replace("_", " "), [(step, run[f"sqa@{step}"]["overall"])
                                                     for step in order_steps(config)]))
    scores = [values["sqa"]["overall"] for name, values in figures.items() if values and "sqa" in values] + [
        value for _, points in curves for _, value in points]
    if scores and max(scores) < chance + 0.1:
        lines += ["", f"Every score here is within 0.1 of chance (the highest {max(scores):.3f}): the model does not "
                  "map an answer onto its option's letter ([evaluation.md](evaluation.md#the-scienceqa-ablation)), so "
                  "this table cannot show the paper's differences until it does."]
    if curves:
        png = os.path.join(config.docs, "ablations_sqa.png")
        evaluate.draw_curves(curves, png, "shapes-SQA accuracy", 1.0)
        lines += ["", "![shapes-SQA accuracy against the step](ablations_sqa.png)"]
    return lines + [""]


if __name__ == "__main__":
    main()
