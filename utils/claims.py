"""The paper's claims, stated so they can fail, and a verdict on each from a grid's records.

A cell is one group of settings (dataset, backbone, ctype, lr, wd, ...) at one corruption rate eta.
Every claim is a paired difference over seeds (one seed = the same corrupted labels and the same
chain), summarised by its mean and a 95% t interval (scipy.stats), under each selection rule
present (which epoch's test accuracy a run reports: best-by-test, last, best-by-validation):
- C1 distillation helps under noise: the best student round minus the teacher > 0 (and each
  round t minus the teacher);
- C2 PLL matches multi-round distillation: PLL minus the best round is non-inferior at a margin
  (the interval's low end above -margin), and beats it when the low end is above 0;
- C3 PLL's advantage grows with noise: the slope over eta of PLL minus the teacher (per seed, by
  least squares; cells with >= 3 etas) > 0;
- C4 more rounds eventually hurt: the last round minus the best round < 0.
The best round of a cell is the round with the highest mean validation accuracy over seeds; without
a validation split it is chosen on the same test numbers it is judged by, an optimistic choice that
every entry flags (`best_chosen_on: "test"`). Verdict: "holds" when the interval lies on the
claim's side of its threshold, "contradicted" when it lies on the other side, else "not resolved"
(the interval covers the threshold: more seeds could tell).
"""
from dataclasses import dataclass
import numpy as np
from scipy import stats

from utils.report import DEFAULT_CLAIMS_MARGIN, group_records, record_value, steps_in
from utils.steps import Step, step_of

CONFIDENCE = 0.95
MIN_SEEDS = 3            # fewer paired seeds give no entry
MIN_ETAS = 3             # C3 needs this many corruption rates
RULES = ("test", "val", "last")
HOLDS, CONTRADICTED, UNRESOLVED = "holds", "contradicted", "not resolved"
# The settings that say which cell an entry belongs to, besides those that vary within the grid.
CELL_SETTINGS = ("dataset", "backbone", "ctype", "lr", "wd")


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    low: float
    high: float


def paired_interval(differences, confidence: float = CONFIDENCE) -> Interval:
    """Mean of paired differences with its two-sided t interval (Student's t, n - 1 degrees of
    freedom, from scipy.stats); a degenerate interval when every difference is the same."""
    d = np.asarray(differences, dtype=np.float64)
    mean = float(d.mean())
    if np.ptp(d) == 0:
        return Interval(len(d), mean, mean, mean)
    low, high = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return Interval(len(d), mean, float(low), float(high))


def verdict_above(interval: Interval, threshold: float = 0.0) -> str:
    """The verdict on 'the difference is above `threshold`'."""
    if interval.low > threshold:
        return HOLDS
    if interval.high < threshold:
        return CONTRADICTED
    return UNRESOLVED


def verdict_below(interval: Interval, threshold: float = 0.0) -> str:
    """The verdict on 'the difference is below `threshold`'."""
    if interval.high < threshold:
        return HOLDS
    if interval.low > threshold:
        return CONTRADICTED
    return UNRESOLVED


def _by_seed(members: list, step: Step, rule: str, quantity: str = "test_acc") -> dict:
    """{seed: value} of one step's records (values missing under the rule left out)."""
    out = {}
    for r in members:
        if step_of(r["step"]) == step:
            value = record_value(r, rule, quantity) if quantity == "test_acc" else r.get(quantity)
            if value is not None and np.isfinite(value):
                out[r["seed"]] = float(value)
    return out


def paired_differences(minuend: dict, subtrahend: dict) -> list:
    """minuend[s] - subtrahend[s] for every seed s that both have, in seed order."""
    return [minuend[s] - subtrahend[s] for s in sorted(set(minuend) & set(subtrahend))]


def best_round(members: list, rule: str) -> tuple:
    """(the best student round as a Step, 'val' or 'test': what chose it), or (None, None) without
    rounds. The round of highest mean validation accuracy over seeds when the runs have a
    validation split, else of highest mean test accuracy under `rule`; the earlier round on a tie."""
    rounds = steps_in(members, kinds=("student",))
    val = {step: _by_seed(members, step, rule, "val_acc_byval") for step in rounds}
    chosen_on = "val" if rounds and all(val.values()) else "test"
    scores = val if chosen_on == "val" else {step: _by_seed(members, step, rule) for step in rounds}
    scored = [(float(np.mean(list(scores[s].values()))), -s.round, s) for s in rounds if scores[s]]
    if not scored:
        return None, None
    return max(scored)[2], chosen_on


def _entry(cell: dict, claim: str, comparison: str, rule: str, interval: Interval, verdict: str,
           **extra) -> dict:
    return {**cell, "claim": claim, "comparison": comparison, "rule": rule, "n": interval.n,
            "mean": interval.mean, "ci": [interval.low, interval.high], "verdict": verdict, **extra}


def _judged(cell: dict, claim: str, comparison: str, rule: str, diffs: list, judge) -> list:
    """[the entry] of paired differences judged by `judge(interval) -> (verdict, extra fields)`, or []
    with fewer than MIN_SEEDS pairs."""
    if len(diffs) < MIN_SEEDS:
        return []
    interval = paired_interval(diffs)
    verdict, extra = judge(interval)
    return [_entry(cell, claim, comparison, rule, interval, verdict, **extra)]


