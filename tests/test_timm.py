"""timm backbones with their own preprocessing, features files written by --extract-only, and the
opt-in feature normalisation. Random weights only (no network here): two small architectures of
different families, a ViT and a ResNet, on a generated image folder."""
import pytest
import torch

import models.timm_backbones as tb
from data.features import FeatureSet, normalize_features
from utils.cli import UserError

VIT, RESNET = "timm:vit_tiny_patch16_224", "timm:resnet10t"


# ---- --feature-norm, by hand ------------------------------------------------------------------------
def small_features():
    train = torch.tensor([[3.0, 4.0, 1.0], [0.0, 0.0, 1.0], [6.0, 8.0, 1.0]])
    test = torch.tensor([[1.0, 0.0, 5.0]])
    return FeatureSet("toy", "custom", train, torch.tensor([0, 1, 0]), test, torch.tensor([1]), 2)


def test_l2_divides_each_row_by_its_norm_and_keeps_zero_rows():
    f = normalize_features(small_features(), "l2")
    expected = torch.tensor([[3 / 26 ** 0.5, 4 / 26 ** 0.5, 1 / 26 ** 0.5], [0.0, 0.0, 1.0],
                             [6 / 101 ** 0.5, 8 / 101 ** 0.5, 1 / 101 ** 0.5]])
    torch.testing.assert_close(f.train_x, expected)
    torch.testing.assert_close(f.test_x, torch.tensor([[1 / 26 ** 0.5, 0.0, 5 / 26 ** 0.5]]))
    zero = FeatureSet("z", "c", torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(1, 3), torch.tensor([0]),
                      2)
    assert torch.equal(normalize_features(zero, "l2").train_x, torch.zeros(2, 3))


def test_standardize_uses_the_training_rows_only():
    f = normalize_features(small_features(), "standardize")
    # train column means (3, 4, 1), population stds (sqrt 6, sqrt(32/3), 0 -> only centred)
    std0, std1 = 6 ** 0.5, (32 / 3) ** 0.5
    torch.testing.assert_close(f.train_x, torch.tensor([[0.0, 0.0, 0.0], [-3 / std0, -4 / std1, 0.0],
                                                        [3 / std0, 4 / std1, 0.0]]))
    # not re-centred on test
    torch.testing.assert_close(f.test_x, torch.tensor([[-2 / std0, -4 / std1, 4.0]]))


def test_none_is_the_stored_features_and_a_bad_mode_is_one_line():
    f = small_features()
    assert normalize_features(f, "none") is f
    with pytest.raises(UserError, match="unknown --feature-norm 'max'"):
        normalize_features(f, "max")


# ---- a timm model's own preprocessing --------------------------------------------------------------
@pytest.mark.parametrize("arch, size, resize, mean", [(RESNET, 176, 201, (0.485, 0.456, 0.406)),
                                                      (VIT, 224, 248, (0.5, 0.5, 0.5))])
def test_the_models_data_config_is_the_transform(arch, size, resize, mean):
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

    model, transform, config = tb.build_timm_backbone(arch, pretrained=False, random_seed=0)
    steps = {type(t): t for t in transform.transforms}
    assert steps[Resize].size == resize and steps[Resize].interpolation == InterpolationMode.BICUBIC
    assert tuple(steps[CenterCrop].size) == (size, size)
    assert tuple(steps[Normalize].mean) == pytest.approx(mean)
    assert config["input_size"] == [3, size, size] and config["interpolation"] == "bicubic"
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, model.feature_dim) and not model.training


