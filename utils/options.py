"""Settings declared once.

An `Option` holds everything about one command-line setting: its flags, type, default, choices,
constraint, help text, whether a recipe may sweep it, and which steps' run keys it enters. A
setting that is a field of a dataclass (RunConfig, EngineOptions, the theory's Setting) is declared
on the field itself with `option(...)`; the parser, the validation, the grid keys and the run keys
are derived from these declarations (see `options_of`, `add_options`, `check_option_values`).
"""
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

from utils.cli import UserError, add_bool_flag

_UNSET = object()


@dataclass(frozen=True)
class Option:
    flags: tuple                   # e.g. ("-d", "--dataset"); () for a setting with no flag of its own
    help: str = ""
    type: Callable = str           # bool: usable as a bare flag or with a word (--partial False)
    default: Any = None            # the command line's default
    choices: Optional[tuple] = None
    metavar: Optional[str] = None
    valid: Optional[Callable[[Any], bool]] = None   # the constraint; False -> "<flag> must <must>, got <v>"
    must: str = ""
    new: bool = False              # not an option of the original code: listed under "[new]"
    sweep: bool = False            # a recipe's grid may set (and sweep) it
    steps: frozenset = frozenset()  # the step kinds ("teacher", "student", "pll") whose run key it enters
    neutral: Any = _UNSET          # at this value it stays out of run keys (added after stores existed)
    column: Optional[int] = None   # its place among the leading columns of a results table
    dest: Optional[str] = None     # the parsed attribute; a dataclass field's name when declared on one

    def __post_init__(self):
        if self.type is bool and self.default is None:  # a flag not given is off
            object.__setattr__(self, "default", False)

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
        """None when `value` is allowed, else the one-line message naming the fix."""
        if self.choices is not None and value not in self.choices:
            return f"unknown {self.flag} {value!r}; choose from {', '.join(map(str, self.choices))}"
        if self.valid is not None and not self.valid(value):
            return f"{self.flag} must {self.must}, got {value}"
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
    """UserError for the first value its option does not allow. `values`: an object whose attributes
    are named by the options' dests (a dataclass instance or a parsed namespace)."""
    for opt in options:
        problem = opt.problem(getattr(values, opt.dest))
        if problem:
            raise UserError(problem)


# ---- constraints, named so a declaration reads as its rule ------------------------------------

def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def positive_finite(x) -> bool:
    return is_number(x) and 0 < x < math.inf


def nonnegative_finite(x) -> bool:
    return is_number(x) and 0 <= x < math.inf


def within(low, high, low_open=False, high_open=False) -> Callable[[Any], bool]:
    """A constraint: low <= x <= high, with either end open."""
    def check(x) -> bool:
        if not is_number(x):
            return False
        return (low < x if low_open else low <= x) and (x < high if high_open else x <= high)
    return check


def integer_within(low, high) -> Callable[[Any], bool]:
    def check(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high
    return check


def parse_with(parser, dest: str, flag: str, value):
    """`value` exactly as `parser` reads `flag=value` into `dest` (so a recipe value and the same
    value typed on the command line are one value)."""
    return getattr(parser.parse_args([f"{flag}={value}"]), dest)

