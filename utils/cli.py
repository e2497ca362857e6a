"""Command-line conventions shared by both entry scripts.

Errors a user can fix are raised as `UserError` anywhere below the entry script; `run_main` turns
them into one line on stderr and exit code 2, so no deep traceback reaches the user.
"""
import argparse
import difflib
import errno
import re
import sys
from pathlib import Path

import yaml


class UserError(Exception):
    """Bad input or missing file; the message names the fix."""


def one_line(message, limit=None) -> str:
    """A message (or an exception's) squeezed onto one line, since a UserError is one stderr line;
    an exception without a message gives its type's name. `limit` cuts it to that many characters."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text[:limit] if limit else text


def plural(count: int, word: str, words: str = None) -> str:
    """'1 run', '2 runs' ('1 class', '3 classes' with words='classes')."""
    return f"{count:,} {word if count == 1 else words or word + 's'}"


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def str2bool(text: str) -> bool:
    """Parse True/False words; the original's `type=bool` made 'False' mean True."""
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {text!r}")


def add_bool_flag(parser, *names, default=False, help="", dest=None):
    """A boolean option usable as a bare flag (`--partial`) or with a word (`--partial False`)."""
    extra = {"dest": dest} if dest else {}
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=help, **extra)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default: "(default: X)" is appended to its help text, unless the
    text already names its default (a `None` default means "not set" and is not shown)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "%(default)" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


# argparse reads a token after an option as its value only when it looks like a number, and its idea
# of a negative number is -1 or -0.5: '-1e-5' or '-inf' were taken for an unknown option ("expected one
# argument"). This pattern also takes exponents and -inf/-nan, so the value is read and then validated.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """Both commands' parser. argparse exits with code 2 and a usage dump; we keep code 2 but print
    one line. A negative number in any notation is a value (see NEGATIVE_NUMBER): no option of either
    command looks like one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        raise UserError(f"{self.prog}: {message}{self._did_you_mean(message)} (see --help)")

    def _did_you_mean(self, message: str) -> str:
        """'; did you mean --corruption?' for each unrecognized option close to one of ours."""
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        flags = {flag.lstrip("-"): flag for flag in self._option_string_actions if flag.startswith("--")}
        close = []
        for word in message[len(prefix):].split():
            name = word.split("=", 1)[0].lstrip("-")
            if word.startswith("-"):
                close += [flags[match] for match in difflib.get_close_matches(name, flags, n=1, cutoff=0.7)]
        return f"; did you mean {' or '.join(close)}?" if close else ""


def resolve_device(spec, flag: str):
    """The torch device a device option names (`flag` in messages): 'cpu' (also '-1' or ''); 'auto'
    or a CUDA index such as '0' (or '0,1': the first) for that GPU when CUDA is there and the CPU
    otherwise; 'cuda' or 'cuda:i' for that GPU, which must exist. Never touches CUDA_VISIBLE_DEVICES."""
    import torch

    text = str(spec).strip().lower()
    first = text.split(",")[0].strip()
    if first in ("", "cpu", "-1"):
        return torch.device("cpu")
    if first == "auto" or first.isdigit():
        if not torch.cuda.is_available():
            return torch.device("cpu")
        first = "cuda" if first == "auto" else f"cuda:{first}"
    elif not first.startswith("cuda"):
        raise UserError(f"{flag} {spec!r}: use auto, cpu, cuda, cuda:i or a GPU index")
    elif not torch.cuda.is_available():
        raise UserError(f"{flag} {spec}: no CUDA device here; use {flag} cpu (or auto)")
    try:
        device = torch.device(first)
    except RuntimeError:
        raise UserError(f"{flag} {spec!r}: use auto, cpu, cuda, cuda:i or a GPU index") from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {spec}: no such CUDA device (found {torch.cuda.device_count()}); "
                        "pass an index below that, or cpu")
    return device


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key given twice (plain YAML keeps the last
    one silently, so `lr: 0.1` ... `lr: 0.05` in one recipe would run only one of them)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


class QuotedText(str):
    """A YAML scalar written in quotes ("10", '0.5'): text on purpose, never a number. (An unquoted
    5e-3 is text to YAML too, but the writer meant the number the command line reads.)"""


def _text(loader, node):
    value = loader.construct_scalar(node)
    return QuotedText(value) if node.style in ("'", '"') else value


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_StrictLoader.add_constructor("tag:yaml.org,2002:str", _text)


RECIPES = Path(__file__).resolve().parents[1] / "recipes"   # the recipes of this installation


def check_recipe_file(path, what: str) -> None:
    """UserError when a recipe (or config) file is not there: it names this installation's recipes
    folder, since a relative path is read from the current folder, and the closest recipe's path."""
    path = Path(path)
    if path.is_file():
        return
    known = {recipe.name: recipe for recipe in sorted(RECIPES.rglob("*.yaml"))}
    close = difflib.get_close_matches(path.name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {known[close[0]]}?" if close else ""
    raise UserError(f"{what} not found: {path} (read from {Path.cwd()}); the recipes of this installation "
                    f"are in {RECIPES}/{hint}")


def load_yaml_file(path, what: str):
    """A YAML file's content (duplicate keys refused), or UserError naming `what` and the problem."""
    path = Path(path)
    check_recipe_file(path, what)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {path} is not valid YAML{where} "
                        f"({one_line(getattr(exc, 'problem', None) or exc)}); fix it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} cannot be read as UTF-8 text ({one_line(exc)})") from None


def os_error_line(exc: OSError) -> str:
    """One line for a failed file operation: the path, the OS's words, and what to do."""
    path = exc.filename or "a file"
    reason = exc.strerror or one_line(exc)
    fix = {errno.ENOSPC: "free some space or choose another directory",
           errno.EDQUOT: "free some space or choose another directory",
           errno.EACCES: "choose a directory you can write to (-c, --results, --out, --cache-dir)",
           errno.EROFS: "choose a directory you can write to (-c, --results, --out, --cache-dir)",
           errno.ENOTDIR: "a part of that path is a file, not a directory: choose another path"}
    return (f"cannot write or read {path}: {reason}; "
            f"{fix.get(exc.errno, 'check the path and its permissions')}")


def run_main(main, argv=None) -> int:
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable or full output directory: one line, not a traceback
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130
