"""The selection rules: which epoch of a run is its result and its students' teacher.

One row per rule; everything else is derived from this table: the `--selection` choices and
default, the snapshots the trainer keeps, the final checkpoint files, the record fields
(`test_acc_bytest`, `epoch_last`, ...), the columns of the printed table and of records.csv, and
the words of every caption. The order is the order of those fields and columns.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SelectionRule:
    name: str              # the --selection value (and a report's `metric:`)
    metric: Optional[str]  # the per-epoch accuracy whose first maximum it picks; None: the last epoch
    checkpoint: str        # its final checkpoint, <checkpoint>.pt, named so in a record's `checkpoints`
    suffix: str            # its record fields: test_acc_<suffix>, epoch_<suffix>, ...
    column: str            # its column in the table a chain prints
    picks: str             # what it picks, in a caption's words

    def field(self, quantity: str = "test_acc") -> str:
        """The record field of `quantity` under this rule: 'test_acc_bytest'."""
        return f"{quantity}_{self.suffix}"


RULES = (
    SelectionRule("test", "test_acc", "best", "bytest", "best-by-test",
                  "test accuracy at the best-by-test epoch (the paper's protocol: the epoch of highest test "
                  "accuracy)"),
    SelectionRule("last", None, "last", "last", "last epoch", "test accuracy at the last epoch"),
    SelectionRule("val", "val_acc", "best_val", "byval", "best-by-val",
                  "test accuracy at the best-by-validation epoch (highest accuracy on the held-out split of "
                  "the noisy training set)"),
)
RULE = {rule.name: rule for rule in RULES}
DEFAULT = RULES[0]        # the paper's protocol
TRACKED = tuple(rule for rule in RULES if rule.metric)   # the rules that keep a snapshot of their best epoch
LAST = RULE["last"]       # its checkpoint is written last and carries the run's record
