"""LLaVA-Plus in the shapes world: the tools read pixels (checked against the scenes the images were drawn from), the
assistant turn is written as LLaVA-Plus writes it (checked against hand-written text), the loss covers the assistant
turns only, and the server's loop runs the one tool a reply names, on its own image, or says in one line why not."""
import random
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest

import plus
import world
from data import IMAGE_TAG, assistant_text, encode_conversation, load_tokenizer, parse_conversation
from tinyllava import IGNORE_INDEX
from tiny_llava import REPO

SCENES = [world.sample_scene(random.Random(seed)) for seed in range(200)]


def alone(scene, obj):
    """The pixels of obj drawn alone on the scene's background: its area is the count of those that changed."""
    image = np.asarray(world.render(world.Scene(scene.background, (obj,))), dtype=np.int16)
    return int((np.abs(image - world.BACKGROUNDS[scene.background]).sum(-1) > 0).sum())


def test_detector_boxes_segmenter_areas_and_phrases_equal_the_scene_the_image_was_drawn_from():
    for scene in SCENES:
        image = world.render(scene)
        found = plus.detect(image, "object")  # every object
        assert found["boxes"] == [[c / world.IMAGE_SIZE for c in o.box] for o in scene.objects]  # to the pixel
        assert found["phrases"] == [f"{o.size} {o.color} {o.shape}" for o in scene.objects]
        assert plus.segment(image, "object")["areas"] == [alone(scene, o) for o in scene.objects]
        first = scene.objects[0]
        asked = plus.detect(image, f"the {first.size} {first.color} {first.shape}")["boxes"]
        assert [[c / world.IMAGE_SIZE for c in first.box]] == asked[:1] and len(asked) == sum(
            (o.size, o.color, o.shape) == (first.size, first.color, first.shape) for o in scene.objects)


def test_a_caption_of_several_phrases_and_plural_shapes_find_each():
    scene = world.Scene("white", (world.place("circle", "red", "small", 0, 0), world.place("square", "blue", "large", 1, 1),
                                  world.place("circle", "red", "large", 2, 2)))
    found = plus.detect(world.render(scene), "red circles . blue square")
    assert found["phrases"] == ["small red circle", "large red circle", "large blue square"]
    assert plus.detect(world.render(scene), "green triangle") == {"boxes": [], "logits": [], "phrases": []}


def test_editor_repaints_or_removes_and_the_detector_reads_the_change_back():
    scene = world.Scene("gray", (world.place("circle", "red", "small", 0, 0), world.place("square", "blue", "large", 1, 1)))
    image = world.render(scene)
    edited = plus.edit(image, "red circle", "green")["edited_image"]
    assert plus.detect(edited, "object")["phrases"] == ["small green circle", "large blue square"]
    assert plus.detect(edited, "green circle")["boxes"] == plus.detect(image, "red circle")["boxes"]
    removed = plus.edit(image, "blue square", "background")["edited_image"]
    assert plus.detect(removed, "object")["phrases"] == ["small red circle"]
    assert np.array_equal(np.asarray(image), np.asarray(world.render(scene)))  # the user's image is untouched


def test_an_assistant_turn_is_written_as_llava_plus_writes_it():
    turn = {"from": "gpt", "thoughts": "I need the box.", "value": "I will use detector. Please wait for a moment.",
            "actions": [{"API_name": "detector", "API_params": {"caption": "small green circle"}}]}
    assert assistant_text(turn) == ('"thoughts🤔" I need the box.\n'
                                    '"actions🚀" [{"API_name": "detector", "API_params": {"caption": '
                                    '"small green circle"}}]\n'
                                    '"value👉" I will use detector. Please wait for a moment.\n')
    assert assistant_text({"from": "gpt", "thoughts": "No tool.", "actions": [], "value": "Red."}) == \
        '"thoughts🤔" No tool.\n"actions🚀" []\n"value👉" Red.\n'
    assert assistant_text({"from": "gpt", "value": "Red."}) == "Red."  # LLaVA's own turns stay as they are
    assert plus.parse_turn(assistant_text(turn)) == (turn["thoughts"], turn["actions"], turn["value"])
    bare = plus.without_thoughts({"id": "x", "conversations": [turn]})["conversations"][0]  # the ablation's records
    assert assistant_text(bare) == ('"actions🚀" [{"API_name": "detector", "API_params": {"caption": '
                                    '"small green circle"}}]\n'
                                    '"value👉" I will use detector. Please wait for a moment.\n')
    assert plus.parse_turn(assistant_text(bare)) == (None, turn["actions"], turn["value"])