def eta_cell_claims(cell: dict, members: list, rule: str, margin: float) -> list:
    """C1 (best round and each round), C2 and C4 of one cell under one rule; C1 and C2 speak of
    label noise, so a cell without any (eta = 0) has only C4."""
    best, chosen_on = best_round(members, rule)
    if best is None:
        return []
    chosen = {"best_step": best.label, "best_chosen_on": chosen_on}
    teacher, best_values = _by_seed(members, Step.teacher(), rule), _by_seed(members, best, rule)
    rounds = steps_in(members, kinds=("student",))
    out = []
    if cell["eta"] > 0:
        out += _judged(cell, "C1", "best round - teacher", rule, paired_differences(best_values, teacher),
                       lambda iv: (verdict_above(iv), chosen))
        for step in rounds:
            out += _judged(cell, "C1", f"step {step.label} - teacher", rule,
                           paired_differences(_by_seed(members, step, rule), teacher),
                           lambda iv: (verdict_above(iv), {}))
        out += _judged(cell, "C2", "PLL - best round", rule,
                       paired_differences(_by_seed(members, Step.pll(), rule), best_values),
                       lambda iv: (verdict_above(iv, -margin),
                                   {"margin": margin, "beats": iv.low > 0, **chosen}))
    if len(rounds) >= 2:
        last_is_best = rounds[-1] == best  # the last round is the best: more rounds did not hurt here
        out += _judged(cell, "C4", "last round - best round", rule,
                       paired_differences(_by_seed(members, rounds[-1], rule), best_values),
                       lambda iv: (CONTRADICTED if last_is_best else verdict_below(iv),
                                   {"last_is_best": last_is_best, **chosen}))
    return out


def per_seed_slopes(members: list, rule: str) -> list:
    """Per seed with >= MIN_ETAS rates: the least-squares slope over eta of PLL minus teacher."""
    points = {}
    for eta in sorted({float(r["eta"]) for r in members}):
        at_eta = [r for r in members if float(r["eta"]) == eta]
        diffs = _by_seed(at_eta, Step.pll(), rule)
        teacher = _by_seed(at_eta, Step.teacher(), rule)
        for seed in set(diffs) & set(teacher):
            points.setdefault(seed, []).append((eta, diffs[seed] - teacher[seed]))
    return [float(stats.linregress(*zip(*pts)).slope) for seed, pts in sorted(points.items())
            if len(pts) >= MIN_ETAS]


def cell_of(settings: dict, members: list) -> dict:
    """The settings that name a group's cells: the usual identity plus whatever varies in the grid."""
    first = members[0]
    return {**{name: first.get(name) for name in CELL_SETTINGS}, **settings}


def rules_present(records: list) -> list:
    """The selection rules under which some record has a test accuracy."""
    return [rule for rule in RULES if any(record_value(r, rule) is not None for r in records)]


def grid_claims(records: list, margin: float = DEFAULT_CLAIMS_MARGIN) -> list:
    """Every claim entry of a grid's records, with `rule_dependent` set where the verdict of one cell's
    claim and comparison differs between selection rules."""
    entries = []
    rules = rules_present(records)
    for settings, members in group_records(records):
        cell = cell_of(settings, members)
        for eta in sorted({float(r["eta"]) for r in members}):
            at_eta = [r for r in members if float(r["eta"]) == eta]
            for rule in rules:
                entries += eta_cell_claims({**cell, "eta": eta}, at_eta, rule, margin)
        for rule in rules:
            slopes = per_seed_slopes(members, rule)
            if len(slopes) >= MIN_SEEDS:
                interval = paired_interval(slopes)
                entries.append(_entry({**cell, "eta": None}, "C3", "slope of (PLL - teacher) over eta", rule,
                                      interval, verdict_above(interval)))
    return mark_rule_dependent(entries)


# The fields an entry adds to its cell's settings: what it claims, then what one rule found.
CLAIM_FIELDS = ("claim", "comparison")
RESULT_FIELDS = ("rule", "n", "mean", "ci", "verdict", "beats", "margin", "best_step", "best_chosen_on",
                 "last_is_best", "rule_dependent")


def claim_identity(entry: dict) -> tuple:
    """What an entry is about, whatever its rule: its cell, claim and comparison (and C2's margin)."""
    return tuple(sorted((k, repr(v)) for k, v in entry.items() if k not in RESULT_FIELDS or k == "margin"))


def mark_rule_dependent(entries: list) -> list:
    verdicts = {}
    for e in entries:
        verdicts.setdefault(claim_identity(e), set()).add(e["verdict"])
    return [{**e, "rule_dependent": len(verdicts[claim_identity(e)]) > 1} for e in entries]


def most_seeds_per_cell(records: list) -> int:
    """The most seeds behind any (group, eta, step) of a grid's records (0 without records)."""
    seeds = {}
    for settings, members in group_records(records):
        for r in members:
            cell = (repr(sorted(settings.items())), float(r["eta"]), r["step"])
            seeds.setdefault(cell, set()).add(r["seed"])
    return max((len(s) for s in seeds.values()), default=0)
