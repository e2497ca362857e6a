import os
import stat

import pytest
import torch

from utils.cli import UserError
from utils.io import atomic_torch_save, atomic_write_text, load_torch_file


def test_atomic_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask != 0o600


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "r.json", "old")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(Exception):
        atomic_torch_save(target, {"x": Boom()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_torch_round_trip_and_truncated_file_is_one_line_error(tmp_path):
    path = atomic_torch_save(tmp_path / "c.pt", {"w": torch.arange(6.0).view(2, 3)})
    assert torch.equal(load_torch_file(path, "checkpoint", "retrain")["w"], torch.arange(6.0).view(2, 3))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError) as err:
        load_torch_file(path, "checkpoint", "retrain")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys):
    """write() and fsync() raise ENOSPC without any file name: the message must still say where."""
    import errno

    import utils.io
    from utils.cli import run_main

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(utils.io.os, "fsync", full)
    target = tmp_path / "results" / "records" / "r.json"
    assert run_main(lambda argv: atomic_write_text(target, "x") and 0) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write or read {target}: No space left on device" in err
    assert "free some space" in err and list(target.parent.iterdir()) == []