def tool_record():
    return [{"from": "human", "value": f"{IMAGE_TAG}\nWhere is the small green circle?"},
            {"from": "gpt", "thoughts": "The exact box needs the detector.", "value": "I will use detector.",
             "actions": [{"API_name": "detector", "API_params": {"caption": "small green circle"}}]},
            {"from": "human", "value": "detector model outputs: {'boxes': [[0.41, 0.41, 0.56, 0.56]], 'logits': "
                                       "[0.97], 'phrases': ['small green circle']}\n\nPlease summarize the model "
                                       "outputs and answer my first question: Where is the small green circle?"},
            {"from": "gpt", "thoughts": "Thanks to the output of detector.", "actions": [],
             "value": "It is at [0.41, 0.41, 0.56, 0.56]."}]


def test_the_loss_of_a_tool_record_covers_the_two_assistant_turns_and_their_end_of_turn_only():
    tokenizer = load_tokenizer(f"{REPO}/bases/llama")
    record = tool_record()
    input_ids, labels = encode_conversation(record, tokenizer, "vicuna_v1", image_first=True)
    spans, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans, current = spans + [current], []
    assert [tokenizer.decode(span, skip_special_tokens=False).strip() for span in spans] == \
        [assistant_text(turn) + "</s>" for turn in (record[1], record[3])]  # its last newline, then end of turn
    assert "summarize" in tokenizer.decode([t for t in input_ids if t >= 0]) and all(
        label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))


def test_the_loop_runs_the_named_tool_on_the_servers_image_and_hands_its_cleaned_output_back():
    scene = world.Scene("white", (world.place("circle", "green", "small", 1, 1),))
    reply = assistant_text(tool_record()[1])  # what a model that learned the record would say
    turn, output = plus.tool_turn(reply, world.render(scene), "Where is the small green circle?")
    assert turn == tool_record()[2]["value"]  # 26/64 = 0.40625 and 36/64 = 0.5625 to two decimals; fill 0.76
    assert output["boxes"] == [[0.40625, 0.40625, 0.5625, 0.5625]]
    no_tool = assistant_text({"from": "gpt", "thoughts": "I can see it.", "actions": [], "value": "Green."})
    assert plus.tool_turn(no_tool, world.render(scene), "?") is None and plus.tool_turn("Green.", None, "?") is None
    edit = '"thoughts🤔" x\n"actions🚀" [{"API_name": "editor", "API_params": {"caption": "circle", "new_color": ' \
           '"red"}}]\n"value👉" y\n'
    turn, output = plus.tool_turn(edit, world.render(scene), "Make it red")
    assert turn.startswith("editor model outputs: {'phrases': ['small green circle']}\n\n")  # the image is the user's
    assert plus.detect(output["edited_image"], "object")["phrases"] == ["small red circle"]


@pytest.mark.parametrize("actions, message", [
    ('[{"API_name": "detector", "API_params": {"caption": "circle"}', "the actions are not JSON"),
    ('{"API_name": "detector"}', "not a list of {API_name, API_params}"),
    ('[{"API_name": "ruler", "API_params": {}}]', "there is no tool 'ruler'"),
    ('[{"API_name": "detector", "API_params": {}}]', "detector: detect() missing 1 required positional argument"),
    ('[{"API_name": "detector", "API_params": {"caption": "circle", "zoom": 2}}]', "unexpected keyword argument 'zoom'"),
    ('[{"API_name": "detector", "API_params": {"caption": "banana"}}]', "detector: cannot look for 'banana'"),
    ('[{"API_name": "editor", "API_params": {"caption": "circle", "new_color": "pink"}}]', "'new_color' 'pink' is none"),
    ('[{"API_name": "detector", "API_params": {"caption": "a"}}, {"API_name": "detector", "API_params": {"caption": '
     '"b"}}]', "2 actions in one turn"),
])
def test_a_malformed_action_is_a_one_line_tool_error(actions, message):
    image = world.render(SCENES[0])
    with pytest.raises(plus.ToolError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")
                       .replace("}", r"\}")) as caught:
        plus.tool_turn(f'"thoughts🤔" t\n"actions🚀" {actions}\n"value👉" v\n', image, "?")
    assert "\n" not in str(caught.value)


