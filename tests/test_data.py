"""Data in: features files, the datasets' split conventions, an image folder through a real (random)
ResNet-18 with its cache, and the one-line errors of an offline machine."""
import inspect
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from conftest import DIGITS, blob_features, stderr_error_lines
import train_linear
import data.datasets
import models.extract
import utils.threads
from data.datasets import TORCHVISION_FILES, digits_features, host_unreachable, image_splits
from data.features import load_features_file, save_features
from utils.cli import run_main


def the_error(capsys, rc, *needles) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = stderr_error_lines(err)
    assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def probes(monkeypatch):
    """No test touches the network: the quick check of a download host answers "reachable" (so a
    download is attempted, and fails through `offline`) and records which URLs it was asked about."""
    asked = []

    def reachable(url, within=data.datasets.REACHABLE_WITHIN_S):
        asked.append(url)
        return None
    monkeypatch.setattr(data.datasets, "host_unreachable", reachable)
    return asked


@pytest.fixture
def offline(monkeypatch):
    """No internet: every urllib request fails at once (as it would, slowly, on a cut-off machine)."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def run_with(cli, *argv, where="a", data=None, cache=None) -> int:
    """`cli(...)`, but with this data root / cache directory (the fixture's own come last and win)."""
    d = cli.dirs(where)
    dirs = ["--checkpoint", d["ckpt"], "--results", d["results"], "--cache-dir", cache or d["cache"],
            "--data-root", data or d["data"]]
    return run_main(train_linear.main, [str(a) for a in (*argv, *dirs)])


# ---- features files ---------------------------------------------------------------------------------
def write_features(path, arrays, fmt):
    if fmt == "npz":
        np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    else:
        plain = lambda v: str(v) if np.asarray(v).dtype.kind == "U" else torch.as_tensor(v)  # noqa: E731
        torch.save({k: plain(v) for k, v in arrays.items()}, path)
    return path


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_features_file_round_trip(tmp_path, fmt):
    arrays = blob_features()
    arrays.update(num_classes=np.array(4), name=np.array("blobs"), backbone=np.array("clip"))
    f = load_features_file(write_features(tmp_path / f"f.{fmt}", arrays, fmt))
    for got, key in zip((f.train_x, f.train_y, f.test_x, f.test_y), ("train_features", "train_labels",
                                                                      "test_features", "test_labels")):
        assert torch.equal(got, torch.as_tensor(arrays[key]))
    assert (f.train_x.dtype, f.train_y.dtype, f.num_classes, f.name, f.backbone) == (
        torch.float32, torch.int64, 4, "blobs", "clip")
    # the cache this tool writes is the same format
    save_features(tmp_path / "again.pt", f)
    g = load_features_file(tmp_path / "again.pt")
    assert g.fingerprint() == f.fingerprint() and (g.num_classes, g.name, g.backbone) == (4, "blobs", "clip")


def test_features_files_pt_and_npz_train_the_same_chain(cli, tmp_path):
    """One set of features as .pt and as .npz: same fingerprint, same numbers at every step; labels
    0..2 with num_classes=4 give a 4-way head; -d only names the results."""
    arrays = blob_features()
    arrays["num_classes"] = np.array(4)
    chain = ("--rounds", 1, "--epochs", 3, "--lr", 0.05, "--wd", 5e-3, "--ctype", "sym", "--corruption", 0.3)
    by_fmt = {}
    for fmt in ("pt", "npz"):
        path = write_features(tmp_path / f"mine.{fmt}", arrays, fmt)
        assert cli("--features", path, *chain, where=fmt) == 0
        by_fmt[fmt] = cli.by_step(fmt)
    assert set(by_fmt["pt"]) == {"0", "1", "p"}
    for step, rec in by_fmt["pt"].items():
        other = by_fmt["npz"][step]
        assert (rec["dataset"], rec["backbone"]) == ("mine", "custom")
        for name in ("features_id", "test_acc_bytest", "test_acc_last", "realised_corruption"):
            assert rec[name] == other[name], (step, name)
        assert cli.checkpoint(rec, "best", where="pt")["model"]["weight"].shape == (4, 6)
    assert by_fmt["pt"]["0"]["test_acc_bytest"] > 60  # separable blobs: the probe learns
    assert cli("--features", tmp_path / "mine.npz", "-d", "renamed", *chain, where="named") == 0
    assert {r["dataset"] for r in cli.records("named")} == {"renamed"}


def test_digits_as_a_features_file_equals_the_builtin_digits(cli, tmp_path):
    d = digits_features()
    path = tmp_path / "digits.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in d.to_file_dict().items()})
    args = ("--rounds", 1, "--epochs", 3, *DIGITS[2:])
    assert cli(*DIGITS[:2], *args, where="builtin") == 0
    assert cli("--features", path, *args, where="file") == 0
    builtin, from_file = cli.by_step("builtin"), cli.by_step("file")
    for step in ("0", "1", "p"):
        assert from_file[step]["key"] == builtin[step]["key"]  # same name, backbone, features and settings
        assert from_file[step]["test_acc_bytest"] == builtin[step]["test_acc_bytest"]


# ---- split conventions ------------------------------------------------------------------------------
class FakeFlowers:
    def __init__(self, root, split, transform=None, download=False):
        self.split, self.download = split, download
        self.n = {"train": 1020, "val": 1020, "test": 6149}[split]

    def __len__(self):
        return self.n


def test_flowers102_trains_on_the_official_test_split(monkeypatch, tmp_path):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    train, test, k = image_splits("flowers102", tmp_path, transform=None)
    assert (train.split, len(train), test.split, len(test), k) == ("test", 6149, "train", 1020, 102)
    assert train.download and test.download  # nothing on disk: torchvision may download


def test_dataset_on_disk_is_read_without_download_or_network_check(monkeypatch, tmp_path, probes):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    for name in ("imagelabels.mat", "setid.mat"):
        (base / name).write_bytes(b"")
    train, test, _ = image_splits("flowers102", tmp_path, transform=None)
    assert not train.download and not test.download and probes == []
    (base / "jpg").rmdir()   # the archive instead of the folder: torchvision extracts it, no network check
    (base / "102flowers.tgz").write_bytes(b"")
    train, _, _ = image_splits("flowers102", tmp_path, transform=None)
    assert train.download and probes == []


def jpeg(path, colour=(200, 30, 30), size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def make_caltech101(root, counts):
    base = root / "caltech101" / "101_ObjectCategories"
    for c, n in counts.items():
        for i in range(1, n + 1):
            jpeg(base / c / f"image_{i:04d}.jpg")
    (root / "caltech101" / "Annotations").mkdir(parents=True)


def make_caltech256(root, counts):
    base = root / "caltech256" / "256_ObjectCategories"
    for c, n in counts.items():
        for i in range(1, n + 1):
            jpeg(base / c / f"{c[:3]}_{i:04d}.jpg")


def labels_of(subset):
    return [subset[i][1] for i in range(len(subset))]


def test_caltech101_drops_background_and_splits_80_20_with_seed_42(tmp_path, probes):
    # torchvision's own Caltech101 class on a tiny on-disk copy (nothing to download)
    counts = {"BACKGROUND_Google": 4, "Faces": 6, "accordion": 7, "airplanes": 5}
    make_caltech101(tmp_path, counts)
    train, test, k = image_splits("caltech101", tmp_path, transform=None)
    assert probes == []  # on disk: no network check
    assert k == 3 and train.dataset.categories == ["Faces", "accordion", "airplanes"]
    n = 6 + 7 + 5
    want_train, want_test = train_test_split(np.arange(n), test_size=0.2, random_state=42)
    assert sorted(train.indices) == sorted(want_train.tolist())
    assert sorted(test.indices) == sorted(want_test.tolist())
    truth = [0] * 6 + [1] * 7 + [2] * 5  # class ids from the sorted folder names, background gone
    assert labels_of(train) == [truth[i] for i in train.indices]
    assert labels_of(test) == [truth[i] for i in test.indices]


def test_caltech256_drops_clutter_and_splits_80_20_with_seed_42(tmp_path):
    counts = {"001.ak47": 5, "002.american-flag": 6, "003.backpack": 5, "257.clutter": 7}
    make_caltech256(tmp_path, counts)
    train, test, k = image_splits("caltech256", tmp_path, transform=None)
    assert k == 3
    kept = np.arange(16)  # the clutter images are the last 7 of the 23
    want_train, want_test = train_test_split(kept, test_size=0.2, random_state=42)
    assert sorted(train.indices) == sorted(want_train.tolist())
    assert sorted(test.indices) == sorted(want_test.tolist())
    assert len(test) == 4 and set(train.indices).isdisjoint(test.indices)
    seen = labels_of(train) + labels_of(test)
    assert sorted(seen) == [0] * 5 + [1] * 6 + [2] * 5  # every non-clutter image once, clutter never


# ---- offline: datasets and weights ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "food101", "stanfordcars", "flowers102",
                                  "caltech101", "caltech256"])
