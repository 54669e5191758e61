"""
A visual chat in the browser: upload an image or pick one of the world's held-out examples, ask, and watch the answer
stream token by token; the conversation goes on in one KV cache, as sample.py --chat does. A LLaVA-Plus model's
thoughts, tool calls and tool outputs are shown as steps, with the picture of the tool's work (docs/plus.md). One model
serves everyone: questions queue, and the page says how many are ahead.

Examples:

    python demo.py                                      # the default model (out/stage2); open the address it prints
    python demo.py --ckpt out/stage2-lora --port 8001   # any checkpoint of ours, on another port
    python demo.py --threads 1 --max_new_tokens 64      # 1 thread when others load the cores; shorter answers at most
    python demo.py --hf llava-1.5-7b-hf --device cuda   # a published LLaVA (HF layout)
    python demo.py --host 0.0.0.0                       # reachable from other machines (not only this one)
    python demo.py --ckpt out/plus --tools mytools.py   # LLaVA-Plus with tools of your own (as sample.py --tools)

It listens on 127.0.0.1 (this machine only) unless --host says otherwise, and runs until Ctrl-C. The page is demo.html,
plain HTML and JavaScript served from here; nothing is fetched from elsewhere. The HTTP API it uses:

    GET  /api/info                  the model's name, the example names, the limits and the default settings
    GET  /examples/NAME             an example image (only the names /api/info lists)
    GET  /pictures/TOKEN.png        the picture of a tool's work (only the URLs a 'tool_image' event gave)
    POST /api/upload                the image file as the body (X-Filename: its name) -> {session, image}
    POST /api/example               {"name": NAME} -> {session, image}
    POST /api/ask                   {session, question, temperature, top_p, max_new_tokens} -> a text/event-stream of
                                    'queued' {ahead}, 'started' {}, then 'token' {text} ..., then 'done' {answer,
                                    tokens} or 'error' {message}. A LLaVA-Plus model's reply shows its thoughts
                                    ('thoughts' {text}) and streams its value as tokens; one that names a tool has
                                    'action' {tool, params}, then 'tool_output' {text} (what goes back to the model)
                                    and 'tool_image' {url} (boxes drawn, masks tinted, or the edited image), or
                                    'tool_error' {message}; after an output, the model's next reply (sample.converse)
    POST /api/reset                 {session} -> {image}: the conversation starts over, about the same image

A bad request gets {"error": message} with a 4xx status; an upload that is too large, not an image, cut short or a
decompression bomb (over Pillow's MAX_IMAGE_PIXELS) is refused so, and the server goes on serving.
"""
import contextlib
import glob
import io
import json
import mimetypes
import os
import secrets
import sys
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import ask
import flags
from data import ImageError, load_image
from sample import Chat, converse, load_tools
from tinyllava import REPO_DIR

USAGE = "python demo.py [--ckpt PATH | --hf DIR] [--port N] [--host ADDRESS] [--flag value ...]"
PAGE = os.path.join(REPO_DIR, "demo.html")
HEARTBEAT = 1.0  # seconds between 'queued' events while waiting: each also finds out whether the client is gone
MAX_JSON_BYTES = 64 * 1024  # a question and its settings
MAX_QUESTION_CHARS = 2000
MAX_PICTURES = 16  # pictures of a tool's work kept per conversation, the oldest forgotten beyond that
THOUGHTS, ACTIONS, VALUE = '"thoughts🤔"', '"actions🚀"', '"value👉"'  # a LLaVA-Plus turn's markers


@dataclass
class DemoConfig(ask.ModelFlags):
    # server: where it listens and what it accepts
    host: str = "127.0.0.1"  # the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
    port: int = 8000  # the port (0: any free one; the address printed says which)
    examples: str = "cache/world/default/images/val_*.png"  # the example images the page offers, a glob pattern
                                                              # (where this runs, else in the repository; default:
                                                              # the world's held-out images)
    max_upload_mb: float = 10.0  # largest image file accepted, in MB
    max_sessions: int = 16  # conversations kept; a new one beyond that forgets the least recently used (each holds
                            # a KV cache of the model's whole context: 2 GB at 7B in float16)
    # generation: the page's settings start at these; max_new_tokens is also the most it may ask
    max_new_tokens: int = 256  # most tokens per answer
    temperature: float = 0.0  # 0: greedy, reproducible; LLaVA's chat demo samples at 0.2
    top_p: float = 1.0  # nucleus sampling threshold (1.0: off); used at a temperature above 0
    seed: int = 1337  # of the sampling generator, shared by every conversation
    # LLaVA-Plus: a reply that names a tool (plus.py) has it run on the conversation's image
    tools: list[str] = field(default_factory=list)  # Python files of your own tools (functions registered with
                                                    # @plus.tool("name")), besides detector, segmenter and editor


