"""demo.py: the HTTP API on a tiny random-weight model served in this process (upload, example, ask and its stream,
reset; bad uploads, paths, sessions and settings; the queue; a client gone mid-answer), the command line, and the page
in a real headless Chromium. Answers are checked against TinyLLaVA.generate called directly, with the prompt written
from the facts sheet (tiny_llava.vicuna_ids), never against the server's own output."""
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ask
import bench_demo
import demo
import flags
import plus
import world
from data import IMAGE_TAG, assistant_text, load_image, process_image
from test_plus import tool_record
from tiny_llava import EOS, FOLLOW_UP, NUM_IMAGE_TOKENS, QUESTION, REPO, our_answer, tiny_llava, until_stop, vicuna_ids

MAX_NEW = 100  # the server's --max_new_tokens: the most an answer may ask for
UPLOAD_LIMIT = 20_000  # bytes (--max_upload_mb 0.02): the tiny images are far smaller


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tiny = tiny_llava(root)
    (root / "examples").mkdir()
    for k, image in enumerate(tiny.images):
        shutil.copy(image, root / "examples" / f"val_{k:05d}.png")
    config = demo.DemoConfig(ckpt=tiny.ckpt, port=0, examples=str(root / "examples" / "val_*.png"),
                             max_upload_mb=UPLOAD_LIMIT / 1e6, max_new_tokens=MAX_NEW, max_sessions=4)
    model, tokenizer = ask.load(config)
    server = demo.make_server(config, demo.Demo(model, tokenizer, config, "tiny"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(tiny=tiny, model=model, server=server, port=server.server_address[1], root=root,
                          url=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def call(served, method, path, body=None, headers=None):
    """(status, body) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


def post_json(served, path, data):
    status, body = call(served, "POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


def upload(served, body, name):
    status, answer = call(served, "POST", "/api/upload", body, {"X-Filename": name})
    return status, json.loads(answer)


def events(stream):
    """[(event, data)] of a text/event-stream body."""
    parsed = []
    for block in stream.decode().split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def ask_events(served, session, question, **settings):
    status, body = call(served, "POST", "/api/ask", json.dumps(dict(session=session, question=question, **settings)),
                        {"Content-Type": "application/json"})
    assert status == 200, body
    return events(body)


def streamed(received):
    """The answer the token events spell, after checking that the stream ended with 'done' saying the same."""
    text = "".join(data["text"] for event, data in received if event == "token")
    assert received[-1] == ("done", {"answer": text, "tokens": received[-1][1]["tokens"]}), received[-3:]
    return text


def png_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def reference(served, turns, image, max_new_tokens):
    """The greedy answer ids to the conversation `turns` ([question, answer ids, question, ...]) about an image, by
    TinyLLaVA.generate without any cache."""
    pixel_values = process_image(load_image(image), 16, "crop")[None]
    return served.model.generate([vicuna_ids(served.tiny.tokenizer, turns)], pixel_values, use_cache=False,
                                 max_new_tokens=max_new_tokens, stop_token_ids=[EOS])[0].tolist()

# ----------------------------------------------------------------------------------------------------------------------
# The page, and a conversation


def test_the_page_is_served_and_fetches_nothing_from_elsewhere(served):
    status, page = call(served, "GET", "/")
    assert status == 200 and b"<script>" in page and page == png_bytes(os.path.join(REPO, "demo.html"))
    assert b"http:" not in page and b"https:" not in page and b'="//' not in page  # only the server's own routes
    status, info = call(served, "GET", "/api/info")
    info = json.loads(info)
    assert status == 200 and info["examples"] == ["val_00000.png", "val_00001.png", "val_00002.png"]
    assert info["max_upload_bytes"] == UPLOAD_LIMIT and info["max_new_tokens"] == MAX_NEW


def test_upload_ask_streams_the_answer_token_by_token_and_it_is_generate_s(served):
    status, opened = upload(served, png_bytes(served.tiny.images[0]), "ball.png")
    assert status == 200 and opened["image"] == "ball.png"
    received = ask_events(served, opened["session"], QUESTION, max_new_tokens=12)
    assert received[0] == ("started", {}) and {event for event, _ in received} == {"started", "token", "done"}
    expected = our_answer(served.tiny, served.model, QUESTION, served.tiny.images[0], 12)
    assert streamed(received) == expected and len(expected) > 5
    assert sum(event == "token" for event, _ in received) > 3  # piece by piece, not the whole answer at once
    assert received[-1][1]["tokens"] == 12  # cut at max_new_tokens: the random model never says EOS


def test_the_conversation_goes_on_in_the_cache_and_reset_starts_over(served):
    image = served.tiny.images[1]
    session = upload(served, png_bytes(image), "b.png")[1]["session"]
    first = streamed(ask_events(served, session, QUESTION, max_new_tokens=10))
    second = streamed(ask_events(served, session, FOLLOW_UP, max_new_tokens=10))
    answer_1 = reference(served, [QUESTION], image, 10)
    assert first == served.tiny.tokenizer.decode(until_stop(answer_1)).strip()
    # the second answer is the one to the whole conversation, computed afresh without a cache
    answer_2 = reference(served, [QUESTION, until_stop(answer_1), FOLLOW_UP], image, 10)
    assert second == served.tiny.tokenizer.decode(until_stop(answer_2)).strip()
    assert second != our_answer(served.tiny, served.model, FOLLOW_UP, image, 10)  # so the history mattered
    status, answer = post_json(served, "/api/reset", {"session": session})
    assert status == 200 and answer["image"] == "b.png"
    after_reset = streamed(ask_events(served, session, FOLLOW_UP, max_new_tokens=10))
    assert after_reset == our_answer(served.tiny, served.model, FOLLOW_UP, image, 10)  # a first question again


def test_an_example_is_picked_by_name_and_served(served):
    status, opened = post_json(served, "/api/example", {"name": "val_00002.png"})
    assert status == 200 and opened["image"] == "val_00002.png"
    answer = streamed(ask_events(served, opened["session"], QUESTION, max_new_tokens=8))
    assert answer == our_answer(served.tiny, served.model, QUESTION, served.tiny.images[2], 8)
    assert call(served, "GET", "/examples/val_00002.png") == (200, png_bytes(served.tiny.images[2]))


def test_sampling_settings_reach_the_sampler(served):
    session = upload(served, png_bytes(served.tiny.images[0]), "a.png")[1]["session"]
    greedy = streamed(ask_events(served, session, QUESTION, max_new_tokens=12))
    post_json(served, "/api/reset", {"session": session})
    served.server.demo.generator.manual_seed(5)
    sampled = streamed(ask_events(served, session, QUESTION, max_new_tokens=12, temperature=1.5, top_p=0.9))
    pixel_values = process_image(load_image(served.tiny.images[0]), 16, "crop")[None]
    expected = served.model.generate([vicuna_ids(served.tiny.tokenizer, [QUESTION])], pixel_values, max_new_tokens=12,
                                     stop_token_ids=[EOS], temperature=1.5, top_p=0.9,
                                     generator=torch.Generator().manual_seed(5))[0]
    assert sampled == served.tiny.tokenizer.decode(until_stop(expected.tolist())).strip() != greedy

# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a clear message, and the server goes on serving


def bad_uploads(served):
    bodies = bench_demo.bad_upload_bodies(served.tiny.images[0], UPLOAD_LIMIT)
    expected = {  # name: (status, what the message says)
        "big.png": (413, "big.png is over the upload limit of 0.02 MB"),
        "notes.txt": (400, "notes.txt is not an image"),
        "empty.png": (400, "empty.png is not an image"),
        "cut.png": (400, "cut.png is cut short or damaged"),
        "cut.jpg": (400, "cut.jpg is cut short or damaged"),
        "bomb.png": (400, "bomb.png is too large in pixels, a possible decompression bomb (Image size (10000000000 "
                          "pixels) exceeds limit"),
    }
    assert len(bodies["big.png"]) == UPLOAD_LIMIT + 4 and len(bodies["cut.jpg"]) > 500  # a JPEG cut in its data
    with pytest.raises(Image.DecompressionBombError):  # Pillow, asked directly, sees a bomb
        Image.open(io.BytesIO(bodies["bomb.png"]))
    return {name: (bodies[name], *expected[name]) for name in expected}


def test_bad_uploads_get_a_clear_message_and_the_server_goes_on(served):
    for name, (body, status, message) in bad_uploads(served).items():
        answer = upload(served, body, name)
        assert answer[0] == status and message in answer[1]["error"], (name, answer)
    session = upload(served, png_bytes(served.tiny.images[0]), "fine.png")[1]["session"]
    assert streamed(ask_events(served, session, QUESTION, max_new_tokens=5)) == \
        our_answer(served.tiny, served.model, QUESTION, served.tiny.images[0], 5)


def test_no_path_a_client_sends_reaches_the_file_system(served, monkeypatch):
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *args, **kwargs: opened.append(str(path)) or
                        real_open(path, *args, **kwargs))
    outside = served.tiny.images[0]  # a real image file, outside the examples
    for path in ("/examples/../demo.py", "/examples/%2e%2e/demo.py", "/examples/..%2F..%2Fdemo.py", "/../demo.py",
                 "/examples/" + outside, "/examples/%2F" + outside.lstrip("/"), "/demo.py", "/examples/",
                 "/pictures/../demo.py", "/pictures/..%2Fdemo.py", "/pictures/" + outside, "/pictures/"):
        status, body = call(served, "GET", path)
        assert status == 404 and b"error" in body, path
    for name in ("../image0.png", outside, "val_00000.png/..", ["val_00000.png"], None):
        status, answer = post_json(served, "/api/example", {"name": name})
        assert status == 404 and "no example named" in answer["error"], name
    assert opened == []  # nothing was opened for them
    assert call(served, "GET", "/examples/val_00000.png")[0] == 200  # (mimetypes may read /etc/mime.types first)
    assert [path for path in opened if path.endswith("val_00000.png")] != []


def test_unknown_sessions_and_bad_questions_are_refused_in_words(served):
    session = upload(served, png_bytes(served.tiny.images[0]), "a.png")[1]["session"]
    for route in ("/api/ask", "/api/reset"):
        status, answer = post_json(served, route, {"session": "nope", "question": QUESTION})
        assert status == 404 and "unknown session" in answer["error"]
    refused = {"ask a question": {"question": "  "}, "temperature must be": {"question": "Hi", "temperature": -1},
               "top_p must be": {"question": "Hi", "top_p": 0}, "max_new_tokens must be a number from 1 to 100":
               {"question": "Hi", "max_new_tokens": MAX_NEW + 1}, "max_new_tokens must": {"question": "Hi",
               "max_new_tokens": 2.5}, "question is over": {"question": "x" * 3000}}
    for message, request in refused.items():
        status, answer = post_json(served, "/api/ask", dict(request, session=session))
        assert status == 400 and message in answer["error"], (message, answer)
    status, body = call(served, "POST", "/api/ask", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    status, answer = post_json(served, "/api/nothing", {})
    assert status == 404
    # a conversation that outgrows the context says so in the stream, and start over works
    received = ask_events(served, session, "x " * 300, max_new_tokens=5)
    assert received[-1][0] == "error" and "the conversation is too long" in received[-1][1]["message"]


def test_the_least_recently_used_session_is_forgotten_beyond_max_sessions(served):
    sessions = [upload(served, png_bytes(served.tiny.images[0]), f"{k}.png")[1]["session"] for k in range(5)]
    status, answer = post_json(served, "/api/reset", {"session": sessions[0]})  # max_sessions 4: the first is gone
    assert status == 404 and "choose the image again" in answer["error"]
    assert post_json(served, "/api/reset", {"session": sessions[1]})[0] == 200

# ----------------------------------------------------------------------------------------------------------------------
# One model for everyone: a queue, and a client gone frees it


@pytest.fixture
def slow_model(served, monkeypatch):
    """Each LLaMA forward takes 10 ms more and is logged as (thread, time): generations overlap if the server lets
    them, and the log shows it."""
    calls, forward = [], served.model.llm.forward

    def slow_forward(*args, **kwargs):
        calls.append((threading.get_ident(), time.monotonic()))
        time.sleep(0.01)
        return forward(*args, **kwargs)
    monkeypatch.setattr(served.model.llm, "forward", slow_forward)
    return calls


def test_concurrent_questions_queue_and_never_run_two_generations_at_once(served, slow_model):
    sessions = [upload(served, png_bytes(image), "q.png")[1]["session"] for image in served.tiny.images]
    results = [None] * 3

    def client(k):
        results[k] = ask_events(served, sessions[k], QUESTION, max_new_tokens=15)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # in this order
    for thread in threads:
        thread.join()
    threads_in_order = [thread for thread, _ in slow_model]
    runs = [t for k, t in enumerate(threads_in_order) if k == 0 or t != threads_in_order[k - 1]]
    assert len(runs) == 3 and len(slow_model) == 3 * 15  # one generation after another, never interleaved
    for k, received in enumerate(results):  # every answer whole and right
        assert streamed(received) == our_answer(served.tiny, served.model, QUESTION, served.tiny.images[k], 15)
    assert ("queued", {"ahead": 2}) in results[2] and ("queued", {"ahead": 1}) in results[2]  # the page is told
    assert ("queued", {"ahead": 1}) in results[1] and results[0][0] == ("started", {})


def test_clients_coming_at_once_wait_to_be_accepted_instead_of_being_turned_away(served, monkeypatch):
    """While the server is too busy to accept connections, 40 new ones wait in the listen queue (socketserver's
    default of 5 drops the rest: their SYNs are retried a second later, or time out)."""
    release, accept = threading.Event(), served.server.get_request
    monkeypatch.setattr(served.server, "get_request", lambda: release.wait() and accept())
    connections = []
    try:
        for _ in range(40):
            connections.append(socket.create_connection(("127.0.0.1", served.port), timeout=0.5))  # or times out
            connections[-1].sendall(b"GET /api/info HTTP/1.0\r\n\r\n")
    finally:
        release.set()
    for connection in connections:
        connection.settimeout(30)
        assert connection.makefile("rb").readline().startswith(b"HTTP/1.0 200"), "a client was not served"
        connection.close()


def test_a_client_gone_mid_answer_frees_the_model_and_the_next_one_is_served(served, slow_model):
    session = upload(served, png_bytes(served.tiny.images[0]), "a.png")[1]["session"]
    request = json.dumps(dict(session=session, question=QUESTION, max_new_tokens=MAX_NEW)).encode()
    leaving = socket.create_connection(("127.0.0.1", served.port))
    leaving.sendall(b"POST /api/ask HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(request)).encode() + b"\r\n\r\n" + request)
    received = b""
    while b"event: token" not in received:
        received += leaving.recv(4096)
    other = upload(served, png_bytes(served.tiny.images[1]), "b.png")[1]["session"]
    waiting = []
    thread = threading.Thread(target=lambda: waiting.append(ask_events(served, other, QUESTION, max_new_tokens=5)))
    thread.start()
    time.sleep(0.1)
    leaving.close()  # the tab is closed mid-answer
    thread.join(timeout=30)
    first_answer = len(slow_model) - 5  # the forwards of the answer left behind (the other's 5 come after)
    assert 0 < first_answer < 40, first_answer  # it stopped when the client went, long before its MAX_NEW tokens
    assert streamed(waiting[0]) == our_answer(served.tiny, served.model, QUESTION, served.tiny.images[1], 5)
    assert ("queued", {"ahead": 1}) in waiting[0]  # it did wait for the first
    assert len(reference(served, [QUESTION], served.tiny.images[0], MAX_NEW)) == MAX_NEW  # which it would have made

# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-Plus: a reply that names a tool has it run (sample.converse), and the page is sent each step

CIRCLE = world.Scene("white", (world.place("circle", "green", "small", 1, 1),))  # test_plus's: its box is 26..36 of 64
RECORD = tool_record()  # test_plus's four turns: the question, the call, the output handed back, the answer
ASKED = RECORD[0]["value"].split("\n", 1)[1]  # "Where is the small green circle?"
TOOL_REPLY, FINAL_REPLY = assistant_text(RECORD[1]), assistant_text(RECORD[3])  # as a model that learned it says them


@pytest.fixture(scope="module")
def plus_served(served):
    """A second server whose model says what a test scripts: each LLaMA forward runs as usual (the KV cache fills as
    it would), then its next token is forced to the next id of `script`; with the script used up, the model is the
    random one again. `calls` logs (positions fed, positions cached before) of every forward. Its context is 1,024
    positions (rotary: any length will do), so that LLaVA-Plus's turns fit in the tiny tokenizer's bytes."""
    config = demo.DemoConfig(ckpt=served.tiny.ckpt, port=0, examples=str(served.root / "examples" / "val_*.png"),
                             max_new_tokens=400, max_sessions=4)
    model, tokenizer = ask.load(config)
    model.llm.config.max_position_embeddings = 1024
    script, calls, forward = [], [], model.llm.forward

    def scripted(*args, **kwargs):
        calls.append((kwargs["inputs_embeds"].shape[1], kwargs["cache"].length))
        logits = forward(*args, **kwargs)
        if not script:
            return logits
        forced = torch.full_like(logits, -1e4)
        forced[..., script.pop(0)] = 0.0
        return forced
    model.llm.forward = scripted
    server = demo.make_server(config, demo.Demo(model, tokenizer, config, "tiny-plus"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(tiny=served.tiny, server=server, port=server.server_address[1], script=script, calls=calls,
                          url=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def ids(served, text):
    return served.tiny.tokenizer.encode(text, add_special_tokens=False).ids


def say(served, *replies):
    """Script the model's next replies, each ending its turn."""
    for reply in replies:
        served.script.extend(ids(served, reply) + [EOS])


def circle_session(served):
    png = io.BytesIO()
    world.render(CIRCLE).save(png, format="PNG")
    return upload(served, png.getvalue(), "circle.png")[1]["session"]


def steps(received):
    """The events, each run of 'token' events joined into one ('token', text)."""
    joined = []
    for event, data in received:
        if event == "token" and joined and joined[-1][0] == "token":
            joined[-1] = ("token", joined[-1][1] + data["text"])
        else:
            joined.append((event, data["text"] if event == "token" else data))
    return joined


def plus_turn(thoughts, actions, value):
    return f'"thoughts🤔" {thoughts}\n"actions🚀" {actions}\n"value👉" {value}\n'


def test_a_tool_call_is_sent_as_steps_run_on_the_sessions_image_and_its_output_handed_back_in_the_cache(plus_served):
    session = circle_session(plus_served)
    say(plus_served, TOOL_REPLY, FINAL_REPLY)
    plus_served.calls.clear()
    received = ask_events(plus_served, session, ASKED, max_new_tokens=300)
    url = next((data["url"] for event, data in received if event == "tool_image"), None)
    assert steps(received) == [
        ("started", {}),
        ("thoughts", {"text": RECORD[1]["thoughts"]}),  # "The exact box needs the detector."
        ("token", RECORD[1]["value"]),  # "I will use detector."
        ("action", {"tool": "detector", "params": {"caption": "small green circle"}}),
        ("tool_output", {"text": "detector model outputs: {'boxes': [[0.41, 0.41, 0.56, 0.56]], 'logits': [0.97], "
                                 "'phrases': ['small green circle']}"}),
        ("tool_image", {"url": url}),
        ("thoughts", {"text": RECORD[3]["thoughts"]}),  # "Thanks to the output of detector."
        ("token", RECORD[3]["value"]),  # "It is at [0.41, 0.41, 0.56, 0.56]."
        ("done", {"answer": RECORD[3]["value"], "tokens": len(ids(plus_served, FINAL_REPLY)) + 1})]
    assert sum(event == "token" for event, _ in received) > 10  # the values stream piece by piece
    assert url.startswith("/pictures/") and url.endswith(".png") and len(url) > 30  # a name the server minted
    # the output went back as the next user turn of the same conversation, in its KV cache: only the new turn fed
    chat = plus_served.server.demo.session(session).chat
    assert [turn["value"] for turn in chat.conversation] == [RECORD[0]["value"], TOOL_REPLY.strip(),
                                                             RECORD[2]["value"], FINAL_REPLY.strip()]
    (fed_1, answer_1), (fed_2, answer_2) = chat.turns
    assert answer_1 == ids(plus_served, TOOL_REPLY) + [EOS] and answer_2 == ids(plus_served, FINAL_REPLY) + [EOS]
    assert fed_2 == [EOS] + ids(plus_served, f"USER: {RECORD[2]['value']} ASSISTANT:")  # vicuna_v1, by hand
    cached = len(fed_1) - 1 + NUM_IMAGE_TOKENS + len(answer_1) - 1
    assert plus_served.calls[len(answer_1)] == (len(fed_2), cached) and len(plus_served.calls) == \
        len(answer_1) + len(answer_2)


def picture_of(served, received):
    url = next(data["url"] for event, data in received if event == "tool_image")
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    connection.request("GET", url)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "image/png"
    return url, Image.open(io.BytesIO(response.read()))


def test_the_detectors_picture_is_a_png_at_its_url_with_the_box_drawn_and_forgotten_at_reset(plus_served):
    session = circle_session(plus_served)
    say(plus_served, TOOL_REPLY, FINAL_REPLY)
    url, picture = picture_of(plus_served, ask_events(plus_served, session, ASKED, max_new_tokens=300))
    pixels = np.asarray(picture)
    assert picture.format == "PNG" and pixels.shape == (256, 256, 3)  # the 64-pixel image, 4 times larger
    box = slice(26 * 4, 36 * 4)  # the circle's box, pixels 26 to 36 of 64
    assert (pixels[26 * 4, box] == 0).all() and (pixels[box, 26 * 4] == 0).all()  # its top and left edges, black
    assert (pixels[36 * 4 - 1, box] == 0).all() and (pixels[box, 36 * 4 - 1] == 0).all()  # bottom and right
    assert (pixels[26 * 4 - 1, box] == 255).all() and (pixels[0, 0] == 255).all()  # outside it, the white image
    assert tuple(pixels[31 * 4, 31 * 4]) == world.COLORS["green"]  # inside, the circle
    for path in (url.replace("/pictures/", "/pictures/x"), "/pictures/", url[:-4], url + "/../../demo.py"):
        assert call(plus_served, "GET", path)[0] == 404, path
    assert post_json(plus_served, "/api/reset", {"session": session})[0] == 200
    assert call(plus_served, "GET", url)[0] == 404  # the conversation's pictures go with it


def test_an_edit_is_shown_as_the_edited_image_and_the_sessions_own_image_stays(plus_served):
    session = circle_session(plus_served)
    edit = {"API_name": "editor", "API_params": {"caption": "small green circle", "new_color": "red"}}
    say(plus_served, plus_turn("Changing the image needs the editor.", json.dumps([edit]), "I will use editor."),
        plus_turn("Thanks to the output of editor.", "[]", "The small green circle is now red."))
    received = ask_events(plus_served, session, "Make the small green circle red.", max_new_tokens=300)
    assert ("action", {"tool": "editor", "params": edit["API_params"]}) in received
    assert ("tool_output", {"text": "editor model outputs: {'phrases': ['small green circle']}"}) in received
    _, picture = picture_of(plus_served, received)
    assert picture.size == (64, 64) and picture.getpixel((31, 31)) == world.COLORS["red"]  # the edited image
    assert plus.detect(picture, "object")["phrases"] == ["small red circle"]
    assert plus.detect(plus_served.server.demo.session(session).original, "object")["phrases"] == \
        ["small green circle"]
    assert received[-1][0] == "done" and received[-1][1]["answer"] == "The small green circle is now red."


@pytest.mark.parametrize("actions, action, message", [
    ('[{"API_name": "ruler", "API_params": {}}]', {"tool": "ruler", "params": {}},
     "there is no tool 'ruler' (there are detector, editor, segmenter"),
    ('[{"API_name": "detector", "API_params": {"caption": "circle"}', None, "the actions are not JSON: "),
    ('[{"API_name": "detector", "API_params": {"caption": "banana"}}]', {"tool": "detector", "params": {"caption":
                                                                          "banana"}}, "detector: cannot look for"),
    ('[{"API_name": "detector", "API_params": {"caption": "circle", "zoom": 2}}]', {"tool": "detector", "params": {
        "caption": "circle", "zoom": 2}}, "unexpected keyword argument 'zoom'"),
])
def test_a_malformed_action_is_one_line_in_the_stream_and_the_conversation_goes_on(plus_served, actions, action,
                                                                                   message):
    session = circle_session(plus_served)
    say(plus_served, plus_turn("t", actions, "v"))
    received = steps(ask_events(plus_served, session, "Where is it?", max_new_tokens=300))
    assert received[:3] == [("started", {}), ("thoughts", {"text": "t"}), ("token", "v")]
    assert [event for event, _ in received[3:]] == ["action"] * (action is not None) + ["tool_error", "done"]
    assert action is None or received[3] == ("action", action)
    error = received[-2][1]["message"]
    assert message in error and "\n" not in error, error
    say(plus_served, plus_turn(plus.NO_TOOL, "[]", "It is green."))  # the next question: no tool, answered
    assert steps(ask_events(plus_served, session, "What color is it?", max_new_tokens=300)) == [
        ("started", {}), ("thoughts", {"text": plus.NO_TOOL}), ("token", "It is green."),
        ("done", {"answer": "It is green.", "tokens": len(ids(plus_served, plus_turn(plus.NO_TOOL, "[]", "It is "
                                                                                                  "green."))) + 1})]
    chat = plus_served.server.demo.session(session).chat
    assert [turn["value"] for turn in chat.conversation][::2] == [f"{IMAGE_TAG}\nWhere is it?", "What color is it?"]


def test_a_reply_that_is_no_llava_plus_turn_streams_as_it_comes(plus_served):
    """An ordinary model's replies are unchanged: one that starts like a marker is all answer, every character."""
    session = circle_session(plus_served)
    for reply in ('"thoughts" are mine, "actions🚀" too.', '"thought"', "Green."):
        say(plus_served, reply)
        received = ask_events(plus_served, session, "Why?", max_new_tokens=300)
        assert steps(received) == [("started", {}), ("token", reply), ("done", {"answer": reply, "tokens": len(
            ids(plus_served, reply)) + 1})]

# ----------------------------------------------------------------------------------------------------------------------
# The command line


def test_the_command_prints_the_address_serves_and_stops_on_ctrl_c(served, tmp_path):
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "demo.py"), "--ckpt", served.tiny.ckpt, "--port",
                                "0", "--threads", "1", "--examples", str(served.root / "examples" / "*.png")],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        while "serving" not in line and line:
            line = process.stderr.readline()
        assert f"demo: 3 examples, serving {served.tiny.ckpt} at http://127.0.0.1:" in line, line
        address = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(address + "api/info", timeout=30) as response:
            assert json.load(response)["examples"] == ["val_00000.png", "val_00001.png", "val_00002.png"]
    finally:
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in rest


@pytest.mark.parametrize("args, message", [
    (["--port", "-1"], "--port must be at least 0, got -1"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--max_upload_mb", "0"], "--max_upload_mb must be above 0"),
    (["--max_sessions", "0"], "--max_sessions must be at least 1"),
    (["--prot", "8000"], "unknown flag --prot (did you mean --port?)"),
    (["--tools", "nothere.py"], "--tools nothere.py: cannot read it"),
])
def test_flag_mistakes_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        demo.main(args)
    assert str(exit.value).startswith("demo.py: error: ") and message in str(exit.value)
    assert "\n" not in str(exit.value) and capsys.readouterr().err == ""


def test_tools_of_ones_own_join_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "mytools.py").write_text('import plus\n\n@plus.tool("ruler")\ndef ruler(image):\n'
                                         '    return {"width": image.size[0]}\n')
    try:
        with pytest.raises(SystemExit, match="demo.py: error: .*nothere"):  # the model is looked for after the tools
            demo.main(["--tools", str(tmp_path / "mytools.py"), "--ckpt", str(tmp_path / "nothere")])
        reply = '"thoughts🤔" t\n"actions🚀" [{"API_name": "ruler", "API_params": {}}]\n"value👉" v\n'
        assert plus.tool_turn(reply, world.render(world.sample_scene(random.Random(0))), "?")[0].startswith(
            "ruler model outputs: {'width': 64}")
    finally:
        plus.TOOLS.pop("ruler", None)


def test_a_port_in_use_is_one_line_naming_the_flags(served, capsys):
    with pytest.raises(SystemExit) as exit:
        demo.main(["--ckpt", served.tiny.ckpt, "--port", str(served.port)])
    assert f"demo.py: error: cannot listen on 127.0.0.1 port {served.port} (--host, --port)" in str(exit.value)


def test_help_starts_with_the_examples(capsys):
    assert demo.main(["--help"]) is None
    text = capsys.readouterr().out
    examples = text.split("Examples:")[1].strip().split("\n\n")[0].splitlines()
    assert len(examples) >= 4 and all(line.strip().startswith("python demo.py") for line in examples)
    assert text.index("Examples:") < text.index("--host STR") and "(default: 127.0.0.1)" in text

# ----------------------------------------------------------------------------------------------------------------------
# The page in a real browser


def chromium():
    """Headless Chromium (bench_demo.chromium); without it, a failure saying how to install it."""
    try:
        return bench_demo.chromium()
    except flags.Stop as error:
        pytest.fail(str(error))


def ask_in_page(browser, question, max_new_tokens):
    """Type the question and the answer length into the page, send it, and return the answer's element once done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    length = browser.find_element(By.ID, "max_new_tokens")
    length.clear()
    length.send_keys(str(max_new_tokens))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    answer = browser.find_elements(By.CLASS_NAME, "answer")[-1]  # the page adds it at once, then fills it
    WebDriverWait(browser, 60).until(lambda _: answer.get_attribute("data-done"))
    return answer


def page_with_image(browser, served, image):
    """Load the page and upload an image in it; returns a WebDriverWait of 30 s."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(served.url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    browser.find_element(By.ID, "upload").send_keys(str(image))
    wait.until(lambda b: b.find_element(By.ID, "image-name").text == os.path.basename(image))
    return wait


def test_in_a_real_browser_upload_ask_read_the_streamed_answer_and_see_a_bad_upload_refused(served, tmp_path):
    from selenium.webdriver.common.by import By
    browser = chromium()
    try:
        image = served.tiny.images[0]
        wait = page_with_image(browser, served, image)
        answer = ask_in_page(browser, QUESTION, 12)
        assert answer.get_attribute("data-done") == "true"
        answer_1 = reference(served, [QUESTION], image, 12)
        assert answer.get_property("textContent") == served.tiny.tokenizer.decode(until_stop(answer_1)).strip()
        assert int(answer.get_attribute("data-pieces")) > 3  # it came in pieces, as they were generated
        (tmp_path / "notes.png").write_bytes(b"not an image at all")
        browser.find_element(By.ID, "upload").send_keys(str(tmp_path / "notes.png"))
        status = wait.until(lambda b: (s := b.find_element(By.ID, "status")).get_attribute("class") == "error" and s)
        assert status.text == "notes.png is not an image this server can read (PNG, JPEG, GIF, WebP, BMP, ...)"
        # the conversation about the image goes on, in the cache
        answer = ask_in_page(browser, FOLLOW_UP, 8)
        assert answer.get_attribute("data-done") == "true" and len(browser.find_elements(By.CLASS_NAME, "answer")) == 2
        answer_2 = reference(served, [QUESTION, until_stop(answer_1), FOLLOW_UP], image, 8)
        assert answer.get_property("textContent") == served.tiny.tokenizer.decode(until_stop(answer_2)).strip()
        browser.find_element(By.ID, "reset").click()
        wait.until(lambda b: not b.find_elements(By.CLASS_NAME, "turn"))
        assert "Started over" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()


def test_in_a_real_browser_a_tool_call_shows_its_steps_and_picture_and_a_bad_call_is_one_line(plus_served, tmp_path):
    from selenium.webdriver.common.by import By
    browser = chromium()
    try:
        world.render(CIRCLE).save(tmp_path / "circle.png")
        wait = page_with_image(browser, plus_served, tmp_path / "circle.png")
        say(plus_served, TOOL_REPLY, FINAL_REPLY)
        answer = ask_in_page(browser, ASKED, 300)
        assert answer.get_attribute("data-done") == "true"
        shown = [(part.get_attribute("class"), part.get_property("textContent"))
                 for part in answer.find_elements(By.XPATH, "./div")]
        assert shown == [
            ("step thoughts", "thinks The exact box needs the detector."), ("text", "I will use detector."),
            ("step action", 'calls detector {caption: "small green circle"}'),
            ("step output", "tool output detector model outputs: {'boxes': [[0.41, 0.41, 0.56, 0.56]], 'logits': "
                            "[0.97], 'phrases': ['small green circle']}"),
            ("step picture", "picture "), ("step thoughts", "thinks Thanks to the output of detector."),
            ("text", "It is at [0.41, 0.41, 0.56, 0.56].")]
        picture = answer.find_element(By.CSS_SELECTOR, ".picture img")
        size = "return arguments[0].complete && [arguments[0].naturalWidth, arguments[0].naturalHeight]"
        assert wait.until(lambda b: b.execute_script(size, picture)) == [256, 256]  # loaded: the boxes drawn
        assert picture.size["width"] > 100 and picture.get_attribute("src").startswith(plus_served.url + "/pictures/")
        # a call that cannot run is one line in the answer, and the conversation goes on
        say(plus_served, plus_turn("t", '[{"API_name": "ruler", "API_params": {}}]', "v"),
            plus_turn(plus.NO_TOOL, "[]", "It is green."))
        answer = ask_in_page(browser, "Measure it.", 300)
        error = answer.find_element(By.CSS_SELECTOR, ".step.error").get_property("textContent")
        assert answer.get_attribute("data-done") == "true"
        assert error.startswith("tool not run: there is no tool 'ruler'")
        answer = ask_in_page(browser, "What color is it?", 300)
        assert answer.find_element(By.CLASS_NAME, "text").get_property("textContent") == "It is green."
        assert len(browser.find_elements(By.CLASS_NAME, "answer")) == 3
        assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
    finally:
        browser.quit()