def test_a_registered_tool_is_called_with_the_models_parameters_and_the_servers_image_only():
    calls = []

    @plus.tool("counter")
    def count(image, caption):
        calls.append((image.size, caption))
        return {"count": len(plus.detect(image, caption)["boxes"])}

    try:
        image = world.render(SCENES[1])
        reply = ('"thoughts🤔" t\n"actions🚀" [{\'API_name\': \'counter\', \'API_params\': {\'caption\': \'object\', '
                 '\'image\': \'/etc/passwd\'}}]\n"value👉" v\n')  # single quotes, as LLaVA-Plus retries them
        turn, _ = plus.tool_turn(reply, image, "How many?")
        assert calls == [(image.size, "object")]  # the model's 'image' dropped, the server's passed
        assert turn.startswith(f"counter model outputs: {{'count': {len(SCENES[1].objects)}}}")
    finally:
        del plus.TOOLS["counter"]


@pytest.mark.parametrize("body, message", [
    (lambda image: 1 / 0, "broken failed: ZeroDivisionError: division by zero"),
    (lambda image: [1, 2], "broken returned list, not a dict of outputs"),
    (lambda image: {"boxes": [[0.1]]}, r"broken returned the box \[0.1\], not \[x0, y0, x1, y1\]"),
    (lambda image: {"boxes": [[0.5, 0.5, 0.2, 0.9]]}, "not \\[x0, y0, x1, y1\\] fractions"),
    (lambda image: {"masks": [np.ones((3, 3), bool)]}, r"a mask that is not an \(H, W\) = \(64, 64\) boolean"),
    (lambda image: {"edited_image": "x.png"}, "an edited_image that is not a PIL image"),
])
def test_a_users_tool_that_fails_is_one_line_and_the_next_call_still_runs(body, message):
    plus.tool("broken")(body)
    try:
        reply = '"thoughts🤔" t\n"actions🚀" [{"API_name": "broken", "API_params": {}}]\n"value👉" v\n'
        with pytest.raises(plus.ToolError, match=message) as caught:
            plus.tool_turn(reply, world.render(SCENES[0]), "?")
        assert "\n" not in str(caught.value)
        detector = reply.replace('"broken", "API_params": {}', '"detector", "API_params": {"caption": "object"}')
        assert plus.tool_turn(detector, world.render(SCENES[0]), "?")[0].startswith("detector model outputs:")
    finally:
        del plus.TOOLS["broken"]


def test_the_picture_enlarges_a_drawing_to_256_pixels_and_leaves_a_photo_its_size():
    box = {"boxes": [[0.25, 0.25, 0.75, 0.75]]}
    drawing = plus.picture(world.render(SCENES[0]), box)
    assert drawing.size == (256, 256) and drawing.getpixel((64, 100)) == (0, 0, 0)  # 64 pixels x 4, the box's edge
    photo = plus.picture(Image.new("RGB", (1200, 800), (255, 255, 255)), box)
    assert photo.size == (1200, 800) and photo.getpixel((300, 400)) == (0, 0, 0)  # x0 = 0.25 of 1200
    assert photo.getpixel((600, 400)) == (255, 255, 255)


def test_parse_conversation_reads_a_tool_record_as_pairs_of_question_and_written_turn():
    pairs, has_image = parse_conversation(tool_record())
    assert has_image and [answer for _, answer in pairs] == [assistant_text(t) for t in tool_record()[1::2]]
    with pytest.raises(ValueError, match="actions a list"):
        parse_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "actions": "detector"}])


def test_a_box_task_is_written_as_llava_plus_records_it_with_the_detectors_numbers_in_the_answer():
    scene = world.Scene("white", (world.place("circle", "green", "small", 1, 1),))  # 'the circle' names it alone
    task = plus.tool_task("box", scene, world.render(scene), random.Random(0))
    name, box = "the circle", [0.41, 0.41, 0.56, 0.56]  # (26, 26, 36, 36) / 64 to two decimals
    assert name in task["question"]
    record = plus.tool_record("x-tool", "images/x.png", task)
    assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert record["conversations"][1]["actions"] == [{"API_name": "detector",
                                                      "API_params": {"caption": name.removeprefix("the ")}}]
    assert record["conversations"][1]["value"] == "I will use detector to help to answer the question. Please wait " \
                                                  "for a moment."
    assert record["conversations"][2]["value"].startswith(f"detector model outputs: {{'boxes': [{box}]")
    assert record["conversations"][2]["value"].endswith(
        f"\n\nPlease summarize the model outputs and answer my first question: {task['question']}")
    assert record["conversations"][3] == {"from": "gpt", "thoughts": "Thanks to the output of detector. I can answer "
                                          "the question better.", "actions": [],
                                          "value": f"{name[0].upper()}{name[1:]} is at {box}."}