def test_dataset_that_cannot_be_downloaded_names_where_to_put_it(cli, capsys, offline, no_training, probes,
                                                                 name):
    root = cli.dirs()["data"]
    spec = TORCHVISION_FILES[name]
    line = the_error(capsys, cli("-d", name, "--arch", "resnet18", "--pretrained", "False"),
                     f"it needs the folder {root / spec.folder}/", "--data-root", "then rerun")
    if spec.url is None:  # stanfordcars: torchvision cannot download it, so nothing was tried
        assert f"{name} is not under {root}" in line and "cannot download it" in line and probes == []
    else:
        assert f"could not load {name} under {root} (URLError" in line
        assert f"or the archive {root / spec.archive} (extracted on first use) from {spec.url}" in line
        assert probes == [spec.url]
    assert "ImageNet weights" not in line  # --pretrained False needs none
    assert "\n" not in line
    assert not root.exists()  # no empty data root (or dataset folder) left behind
    assert not cli.dirs()["cache"].exists()


def test_missing_cifar100_names_its_files_url_and_the_weights_needed_next(cli, capsys, offline, no_training,
                                                                          monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    root = cli.dirs()["data"]
    line = the_error(capsys, cli("-d", "cifar100"), f"could not load cifar100 under {root} (URLError",
                     f"it needs the folder {root}/cifar-100-python/ or the archive "
                     f"{root}/cifar-100-python.tar.gz",
                     "from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     "next, the resnet34 ImageNet weights are needed: resnet34-b627a593.pth in "
                     f"{tmp_path / 'torch_home' / 'hub' / 'checkpoints'}/",
                     "https://download.pytorch.org/models/resnet34-b627a593.pth")
    assert not root.exists()
    # an existing data root is kept, and only the folders the failed download made are removed
    root.mkdir(parents=True)
    (root / "other").mkdir()
    assert cli("-d", "caltech101", "--pretrained", "False") == 2
    assert sorted(p.name for p in root.iterdir()) == ["other"]


def test_unreachable_download_host_fails_at_once_without_downloading(cli, capsys, monkeypatch, no_training,
                                                                    probes):
    def no_network(url, within=2.0):
        probes.append(url)
        return "no answer within 2 s"
    monkeypatch.setattr(data.datasets, "host_unreachable", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("a download was attempted"))
    root = cli.dirs()["data"]
    the_error(capsys, cli("-d", "cifar10", "--pretrained", "False"),
              f"cifar10 is not under {root} and its download host www.cs.toronto.edu cannot be reached "
              "(no answer within 2 s)", f"{root}/cifar-10-batches-py/", f"{root}/cifar-10-python.tar.gz",
              "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "download it on another machine")
    assert probes == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert not root.exists()


def test_host_check_is_bounded_in_time(monkeypatch):
    """Name lookup and connection can hang for a minute on a machine without network: the check
    gives up after `within` seconds whatever the socket does (no real network used)."""
    import socket
    import threading

    class Conn:
        def close(self):
            pass
    gate = threading.Event()

    def hang(*args, **kwargs):
        gate.wait(10)
        return Conn()
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {})
    started = time.time()
    assert host_unreachable("https://example.invalid/x.tar.gz", within=0.2) == "no answer within 0.2 s"
    assert time.time() - started < 1.5
    gate.set()

    def refuse(address, timeout=None):
        assert address == ("example.invalid", 443)
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert "Connection refused" in host_unreachable("https://example.invalid/x.tar.gz", within=0.5)

    seen = []
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, timeout=None: seen.append(address) or Conn())
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"http": "http://proxy.local:3128"})
    assert host_unreachable("http://example.invalid/x.tar.gz", within=0.5) is None
    assert seen == [("proxy.local", 3128)]  # behind a proxy, the proxy is what must answer


