"""Command-line conventions shared by both entry scripts.

Errors a user can fix are raised as `UserError` anywhere below the entry script; `run_main` turns
them into one line on stderr and exit code 2, so no deep traceback reaches the user.
"""
import argparse
import sys


class UserError(Exception):
    """Bad input or missing file; the message names the fix."""


def one_line(message, limit=None) -> str:
    """A message (or an exception's) squeezed onto one line, since a UserError is one stderr line;
    an exception without a message gives its type's name. `limit` cuts it to that many characters."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text[:limit] if limit else text


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


def add_bool_flag(parser, *names, default=False, help=""):
    """A boolean option usable as a bare flag (`--partial`) or with a word (`--partial False`)."""
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=help)


class ArgumentParser(argparse.ArgumentParser):
    """argparse exits with code 2 and a usage dump; we keep code 2 but print one line."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def run_main(main, argv=None) -> int:
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130
