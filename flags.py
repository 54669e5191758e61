"""
One command line for every script. A script's flags are the fields of a small dataclass, each explained by the comment
beside it: a comment line level with the fields starts a group ("name: note"), and deeper comment lines under a field
go on explaining it. A new flag is a new field with its comment, nothing more:

    @dataclass
    class SampleConfig:
        # generation: how answers are decoded
        max_new_tokens: int = 256  # most tokens per answer

    given = flags.parse(SampleConfig, argv, "sample.py")  # {field: typed value} of the flags given, nothing else
    config = SampleConfig(**given)

The rules, the same in every script: --key value or --key=value; --key-name spells --key_name; a true/false field
alone means true; a list field takes the values up to the next flag; a Literal field takes one of its values. A
mistake is one line naming the flag, `<script>: error: <what>` (a `Stop`), exit status 1; an unknown flag gets the
nearest known one as a suggestion. `--help` prints the script's docstring (its examples first), then every field
under its group, with its default.
"""
import argparse
import contextlib
import dataclasses
import difflib
import inspect
import os
import shutil
import sys
import typing


class Stop(Exception):
    """A reason to stop, told to the user in one line (see one_line_errors); the process exits with status 1."""


@contextlib.contextmanager
def one_line_errors(prog, expected=()):
    """Run a script's body: a Stop, or one of the `expected` errors the libraries raise for bad input (their message
    names the file), ends the process with `<prog>: error: <message>` and status 1; Ctrl-C with status 130; a reader
    that stopped reading (`| head`) quietly. No traceback for any."""
    try:
        yield
    except (Stop, *expected) as error:
        raise SystemExit(f"{prog}: error: {error}") from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write when Python exits
        raise SystemExit(1) from None


def wants_help(argv):
    return "-h" in argv or "--help" in argv


def command_line(config_class, argv, prog, usage, doc):
    """The flags given on the command line (argv, or sys.argv's), parsed; None once --help has been printed."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(config_class, prog, usage, doc))
        return None
    return parse(config_class, argv, prog)


def parse(config_class, argv, prog):
    """The flags in argv -> {field: value of the field's type}, for the flags given only (the caller knows what was
    asked for, as opposed to defaulted). A repeated flag: the last one wins, a list flag takes them all."""
    kinds = {f.name: f.type for f in dataclasses.fields(config_class)}
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise Stop(f"unexpected argument {arg!r}: every option is --key value or --key=value")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in kinds:
            close = difflib.get_close_matches(key, kinds, n=1)
            raise Stop(f"unknown flag --{key}" + (f" (did you mean --{close[0]}?)" if close else "")
                       + f"; python {prog} --help explains every flag")
        kind, values = value_kind(kinds[key]), [value] if has_value else []
        while i + 1 < len(argv) and not argv[i + 1].startswith("--") and (kind is list or not values):
            values.append(argv[i + 1])
            i += 1
        if kind is list:
            if not values:
                raise Stop(f"--{key} needs at least one value")
            given[key] = given.get(key, []) + values
        elif not values and kind is bool:
            given[key] = True
        elif not values:
            raise Stop(f"--{key} needs a value ({kind_name(kinds[key])})")
        else:
            given[key] = parse_value(key, kinds[key], values[0])
        i += 1
    return given


def value_kind(annotation):
    """What a field holds: bool, int, float, str, list (of str), or the values of a Literal as a tuple; `X | None`
    holds X."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return list
    held = [t for t in typing.get_args(annotation) if t is not type(None)]
    return value_kind(held[0]) if held else annotation


def kind_name(annotation):
    kind = value_kind(annotation)
    return "{" + ",".join(kind) + "}" if isinstance(kind, tuple) else "STR ..." if kind is list else \
        kind.__name__.upper()


def parse_value(key, annotation, text):
    kind = value_kind(annotation)
    if isinstance(kind, tuple):
        if text not in kind:
            raise Stop(f"--{key} must be one of {', '.join(kind)}; got {text!r}")
        return text
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise Stop(f"--{key} expects true/false/1/0, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise Stop(f"--{key} expects {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}") from None


def at_least(config, minimum, *names):
    """Refuse any of these fields below `minimum`, naming the flag."""
    for name in names:
        if getattr(config, name) < minimum:
            raise Stop(f"--{name} must be at least {minimum}, got {getattr(config, name)}")


def explained_fields(config_class):
    """[(group, note, [[field, explanation]])] in the dataclass's order (its bases' fields first), read from the
    comments in its source: the one place where the flags are explained."""
    groups = []
    for cls in reversed(config_class.__mro__):
        if "__dataclass_fields__" not in vars(cls):
            continue
        lines = inspect.getsource(cls).splitlines()
        for line in lines[next(k for k, line in enumerate(lines) if line.startswith("class ")) + 1:]:
            code, _, comment = line.partition("#")
            comment = comment.strip()
            if code.strip() and not code.strip().startswith('"""'):  # "    name: type = default  # explanation"
                groups[-1][2].append([code.split(":")[0].strip(), comment])
            elif line.startswith("    # "):  # level with the fields: a new group
                name, _, note = comment.partition(": ")
                groups.append((name, note, []))
            elif comment:  # deeper: the explanation above goes on
                groups[-1][2][-1][1] += " " + comment
    return groups


def shown(value):
    """A default as it is typed on the command line."""
    return str(value).lower() if isinstance(value, bool) else '""' if value == "" else \
        " ".join(value) or "none" if isinstance(value, list) else str(value)


def help_text(config_class, prog, usage, doc, variants=None):
    """Usage, the script's docstring (what it does, examples), then every field under its group with its explanation
    and default; laid out by argparse, in 120 columns at most. variants: {name: {field: default}} where the defaults
    differ between variants (train.py's stages), shown as 'stage 1: a, stage 2: b'; a None default is not shown."""
    layout = lambda prog: argparse.RawDescriptionHelpFormatter(
        prog, max_help_position=34, width=min(120, shutil.get_terminal_size((120, 24)).columns))
    parser = argparse.ArgumentParser(prog=prog, usage=usage, description=doc.strip(), add_help=False,
                                     formatter_class=layout)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config_class)}
    kinds = {f.name: f.type for f in dataclasses.fields(config_class)}
    for name, note, explained in explained_fields(config_class):
        group = parser.add_argument_group(name, note or None)
        for field, explanation in explained:
            default = None if defaults[field] is None else shown(defaults[field])
            if any(field in values for values in (variants or {}).values()):
                per_variant = {name: shown(values.get(field, defaults[field])) for name, values in variants.items()}
                default = ", ".join(f"{name}: {value}" for name, value in per_variant.items()) \
                    if len(set(per_variant.values())) > 1 else per_variant.popitem()[1]
            group.add_argument(f"--{field}", metavar=kind_name(kinds[field]),
                               help=(explanation + (f" (default: {default})" if default else "")).replace("%", "%%"))
    return parser.format_help()