def test_dataset_files_are_torchvisions_own():
    """Folder, archive and URL of each dataset are the ones torchvision's classes use."""
    import torchvision.datasets as tvd
    for name, cls in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100)):
        spec = TORCHVISION_FILES[name]
        assert (spec.folder, spec.archive, spec.url) == (cls.base_folder, cls.filename, cls.url)
    assert TORCHVISION_FILES["food101"].url == tvd.Food101._URL
    assert TORCHVISION_FILES["food101"].archive == tvd.Food101._URL.rsplit("/", 1)[1]
    flowers = TORCHVISION_FILES["flowers102"]
    assert flowers.url == tvd.Flowers102._download_url_prefix + tvd.Flowers102._file_dict["image"][0]
    files = {f for f, _ in tvd.Flowers102._file_dict.values()}
    assert {p.split("/")[-1] for p in flowers.archive_holds} == files
    for name, cls in (("caltech101", tvd.Caltech101), ("caltech256", tvd.Caltech256)):
        spec, source = TORCHVISION_FILES[name], inspect.getsource(cls)
        assert spec.url in source and spec.archive.split("/")[-1] in source
        assert spec.folder.split("/")[-1] in source and name in source
    cars = inspect.getsource(tvd.StanfordCars)
    assert all(p.split("/")[-1] in cars for p in TORCHVISION_FILES["stanfordcars"].folder_holds)


