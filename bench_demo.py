"""
demo.py under load: the server runs in this process on a trained model, and clients ask at once, each question about a
held-out image of the world (evaluate.py's eval.json, every type in turn) in a conversation of its own. Every answer
must come whole and be the one the model gives to that question alone (sample.Chat, asked here one after another
before the clients start); it prints the p50 and p95 time to the first token and to the whole answer, then tries the
bad uploads (too large, not an image, cut short, a decompression bomb) and asks once more.

    python bench_demo.py                          # 8 clients x 10 questions on out/stage2 (train.py's default)
    python bench_demo.py --clients 2 --questions 3 --threads 1   # smaller, 1 thread when others load the cores
    python bench_demo.py --ckpt out/stage2-lora   # any checkpoint of ours (ask.py's model flags)
    python bench_demo.py --screenshot docs/demo.png   # also a conversation in headless Chromium, saved as a PNG

--screenshot drives Debian's chromium through selenium (a test-only dependency: requirements-test.txt).
"""
import http.client
import io
import json
import os
import shutil
import statistics
import struct
import threading
import time
import zlib
from dataclasses import dataclass

from PIL import Image

import ask
import demo
import flags
import runtime
import world
from data import load_image
from sample import Chat

USAGE = "python bench_demo.py [--clients N] [--questions N] [--screenshot PNG] [--ckpt PATH] [--flag value ...]"
CONVERSATION = ("How many circles are there?", "What color is the small circle?",
                "Is the square bigger than the green object?")  # the README's chat, for the screenshot


@dataclass
class BenchDemoConfig(ask.ModelFlags):
    # load: who asks what
    clients: int = 8  # clients asking at once
    questions: int = 10  # questions each client asks, one after another
    max_new_tokens: int = 64  # most tokens per answer
    # screenshot
    screenshot: str = ""  # a PNG to save a conversation in the page to (val_00113.png, the README's three questions)