def main(argv=None):
    """Serve the demo until Ctrl-C; a mistake ends it with one line (flags.one_line_errors)."""
    with flags.one_line_errors("demo.py"):
        given = flags.command_line(DemoConfig, argv, "demo.py", USAGE, __doc__)
        if given is None:  # --help
            return
        config = checked(DemoConfig(**given))
        for tools in config.tools:  # a mistake in them should not cost a model load first
            load_tools(tools)
        path = ask.find_model(config)
        ask.refuse_captioner(config, path, "the demo's chat")
        model, tokenizer = ask.load(config, path)
        server = make_server(config, Demo(model, tokenizer, config, ask.model_id(path)))
        host, port = server.server_address[:2]
        print(f"demo: {len(server.demo.examples)} examples, serving {path} at http://{host}:{port}/ "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: --host {config.host}: anyone who can reach this machine can use the model", file=sys.stderr)
        with server:
            server.serve_forever()


def checked(config):
    """The config, once every flag makes sense; else one line naming the flag."""
    flags.at_least(config, 1, "max_new_tokens", "max_sessions")
    flags.at_least(config, 0, "temperature", "threads", "port")
    if not 0 < config.top_p <= 1:
        raise flags.Stop(f"--top_p must be in (0, 1], got {config.top_p}")
    if not config.max_upload_mb > 0:
        raise flags.Stop(f"--max_upload_mb must be above 0, got {config.max_upload_mb}")
    return config


def make_server(config, demo):
    """A ThreadingHTTPServer (one thread per request) bound to --host and --port, serving `demo`."""
    try:
        server = Server((config.host, config.port), Handler)
    except OSError as error:
        raise flags.Stop(f"cannot listen on {config.host} port {config.port} (--host, --port): {error.strerror}; "
                         "--port 0 takes any free port") from None
    server.demo = demo
    return server


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open does not hold up Ctrl-C
    request_queue_size = 128  # connections not yet accepted: with socketserver's 5, clients coming at once while the
                              # model keeps this process busy were turned away, and came back a second later


def find_examples(pattern):
    """{name: path} of the example images: the files the pattern matches where this runs, else in the repository.
    Clients name an example; only these paths are ever opened for them."""
    paths = sorted(glob.glob(pattern)) or sorted(glob.glob(os.path.join(REPO_DIR, pattern)))
    found = {}
    for path in paths:
        found.setdefault(os.path.basename(path), path)
    return found


class Demo:
    """What the requests share: the model, its conversations (sessions) and the line of questions waiting for it."""

    def __init__(self, model, tokenizer, config, name):
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, config, name
        self.examples = find_examples(config.examples)
        self.sessions = OrderedDict()  # id -> Session, least recently used first
        self.sessions_lock = threading.Lock()
        self.decoding = threading.Lock()  # data.load_image sets warnings filters, which are process-wide
        self.line = Line()
        device = model.llm.embed_tokens.weight.device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

    def info(self):
        config = self.config
        return dict(model=self.name, examples=list(self.examples), max_upload_bytes=self.max_upload_bytes(),
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p)

    def max_upload_bytes(self):
        return int(self.config.max_upload_mb * 1e6)

    def open_session(self, image, name):
        """A new conversation about a PIL image; returns its id. Beyond --max_sessions the least recently used goes."""
        session = Session(name, ask.to_pixels(self.model, [image]), image)
        session_id = secrets.token_urlsafe(16)
        with self.sessions_lock:
            self.sessions[session_id] = session
            while len(self.sessions) > self.config.max_sessions:
                self.sessions.popitem(last=False)
        return session_id

    def session(self, session_id):
        """The session of that id (now the most recently used), or None."""
        with self.sessions_lock:
            if not isinstance(session_id, str) or session_id not in self.sessions:
                return None
            self.sessions.move_to_end(session_id)
            return self.sessions[session_id]

    def keep_picture(self, session, picture):
        """Keep a tool's picture (PIL) in its session, as a PNG; returns the URL, a name only this server mints."""
        png = io.BytesIO()
        picture.save(png, format="PNG")
        token = secrets.token_urlsafe(16)
        with self.sessions_lock:
            session.pictures[token] = png.getvalue()
            while len(session.pictures) > MAX_PICTURES:
                session.pictures.popitem(last=False)
        return f"/pictures/{token}.png"

    def picture(self, name):
        """The PNG of a picture kept under that name (TOKEN.png), or None."""
        with self.sessions_lock:
            return next((s.pictures[name[:-4]] for s in self.sessions.values() if name.endswith(".png")
                         and name[:-4] in s.pictures), None)

    def decode_upload(self, body, name):
        """The uploaded file as a PIL image, or an ImageError whose message says what is wrong in words."""
        with self.decoding:
            try:
                return load_image(Upload(body, name))
            except ImageError as error:
                raise ImageError(upload_problem(error.__cause__, name)) from None


@dataclass
class Session:
    image: str  # the image's name, as the page shows it
    pixel_values: torch.Tensor  # (1, 3, S, S)
    original: object  # the image itself (PIL), which LLaVA-Plus's tools read
    chat: Chat | None = None  # made at the first question (its KV cache is the model's whole context); None again
                              # after a reset
    pictures: OrderedDict = field(default_factory=OrderedDict)  # token -> PNG bytes of a tool's work, oldest first


class Upload(io.BytesIO):
    """An uploaded file's bytes, which Pillow opens as a file; named by the file name the browser sent."""

    def __init__(self, body, name):
        super().__init__(body)
        self.name = name

    def __str__(self):
        return self.name


def upload_problem(error, name):
    """What is wrong with an upload that Pillow could not read, in words (error: what Pillow raised)."""
    text = f"{type(error).__name__}: {error}"
    if "DecompressionBomb" in type(error).__name__:
        return f"{name} is too large in pixels, a possible decompression bomb ({error})"
    if "cannot identify image file" in str(error):
        return f"{name} is not an image this server can read (PNG, JPEG, GIF, WebP, BMP, ...)"
    if "truncated" in str(error) or "broken" in str(error) or isinstance(error, (SyntaxError, EOFError)):
        return f"{name} is cut short or damaged: {text}"
    return f"{name} cannot be read as an image: {text}"


class Line:
    """One generation at a time, first come first served. Each request joins, waits until nothing is ahead of it,
    generates, and leaves (also when its client has gone: then the next one goes on)."""

    def __init__(self):
        self.changed = threading.Condition()
        self.tickets = []  # in arrival order; the first one is generating

    def join(self):
        ticket = object()
        with self.changed:
            self.tickets.append(ticket)
        return ticket

    def ahead(self, ticket, timeout):
        """The number of requests ahead of this ticket, after waiting up to `timeout` seconds for it to change."""
        with self.changed:
            if self.tickets.index(ticket):
                self.changed.wait(timeout)
            return self.tickets.index(ticket)

    def leave(self, ticket):
        with self.changed:
            self.tickets.remove(ticket)
            self.changed.notify_all()


class ClientGone(Exception):
    """The client closed the connection (its tab, or the request): stop working for it."""


class Handler(BaseHTTPRequestHandler):
    """The routes of the docstring; every answer but the page, the examples and the stream is JSON."""
    server_version = "tinyllava-demo"
    timeout = 60  # seconds a read or write may block: a client that stops reading mid-request is dropped

    def do_GET(self):
        route = urllib.parse.urlsplit(self.path).path
        demo = self.server.demo
        if route in ("/", "/demo.html"):
            with open(PAGE, "rb") as f:
                self.send_bytes(HTTPStatus.OK, f.read(), "text/html; charset=utf-8")
        elif route == "/api/info":
            self.send_json(HTTPStatus.OK, demo.info())
        elif route.startswith("/examples/") and urllib.parse.unquote(route[len("/examples/"):]) in demo.examples:
            path = demo.examples[urllib.parse.unquote(route[len("/examples/"):])]  # only names listed: no client path
            with open(path, "rb") as f:
                self.send_bytes(HTTPStatus.OK, f.read(), mimetypes.guess_type(path)[0] or "application/octet-stream")
        elif route.startswith("/pictures/") and (png := demo.picture(route[len("/pictures/"):])) is not None:
            self.send_bytes(HTTPStatus.OK, png, "image/png")  # from memory: nothing here opens a file
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {route}"})

    def do_POST(self):
        routes = {"/api/upload": self.upload, "/api/example": self.example, "/api/ask": self.ask,
                  "/api/reset": self.reset}
        route = urllib.parse.urlsplit(self.path).path
        if route not in routes:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such route: POST {route}"})
            return
        try:
            routes[route]()
        except RequestError as error:
            self.send_json(error.status, {"error": str(error)})
        except ClientGone:
            pass

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:  # refusals are worth a line; 80 answered questions are not
            super().log_request(code, size)

    # ---- routes ----

    def upload(self):
        demo = self.server.demo
        name = urllib.parse.unquote(self.headers.get("X-Filename", "upload"))[-100:] or "upload"
        body = self.read_body(demo.max_upload_bytes(), f"{name} is over the upload limit of "
                                                       f"{demo.config.max_upload_mb:g} MB (--max_upload_mb)")
        try:
            image = demo.decode_upload(body, name)
        except ImageError as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        self.send_json(HTTPStatus.OK, {"session": demo.open_session(image, name), "image": name})

    def example(self):
        demo, name = self.server.demo, self.read_json().get("name")
        if not isinstance(name, str) or name not in demo.examples:  # only names listed: a path sent opens nothing
            raise RequestError(HTTPStatus.NOT_FOUND, f"no example named {str(name)[:100]!r} (GET /api/info lists them)")
        image = load_image(demo.examples[name])
        self.send_json(HTTPStatus.OK, {"session": demo.open_session(image, name), "image": name})

    def reset(self):
        session = self.known_session(self.read_json())
        session.chat = None  # a generation under way keeps the Chat it holds; the next question starts afresh
        with self.server.demo.sessions_lock:
            session.pictures.clear()
        self.send_json(HTTPStatus.OK, {"image": session.image})

    def ask(self):
        demo, request = self.server.demo, self.read_json()
        session = self.known_session(request)
        question, settings = asked(request, demo.config)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        ticket = demo.line.join()
        try:
            ahead = demo.line.ahead(ticket, timeout=0)
            while ahead:
                self.send_event("queued", {"ahead": ahead})
                ahead = demo.line.ahead(ticket, HEARTBEAT)
            self.answer(session, question, settings)
        finally:
            demo.line.leave(ticket)

    def answer(self, session, question, settings):
        """Stream the answer, its turn (generation holds the model); stop generating once the client is gone. A reply
        of LLaVA-Plus's that names a tool has it run on the session's image (sample.converse, as sample.py runs it)
        and its steps sent."""
        demo = self.server.demo
        session.chat = chat = session.chat or Chat(demo.model, demo.tokenizer, session.pixel_values)
        sampling = dict(temperature=settings["temperature"], top_p=settings["top_p"], generator=demo.generator)
        self.send_event("started", {})
        reply = Reply()
        try:
            with contextlib.closing(converse(chat, demo.tokenizer, question, settings["max_new_tokens"], sampling,
                                             session.original)) as parts:
                for kind, value in parts:
                    if kind == "tool":
                        self.send_tool_step(session, value)
                        reply = Reply()  # the model's reply to the tool's output comes next
                        continue
                    for event, data in reply.feed(value if kind == "piece" else "", end=kind == "reply"):
                        self.send_event(event, data)
        except flags.Stop as error:  # the conversation no longer fits the context
            self.send_event("error", {"message": str(error)})
            return
        self.send_event("done", {"answer": reply.answer(), "tokens": len(chat.turns[-1][1])})

    def send_tool_step(self, session, step):
        """A sample.ToolStep as events: the call, then the tool's output and its picture, or why it could not run."""
        if step.action is not None:
            self.send_event("action", {"tool": step.action["API_name"], "params": step.action.get("API_params", {})})
        if step.error is not None:
            self.send_event("tool_error", {"message": step.error})
            return
        self.send_event("tool_output", {"text": step.output_text})
        if step.picture is not None:
            self.send_event("tool_image", {"url": self.server.demo.keep_picture(session, step.picture)})

    # ---- reading and writing ----

    def read_body(self, limit, too_large):
        """The request's body, at most `limit` bytes (too_large: the message beyond that)."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length") from None
        if length > limit:
            self.drain(length)
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientGone()
        return body

    def drain(self, length, most=64 << 20):
        """Read and drop a refused body (up to `most` bytes), so that the client, still sending it, reads the
        refusal instead of a reset connection."""
        with contextlib.suppress(OSError):
            while length > 0 and most > 0 and (chunk := self.rfile.read(min(length, most, 1 << 20))):
                length, most = length - len(chunk), most - len(chunk)

    def read_json(self):
        body = self.read_body(MAX_JSON_BYTES, f"a request body over {MAX_JSON_BYTES} bytes")
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the request is not JSON: {error}") from None
        if not isinstance(request, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request is not a JSON object")
        return request

    def known_session(self, request):
        session = self.server.demo.session(request.get("session"))
        if session is None:
            raise RequestError(HTTPStatus.NOT_FOUND, "unknown session (the server restarted, or forgot the least "
                                                     "recently used conversation): choose the image again")
        return session

    def send_event(self, event, data):
        """One server-sent event; a client that is gone raises ClientGone."""
        try:
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode())
        except OSError:
            raise ClientGone() from None

    def send_json(self, status, data):
        self.send_bytes(status, json.dumps(data).encode(), "application/json")

    def send_bytes(self, status, body, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client is gone; nothing is waiting for this answer


class RequestError(Exception):
    """A request refused: the status and the message the page shows."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Reply:
    """One reply as the page shows it, read as it streams. An ordinary reply is all answer: its pieces go out as
    'token' events as they come. A LLaVA-Plus turn ('"thoughts🤔" ...\n"actions🚀" [...]\n"value👉" ...') sends
    its thoughts once whole ('thoughts') and streams its value as tokens; its actions are the loop's to run and
    show (send_tool_step). Until the text is seen to start otherwise, a marker's beginning is held back."""

    def __init__(self):
        self.text, self.plus, self.thought, self.sent = "", None, False, 0

    def feed(self, piece, end=False):
        """[(event, data)] that the text so far, `piece` added, lets the page be sent; end: the reply is whole."""
        self.text += piece
        head = self.text.lstrip()
        if self.plus is None and (end or not any(marker.startswith(head) for marker in (THOUGHTS, ACTIONS))):
            self.plus = head.startswith((THOUGHTS, ACTIONS))
        events = []
        if self.plus and not self.thought and (ACTIONS in self.text or end):
            self.thought = True
            if thoughts := self.text.split(ACTIONS)[0].partition(THOUGHTS)[2].strip():
                events.append(("thoughts", {"text": thoughts}))
        if len(shown := self.answer(end)) > self.sent:
            events.append(("token", {"text": shown[self.sent:]}))
            self.sent = len(shown)
        return events

    def answer(self, end=True):
        """What the user reads of the reply so far: an ordinary reply whole; a LLaVA-Plus turn's value (without one,
        once whole, what follows its thoughts, as written)."""
        if not self.plus:
            return self.text if self.plus is False else ""
        if VALUE in self.text:
            return self.text.split(VALUE, 1)[1].strip()
        return self.text[self.text.index(ACTIONS):].strip() if end and ACTIONS in self.text else ""


def asked(request, config):
    """The question and the sampling settings of an ask request, checked; the page's defaults fill what it leaves
    out."""
    question = request.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(HTTPStatus.BAD_REQUEST, "ask a question (the question is empty)")
    if len(question) > MAX_QUESTION_CHARS:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the question is over {MAX_QUESTION_CHARS} characters")
    settings = {key: request.get(key, getattr(config, key)) for key in ("temperature", "top_p", "max_new_tokens")}
    limits = {"temperature": (0, 10), "top_p": (1e-9, 1), "max_new_tokens": (1, config.max_new_tokens)}
    for key, (low, high) in limits.items():
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (key == "max_new_tokens" and value != int(value)):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{key} must be a number from {low:g} to {high:g}, got "
                                                       f"{str(value)[:20]}")
    settings["max_new_tokens"] = int(settings["max_new_tokens"])
    return question, settings


if __name__ == "__main__":
    main()