def test_area_and_edit_tasks_answer_from_the_pixels_and_ordinary_records_say_no_tool_is_needed():
    for seed, scene in enumerate(SCENES[:40]):
        task = plus.tool_task("area", scene, world.render(scene), random.Random(seed))
        if task is None:  # no object a phrase picks out alone
            assert all(world.refer(scene, o, hide=("cell",)) is None for o in scene.objects)
            continue
        caption = task["action"]["API_params"]["caption"]
        (obj,) = [o for o in scene.objects if all(w in f"{o.size} {o.color} {o.shape}" for w in caption.split()
                                                  if w != "object")]
        assert task["answer"].endswith(f" covers {alone(scene, obj)} pixels.")
        task = plus.tool_task("remove", scene, world.render(scene), random.Random(seed))
        assert task["answer"].endswith(" is gone.") and task["action"]["API_params"]["new_color"] == "background"
    record = {"id": "r", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert plus.without_tools(record)["conversations"] == [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "actions": [],
                                          "thoughts": "The question can be answered by the information in the "
                                                      "context, without need any external tools."}]


def test_evaluate_plus_scores_a_model_that_replies_as_the_teacher_and_one_that_never_calls_a_tool(tmp_path,
                                                                                                 monkeypatch, capsys):
    """evaluate.py --plus with the model's replies stubbed: the teacher's own turns score 1 on every task and on the
    ordinary questions; replies that answer without a tool score 0 calls and 0 answers on the tool questions."""
    import ask
    import evaluate
    import json
    directory = tmp_path / "world"
    directory.mkdir()
    world.generate(directory, seed=3, n_train=4, n_heldout=40, eval_per_type=2)
    plus.ensure_plus_data(str(directory), seed=3)
    keys = [json.loads(line) for line in open(directory / "shapes_plus_truth.jsonl")]  # in the questions' order
    items = json.load(open(directory / "eval.json"))
    script = {}  # what is left to ask, in the order evaluate.py asks: the tool questions, then the ordinary ones

    def replies(model, tokenizer, prompts, pixel_values=None, max_new_tokens=256, culprit=""):
        if script["teacher"] == "garbled":  # actions that do not parse: no tool runs, nothing is right
            if not script["keys"]:
                script["items"] = script["items"][len(prompts):]
            script["keys"] = script["keys"][len(prompts):]
            return ['"thoughts🤔" t\n"actions🚀" [}\n"value👉" v\n'] * len(prompts)
        if "model outputs" in tokenizer.decode([t for t in prompts[0] if t >= 0]):  # the batch's second turns
            turns = [{"thoughts": "t", "actions": [], "value": key["answer"]} for key in script["batch"]]
        elif script["keys"]:
            script["batch"], script["keys"] = script["keys"][:len(prompts)], script["keys"][len(prompts):]
            turns = [{"thoughts": "t", "actions": [key["action"]], "value": "wait"} if script["teacher"] else
                     {"thoughts": plus.NO_TOOL, "actions": [], "value": "I cannot tell."} for key in script["batch"]]
        else:
            answered, script["items"] = script["items"][:len(prompts)], script["items"][len(prompts):]
            turns = [{"thoughts": plus.NO_TOOL, "actions": [], "value": item["answer"]} for item in answered]
        return [assistant_text({"from": "gpt", **turn}) for turn in turns]

    monkeypatch.setattr(ask, "greedy_answers", replies)
    monkeypatch.setattr(ask, "load", lambda config, path=None: (SimpleModel(), load_tokenizer(f"{REPO}/bases/llama")))
    monkeypatch.setattr(ask, "to_pixels", lambda model, images: None)
    monkeypatch.setattr(ask, "find_model", lambda config: "stub")
    monkeypatch.setattr(ask, "refuse_captioner", lambda *args: None)
    for teaches, expected in ((True, "1.0000"), (False, "0.0000"), ("garbled", "0.0000")):
        script.update(keys=keys, items=items, teacher=teaches)
        evaluate.main(["--plus", "--world", str(directory)])
        table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
        assert set(table) >= {"box", "area", "recolor", "remove", "overall"}
        assert table["overall"][1:] == [expected, expected]
        assert table["ordinary"][1:2] == ["1.0000"]  # a call that does not parse runs no tool
        assert table["ordinary"][6:7] == ["0.0000" if teaches == "garbled" else "1.0000"]