def make_image_folder(root, classes=("cat", "dog", "fox"), train=4, test=2, size=32):
    """Class-coloured PNGs (with a little noise) under root/train/<class> and root/test/<class>."""
    rng = np.random.default_rng(0)
    palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40)]
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            for i in range(n):
                pixels = np.clip(np.array(palette[c]) + rng.normal(0, 20, (size, size, 3)), 0, 255)
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


def test_missing_pretrained_weights_names_where_to_put_them(cli, capsys, offline, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = make_image_folder(tmp_path / "imgs", train=1, test=1)
    argv = ("-d", "imagefolder", "--arch", "resnet18", "-j", 0, "--epochs", 1)
    where = tmp_path / "torch_home" / "hub" / "checkpoints"
    line = the_error(capsys, run_with(cli, *argv, data=folder), "could not get ImageNet weights for resnet18",
                     f"copy resnet18-f37072fd.pth into {where}/")
    assert "\n" not in line
    # the place named is the right one: a state dict put there is what the backbone loads, offline
    import torchvision
    from models.backbones import build_backbone
    reference = torchvision.models.resnet18(weights=None)
    where.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), where / "resnet18-f37072fd.pth")
    model = build_backbone("resnet18", pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert isinstance(model.fc, torch.nn.Identity) and not model.training


# ---- an image folder through a real backbone --------------------------------------------------------
class ExtractSpy:
    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, model, dataset, *args, **kwargs):
        self.calls.append(len(dataset))
        return self.real(model, dataset, *args, **kwargs)


