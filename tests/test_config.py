"""Trainer names, overrides and the registries resolved into one typed configuration."""

from __future__ import annotations

import json

import pytest

from nnssl.methods.registry import list_methods
from nnssl.models.registry import list_backbones
from nnssl.settings import differences
from nnssl.training.config import TrainingConfig, with_geometry
from nnssl.training.names import UnknownTrainer, example_trainer_names, resolve_config


def test_default_trainer_exists_and_uses_reference_defaults_with_geometry_from_the_plan():
    c = resolve_config("IJEPATrainer")
    assert (c.method, c.backbone) == ("IJEPATrainer", "PrimusM")
    assert c.patch_size is None and c.batch_size is None  # the plans decide
    assert (c.num_epochs, c.iterations_per_epoch) == (1000, 250)
    resolved, notes = with_geometry(c, [160, 160, 160], 8)
    assert resolved.patch_size == (160, 160, 160) and resolved.batch_size == 8
    assert notes == ["patch size [160, 160, 160] from the plan", "global batch size 8 from the plan"]


def test_name_suffixes_override_the_plan_and_say_so():
    c, notes = with_geometry(resolve_config("IJEPATrainer_Tiny_P32_BS2"), [48, 48, 48], 8)
    assert (c.patch_size, c.batch_size) == ((32, 32, 32), 2)
    assert notes == ["patch size [32, 32, 32] set by the trainer overrides the plan's [48, 48, 48]",
                     "global batch size 2 set by the trainer overrides the plan's 8"]


def test_anisotropic_plan_patch_is_kept_and_rounded_up_to_the_token_cell():
    c, notes = with_geometry(resolve_config("IJEPATrainer_ResEncTiny"), [40, 96, 64], 4)
    assert c.patch_size == (64, 96, 64)  # ResEnc tiles 32³ cells
    assert "rounded up" in notes[0]
    c, _ = with_geometry(resolve_config("IJEPATrainer_Tiny"), [24, 48, 40], 4)
    assert c.patch_size == (24, 48, 40)  # Primus: multiples of 8 on each axis


def test_suffixes_in_any_order():
    a = resolve_config("IJEPATrainer_Tiny_P32_BS2_2ep_5it")
    b = resolve_config("IJEPATrainer_5it_2ep_BS2_P32_Tiny")
    assert (a.patch_size, a.batch_size, a.num_epochs, a.iterations_per_epoch) == ((32, 32, 32), 2, 2, 5)
    assert differences(a, b) == [("trainer_name", a.trainer_name, b.trainer_name)]


def test_learning_rate_suffix_sets_the_peak_lr_in_any_notation():
    assert resolve_config("IJEPATrainer_Tiny_lr1e-3").optim.peak_lr == 1e-3
    assert resolve_config("IJEPATrainer_lr0.0005_BS4").optim.peak_lr == 5e-4
    assert resolve_config("IJEPATrainer_Tiny").optim.peak_lr == 3e-4  # the default without the suffix
    assert resolve_config("IJEPATrainer_Tiny_lr2e-3_1ep_100it").schedule_config().peak_lr == 2e-3


def test_every_section_is_reachable_by_set_and_config_file_with_set_winning():
    c = resolve_config("IJEPATrainer_Tiny", {"mask": {"num_targets": 2}, "ijepa.ema_start": 0.98},
                       {"ijepa.ema_start": 0.99, "mask.target_scale": [0.1, 0.12], "augment.zoom_probability": 0.0,
                        "loader.foreground_probability": 0.5, "mae.mask_ratio": 0.6, "model.drop_path_rate": 0.1,
                        "optim.grad_clip": 0.0, "patch_size": [64, 32, 32]})
    assert c.mask.num_targets == 2 and c.ijepa.ema_start == 0.99 and c.mask.target_scale == (0.1, 0.12)
    assert c.augment.zoom_probability == 0.0 and c.loader.foreground_probability == 0.5
    assert c.mae.mask_ratio == 0.6 and c.model.drop_path_rate == 0.1 and c.optim.grad_clip == 0.0
    assert c.patch_size == (64, 32, 32)
    assert c.schedule_config().ema_start == 0.99


def test_every_problem_is_listed_at_once_with_suggestions():
    with pytest.raises(UnknownTrainer) as e:
        resolve_config("IJEPATrainer", overrides={"ijepa.ema_strat": 0.99, "mask.num_targets": 0,
                                                  "optim.peak_lr": "fast", "mask": 3})
    text = str(e.value)
    assert "did you mean ijepa.ema_start" in text and "num_targets=0" in text
    assert "'fast' must be a number" in text and "a section: set one of its fields" in text


