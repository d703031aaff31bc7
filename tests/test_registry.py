from __future__ import annotations

import json

import pytest

from nnssl.training.config import TrainingConfig
from nnssl.training.registry import UnknownTrainer, example_trainer_names, resolve_trainer


def test_default_trainer_exists_and_uses_reference_defaults():
    spec = resolve_trainer("IJEPATrainer")
    c = spec.config
    assert (spec.method, spec.backbone) == ("IJEPATrainer", "PrimusM")
    assert c.patch_size == (160, 160, 160) and c.batch_size == 8
    assert (c.num_epochs, c.iterations_per_epoch) == (1000, 250)


def test_suffixes_in_any_order():
    a = resolve_trainer("IJEPATrainer_Tiny_P32_BS2_2ep_5it").config
    b = resolve_trainer("IJEPATrainer_5it_2ep_BS2_P32_Tiny").config
    assert (a.patch_size, a.batch_size, a.num_epochs, a.iterations_per_epoch) == ((32, 32, 32), 2, 2, 5)
    assert a.to_dict() | {"trainer_name": ""} == b.to_dict() | {"trainer_name": ""}


def test_learning_rate_suffix_sets_the_peak_lr_in_any_notation():
    assert resolve_trainer("IJEPATrainer_Tiny_lr1e-3").config.peak_lr == 1e-3
    assert resolve_trainer("IJEPATrainer_lr0.0005_BS4").config.peak_lr == 5e-4
    assert resolve_trainer("IJEPATrainer_Tiny").config.peak_lr == 3e-4  # the default without the suffix
    schedule = resolve_trainer("IJEPATrainer_Tiny_lr2e-3_1ep_100it").config.schedule_config()
    assert schedule.peak_lr == 2e-3


def test_batch_size_suffix_is_honoured():
    # the reference had subclasses that silently ignored their batch size
    assert resolve_trainer("IJEPATrainer_BS16").config.batch_size == 16
    assert resolve_trainer("IJEPATrainer_PrimusL_BS3").config.primus_preset == "L"


@pytest.mark.parametrize("bad,needle", [
    ("IJEPATrainr_BS8", "unknown trainer method"),
    ("IJEPATrainer_BS8_XL", "unknown suffix 'XL'"),
    ("IJEPATrainer_BS8_BS4", "BS<N> twice"),
    ("IJEPATrainer_PrimusM_PrimusL", "two backbones"),
    ("IJEPATrainer_P20", "multiple of the token size"),
    ("IJEPATrainer_BS0", "batch_size must be at least 1"),
    ("IJEPATrainer_lr1e-3_lr2e-3", "lr<X> twice"),
    ("IJEPATrainer_lr0", "peak_lr must be positive"),
    ("IJEPATrainer_lr-1", "unknown suffix 'lr-1'"),
])
def test_bad_names_explain_and_list_valid_ones(bad, needle):
    with pytest.raises(UnknownTrainer) as e:
        resolve_trainer(bad)
    assert needle in str(e.value)


def test_unknown_suffix_lists_grammar():
    with pytest.raises(UnknownTrainer) as e:
        resolve_trainer("IJEPATrainer_foo")
    assert "BS<N>" in str(e.value) and "PrimusM" in str(e.value)


@pytest.mark.parametrize("name", example_trainer_names())
def test_every_listed_name_resolves_and_round_trips(name):
    c = resolve_trainer(name).config
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainingConfig.from_dict(d) == c
    assert d["total_steps"] == c.num_epochs * c.iterations_per_epoch


def test_config_drives_the_schedules():
    from nnssl.methods.schedules import lr_at, momentum_at, wd_at

    c = resolve_trainer("IJEPATrainer_Tiny_P32_BS2_4ep_25it").config
    sc = c.schedule_config()
    assert sc.total_steps == 100 and sc.warmup_steps == c.warmup_steps == 5
    assert lr_at(sc.warmup_steps - 1, sc) == c.peak_lr
    assert wd_at(0, sc) == c.start_weight_decay and momentum_at(0, sc) == c.ema_start