def test_image_folder_chain_caches_features_and_reuses_them(cli, capsys, monkeypatch, tmp_path):
    spy = ExtractSpy(models.extract.extract_features)
    monkeypatch.setattr(models.extract, "extract_features", spy)
    folder = make_image_folder(tmp_path / "pets")
    argv = ("-d", "imagefolder", "--arch", "resnet18", "--pretrained", "False", "-j", 0, "--test-batch", 8,
            "--rounds", 1, "--epochs", 2, "--lr", 0.05, "--ctype", "sym", "--corruption", 0.2)
    assert run_with(cli, *argv, data=folder) == 0
    assert spy.calls == [12, 6]   # train then test split, once
    caches = list(cli.dirs()["cache"].glob("*.pt"))
    assert len(caches) == 1 and caches[0].name.startswith("imagefolder-pets-")
    assert caches[0].name.endswith("_resnet18-random.pt")
    cached = load_features_file(caches[0])
    assert cached.train_x.shape == (12, 512) and cached.test_x.shape == (6, 512)
    assert cached.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cached.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    first = cli.by_step()
    assert set(first) == {"0", "1", "p"}
    assert {(r["dataset"], r["backbone"]) for r in first.values()} == {("imagefolder", "resnet18-random")}

    # second run: features come from the cache, not from the backbone
    monkeypatch.setattr(models.extract, "load_backbone", lambda *a: pytest.fail("backbone built again"))
    assert run_with(cli, *argv, "--overwrite", data=folder) == 0
    assert spy.calls == [12, 6]
    assert {r["features_id"] for r in cli.records()} == {first["0"]["features_id"]}
    # the cache is a valid features file
    assert cli("--features", caches[0], "--epochs", 1, where="fromcache") == 0
    assert cli.records("fromcache")[0]["features_id"] == first["0"]["features_id"]

    # a corrupt cache is a one-line error naming the file; deleting it (the fix named) re-extracts
    monkeypatch.undo()
    monkeypatch.setattr(models.extract, "extract_features", spy)
    caches[0].write_bytes(caches[0].read_bytes()[:100])
    capsys.readouterr()
    the_error(capsys, run_with(cli, *argv, data=folder), f"feature cache {caches[0]}", f"Delete {caches[0]}")
    caches[0].unlink()
    assert run_with(cli, *argv, data=folder) == 0
    assert spy.calls == [12, 6, 12, 6]
    assert load_features_file(caches[0]).fingerprint() == cached.fingerprint()  # extraction is deterministic


def test_two_image_folders_do_not_share_a_cache(cli, monkeypatch, tmp_path):
    spy = ExtractSpy(models.extract.extract_features)
    monkeypatch.setattr(models.extract, "extract_features", spy)
    argv = ("-d", "imagefolder", "--arch", "resnet18", "--pretrained", "False", "-j", 0, "--epochs", 1)
    a = make_image_folder(tmp_path / "a" / "imgs", classes=("x", "y"), train=3, test=1, size=16)
    b = make_image_folder(tmp_path / "b" / "imgs", classes=("p", "q", "r"), train=2, test=1, size=16)
    assert run_with(cli, *argv, data=a) == 0
    assert run_with(cli, *argv, data=b) == 0
    assert spy.calls == [6, 2, 6, 3]
    assert len(list(cli.dirs()["cache"].glob("imagefolder-imgs-*_resnet18-random.pt"))) == 2
    assert sorted(len(cli.checkpoint(r, "best")["model"]["weight"]) for r in cli.records()) == [2, 3]


def test_image_folder_problems_are_one_line(cli, capsys, tmp_path, no_training):
    argv = ("-d", "imagefolder", "--arch", "resnet18", "--pretrained", "False", "-j", 0)
    the_error(capsys, run_with(cli, *argv, data=tmp_path / "absent"),
              f"image folder {tmp_path / 'absent'} not found",
              "-d imagefolder reads the images in --data-root DIR", "DIR/<class>/<images>",
              "DIR/train/<class>/<images> and DIR/test/<class>/<images>")
    (tmp_path / "empty").mkdir()
    the_error(capsys, run_with(cli, *argv, data=tmp_path / "empty"), "image folder", "sub-folder")
    one = make_image_folder(tmp_path / "one", classes=("solo",), train=2, test=1, size=8)
    the_error(capsys, run_with(cli, *argv, data=one), "1 class folder", "at least 2")
    odd = make_image_folder(tmp_path / "odd", classes=("a", "b"), train=2, test=1, size=8)
    (odd / "test" / "b").rename(odd / "test" / "c")
    the_error(capsys, run_with(cli, *argv, data=odd), "different class folders")
    flat = tmp_path / "flat"
    for c in ("a", "b"):
        jpeg(flat / c / "0.jpg")
    the_error(capsys, run_with(cli, *argv, data=flat), "2 images", "too few", "DIR/train and DIR/test")
    half = make_image_folder(tmp_path / "half", classes=("a", "b"), train=2, test=1, size=8)
    for image in (half / "test").rglob("*.png"):
        image.unlink()
    for folder in sorted((half / "test").rglob("*"), reverse=True) + [half / "test"]:
        folder.rmdir()
    the_error(capsys, run_with(cli, *argv, data=half), f"image folder {half} has train/ but no test/",
              f"give both {half}/train and {half}/test")


