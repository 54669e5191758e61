"""
Ask a trained tinyllava model about images: one answer streamed as it is generated, a batch of images, or a chat.
(Benchmarks, the held-out eval and learning curves: evaluate.py.)

Examples:

    python sample.py --image photo.png                                        # the default question: describe it
    python sample.py --image photo.png --prompt "What color is the circle?"   # one question, streamed to stdout
    python sample.py --image a.png b.png --prompt "How many shapes are there?"  # one batch, an answer per file
    python sample.py --image photo.png --chat                                 # multi-turn; an empty line or Ctrl-D ends
    python sample.py --prompt "Say hello in French."                          # a question without an image
    python sample.py --ckpt out/stage1 --image photo.png                      # a stage-1 model captions the image
    python sample.py --ckpt out/stage2-lora --image photo.png                 # a LoRA run (adapters merged on load)
    python sample.py --image photo.png --temperature 0.2 --seed 7             # sampled, as LLaVA's chat demo
    python sample.py --image photo.png --threads 1 --max-new-tokens 32        # 1 thread when others load the cores
    python sample.py --image photo.png --chat --compile                       # faster tokens after a compile
    python sample.py --hf llava-1.5-7b-hf --image photo.jpg --device cuda     # published LLaVA weights (HF layout)
    python sample.py --ckpt out/plus --image photo.png --prompt "Remove the red circle."  # LLaVA-Plus: tools run
    python sample.py --ckpt out/plus --image photo.png --chat --tools mytools.py  # with tools of your own

The model is --ckpt (one of ours: a ckpt.pt or its directory), --hf (an HF LlavaForConditionalGeneration directory),
or by default out/stage2/ckpt.pt, else out/stage1/ckpt.pt (train.py's default out_dirs); a path is looked for where
you run this, then in this repository. Images are preprocessed as in training (the vision tower's size, mean and std;
the checkpoint's crop or pad), and the prompt is the model's template with the image before the question. Answers go
to stdout, everything else to stderr. A LLaVA-Plus model's reply that names a tool (docs/plus.md) has the tool run on
the image, its output shown and handed back, and the model's next reply streamed; a call that cannot run is one line,
and the conversation goes on.
"""
import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image

import ask
import flags
import plus
from data import IMAGE_TAG, ImageError, encode_conversation, encode_prompt, load_image, question_ids, stop_token_ids
from llama import KVCache

USAGE = "python sample.py --image FILE [FILE ...] [--prompt TEXT | --chat] [--flag value ...]"


@dataclass
class SampleConfig(ask.ModelFlags):
    # images and questions
    image: list[str] = field(default_factory=list)  # the image file(s); several are answered as one batch, each
                                                    # answer labelled by its file
    prompt: str = "Describe the image concisely."  # the question (with --chat, the first one; the default is paper
                                                   # Table 8's first brief-description instruction); a stage-1
                                                   # model ignores it and captions the image
    chat: bool = False  # a multi-turn conversation about one image, its questions read from stdin, each turn
                        # continuing in one KV cache
    # generation: how answers are decoded
    max_new_tokens: int = 256  # most tokens per answer, fewer where the context ends
    temperature: float = 0.0  # 0: greedy, reproducible; LLaVA's chat demo samples at 0.2
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling threshold (1.0: off)
    seed: int = 1337  # of the sampling generator
    batch_size: int = 32  # images per generate call
    compile: bool = False  # decode each new token through code compiled by torch.compile (Llama.compile_decoding):
                           # the same tokens, faster per token; compiling costs tens of seconds once (again for
                           # each new batch size), so it pays on long answers and chats, not on one short answer
    # LLaVA-Plus: a reply that names a tool (plus.py) has it run on the --image and gets its output back as a new turn
    tools: list[str] = field(default_factory=list)  # Python files of your own tools (functions registered with
                                                    # @plus.tool("name")), besides detector, segmenter and editor
    tool_dir: str = "out/tools"  # where the pictures of a tool's work go: boxes drawn, masks, edited images