class SimpleModel:
    """What evaluate.py reads of a model when its replies are stubbed."""
    config = SimpleNamespace(template="vicuna_v1")
    llm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    num_image_tokens = 9


def test_sample_chat_runs_the_named_tool_shows_its_output_saves_its_picture_and_goes_on_after_a_bad_call(
        tmp_path, monkeypatch):
    """sample.py's loop with a scripted model: a reply naming the detector gets the tool's output back as the next
    turn (and the reply to it streamed), the boxes drawn are saved; a malformed call is one line and the next
    question is asked as usual."""
    import io
    import sample
    tokenizer = load_tokenizer(f"{REPO}/bases/llama")
    scene = world.Scene("white", (world.place("circle", "green", "small", 1, 1),))
    replies = [assistant_text(tool_record()[1]), assistant_text(tool_record()[3]),
               '"thoughts🤔" t\n"actions🚀" [{"API_name": "ruler"}]\n"value👉" v\n']
    asked = []

    class ScriptedChat:
        def __init__(self, model, tokenizer, pixel_values):
            self.stops, self.turns = [tokenizer.token_to_id("</s>")], []

        def ask(self, text, max_new, sampling, culprit=None):
            asked.append(text)
            yield from tokenizer.encode(replies.pop(0), add_special_tokens=False).ids + self.stops

    monkeypatch.setattr(sample, "Chat", ScriptedChat)
    questions, out = ["Where is the small green circle?", "What is this?", None], io.StringIO()
    sample.chat(None, tokenizer, None, 64, {}, read=lambda prompt: questions.pop(0), out=out,
                image=world.render(scene), tool_dir=str(tmp_path / "tools"))
    printed = out.getvalue().splitlines()
    assert asked == ["Where is the small green circle?", tool_record()[2]["value"], "What is this?"]
    assert f"tool: {tool_record()[2]['value'].splitlines()[0]}" in printed
    assert f"tool: its picture is {tmp_path / 'tools' / '001.png'}" in printed
    assert "tool not run: there is no tool 'ruler' (there are detector, editor, segmenter)" in printed
    drawn = np.asarray(Image.open(tmp_path / "tools" / "001.png"))
    assert drawn.shape == (256, 256, 3) and (drawn[26 * 4, 26 * 4:36 * 4] == 0).all()  # the box's top edge, black


def test_tools_of_ones_own_load_from_a_file_and_a_broken_file_is_one_line(tmp_path):
    import flags
    import sample
    (tmp_path / "mytools.py").write_text("import plus\n\n@plus.tool('counter')\ndef count(image, caption):\n"
                                         "    return {'count': len(plus.detect(image, caption)['boxes'])}\n")
    try:
        sample.load_tools(str(tmp_path / "mytools.py"))
        turn, _ = plus.tool_turn('"thoughts🤔" t\n"actions🚀" [{"API_name": "counter", "API_params": {"caption": '
                                 '"object"}}]\n"value👉" v\n', world.render(SCENES[2]), "How many?")
        assert turn.startswith(f"counter model outputs: {{'count': {len(SCENES[2].objects)}}}")
    finally:
        plus.TOOLS.pop("counter", None)
    (tmp_path / "broken.py").write_text("import plus\nplus.tool(\n")
    with pytest.raises(flags.Stop, match="--tools .*broken.py: SyntaxError"):
        sample.load_tools(str(tmp_path / "broken.py"))
    with pytest.raises(flags.Stop, match="--tools nothere.py: cannot read it"):
        sample.load_tools("nothere.py")


def test_a_directory_that_is_no_world_is_one_line_for_evaluate_and_plus_py(tmp_path):
    import evaluate
    with pytest.raises(SystemExit, match=f"evaluate.py: error: --world {tmp_path}: not a world directory"):
        evaluate.main(["--plus", "--world", str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="plus.py: error: .*file"):
        plus.main(["--root", str(tmp_path / "file" / "under")])
