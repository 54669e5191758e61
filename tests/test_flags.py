"""flags.py, the one command line of every script, on a config written here: types, spellings, lists, choices, the one
line a mistake gets, and --help read from the comments."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

import flags


@dataclass
class Base:
    # model: inherited fields come first
    ckpt: str = ""  # a checkpoint
    dtype: Literal["auto", "float32"] | None = None  # a choice or nothing


@dataclass
class Config(Base):
    # things: what is asked
    image: list[str] = field(default_factory=list)  # files, as many as follow
                                                    # (a second comment line goes on explaining)
    steps: int = 3  # a count
    rate: float = 0.5  # a number
    quiet: bool = False  # a switch


def test_values_are_typed_lists_take_what_follows_and_only_given_flags_are_returned():
    given = flags.parse(Config, ["--image", "a.png", "b.png", "--steps=7", "--quiet", "--rate", "-1e-3",
                                 "--image=c.png", "--dtype", "float32"], "x.py")
    assert given == dict(image=["a.png", "b.png", "c.png"], steps=7, quiet=True, rate=-1e-3, dtype="float32")
    assert flags.parse(Config, ["--quiet", "0", "--ckpt", ""], "x.py") == dict(quiet=False, ckpt="")
    assert flags.parse(Config, ["--Steps".lower(), "4"], "x.py") == dict(steps=4)


@pytest.mark.parametrize("argv, message", [
    (["--step", "4"], "unknown flag --step (did you mean --steps?); python x.py --help explains every flag"),
    (["--steps", "four"], "--steps expects an int, got 'four'"),
    (["--rate"], "--rate needs a value (FLOAT)"),
    (["--image"], "--image needs at least one value"),
    (["--dtype", "float16"], "--dtype must be one of auto, float32; got 'float16'"),
    (["--quiet", "maybe"], "--quiet expects true/false/1/0, got 'maybe'"),
    (["steps=4"], "unexpected argument 'steps=4'"),
])
def test_each_mistake_is_one_line_naming_the_flag(argv, message):
    with pytest.raises(flags.Stop) as error:
        flags.parse(Config, argv, "x.py")
    assert str(error.value).startswith(message)
    with pytest.raises(SystemExit) as exit:  # what a script's main turns it into: status 1, one line
        with flags.one_line_errors("x.py"):
            flags.parse(Config, argv, "x.py")
    assert str(exit.value) == f"x.py: error: {error.value}" and "\n" not in str(exit.value)


def test_help_groups_every_field_with_its_comment_and_default_after_the_docstring():
    assert flags.explained_fields(Config) == [
        ("model", "inherited fields come first", [["ckpt", "a checkpoint"], ["dtype", "a choice or nothing"]]),
        ("things", "what is asked", [["image", "files, as many as follow (a second comment line goes on explaining)"],
                                     ["steps", "a count"], ["rate", "a number"], ["quiet", "a switch"]])]
    text = flags.help_text(Config, "x.py", "python x.py [flags]", "Does x.\n\nExamples:\n\n    python x.py --steps 4\n",
                           {"stage 1": dict(steps=1), "stage 2": dict(steps=2, rate=0.5)})
    flat = " ".join(text.split())
    assert flat.startswith("usage: python x.py [flags] Does x. Examples: python x.py --steps 4 model:")
    assert "--dtype {auto,float32} a choice or nothing things: what is asked --image STR ..." in flat  # None: not shown
    assert "--steps INT a count (default: stage 1: 1, stage 2: 2)" in flat  # per variant where they differ
    assert "--rate FLOAT a number (default: 0.5)" in flat and "--quiet BOOL a switch (default: false)" in flat
    assert '--ckpt STR a checkpoint (default: "")' in flat and "files, as many as follow (a second" in flat