def main(argv=None):
    """Answer as the command line says; a mistake ends it with one line (flags.one_line_errors)."""
    with flags.one_line_errors("sample.py", expected=(ImageError,)):
        given = flags.command_line(SampleConfig, argv, "sample.py", USAGE, __doc__)
        if given is None:  # --help
            return
        config = checked(SampleConfig(**given), given)
        images = [load_image(path) for path in config.image]  # a typo in a path should not cost a 7B load first
        for path in config.tools:
            load_tools(path)
        path = ask.find_model(config)
        if config.chat or not images:
            ask.refuse_captioner(config, path, "--chat" if config.chat else "a --prompt without --image")
        model, tokenizer = ask.load(config, path)
        if config.compile:
            model.llm.compile_decoding()
        generator = torch.Generator(device=model.llm.embed_tokens.weight.device).manual_seed(config.seed)
        sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, generator=generator)
        pixel_values = ask.to_pixels(model, images) if images else None  # None: text only, as some LLaVA records
        if len(images) > 1 or model.config.template == "plain":  # one question about each image
            if model.config.template == "plain" and "prompt" in given:
                print("note: a stage-1 model (plain template) ignores --prompt and captions the image", file=sys.stderr)
            answer_images(model, tokenizer, pixel_values, config.image, config.prompt, config, sampling)
            return
        opening = [config.prompt] if "prompt" in given or not config.chat else []  # the first question, if given
        if config.chat:
            print(f"chat about {config.image[0] if images else 'no image'} ({model.config.template} template): type "
                  "a question; an empty line or Ctrl-D ends", file=sys.stderr)
        more = read_question if config.chat else lambda prompt: None  # one-shot: a chat of one question
        chat(model, tokenizer, pixel_values, config.max_new_tokens, sampling,
             read=lambda prompt: opening.pop() if opening else more(prompt),
             image=images[0] if images else None, tool_dir=config.tool_dir,
             first_culprit="--prompt" if opening else "the question is too long for the model's context")


def answer_images(model, tokenizer, pixel_values, names, text, config, sampling, out=None):
    """One question about each image (N, 3, S, S), or about none (pixel_values None). One answer is streamed; several
    are generated in batches (left padding is generate_stream's business) and each is printed as 'file: answer' when
    its batch is done."""
    out = out or sys.stdout
    prompt = question_ids(text, tokenizer, model.config.template, image=pixel_values is not None)
    positions = len(prompt) - 1 + model.num_image_tokens if pixel_values is not None else len(prompt)
    budget = ask.answer_budget(model, 0, positions, config.max_new_tokens, "--prompt")
    stops = stop_token_ids(tokenizer, model.config.template)
    for start in range(0, len(names) or 1, config.batch_size):
        batch = None if pixel_values is None else pixel_values[start:start + config.batch_size]
        tokens = model.generate_stream([prompt] * (1 if batch is None else len(batch)), batch, max_new_tokens=budget,
                                       stop_token_ids=stops, **sampling)
        if len(names) <= 1:
            stream_answer((int(token[0]) for token in tokens), tokenizer, stops, out)
            return
        generated = torch.stack(list(tokens), dim=1).tolist()  # (B, N)
        for name, ids in zip(names[start:], generated):
            print(f"{name}: {ask.decode_answer(ids, tokenizer, stops)}", file=out, flush=True)