def test_unreadable_image_names_the_file(cli, capsys, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b"), train=2, test=1, size=8)
    bad = folder / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    argv = ("-d", "imagefolder", "--arch", "resnet18", "--pretrained", "False", "-j", 0)
    the_error(capsys, run_with(cli, *argv, data=folder), "could not read an image of imagefolder", str(bad),
              "remove or replace")
    assert not list(cli.dirs()["cache"].glob("*.pt"))  # nothing half-extracted was cached


# ---- cache names stay plain file names inside --cache-dir --------------------------------------------
@pytest.mark.parametrize("folder", ["pets", "we ird+näme", "...", ".hidden", "a" * 80, "x;rm -rf"])
def test_image_folder_cache_name_is_a_plain_name_inside_the_cache(tmp_path, folder):
    from data.features import cache_path
    from utils.names import is_plain_name
    root = tmp_path / folder
    root.mkdir()
    name = models.extract.cache_name("imagefolder", root)
    assert is_plain_name(name) and name.startswith("imagefolder-")
    assert cache_path(tmp_path / "cache", name, "resnet18-random").parent == tmp_path / "cache"
    if folder == "pets":  # plain folder names keep the cache name they always had
        assert name.startswith("imagefolder-pets-") and len(name) == len("imagefolder-pets-") + 8


@pytest.mark.parametrize("dataset, backbone", [("../x", "resnet18"), ("cifar10", "../../y"), ("/abs", "r"),
                                               ("a", "b/c")])
def test_cache_path_refuses_names_that_leave_the_cache(tmp_path, dataset, backbone):
    from data.features import cache_path
    from utils.cli import UserError
    with pytest.raises(UserError, match="feature cache name .* is not a plain name"):
        cache_path(tmp_path, dataset, backbone)


# ---- validation split: classes too small to stratify ---------------------------------------------------
def test_stratified_split_names_every_single_sample_class():
    from data.splits import stratified_val_split
    from utils.cli import UserError
    labels = np.array([0] * 10 + [1] * 10 + [2] + [3])
    with pytest.raises(UserError,
                       match=r"--val-split 0.2: classes 2, 3 have only 1 training sample.*drop --val-split"):
        stratified_val_split(labels, 0.2, 0)


def test_stratified_split_that_sklearn_cannot_make_is_one_line():
    """Ten classes of two samples each, 10% held out: 2 validation samples cannot cover 10 classes."""
    from data.splits import stratified_val_split
    from utils.cli import UserError
    with pytest.raises(UserError) as info:
        stratified_val_split(np.repeat(np.arange(10), 2), 0.1, 0)
    assert "--val-split 0.1 cannot split the 20 training samples of 10 classes by class" in str(info.value)
    assert "\n" not in str(info.value)


def test_stratified_split_is_unchanged_for_good_labels():
    from data.splits import stratified_val_split
    labels = np.arange(200) % 7
    want_train, want_val = train_test_split(np.arange(200), test_size=0.1, random_state=3, stratify=labels)
    train, val = stratified_val_split(labels, 0.1, 3)
    assert train.tolist() == sorted(want_train.tolist()) and val.tolist() == sorted(want_val.tolist())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int32, np.bool_])
