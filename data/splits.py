"""Index splits: the original's 80/20 split for datasets without one, and the validation split."""
import numpy as np

from utils.cli import UserError, one_line

# The original splits Caltech-101/256 80/20 with this seed (scikit-learn's train_test_split).
FIXED_SPLIT_SEED = 42


def fixed_train_test_split(num_samples: int, test_size: float = 0.2, seed: int = FIXED_SPLIT_SEED):
    """(train indices, test indices), as `train_test_split(..., test_size=0.2, random_state=42)`."""
    from sklearn.model_selection import train_test_split  # imported here: it adds ~2 s to every start
    train, test = train_test_split(np.arange(num_samples), test_size=test_size, random_state=seed)
    return np.sort(train), np.sort(test)


def stratified_val_split(labels: np.ndarray, fraction: float, seed: int):
    """(train indices, val indices): a seeded, class-stratified hold-out of the training set.

    Made from the TRUE labels before corruption, so it depends only on (dataset, seed, fraction)
    and is identical across rounds, corruption rates and selection modes."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    rare = classes[counts < 2]
    if len(rare):
        more = f", ... ({len(rare)} classes)" if len(rare) > 10 else ""
        shown = ", ".join(str(c) for c in rare[:10]) + more
        which = f"class {shown} has" if len(rare) == 1 else f"classes {shown} have"
        raise UserError(f"--val-split {fraction:g}: {which} only 1 training sample, but a stratified "
                        "validation split needs at least 2 per class; drop --val-split (and --selection "
                        "val / --val-clean) or use a dataset with more samples of that class")
    try:
        train, val = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed,
                                      stratify=labels)
    except ValueError as exc:  # e.g. fewer validation (or remaining) samples than classes
        raise UserError(f"--val-split {fraction:g} cannot split the {len(labels)} training samples of "
                        f"{len(classes)} classes by class ({one_line(exc, 160)}); choose another --val-split "
                        "or drop it") from None
    return np.sort(train), np.sort(val)