def answer_pieces(tokens, tokenizer, stops):
    """An answer's text as its tokens (ids) arrive, yielded piece by piece. Each step decodes all the ids so far and
    yields only what is new, so spaces and characters made of several tokens come out right."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = ask.decode_answer(ids, tokenizer, stops)
        if text.endswith("\ufffd") or text == shown:  # part of a multi-byte character: wait for the rest
            continue
        yield text[len(shown):]
        shown = text
    if rest := ask.decode_answer(ids, tokenizer, stops)[len(shown):]:
        yield rest


def stream_answer(tokens, tokenizer, stops, out):
    """Print an answer as its tokens arrive, then a newline (a note on stderr when the answer is empty: the model
    ended its turn at once); return its text."""
    pieces = []
    for piece in answer_pieces(tokens, tokenizer, stops):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    return end_answer("".join(pieces), out)


def end_answer(text, out):
    """The newline after a streamed answer, and the note on stderr when it is empty; returns the text."""
    if not text.strip():
        print("(the model's answer is empty: it ended its turn at once)", file=sys.stderr)
    out.write("\n")
    out.flush()
    return text


def chat(model, tokenizer, pixel_values, max_new, sampling, read, out=None, image=None, tool_dir="out/tools",
         first_culprit="--prompt"):
    """A conversation on the terminal (Chat): read(prompt) gives the next question (None or an empty line ends), each
    answer is printed as it is generated. A reply that names a tool (LLaVA-Plus) has it run on `image` (PIL), and
    the reply to its output follows (converse). first_culprit names the first question if it is too long. Returns
    the turns."""
    out = out or sys.stdout
    conversation = Chat(model, tokenizer, pixel_values)
    while (text := read("> ")) is not None and text.strip():
        culprit = first_culprit if not conversation.turns else None
        for kind, value in converse(conversation, tokenizer, text, max_new, sampling, image, culprit):
            if kind == "piece":
                out.write(value)
                out.flush()
            elif kind == "reply":
                end_answer(value, out)
            else:
                show_tool_step(value, tool_dir, out)
    return conversation.turns


def converse(conversation, tokenizer, question, max_new, sampling, image=None, culprit=None):
    """One question of a conversation (a Chat), LLaVA-Plus's loop included; sample.py's chat and demo.py show what it
    yields. ("piece", text) as a reply is generated, ("reply", its whole text) when it ends; after a reply that names
    a tool, ("tool", ToolStep): the call run on `image` (the user's, PIL; never one the model names), its output and
    picture, or why it could not run. A call that ran has its output handed back as the next user turn of the same
    conversation, and the model's reply to it follows. culprit: what a question too long for the context is blamed
    on (Chat.ask's default when None). Closing this generator mid-reply ends the reply there (Chat records it)."""
    asked = conversation.ask(question, max_new, sampling, *([culprit] if culprit else []))
    reply = yield from reply_events(asked, tokenizer, conversation.stops)
    step = tool_step(reply, image, question)
    if step is None:
        return
    yield "tool", step
    if step.handed_back is not None:
        yield from reply_events(conversation.ask(step.handed_back, max_new, sampling), tokenizer, conversation.stops)


def reply_events(tokens, tokenizer, stops):
    """("piece", text) as a reply's tokens arrive, then ("reply", its text); returns the text. Closed early, it closes
    the tokens too."""
    pieces = []
    with contextlib.closing(tokens):
        for piece in answer_pieces(tokens, tokenizer, stops):
            pieces.append(piece)
            yield "piece", piece
    yield "reply", "".join(pieces)
    return "".join(pieces)


@dataclass
class ToolStep:
    """What the server did with a reply that names a tool: the call (its action as the model wrote it; None when the
    actions could not be read), then either the turn that hands the output back, the output whole and the picture of
    the tool's work (plus.picture; None when it has none), or the one line saying why the call could not run."""
    action: dict | None = None
    handed_back: str | None = None
    output: dict | None = None
    picture: Image.Image | None = None
    error: str | None = None

    @property
    def output_text(self):
        """The tool's cleaned output, as the model reads it: '<tool> model outputs: {...}'."""
        return self.handed_back.splitlines()[0]


def tool_step(reply, image, question):
    """LLaVA-Plus's server step on one reply (plus.tool_turn): None when it names no tool, else a ToolStep."""
    actions = []
    try:
        actions = plus.parse_turn(reply)[1]
        step = plus.tool_turn(reply, image, question)
    except plus.ToolError as error:
        return ToolStep(action=actions[0] if actions else None, error=str(error))
    if step is None:
        return None
    handed_back, output = step
    return ToolStep(actions[0], handed_back, output, plus.picture(image, output))


def show_tool_step(step, tool_dir, out):
    """A ToolStep on the terminal: `tool: <its output>` and where its picture is saved (under tool_dir, never over
    another), or `tool not run: <why>`."""
    if step.error is not None:
        print(f"tool not run: {step.error}", file=out, flush=True)
        return
    print(f"tool: {step.output_text}", file=out, flush=True)
    if step.picture is not None:
        os.makedirs(tool_dir, exist_ok=True)
        path = next(p for n in range(1, 10 ** 6) if not os.path.exists(p := os.path.join(tool_dir, f"{n:03d}.png")))
        step.picture.save(path)
        print(f"tool: its picture is {path}", file=out, flush=True)


class Chat:
    """
    A conversation about one image (or none: pixel_values None), each turn continuing in one KV cache: only the new
    turn's tokens are prefilled. turns: [(ids fed that turn, answer ids)]. sample.py --chat and demo.py talk through it.

    The cache holds every position seen so far except the last answer's final token: generate_stream yields it but
    never feeds it. A new turn feeds that token (and the end-of-turn token if the answer was cut short) followed by
    the new question's ids, and those come from encode_prompt, which is prefix-stable: the prompt of the whole
    conversation is the prompt through the last answer's end-of-turn token, then the new question. The answer's own
    ids are the ones generated, which re-encoding its text need not reproduce, so the new question's ids are taken
    as a length difference between two encodings of the same text (the conversation through the last answer, and
    that plus the question), never by slicing the generated history.
    """

    def __init__(self, model, tokenizer, pixel_values):
        self.model, self.tokenizer, self.pixel_values = model, tokenizer, pixel_values
        weight = model.llm.embed_tokens.weight
        self.cache = KVCache(model.llm.config, 1, model.llm.config.max_position_embeddings, weight.device, weight.dtype)
        self.template = model.config.template  # vicuna_v1: a plain (stage-1) model is refused before it gets here
        self.stops = stop_token_ids(tokenizer, self.template)
        self.conversation, self.turns, self.unfed = [], [], []

    def ask(self, text, max_new, sampling, culprit="the conversation is too long; start a new chat"):
        """Yield the answer's token ids to the question `text` as they are generated. A question that does not fit the
        context is a Stop naming the culprit before anything changes. The turn is recorded when the answer ends or when the caller stops
        reading (closes this generator): the cache then holds the answer so far, as one cut short at max_new."""
        first = not self.conversation
        image = first and self.pixel_values is not None
        question = {"from": "human", "value": (IMAGE_TAG + "\n" if image else "") + text.replace(IMAGE_TAG, "").strip()}
        prompt = encode_prompt(self.conversation + [question], self.tokenizer, self.template, image_first=True)
        if first:
            new_ids = prompt
        else:
            known = len(encode_conversation(self.conversation, self.tokenizer, self.template, image_first=True)[0])
            new_ids = self.unfed + prompt[known:]  # (last answer token, [end of turn]) + "USER: {question} ASSISTANT:"
        # the image placeholder becomes num_image_tokens positions
        new_positions = len(new_ids) - 1 + self.model.num_image_tokens if image else len(new_ids)
        budget = ask.answer_budget(self.model, self.cache.length, new_positions, max_new, culprit)
        tokens = self.model.generate_stream([new_ids], self.pixel_values if image else None, cache=self.cache,
                                            max_new_tokens=budget, stop_token_ids=self.stops, **sampling)
        answer = []
        try:
            for token in tokens:
                answer.append(int(token[0]))
                yield answer[-1]
        finally:
            tokens.close()
            if answer:  # else nothing was fed: the conversation stays as it was
                self.record(question, new_ids, answer)

    def record(self, question, new_ids, answer):
        """The turn, once answered: what the next turn must feed first, and the answer's text for the arithmetic."""
        end_of_turn = self.stops[0]  # vicuna_v1 closes each answer with EOS
        self.unfed = [answer[-1]] + ([] if answer[-1] in self.stops else [end_of_turn])
        # the text only serves the length arithmetic in ask; a tag in it would read as a second image
        answer_text = ask.decode_answer(answer, self.tokenizer, self.stops).replace(IMAGE_TAG, "")
        self.conversation += [question, {"from": "gpt", "value": answer_text}]
        self.turns.append((new_ids, answer))


def load_tools(path):
    """Run a Python file of the user's, whose @plus.tool functions join the tools a reply may name."""
    try:
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except (OSError, AttributeError) as error:
        raise flags.Stop(f"--tools {path}: cannot read it ({error})") from None
    except Exception as error:
        raise flags.Stop(f"--tools {path}: {type(error).__name__}: {error}") from None


def read_question(prompt):
    """The next line of stdin (None at EOF), with a '> ' prompt when a person types it."""
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def checked(config, given):
    """The config, once every flag makes sense with the others; else one line naming the flag."""
    if not config.image and "prompt" not in given and not config.chat:
        raise flags.Stop("give an --image FILE, or a --prompt (or --chat) to ask without one (evaluate.py runs the "
                         "held-out eval and the benchmarks)")
    for flag in ("top_k", "top_p", "seed"):
        if flag in given and config.temperature == 0:
            raise flags.Stop(f"--{flag} does nothing at --temperature 0 (greedy decoding): give a --temperature above "
                             "0 to sample, or leave it out")
    if not config.prompt.strip():
        raise flags.Stop(f"--prompt is empty: ask a question, or leave --prompt out for the default "
                         f"({SampleConfig.prompt!r})")
    if config.chat and len(config.image) > 1:
        raise flags.Stop("--chat talks about one image; give a single --image")
    flags.at_least(config, 1, "max_new_tokens", "batch_size")
    flags.at_least(config, 0, "temperature", "top_k", "threads")
    if not 0 < config.top_p <= 1:
        raise flags.Stop(f"--top_p must be in (0, 1], got {config.top_p}")
    return config


if __name__ == "__main__":
    main()
