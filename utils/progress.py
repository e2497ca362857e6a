"""Progress output of long work: bars on a terminal, one line per finished chunk elsewhere (logs of
batch jobs), nothing with --quiet. Warnings and errors are printed in every mode."""
import sys

from tqdm import tqdm


def say(message) -> None:
    """print() that leaves progress bars intact: tqdm.write clears the bars, prints, redraws them."""
    tqdm.write(str(message))


def progress_mode(progress: str) -> str:
    """'bars', 'lines' or 'none' for a requested mode ('auto': bars when stderr is a terminal)."""
    if progress in ("bars", "lines", "none"):
        return progress
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        tty = False
    return "bars" if tty else "lines"


class Progress:
    """Where the engine reports what it does: `log` for messages always shown (warnings,
    superclasses), `note` for progress messages, bars for runs and epochs."""

    def __init__(self, progress: str = "auto", log=None):
        self.mode = progress_mode(progress)
        self.log = log or say

    def note(self, message) -> None:
        """A progress message (e.g. waiting for other processes): not shown in mode 'none'."""
        if self.mode != "none":
            self.log(message)

    def bar(self, total: int, desc: str, unit: str, initial: int = 0, leave: bool = True) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                    disable=self.mode != "bars",
                    dynamic_ncols=True)

    def chunk_done(self, desc: str, seconds: float, epoch: int, epochs: int, resumed_from: int) -> None:
        """Off a terminal: one line per finished batched computation instead of bars."""
        if self.mode == "lines":
            resumed = f", resumed from epoch {resumed_from}" if resumed_from else ""
            self.log(f"{desc} trained in {seconds:.1f} s (epoch {epoch}/{epochs}{resumed})")