def main(argv=None):
    with flags.one_line_errors("bench_demo.py"):
        given = flags.command_line(BenchDemoConfig, argv, "bench_demo.py", USAGE, __doc__)
        if given is None:  # --help
            return
        config = BenchDemoConfig(**given)
        flags.at_least(config, 1, "clients", "questions", "max_new_tokens")
        directory = world.ensure_world()
        items = world.eval_items(directory, config.clients * config.questions)
        path = ask.find_model(config)
        ask.refuse_captioner(config, path, "bench_demo.py")
        model, tokenizer = ask.load(config, path)
        server_config = demo.DemoConfig(port=0, examples=os.path.join(directory, "images", "val_*.png"),
                                        max_new_tokens=config.max_new_tokens)
        server = demo.make_server(server_config, demo.Demo(model, tokenizer, server_config, ask.model_id(path)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"cpu: {runtime.cpu_name()}, {os.cpu_count()} cores, torch threads {config.threads or 'default'}")
        expected = alone(model, tokenizer, items, directory, config.max_new_tokens)
        under_load(server, items, expected, config)
        bad_uploads_refused(server, os.path.join(directory, "images", "val_00113.png"), expected, items)
        if config.screenshot:
            take_screenshot(server, config.screenshot)
        server.shutdown()


def alone(model, tokenizer, items, directory, max_new_tokens):
    """Each question's answer asked alone through sample.Chat (greedy), without the server: what the clients must
    get."""
    started, answers = time.perf_counter(), []
    for item in items:
        image = load_image(os.path.join(directory, item["image"]))
        conversation = Chat(model, tokenizer, ask.to_pixels(model, [image]))
        ids = list(conversation.ask(item["question"], max_new_tokens, {}))
        answers.append(ask.decode_answer(ids, tokenizer, conversation.stops))
    print(f"alone: {len(items)} questions one after another, without the server, in "
          f"{time.perf_counter() - started:.2f} s")
    return answers


def under_load(server, items, expected, config):
    """The clients at once, each asking its questions in turn; every answer checked, the times printed."""
    results, start = [None] * len(items), threading.Barrier(config.clients)

    def client(k):
        start.wait()
        for index in range(k * config.questions, (k + 1) * config.questions):
            results[index] = timed_question(server, items[index])
    threads = [threading.Thread(target=client, args=(k,)) for k in range(config.clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    answered = [r for r in results if r and r["answer"] is not None]
    same = sum(r["answer"] == answer for r, answer in zip(results, expected) if r and r["answer"] is not None)
    right = sum(r["answer"] == item["answer"] for r, item in zip(results, items) if r and r["answer"] is not None)
    print(f"load: {config.clients} clients x {config.questions} questions at once, {wall:.2f} s: {len(answered)} of "
          f"{len(items)} answered whole ({len(items) - len(answered)} lost), {same} the same as asked alone, "
          f"{right} right (the world's answer); at most {max(r['ahead'] for r in answered)} waiting ahead of one")
    for key, what in (("first", "first token"), ("whole", "whole answer")):
        times = sorted(r[key] for r in answered)
        print(f"  time to the {what}: p50 {percentile(times, 50):.3f} s, p95 {percentile(times, 95):.3f} s, "
              f"max {times[-1]:.3f} s")
    if len(answered) < len(items) or same < len(items):
        raise flags.Stop(f"{len(items) - len(answered)} answers lost, {len(items) - same} not as asked alone")


def percentile(ordered, p):
    """The p-th percentile of sorted values, linearly between the nearest ranks (numpy's default)."""
    return statistics.quantiles(ordered, n=100, method="inclusive")[p - 1] if len(ordered) > 1 else ordered[0]


def request(server, method, path, body=b"", headers=None):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=600)
    connection.request(method, path, body=body, headers=headers or {})
    return connection.getresponse()


def timed_question(server, item):
    """One conversation about the item's image, one question: {answer (None if it did not end with 'done'), first
    and whole (seconds from sending the question), ahead (the most waiting ahead of it)}."""
    name = os.path.basename(item["image"])
    session = json.load(request(server, "POST", "/api/example", json.dumps({"name": name}).encode()))["session"]
    sent = time.perf_counter()
    response = request(server, "POST", "/api/ask", json.dumps({"session": session, "question": item["question"]}))
    result, event = dict(answer=None, first=None, ahead=0), None
    for line in response:
        if line.startswith(b"event: "):
            event = line[7:].strip().decode()
        elif line.startswith(b"data: "):
            data = json.loads(line[6:])
            if event == "token" and result["first"] is None:
                result["first"] = time.perf_counter() - sent
            result["ahead"] = max(result["ahead"], data.get("ahead", 0))
            if event == "done":
                result.update(answer=data["answer"], whole=time.perf_counter() - sent)
    return result


def bad_upload_bodies(image_path, limit):
    """{file name: bytes} of the uploads a server must refuse: one over `limit` bytes, one not an image, an empty one,
    a PNG and a JPEG cut in half, and a decompression bomb (a PNG whose header says 100000 x 100000 pixels)."""
    with open(image_path, "rb") as f:
        png = f.read()
    jpeg = io.BytesIO()
    Image.open(image_path).convert("RGB").resize((120, 90)).save(jpeg, "JPEG")
    bomb = bytearray(png)
    header = struct.pack(">II", 100_000, 100_000) + bomb[24:29]  # IHDR: width, height, then depth, colour type, ...
    bomb[16:29] = header
    bomb[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return {"big.png": b"\x89PNG" + b"0" * limit, "notes.txt": b"just some words", "empty.png": b"",
            "cut.png": png[:len(png) // 2], "cut.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
            "bomb.png": bytes(bomb)}


def bad_uploads_refused(server, image_path, expected, items):
    """Each bad upload's status and message, then a question: is the server still answering, and right?"""
    for name, body in bad_upload_bodies(image_path, server.demo.max_upload_bytes()).items():
        response = request(server, "POST", "/api/upload", body, {"X-Filename": name})
        print(f"bad upload {name} ({len(body):,} bytes): {response.status} {json.load(response)['error']}")
    after = timed_question(server, items[0])
    print(f"after them, the first question again: {after['answer']!r} in {after['whole']:.3f} s "
          f"({'the same' if after['answer'] == expected[0] else 'NOT the same'} as alone)")


def chromium(size="1000,640"):
    """Headless Chromium driven through Debian's chromedriver by selenium; a Stop saying what to install without."""
    try:
        from selenium import webdriver
    except ImportError:
        raise flags.Stop("driving Chromium needs selenium: pip install -r requirements-test.txt") from None
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise flags.Stop("driving Chromium needs Chromium and its driver: apt-get install -y chromium chromium-driver "
                         "(Debian's packages, as .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size}"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def take_screenshot(server, png):
    """The README's conversation about val_00113.png in the page, saved as a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    browser = chromium("1000,760")
    try:
        browser.get("http://{}:{}/".format(*server.server_address[:2]))
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        Select(browser.find_element(By.ID, "example")).select_by_value("val_00113.png")
        wait.until(lambda b: b.find_element(By.ID, "image-name").text == "val_00113.png")
        for question in CONVERSATION:
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "send").click()
            answer = browser.find_elements(By.CLASS_NAME, "answer")[-1]
            wait.until(lambda _: answer.get_attribute("data-done"))
            print(f"page: > {question}\n      {answer.text}")
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png()))
        height = browser.execute_script("return document.documentElement.scrollHeight;")
        shot.crop((0, 0, shot.width, min(shot.height, height))).save(png, optimize=True)  # the page, not the window
        print(f"screenshot: {png}")
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
