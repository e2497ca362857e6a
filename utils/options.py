"""Settings declared once, and the one parsing stack of both commands.

An `Option` holds everything about one command-line setting: its flags, type, default, choices,
constraint, help text, whether a recipe may sweep it, and which steps' run keys it enters. A
setting that is a field of a dataclass (RunConfig, EngineOptions, the theory's Setting) is declared
on the field itself with `option(...)`; the parser, the validation, the grid keys and the run keys
are derived from these declarations (see `options_of`, `add_options`, `check_option_values`).
A constraint (`Interval`) writes its own message, so a rule and its words cannot disagree.
Both commands build their parsers with `add_options`, check values with `check_option_values` and
read a value from a recipe or config file exactly as its flag reads it with `read_as_flag`.
"""
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

from utils.cli import QuotedText, UserError, add_bool_flag

_UNSET = object()


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number_text(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Interval:
    """The numbers of type `kind` (int or float) from `low` to `high`, each end included or not
    (`closed`: "both", "left", "right" or "neither"; an infinite end is never included), plus
    the values in `also`. It states itself for messages (`describe`): "lie in [0, 1)", "be >= 2",
    "be an integer in [0, 9]", followed by `note` in brackets."""
    kind: type
    low: float = -math.inf
    high: float = math.inf
    closed: str = "both"
    note: str = ""
    also: tuple = ()

    def __call__(self, x) -> bool:
        if x in self.also and _is_number(x):
            return True
        if not _is_number(x) or (self.kind is int and not isinstance(x, int)) or math.isnan(x):
            return False
        low_ok = self.low < x or (self.closed in ("both", "left") and x == self.low)
        high_ok = x < self.high or (self.closed in ("both", "right") and x == self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        bounded = math.isfinite(self.low) and math.isfinite(self.high)
        if bounded:
            left = "[" if self.closed in ("both", "left") else "("
            right = "]" if self.closed in ("both", "right") else ")"
            span = f"{left}{_number_text(self.low)}, {_number_text(self.high)}{right}"
            text = f"be an integer in {span}" if self.kind is int else f"lie in {span}"
        elif math.isfinite(self.low):
            text = f"be {'>=' if self.closed in ('both', 'left') else '>'} {_number_text(self.low)}"
        else:
            text = f"be {'<=' if self.closed in ('both', 'right') else '<'} {_number_text(self.high)}"
        text += "".join(f" or be {_number_text(value)}" for value in self.also)
        return text + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Option:
    flags: tuple                   # e.g. ("-d", "--dataset"); () for a setting with no flag of its own
    help: str = ""
    type: Callable = str           # bool: usable as a bare flag or with a word (--partial False)
    default: Any = None            # the command line's default
    choices: Optional[tuple] = None
    metavar: Optional[str] = None
    valid: Optional[Interval] = None  # the constraint: "<flag> must <valid.describe()>, got <value>"
    new: bool = False              # not an option of the original code: listed under "[new]"
    sweep: bool = False            # a recipe's grid may set (and sweep) it
    steps: frozenset = frozenset()  # the step kinds ("teacher", "student", "pll") whose run key it enters
    neutral: Any = _UNSET          # at this value it stays out of run keys (added after stores existed)
    column: Optional[int] = None   # its place among the leading columns of a results table
    dest: Optional[str] = None     # the parsed attribute: a dataclass field's name when declared on one,
    #                                else the first long flag's name with '-' read as '_'

    def __post_init__(self):
        if self.type is bool and self.default is None:  # a flag not given is off
            object.__setattr__(self, "default", False)
        if self.dest is None and self.grid_names:
            object.__setattr__(self, "dest", self.grid_names[0])

    @property
    def flag(self) -> str:
        """The shortest long flag, as messages name the option (--wd, not --weight-decay)."""
        long = [f for f in self.flags if f.startswith("--")]
        return min(long, key=len) if long else self.flags[0] if self.flags else self.dest

    @property
    def grid_names(self) -> list:
        """The recipe keys that set it: each long flag without its dashes, '-' read as '_'."""
        return [f[2:].replace("-", "_") for f in self.flags if f.startswith("--")]

    def is_neutral(self, value) -> bool:
        return self.neutral is not _UNSET and value == self.neutral

    def problem(self, value) -> Optional[str]:
        """None when `value` is allowed, else the one-line message naming the fix. An option whose
        default is None (not given) is not checked when it is not given."""
        if value is None and self.default is None:
            return None
        if self.type is float and not (_is_number(value) and math.isfinite(value)):
            return f"{self.flag} must be a finite number, got {value}"
        if self.choices is not None and value not in self.choices:
            return f"unknown {self.flag} {value!r}; choose from {', '.join(map(str, self.choices))}"
        if self.valid is not None and not self.valid(value):
            return f"{self.flag} must {self.valid.describe()}, got {value}"
        return None


def option(field_default=MISSING, *flags, cli_default=_UNSET, **spec):
    """A dataclass field declared with its option. The command line's default is the field's
    default unless `cli_default` says otherwise (e.g. None for "derived when not given")."""
    default = field_default if cli_default is _UNSET else cli_default
    opt = Option(tuple(flags), default=None if default is MISSING else default, **spec)
    return field(default=field_default, metadata={"option": opt})


def options_of(cls) -> dict:
    """{field name: Option} of a dataclass's declared fields, in declaration order (dest = field name)."""
    out = {}
    for f in fields(cls):
        opt = f.metadata.get("option")
        if opt is not None:
            out[f.name] = Option(**{**opt.__dict__, "dest": f.name})
    return out


def add_options(parser, options, group_new: str = "[new] options not in the original"):
    """Add options (an iterable of Option with a dest) to `parser`: those of the original code first,
    the [new] ones in their own group, each with its help, default and choices. Returns that group
    (for options argparse must add itself, such as a repeatable flag)."""
    options = [opt for opt in options if opt.flags]
    new = parser.add_argument_group(group_new)
    for opt in sorted(options, key=lambda o: o.new):
        target = new if opt.new else parser
        if opt.type is bool:
            add_bool_flag(target, *opt.flags, default=opt.default, help=opt.help, dest=opt.dest)
            continue
        metavar = opt.metavar or (None if opt.choices else opt.flag.lstrip("-").replace("-", "_").upper())
        target.add_argument(*opt.flags, dest=opt.dest, type=opt.type, default=opt.default,
                            choices=opt.choices, metavar=metavar, help=opt.help)
    return new


def check_option_values(options, values) -> None:
    """UserError for the first value its option does not allow: a float option's value that is not
    finite (all of them first), then each option's choices and constraint. `values`: an object
    whose attributes are named by the options' dests (a dataclass instance or a parsed namespace)."""
    options = list(options)
    for opt in sorted(options, key=lambda o: o.type is not float):
        problem = opt.problem(getattr(values, opt.dest))
        if problem:
            raise UserError(problem)


class _BadValue(Exception):
    """argparse's own message about one value (raised instead of its usage-and-exit)."""


def read_as_flag(parser, dest: str, value, where: str):
    """`value` (from a recipe or config file) exactly as `parser` reads `--flag=value` into `dest`:
    the same type, choices and boolean words, so a file's value and the same value typed on the
    command line are one value. YAML gives typed values; they are read as the words they print as
    (`k: 3.7` and `eta: true` are refused as `--k=3.7` and `--eta=True` are, never truncated or
    taken for numbers). Otherwise a UserError starting with `where`."""
    if value is None or isinstance(value, (list, dict, set, tuple)):
        got = "nothing" if value is None else f"a {type(value).__name__} {value!r}"
        raise UserError(f"{where}: expected one value, got {got}")
    action = next(a for a in parser._actions if a.dest == dest and a.option_strings)
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(value, QuotedText) and action.type in (int, float):
        raise UserError(f"{where}: {str(value)!r} is quoted, so it is text; write the number without quotes")

    def error(message):
        raise _BadValue(message)

    strict, parser.error = parser.error, error
    try:
        return getattr(parser.parse_args([f"{flag}={value}"]), dest)
    except _BadValue as exc:
        reason = str(exc).removeprefix(f"argument {'/'.join(action.option_strings)}: ")
        raise UserError(f"{where}: {reason} (as {flag}={value} on the command line)") from None
    finally:
        parser.error = strict
