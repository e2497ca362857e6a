"""Progress output of long work: bars on a terminal, one line per finished chunk elsewhere (logs of
batch jobs) with the time spent and an estimate of the time left, nothing with --quiet. Warnings
and errors are printed in every mode."""
import sys
import time

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
        self.count = None   # the runs of the command (`runs`)

    def note(self, message) -> None:
        """A progress message (e.g. waiting for other processes): not shown in mode 'none'."""
        if self.mode != "none":
            self.log(message)

    def bar(self, total: int, desc: str, unit: str, initial: int = 0, leave: bool = True) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                    disable=self.mode != "bars",
                    dynamic_ncols=True)

    def runs(self, total: int, epochs: float) -> "RunCount":
        """The count (and, on a terminal, the bar) of a command's `total` runs of about `epochs`
        epochs each; per-chunk lines estimate the time left from it."""
        self.count = RunCount(self.bar(total, "runs", "run"), total, epochs)
        return self.count

    def chunk_done(self, desc: str, runs: int, seconds: float, epoch: int, epochs: int,
                   resumed_from: int) -> None:
        """A batched computation of `runs` runs finished (`runs` of the command must have been called).
        Off a terminal: one line instead of bars, with the time since the command started and an
        estimate of the time left."""
        self.count.trained(runs, epoch - resumed_from)
        if self.mode == "lines":
            resumed = f", resumed from epoch {resumed_from}" if resumed_from else ""
            self.log(f"{desc} trained in {seconds:.1f} s (epoch {epoch}/{epochs}{resumed}); "
                     f"{self.count.estimate()}")


def duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '2 h 07 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RunCount:
    """How many of a command's runs are done (found finished, shared or trained), the run-epochs
    this process trained, and from these what is left. Runs found finished cost nothing, so the
    estimate takes the time per trained run-epoch so far times the epochs of the runs not done yet
    (an overestimate when some of those turn out finished)."""

    def __init__(self, bar: tqdm, total: int, epochs: float):
        self.bar, self.total, self.epochs = bar, total, epochs
        self.done, self.trained_epochs, self.started = 0, 0, time.time()

    def update(self, runs: int = 1) -> None:
        self.done += runs
        self.bar.update(runs)

    def trained(self, runs: int, epochs: int) -> None:
        self.trained_epochs += runs * epochs

    def close(self) -> None:
        self.bar.close()

    def estimate(self) -> str:
        """'1 min 05 s elapsed, about 3 min 10 s left' (or '..., none left')."""
        elapsed = time.time() - self.started
        left = max(self.total - self.done, 0)
        if not left:
            return f"{duration(elapsed)} elapsed, none left"
        if not self.trained_epochs:
            return f"{duration(elapsed)} elapsed"
        rate = elapsed / self.trained_epochs   # seconds per run-epoch so far
        return (f"{duration(elapsed)} elapsed, about {duration(rate * left * self.epochs)} left "
                f"({left} of {self.total} runs)")