def test_a_random_timm_backbone_is_the_same_every_time():
    a, _, _ = tb.build_timm_backbone(RESNET, pretrained=False, random_seed=0)
    b, _, _ = tb.build_timm_backbone(RESNET, pretrained=False, random_seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_offline_pretrained_timm_model_is_one_line_naming_the_model_and_the_cache(monkeypatch):
    monkeypatch.setattr(tb, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(tb, "_hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(UserError) as err:
        tb.build_timm_backbone("timm:vit_small_patch14_dinov2.lvd142m", pretrained=True, random_seed=0)
    from huggingface_hub import constants
    message = str(err.value)
    assert "vit_small_patch14_dinov2.lvd142m" in message and constants.HF_HUB_CACHE in message
    assert "timm/vit_small_patch14_dinov2.lvd142m" in message and "--pretrained False" in message
    assert "\n" not in message


def test_an_unknown_timm_model_is_one_line():
    with pytest.raises(UserError, match="timm has no model 'no_such_net'"):
        tb.timm_model_name("timm:no_such_net")
    assert tb.timm_tag("timm:vit_base_patch14_dinov2.lvd142m", True) == "timm-vit_base_patch14_dinov2.lvd142m"
    assert tb.timm_tag(VIT, False) == "timm-vit_tiny_patch16_224-random"


# ---- the whole chain, a grid, --extract-only and --features ------------------------------------------
from conftest import Cli, stderr_error_lines  # noqa: E402
from test_data import make_image_folder, run_with  # noqa: E402
from utils.runs import VOLATILE_FIELDS, RunConfig, step_settings  # noqa: E402

CHAIN = ("-d", "imagefolder", "--pretrained", "False", "-j", 0, "--test-batch", 6, "--rounds", 1,
         "--epochs", 2, "--lr", 0.05, "--ctype", "sym", "--corruption", 0.2)


def numbers(records):
    return {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE_FIELDS} for r in records}


@pytest.mark.parametrize("arch, dim", [(VIT, 192), (RESNET, 512)])
def test_a_timm_backbone_runs_the_whole_chain_from_its_own_cache(cli, tmp_path, arch, dim):
    folder = make_image_folder(tmp_path / "pets", train=3, test=2)
    assert run_with(cli, *CHAIN, "--arch", arch, data=folder) == 0
    tag = tb.timm_tag(arch, False)
    (cache,) = cli.dirs()["cache"].glob("*.pt")
    assert cache.name.endswith(f"_{tag}.pt")
    stored = torch.load(cache, weights_only=True)
    assert stored["train_features"].shape == (9, dim) and stored["backbone"] == tag
    assert '"interpolation": "bicubic"' in stored["preprocessing"] and '"timm": "' in stored["versions"]
    records = cli.by_step()
    assert set(records) == {"0", "1", "p"} and {r["backbone"] for r in records.values()} == {tag}


def test_extract_only_writes_a_features_file_that_trains_to_the_same_records(cli, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "pets", train=3, test=2)
    assert run_with(cli, "-d", "imagefolder", "--arch", RESNET, "--pretrained", "False", "-j", 0,
                    "--extract-only", data=folder) == 0
    (path,) = cli.dirs()["cache"].glob("*.pt")
    assert f"--features {path} -d imagefolder" in capsys.readouterr().out
    assert cli.records() == []  # nothing trained
    assert run_with(cli, *CHAIN, "--arch", RESNET, data=folder) == 0
    argv = [a for a in CHAIN if a not in ("--pretrained", "False")]
    assert cli("--features", path, *argv, where="fromfile") == 0
    assert numbers(cli.records("fromfile")) == numbers(cli.records())


def test_a_recipe_sweeps_a_timm_backbone_and_the_feature_norm(cli, tmp_path):
    folder = make_image_folder(tmp_path / "pets", train=3, test=2)
    recipe = tmp_path / "timm.yaml"
    recipe.write_text(f"name: timm\nrounds: 1\ngrid:\n  dataset: imagefolder\n  arch: [{RESNET}, resnet18]\n"
                      "  pretrained: false\n  feature_norm: [none, standardize]\n  ctype: sym\n"
                      "  corruption: 0.2\n  epochs: 2\n  lr: 0.05\n")
    assert run_with(cli, "--config", recipe, "-j", 0, data=folder) == 0
    records = cli.records()
    assert len(records) == 2 * 2 * 3
    assert {(r["backbone"], r.get("feature_norm", "none")) for r in records} == {
        (b, n) for b in ("timm-resnet10t-random", "resnet18-random") for n in ("none", "standardize")}
    tables = (cli.dirs()["results"] / "reports" / "timm" / "tables.md").read_text()
    titles = [line for line in tables.splitlines() if line.startswith("## ")]
    assert len(titles) == 4 and sum("feature_norm none" in t for t in titles) == 2, titles


def test_feature_norm_enters_run_keys_only_when_it_is_used():
    plain, l2 = RunConfig("d", "b"), RunConfig("d", "b", feature_norm="l2")
    assert "feature_norm" not in step_settings(plain, "0", "f")   # keys of existing stores unchanged
    assert step_settings(l2, "p", "f")["feature_norm"] == "l2"


def test_feature_norm_changes_the_probe_not_the_corruption(cli):
    digits = ("-d", "digits", "--lr", 0.05, "--wd", 5e-3, "--epochs", 2)
    assert cli(*digits) == 0 and cli(*digits, "--feature-norm", "standardize", where="std") == 0
    (plain,), (std,) = cli.records(), cli.records("std")
    assert plain["key"] != std["key"] and plain["realised_corruption"] == std["realised_corruption"]
    assert plain["test_acc_last"] != std["test_acc_last"]


def test_offline_pretrained_timm_backbone_on_the_command_line_is_one_line(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tb, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(tb, "_hub_reachable", lambda timeout=2.0: False)
    folder = make_image_folder(tmp_path / "pets", train=1, test=1)
    assert run_with(cli, "-d", "imagefolder", "--arch", "timm:convnext_atto", "-j", 0, data=folder) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert "timm model convnext_atto needs its pretrained weights" in line and "--pretrained False" in line


def test_unknown_timm_model_on_the_command_line_is_one_line(cli, capsys):
    assert cli("-d", "cifar10", "--arch", "timm:resnet_0") == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert "timm has no model 'resnet_0'" in line