def test_method_and_backbone_come_from_the_name_only():
    with pytest.raises(UnknownTrainer, match="choose the method and backbone with the trainer name"):
        resolve_config("IJEPATrainer", overrides={"backbone": "ResEncL"})


def test_method_and_family_defaults_apply_before_the_name():
    mae = resolve_config("MAETrainer_PrimusS")
    assert mae.optim.betas == (0.9, 0.98) and mae.model.drop_path_rate == 0.2 and mae.optim.grad_clip == 1.0
    assert resolve_config("MAETrainer_ResEncL").optim.grad_clip == 12.0
    assert resolve_config("MAETrainer_Tiny").model.drop_path_rate == 0.0  # the backbone beats the method
    assert resolve_config("IJEPATrainer_ResEncL").mask.min_keep == 4  # the ResEnc family's small grid


@pytest.mark.parametrize("bad,needle", [
    ("IJEPATrainr_BS8", "unknown trainer method"),
    ("IJEPATrainer_BS8_XL", "unknown suffix 'XL'"),
    ("IJEPATrainer_BS8_BS4", "BS<N> twice"),
    ("IJEPATrainer_PrimusM_PrimusL", "two backbones"),
    ("IJEPATrainer_P20", "multiple of Primus's patch embedding"),
    ("IJEPATrainer_ResEncL_P48", "multiple of ResEnc's total stride"),
    ("IJEPATrainer_BS0", "batch_size must be at least 1"),
    ("IJEPATrainer_lr1e-3_lr2e-3", "lr<X> twice"),
    ("IJEPATrainer_lr0", "peak_lr must be positive"),
    ("IJEPATrainer_lr-1", "unknown suffix 'lr-1'"),
])
def test_bad_names_explain_and_list_valid_ones(bad, needle):
    with pytest.raises(UnknownTrainer) as e:
        resolve_config(bad)
    assert needle in str(e.value)


def test_unknown_suffix_lists_the_grammar_from_the_registries():
    with pytest.raises(UnknownTrainer) as e:
        resolve_config("IJEPATrainer_foo")
    text = str(e.value)
    assert "BS<N>" in text
    assert all(b.name in text for b in list_backbones()) and all(m.name in text for m in list_methods())


@pytest.mark.parametrize("name", example_trainer_names())
def test_every_listed_name_resolves_and_round_trips(name):
    c = resolve_config(name)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainingConfig.from_dict(d) == c
    assert d["total_steps"] == c.num_epochs * c.iterations_per_epoch


def test_from_dict_rejects_unknown_keys_instead_of_dropping_them():
    d = resolve_config("IJEPATrainer").to_dict()
    d["ijepa"]["ema_strat"] = 0.9
    with pytest.raises(Exception, match="ijepa.ema_strat: unknown setting"):
        TrainingConfig.from_dict(d)


def test_config_drives_the_schedules():
    from nnssl.methods.schedules import lr_at, momentum_at, wd_at

    c = resolve_config("IJEPATrainer_Tiny_P32_BS2_4ep_25it")
    sc = c.schedule_config()
    assert sc.total_steps == 100 and sc.warmup_steps == c.warmup_steps == 5
    assert lr_at(sc.warmup_steps - 1, sc) == c.optim.peak_lr
    assert wd_at(0, sc) == c.optim.start_weight_decay and momentum_at(0, sc) == c.ijepa.ema_start


@pytest.mark.parametrize("alias,method,backbone,batch", [
    ("BaseMAETrainer", "MAETrainer", "ResEncL", None), ("BaseMAETrainer_BS8", "MAETrainer", "ResEncL", 8),
    ("BaseEvaMAETrainer", "MAETrainer", "PrimusM", None), ("BaseEvaMAETrainer_BS8", "MAETrainer", "PrimusM", 8),
    ("nnsslTrainer", "IJEPATrainer", "PrimusM", None)])
def test_reference_trainer_names_run_as_their_equivalents_and_keep_their_name(alias, method, backbone, batch):
    c = resolve_config(alias)
    assert (c.trainer_name, c.method, c.backbone, c.batch_size) == (alias, method, backbone, batch)
    if alias.startswith("Base"):
        assert c.patch_size == (160, 160, 160)  # the reference fixes it


def test_a_misspelt_name_gets_the_closest_valid_ones():
    with pytest.raises(UnknownTrainer, match="Did you mean BaseMAETrainer_BS8"):
        resolve_config("BaseMAETrainr_BS8")
    with pytest.raises(UnknownTrainer, match="Did you mean IJEPATrainer_Tiny"):
        resolve_config("IJEPATrainer_Tinny")
