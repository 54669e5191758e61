"""ablations.py: every planned command is one its script accepts, each starting from a run that comes before it; the
figures are read from what the scorers print (hand-computed); the data cuts; the scheduler's order, read-back and
failures; the tables' cells."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ablations
import evaluate
import flags
import llava_bench
import train
import world
from tiny_llava import REPO

SCRIPTS = {"train.py": train.TrainConfig, "evaluate.py": evaluate.EvalConfig, "llava_bench.py": llava_bench.BenchConfig,
           "world.py": world.WorldConfig}


INPUTS = {"world": "W", "bases": {"clip": "c1", "llama": "l1"}}


def config(tmp_path, **changes):
    return ablations.AblationsConfig(**{"out_dir": str(tmp_path / "out"), "docs": str(tmp_path / "docs"), **changes})


def test_every_command_is_one_its_script_accepts_and_starts_from_a_run_before_it(tmp_path):
    runs = ablations.plan(config(tmp_path, seeds=2, data_seeds=3), "W", ablations.TABLES)
    assert {"stage1", "default_s1", "no_instruction_tuning", "order_answer_first", "last_layer_s1",
            "data_conversation_s2"} <= set(runs) and "default_s2" not in runs
    out = str(tmp_path / "out")
    for name, run in runs.items():
        assert run.commands[0][0] == sys.executable
        made_here = False
        for command in run.commands:
            script, argv = command[1], command[2:]
            given = flags.parse(SCRIPTS[script], argv, script)
            if script == "evaluate.py" and "score" not in given:  # (--score looks for its files)
                evaluate.checked(evaluate.EvalConfig(**given), given)
            for flag in ("init", "ckpt"):  # a checkpoint read: this run's own (made above) or one it waits for
                if flag in given:
                    source = os.path.relpath(given[flag], out)
                    assert source == name and made_here or source in run.after, (name, command)
            if script == "train.py":
                assert given["out_dir"] == f"{out}/{name}" and ("resume" in given) == made_here, command
                made_here = True
        assert max(k for k, _ in run.read or [(0, "")]) < len(run.commands)
    assert runs["last_layer_s0"].commands[0][runs["last_layer_s0"].commands[0].index("--init") + 1].endswith(
        "stage1_last_layer")
    assert flags.parse(train.TrainConfig, runs["stage1_last_layer"].commands[0][2:], "train.py")[
        "vision_feature_layer"] == -1


def test_the_figures_are_read_from_what_the_scorers_print(tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": k, "prompt": "q", "text": text}) + "\n"
                               for k, text in enumerate(["A", "B", "C", "A", "The answer is B."])))
    truth = tmp_path / "t.jsonl"
    truth.write_text("".join(json.dumps({"question_id": k, "answer": letter, "category": category}) + "\n"
                             for k, (letter, category) in enumerate(
                                 [("A", "image"), ("A", "image"), ("C", "text"), ("B", "text"), ("B", "text")])))
    evaluate.main(["--score", "choice", "--answers", str(answers), "--truth", str(truth)])
    # right: 0 (image), 2 and 4 (text): overall 3/5, image 1/2, text 2/3
    assert ablations.read_figures("sqa", capsys.readouterr().out, "x") == pytest.approx(
        {"overall": 0.6, "image": 0.5, "text": 2 / 3}, abs=1e-4)
    answers.write_text("".join(json.dumps({"question_id": k, "prompt": "q", "text": text}) + "\n"
                               for k, text in enumerate(["red", "Red.", "blue", "2", "no"])))
    truth.write_text("".join(json.dumps({"question_id": k, "answer": word, "category": "color"}) + "\n"
                             for k, word in enumerate(["red", "red", "green", "2", "yes"])))
    evaluate.main(["--score", "short", "--answers", str(answers), "--truth", str(truth)])  # right: 0, 1 (GQA's rule), 3
    assert ablations.read_figures("vqa", capsys.readouterr().out, "x") == {"accuracy": 0.6}
    llava_bench.print_summary({"conv": (8.0, 6.0, 75.0), "detail": (10.0, 5.0, 50.0), "complex": (9.0, 9.0, 100.0),
                               "all": (9.0, 6.667, 74.1)}, "m", 3)
    assert ablations.read_figures("llava_bench", capsys.readouterr().out, "x") == {
        "conv": 75.0, "detail": 50.0, "complex": 100.0, "all": 74.1}
    with pytest.raises(flags.Stop, match=r"out\.txt: expected accuracy in what it printed, found none"):
        ablations.read_figures("vqa", "Traceback ...\n", "out.txt")


def test_the_data_cuts_keep_their_kinds_and_take_out_only_the_format_prompt(tmp_path):
    prompt = world.SHORT_ANSWER_PROMPT
    records = [{"id": "train_00001-conversation", "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
               {"id": "train_00001-vqa", "conversations": [{"from": "human", "value": f"<image>\nQ?\n{prompt}"},
                                                           {"from": "gpt", "value": "red"}]},
               {"id": "train_00002-description", "conversations": [{"from": "human", "value": "D"}]},
               {"id": "train_00003-reasoning", "conversations": [{"from": "human", "value": "R"}]},
               {"id": "train_00004-text-choice", "conversations": [{"from": "human", "value": f"C\n{prompt}"}]}]
    (tmp_path / "stage2.json").write_text(json.dumps(records))
    ablations.write_data(str(tmp_path), str(tmp_path / "out"))
    read = lambda name: json.loads((tmp_path / "out" / "data" / f"{name}.json").read_text())
    assert [r["id"] for r in read("conversation")] == ["train_00001-conversation"]
    assert [r["id"] for r in read("description+reasoning")] == ["train_00002-description", "train_00003-reasoning"]
    assert len(read("conversation+description+reasoning")) == 3
    without = read("without_format_prompt")
    assert [turn["value"] for turn in without[1]["conversations"]] == ["<image>\nQ?", "red"]
    assert without[4]["conversations"][0]["value"] == "C" and without[0] == records[0]


def stub(text, marker):
    """A command that leaves `marker` behind and prints `text`."""
    return [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x'); print({text!r})"]


def test_runs_wait_for_what_they_start_from_finished_runs_are_read_back_and_a_failure_names_its_run(tmp_path):
    settings = config(tmp_path, jobs=2)
    runs = {"later": ablations.Run([stub("accuracy: 0.25", tmp_path / "later")], ("first",), ((0, "vqa"),)),
            "first": ablations.Run([stub("accuracy: 0.5", tmp_path / "first")], (), ((0, "vqa"),)),
            "alone": ablations.Run([stub("accuracy: 1.0", tmp_path / "alone")], (), ((0, "vqa"),))}
    figures, ran = ablations.run_all(runs, settings, INPUTS)
    assert figures == {"first": {"vqa": {"accuracy": 0.5}}, "later": {"vqa": {"accuracy": 0.25}},
                       "alone": {"vqa": {"accuracy": 1.0}}} and ran == {"first", "later", "alone"}
    assert os.path.getmtime(tmp_path / "later") > os.path.getmtime(tmp_path / "first")
    assert ablations.run_all(runs, settings, INPUTS) == (figures, set())  # read back: nothing ran again
    assert (tmp_path / "first").read_text() == "x"
    (tmp_path / "out" / "first" / "done.json").unlink()  # "first" runs again, so "later", which starts from it, too
    assert ablations.run_all(runs, settings, INPUTS)[1] == {"first", "later"}
    assert ablations.run_all(runs, settings, dict(INPUTS, world="other"))[1] == {"first", "later", "alone"}
    changed = dict(runs, alone=ablations.Run([stub("accuracy: 0.75", tmp_path / "alone")], (), ((0, "vqa"),)))
    assert ablations.run_all(changed, settings, INPUTS)[0]["alone"] == {"vqa": {"accuracy": 0.75}}  # new commands
    failing = {"bad": ablations.Run([[sys.executable, "-c", "import sys; sys.exit('no such checkpoint')"]])}
    with pytest.raises(flags.Stop, match=r"bad: `python -c .*` failed \(exit 1\): no such checkpoint \(see .*"
                                         r"bad/progress0\.txt\)"):
        ablations.run_all(failing, settings, INPUTS)


def test_the_tables_give_each_rows_mean_and_range_over_the_seeds_and_a_dash_where_a_run_is_missing(tmp_path):
    settings = config(tmp_path, seeds=2, data_seeds=3, tables=["format"])
    figures = {"default_s0": {"sentence": {"accuracy": 0.9}, "vqa": {"accuracy": 0.5}},
               "default_s1": {"sentence": {"accuracy": 0.8}, "vqa": {"accuracy": 0.7}},
               "without_format_prompt_s0": {"sentence": {"accuracy": 0.4}, "vqa": {"accuracy": 0.1}},
               "without_format_prompt_s1": None}
    (tmp_path / "shapes_sqa.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in [
        "Q?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly.",
        "Context: C.\nQ?\nA. 1\nB. 2\nC. 3\nD. 0\nAnswer with the option's letter from the given choices directly."]))
    ablations.write_docs(settings, str(tmp_path), figures, {"default_s0"}, 60)
    text = (tmp_path / "docs" / "ablations.md").read_text()
    assert "| with the prompt (the default) | 0.600 (0.500-0.700) | 0.850 (0.800-0.900) |" in text
    assert "| without it | - | - |" in text
    assert "| conversation | - | - | - | - | 73.8 |" in text  # the data table's rows never ran
    assert "1 runs in 1 min, 2 read back from earlier calls" in text
    assert "chance is 0.375 (1 / the options" in text  # (1/2 + 1/4) / 2


def sleeper(pid_file):
    """A command that writes its pid, then runs for a minute unless ended."""
    return [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                  "time.sleep(60)"]


def gone(pid_file, within=10):
    """Whether the process named in pid_file has ended within `within` seconds."""
    deadline = time.time() + within
    while time.time() < deadline:
        if pid_file.exists() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), 0)
            except ProcessLookupError:
                return True
        time.sleep(0.1)
    return False


def test_a_failed_run_or_sigterm_ends_the_commands_still_running(tmp_path):
    runs = {"slow": ablations.Run([sleeper(tmp_path / "slow.pid")]),
            "bad": ablations.Run([[sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit('broken')"]])}
    started = time.time()
    with pytest.raises(flags.Stop, match="bad: .* broken"):
        ablations.run_all(runs, config(tmp_path, jobs=2), INPUTS)
    assert time.time() - started < 20 and gone(tmp_path / "slow.pid")
    script = (f"import sys; sys.path.insert(0, {REPO!r}); import ablations, flags\n"
              f"with flags.one_line_errors('ablations.py'):\n"
              f"    ablations.stop_on_sigterm()\n"
              f"    ablations.run_all({{'slow': ablations.Run([{sleeper(tmp_path / 'term.pid')!r}])}}, "
              f"ablations.AblationsConfig(out_dir={str(tmp_path / 'out2')!r}), {{}})\n")
    orchestrator = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "term.pid").exists() and time.time() < deadline:
        time.sleep(0.1)
    orchestrator.send_signal(signal.SIGTERM)
    assert orchestrator.wait(timeout=20) == 130 and gone(tmp_path / "term.pid")


def test_the_repositorys_scripts_run_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no world.py here
    runs = {"help": ablations.Run([[sys.executable, "world.py", "--help"]])}
    assert ablations.run_all(runs, config(tmp_path), INPUTS) == ({"help": {}}, {"help"})
    assert "python world.py --seed 1" in (tmp_path / "out" / "help" / "output0.txt").read_text()


def test_the_tables_go_to_docs_only_from_the_default_runs():
    assert ablations.docs_directory(ablations.AblationsConfig()) == "docs"
    assert ablations.docs_directory(ablations.AblationsConfig(out_dir="/tmp/try")) == "/tmp/try"  # docs/ untouched
    assert ablations.docs_directory(ablations.AblationsConfig(out_dir="/tmp/try", docs="docs")) == "docs"
