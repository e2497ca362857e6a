"""Warnings for what is probably wrong but still runs: a run that did not train, labels that look off.

Each function reads numbers and returns the words of a warning (or nothing); the engine prints them
and keeps a run's in its record (`not_trained`). The faithful defaults stay as they are: these
lines only say when their result cannot be what the user wanted.
"""
import numpy as np

from utils.cli import plural
from utils.selection import RULE
from utils.steps import step_of

# A teacher "near chance" got less than this share of the way from chance to what a model of the
# true classes gets on the noisy labels (100 - realised corruption %).
NEAR_CHANCE = 0.25
# A test split where one sample moves the accuracy by more than this many points is too small to
# tell steps apart.
MAX_POINTS_PER_SAMPLE = 2.0
DEMO_SETTINGS = "--lr 0.05 --wd 5e-3"   # the README demo's, which train the digits probe well
_SHOWN = 10   # class ids listed in a warning


def reported_accuracy(record: dict, selection: str) -> float:
    """A run's test accuracy at the epoch `selection` (a rule's name) chose."""
    return record[RULE[selection].field()]


def untrained_reason(record: dict, num_classes: int, teacher: dict = None):
    """Why a finished run is clearly not trained, or None: a teacher whose training accuracy on its
    own (noisy) labels stayed near chance; a student or PLL student below chance whose teacher was
    well above it (below chance with a poor teacher is what the noise gives, not a training
    failure; both read at the epoch the student's selection rule chooses). `teacher`: a student's
    teacher's record."""
    chance = 100.0 / num_classes
    if step_of(record["step"]).is_teacher:
        fits_true = 100.0 - record["realised_corruption"]   # a model of the true classes, on these labels
        if fits_true <= chance:
            return None   # the labels carry no class signal to fit
        if record["best_train_acc"] < chance + NEAR_CHANCE * (fits_true - chance):
            return (f"its training accuracy on its own (noisy) labels never exceeded "
                    f"{record['best_train_acc']:.1f}%, near chance ({chance:.1f}%; a model of the true "
                    f"classes gets about {fits_true:.0f}% on these labels)")
        return None
    if teacher is None:
        return None
    own, theirs = (reported_accuracy(r, record["selection"]) for r in (record, teacher))
    if own < chance < theirs - NEAR_CHANCE * (100.0 - chance):
        return (f"its test accuracy {own:.2f}% is below chance ({chance:.1f}%) while its teacher "
                f"reached {theirs:.2f}%")
    return None


def untrained_warning(records: list, reasons: list, title: str) -> str:
    """One line for the runs of one batched computation that look untrained (`reasons`: each
    run's `untrained_reason`), naming the likely cause; '' when none does."""
    bad = [(r, why) for r, why in zip(records, reasons) if why]
    if not bad:
        return ""
    first, why = bad[0]
    which = (f"{title} of {first['dataset']}" if len(records) == 1 else
             f"{len(bad)} of {len(records)} runs of {title} of {first['dataset']} "
             f"(e.g. seed {first['seed']}, eta {first['eta']:g})")
    return (f"warning: {which} look{'s' if len(bad) == 1 else ''} untrained: {why}; likely cause: too small "
            f"a learning rate or too few epochs for these features (--lr {first['lr']:g}, --epochs "
            f"{first['epochs']}); the demo trains the digits with {DEMO_SETTINGS}")


def _classes(ids) -> str:
    """'class 0', 'classes 3, 7', 'classes 0, 1, ... and 5 more'."""
    ids = [int(i) for i in ids]
    shown = ", ".join(map(str, ids[:_SHOWN]))
    shown += f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return f"class {shown}" if len(ids) == 1 else f"classes {shown}"


def label_warnings(train_labels, test_labels, num_classes: int, source: str) -> list:
    """Lines about labels that are probably wrong: classes without a training sample (with a hint
    when the labels look 1-based), classes missing from the test split, and a test split so small
    that one sample moves the accuracy by more than MAX_POINTS_PER_SAMPLE points."""
    train = np.bincount(np.asarray(train_labels), minlength=num_classes)
    test = np.bincount(np.asarray(test_labels), minlength=num_classes)
    lines = []
    empty = np.flatnonzero(train == 0)
    if len(empty):
        have = "has" if len(empty) == 1 else "have"
        one_based = list(empty) == [0] and test[0] == 0
        hint = (f"; the labels run from 1 to {num_classes - 1}: if they count from 1, store labels - 1"
                if one_based else ": nothing teaches a probe such a class; check the labels and num_classes")
        lines.append(f"warning: {source}: {_classes(empty)} of {num_classes} {have} no training sample{hint}")
    missing = np.flatnonzero((test == 0) & (train > 0))
    if len(missing):
        has, it = ("has", "it") if len(missing) == 1 else ("have", "them")
        lines.append(f"warning: {source}: {_classes(missing)} {has} training samples but no test sample: "
                     f"test accuracy says nothing about {it}")
    total = int(test.sum())
    if 100.0 / total > MAX_POINTS_PER_SAMPLE:
        lines.append(f"warning: {source}: the test split has {plural(total, 'sample')}, so one sample moves "
                     f"test accuracy by {100.0 / total:.1f} points: differences between steps of that size "
                     "are noise")
    return lines