def test_labels_of_every_integer_type_are_read(tmp_path, dtype):
    arrays = blob_features(num_classes=2)
    arrays.update(train_labels=arrays["train_labels"].astype(dtype),
                  test_labels=arrays["test_labels"].astype(dtype))
    f = load_features_file(write_features(tmp_path / "f.npz", arrays, "npz"))
    assert f.train_y.dtype == torch.int64 and f.num_classes == 2
    assert f.train_y.tolist() == blob_features(num_classes=2)["train_labels"].tolist()


def test_huge_unsigned_label_is_refused_in_one_line(tmp_path):
    from utils.cli import UserError
    arrays = blob_features()
    labels = arrays["train_labels"].astype(np.uint64)
    labels[4] = np.uint64(2**64 - 1)  # would wrap to -1 if cast to int64 first
    arrays["train_labels"] = labels
    with pytest.raises(UserError, match="labels go up to 18446744073709551615.*at most 100,000 classes"):
        load_features_file(write_features(tmp_path / "f.npz", arrays, "npz"))


# ---- data loading workers ---------------------------------------------------------------------------
def test_workers_are_capped_at_the_cores_available_and_said_once(cli, capsys, monkeypatch, tmp_path):
    asked = []
    real = models.extract.extract_features

    def spy(model, dataset, device, batch_size, workers, desc, **kwargs):
        asked.append(workers)
        return real(model, dataset, device, batch_size, 0, desc, **kwargs)  # no worker processes in a test
    monkeypatch.setattr(models.extract, "extract_features", spy)
    monkeypatch.setattr(utils.threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(models.extract, "_CAPPED_SAID", set())
    assert utils.threads.available_cores() == 2
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b"), train=2, test=1, size=8)
    argv = ("-d", "imagefolder", "--arch", "resnet18", "--pretrained", "False", "--epochs", 1)
    assert run_with(cli, *argv, "-j", 4, data=folder) == 0
    assert asked == [2, 2]   # train and test extraction, each with 2 workers
    out = capsys.readouterr().out
    assert out.count("-j 4: only 2 CPU cores available here, using 2 data loading workers\n") == 1
    assert run_with(cli, *argv, "-j", 2, "--overwrite", where="b", data=folder) == 0
    assert asked == [2, 2, 2, 2] and "CPU cores" not in capsys.readouterr().out
    said = []
    assert models.extract.worker_count(9, said.append) == 2
    assert models.extract.worker_count(9, said.append) == 2
    assert len(said) == 1   # once per process


def test_cores_without_an_affinity_mask_come_from_cpu_count(monkeypatch):
    monkeypatch.delattr(utils.threads.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(utils.threads.os, "cpu_count", lambda: 3)
    assert utils.threads.available_cores() == 3
    monkeypatch.setattr(utils.threads.os, "cpu_count", lambda: None)
    assert utils.threads.available_cores() == 1


@pytest.mark.parametrize("change", ["sparse features", "sparse csr labels", "complex features",
                                    "bool features"])
def test_features_of_a_layout_or_type_no_probe_reads_are_one_line(tmp_path, change):
    """Sparse tensors used to fail deep inside torch (NotImplementedError); now one line naming the fix."""
    from utils.cli import UserError
    arrays = {k: torch.from_numpy(v) for k, v in blob_features().items()}
    if change == "sparse features":
        arrays["train_features"] = arrays["train_features"].to_sparse()
    elif change == "sparse csr labels":
        arrays["test_labels"] = arrays["test_labels"].view(-1, 1).to_sparse_csr()
    elif change == "complex features":
        arrays["test_features"] = arrays["test_features"].to(torch.complex64)
    else:
        arrays["train_features"] = arrays["train_features"] > 0
    path = tmp_path / "f.pt"
    torch.save(arrays, path)
    expected = {"sparse features": "train_features is a sparse_coo tensor", "sparse csr labels": "sparse_csr",
                "complex features": "complex64 values", "bool features": "bool values"}[change]
    with pytest.raises(UserError, match=expected):
        load_features_file(path)
