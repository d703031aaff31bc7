"""The dense context probe: token read-outs, encoder-free baselines, the protocol and its CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnssl.cli.dataset import generate_phantoms_main
from nnssl.cli.evaluate import main
from nnssl.data.paired_organs import CONTEXT_LABELS
from nnssl.data.phantom_files import write_phantom_collection
from nnssl.data.phantoms import PhantomConfig, landmark_side, make_phantom
from nnssl.errors import InvalidInput
from nnssl.evaluation.baselines import (
    CONTEXT_BASELINES,
    STATISTICS,
    TOKEN_BASELINES,
    cell_statistics,
    cell_voxels,
    neighbourhood_statistics,
    position_features,
    token_baseline_features,
)
from nnssl.evaluation.labeled import (
    InvalidLabeledSet,
    centre_crop_or_pad,
    load_labeled_set,
    token_labels,
)
from nnssl.evaluation.probe import ProbeConfig, case_splits, context_probe
from nnssl.evaluation.protocol import (
    DENSE_PROBE,
    dense_probe,
    identify_labeled_set,
    protocol_set_config,
    random_reference,
    verdict,
)
from nnssl.export.features import PretrainedEncoder, readout_tokens
from nnssl.io_utils import read_json, write_json
from nnssl.models.primus import build_primus, primus_arch_kwargs, primus_backbone_spec
from nnssl.models.resenc import (
    build_resenc_l,
    resenc_backbone_spec,
    resenc_l_arch_kwargs,
)
from nnssl.preprocessing import steps
from test_evaluate import write_primus_checkpoint


def _paired(num_volumes: int, seed: int = 5, **kw) -> PhantomConfig:
    return PhantomConfig(num_volumes=num_volumes, shape=(48, 48, 48), modality="MR", anisotropic=False,
                         random_orientation=False, num_classes=2, paired_organs=True, seed=seed, **kw)


@pytest.fixture(scope="module")
def paired_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("paired")
    write_phantom_collection(folder, _paired(16))
    return folder


def _primus() -> PretrainedEncoder:
    torch.manual_seed(0)
    primus = build_primus("Tiny", input_shape=(32, 32, 32))
    return PretrainedEncoder(primus, primus_backbone_spec(primus, primus_arch_kwargs("Tiny", 1, (8, 8, 8),
                                                                                      (32, 32, 32))))


# ---------------------------------------------------------------------------- read-outs

def test_primus_token_readouts_are_its_tokens_and_every_depth_concatenated():
    encoder = _primus()
    volumes = torch.randn(2, 1, 32, 32, 32)
    final, layers = encoder.dense_tokens(volumes, "final"), encoder.dense_tokens(volumes, "layers")
    assert torch.equal(final, encoder.tokens(volumes))
    assert layers.shape == (2, 64, 96 * 4)  # embedding, 2 blocks, final norm
    depth = encoder.layers(volumes)
    assert torch.equal(layers, torch.cat(depth, dim=2)) and torch.equal(layers[..., -96:], final)
    # on a coarser probe grid every depth is the mean of its 2x2x2 tokens
    coarse = encoder.dense_tokens(volumes, "final", grid=(2, 2, 2))
    block = final.reshape(2, 2, 2, 2, 2, 2, 2, 96)[:, 0, :, 0, :, 0, :].reshape(2, 8, 96).mean(1)
    assert torch.allclose(coarse[:, 0], block, atol=1e-6)


def test_resenc_token_readouts_place_every_stage_on_the_probe_grid():
    torch.manual_seed(0)
    network = build_resenc_l(preset="Tiny")
    encoder = PretrainedEncoder(network, resenc_backbone_spec(network, resenc_l_arch_kwargs(preset="Tiny"),
                                                              (64, 64, 64)))
    volumes = torch.randn(1, 1, 64, 64, 64)
    assert encoder.grid == (2, 2, 2)
    assert torch.equal(encoder.dense_tokens(volumes, "final"), encoder.tokens(volumes))
    cells = encoder.dense_tokens(volumes, "layers", grid=(8, 8, 8))
    assert cells.shape == (1, 512, 8 + 16 + 32 + 48 + 64 + 64)
    maps = encoder.layer_maps(volumes)
    first_cell = maps[0][0, :, :8, :8, :8].mean((1, 2, 3))  # stage 1 (full resolution) averaged per 8³ cell
    assert torch.allclose(cells[0, 0, :8], first_cell, atol=1e-5)
    stage4 = maps[3].flatten(2).transpose(1, 2)  # stride 8: already on the probe grid
    assert torch.allclose(cells[..., 56:104], stage4)
    bottleneck = cells[0, :, -64:].reshape(8, 8, 8, 64)  # coarser than the grid: repeated per 4³ cells
    assert torch.equal(bottleneck[0, 0, 0], bottleneck[3, 3, 3])
    assert torch.equal(bottleneck[0, 0, 0], maps[-1][0, :, 0, 0, 0])
    with pytest.raises(InvalidInput, match="cannot be placed"):
        readout_tokens(maps, "layers", (3, 3, 3))
    with pytest.raises(InvalidInput, match="read-out"):
        readout_tokens(maps, "cls", (8, 8, 8))


# ---------------------------------------------------------------------------- baselines

def test_cell_features_follow_the_token_order():
    grid = (2, 3, 4)
    cells_value = np.arange(24, dtype=np.float32).reshape(grid)
    volume = np.kron(cells_value, np.ones((4, 4, 4), np.float32))  # each 4³ cell holds its own index
    cells = cell_voxels(volume[None], grid)
    assert cells.shape == (24, 64) and np.array_equal(cells.mean(1), np.arange(24))
    labels = token_labels(volume.astype(np.uint8), grid, "centre")
    assert np.array_equal(labels, np.arange(24))  # the same C order as the token labels
    stats = cell_statistics(cells)
    assert stats.shape == (24, len(STATISTICS)) and np.allclose(stats[:, 1], 0)
    position = position_features(grid)
    assert position.shape == (24, 9) and position.sum(1).tolist() == [3] * 24
    assert position[23].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 1]
    around = neighbourhood_statistics(stats[:, :1], grid, radius=1)
    assert around.shape == (24, 27)
    assert np.array_equal(around[:, 13], stats[:, 0])  # offset (0, 0, 0) is the cell itself
    assert around[0, 0] == 0 and around[23, 26] == 0  # beyond the grid
    assert around[0, 13 + 1] == stats[1, 0] and around[0, 13 + 9] == stats[12, 0]  # z and x neighbours


def test_own_voxels_are_at_chance_on_the_context_labels_and_the_oracle_is_not():
    """The property the protocol rests on, on 64 paired phantoms (the demo's 32³ centre crop):
    a token's own cell (statistics, voxels, with position) cannot tell the twins apart, the
    5x5x5-cell neighbourhood can."""
    config = _paired(64, seed=1)
    features: dict[str, list[np.ndarray]] = {}
    labels, cases, strata = [], [], []
    for i in range(config.num_volumes):
        phantom = make_phantom(i, config)
        volume = centre_crop_or_pad(steps.zscore_normalize(phantom.image[None])[0].astype(np.float32), (32,) * 3)
        token = token_labels(centre_crop_or_pad(phantom.label_map[None], (32,) * 3)[0], (4, 4, 4))
        context = np.flatnonzero(np.isin(token, CONTEXT_LABELS))
        for name, value in token_baseline_features(volume, (4, 4, 4), np.arange(64), context)[1].items():
            features.setdefault(name, []).append(value)
        labels.append(token[context])
        cases.append(np.full(len(context), i))
        strata.append(phantom.class_label + 2 * (landmark_side(i, config) < 0))
    probe = ProbeConfig(num_splits=3, fractions=(1.0,))
    splits = case_splits(config.num_volumes, np.array(strata), probe)
    score = {name: context_probe(np.concatenate(parts), np.concatenate(labels), np.concatenate(cases), splits,
                                 probe)["balanced_accuracy"] for name, parts in features.items()}
    for own in ("raw_cell_statistics", "raw_cell_voxels", "raw_cell_statistics_and_position",
                "raw_cell_voxels_and_position"):
        assert abs(score[own] - 0.5) < 0.08, score
    assert score["context_oracle"] > 0.7, score


# ---------------------------------------------------------------------------- labeled sets

def test_paired_sets_list_context_labels_and_side_balanced_strata(paired_set):
    labeled = load_labeled_set(paired_set)
    assert labeled.context_labels == CONTEXT_LABELS
    strata = labeled.split_strata()
    assert sorted(np.bincount(strata).tolist()) == [4, 4, 4, 4]  # 2 classes x 2 landmark sides
    for train, test in case_splits(16, strata, ProbeConfig(num_splits=3)):
        assert np.bincount(strata[train]).tolist() == np.bincount(strata[test]).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("content, message", [
    ({"context_labels": [7]}, "at least two distinct"),
    ({"context_labels": [7, "8"]}, "at least two distinct"),
    ({"cases_stratum": -1}, "stratum must be an integer"),
])
def test_bad_context_labels_and_strata_are_reported(tmp_path, paired_set, content, message):
    data = read_json(paired_set / "cases.json")
    data.update({k: v for k, v in content.items() if k == "context_labels"})
    if "cases_stratum" in content:
        data["cases"][0]["stratum"] = content["cases_stratum"]
    for case in data["cases"]:
        for key in ("image", "label_map"):
            case[key] = str(paired_set / case[key])
    (tmp_path / "set").mkdir()
    write_json(tmp_path / "set" / "cases.json", data)
    with pytest.raises(InvalidLabeledSet, match=message):
        load_labeled_set(tmp_path / "set")


# ---------------------------------------------------------------------------- protocol

def test_verdict_is_decided_by_the_worst_seed_and_needs_five_seeds():
    win = verdict({0: 0.60, 1: 0.58, 2: 0.57, 3: 0.59, 4: 0.56}, reference=0.50)
    assert win["helps"] is True and win["worst_margin"] == pytest.approx(0.06) and win["seeds_at_or_above"] == 5
    one_short = verdict({0: 0.60, 1: 0.58, 2: 0.57, 3: 0.59, 4: 0.54}, reference=0.50)
    assert one_short["helps"] is False and one_short["mean_margin"] > 0.05 and one_short["seeds_at_or_above"] == 4
    assert verdict({0: 0.70, 1: 0.70}, reference=0.50)["helps"] is None  # too few seeds to say
    with pytest.raises(InvalidInput):
        verdict({0: float("nan")}, reference=0.5)


def test_protocol_sets_are_recognised_by_their_generator_settings(tmp_path):
    for which in ("search", "test"):
        config = protocol_set_config(which)
        assert config.paired_organs and config.num_volumes == 480 and not config.anisotropic
        folder = tmp_path / which
        folder.mkdir()
        write_json(folder / "dataset_description.json", {"nnssl_phantom_config": config.to_dict()})
        assert identify_labeled_set(folder) == which
    other = {**protocol_set_config("test").to_dict(), "seed": 3}
    (tmp_path / "other").mkdir()
    write_json(tmp_path / "other" / "dataset_description.json", {"nnssl_phantom_config": other})
    assert identify_labeled_set(tmp_path / "other") is None and identify_labeled_set(tmp_path) is None
    assert protocol_set_config("search").seed != protocol_set_config("test").seed
    with pytest.raises(InvalidInput):
        protocol_set_config("train")


def test_dense_probe_scores_an_encoder_and_its_random_references(paired_set):
    probe = ProbeConfig(**{**DENSE_PROBE.to_dict(), "num_splits": 2, "fractions": (1.0,)})
    encoder = _primus()
    result = dense_probe(encoder, paired_set, probe)
    assert 0.0 <= result["balanced_accuracy"] <= 1.0 and result["chance_balanced_accuracy"] == 0.5
    assert result["readout"] == "layers" and result["num_features"] == 96 * 4 and result["num_cases"] == 16
    assert set(result["token_label_counts"]) == set(CONTEXT_LABELS) and len(result["balanced_accuracy_per_split"]) == 2
    assert result["labeled_set"] == str(paired_set)  # not one of the protocol's sets
    reference = random_reference(encoder, paired_set, seeds=(0, 1), probe=probe)
    assert len(reference["balanced_accuracy"]) == 2
    assert reference["mean"] == pytest.approx(np.mean(reference["balanced_accuracy"]))
    with pytest.raises(InvalidInput, match="no context_labels"):
        dense_probe(encoder, _plain_set(paired_set), probe)


def _plain_set(paired_set: Path):
    from dataclasses import replace

    return replace(load_labeled_set(paired_set), context_labels=())


# ---------------------------------------------------------------------------- command lines

def test_evaluate_reports_the_context_probe_and_baselines_at_both_readouts(tmp_path, paired_set, capsys):
    checkpoint = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(checkpoint)
    for readout, width in (("final", 96), ("layers", 96 * 4)):
        out = tmp_path / readout
        assert main([str(checkpoint), "--labeled", str(paired_set), "-o", str(out), "-num_splits", "2",
                     "-fractions", "0.5", "-token_readout", readout, "--no_plot"]) == 0
        result = json.loads((out / "evaluation.json").read_text())
        assert result["probe_config"]["token_readout"] == readout
        assert result["data"]["context_labels"] == {"7": "twin_landmark_side", "8": "twin_other_side"}
        for name in ("pretrained", "random"):
            context = result["encoders"][name]["context_probe"]
            assert context["num_features"] == width and context["chance_balanced_accuracy"] == 0.5
            assert [p["fraction"] for p in context["learning_curve"]] == [0.5, 1.0]
            assert result["encoders"][name]["token_probe"]["num_features"] == width
        assert set(result["baselines"]["context_probe"]) == set(CONTEXT_BASELINES)
        assert set(result["baselines"]["token_probe"]) == set(TOKEN_BASELINES)
        assert result["baselines"]["context_probe"]["raw_cell_voxels"]["num_features"] == 512
        assert result["baselines"]["token_probe"]["raw_cell_statistics_and_position"]["num_features"] == 9 + 12
        assert "context_probe_balanced_accuracy" in result["pretrained_minus_random"]
    printed = capsys.readouterr().out
    assert "context probe bal. acc. (layers)" in printed and "context probe baselines" in printed
    assert main([str(checkpoint), "--labeled", str(paired_set), "-o", str(tmp_path / "plain"), "-num_splits", "1",
                 "-fractions", "1", "--no_baselines", "-probe_cell", "16", "--no_plot"]) == 0
    result = json.loads((tmp_path / "plain" / "evaluation.json").read_text())
    assert "baselines" not in result and result["preparation"]["probe_grid"] == [2, 2, 2]


def test_evaluate_protocol_fixes_the_probe_and_refuses_overrides(tmp_path, paired_set, capsys):
    checkpoint = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(checkpoint)
    assert main([str(checkpoint), "--labeled", str(paired_set), "-protocol", "dense", "-C", "1"]) == 2
    assert "-protocol dense fixes -C" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main([str(checkpoint), "--labeled", str(paired_set), "-protocol", "dense", "-o", str(out), "--no_plot",
                 "--no_baselines"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    fixed = {k: v for k, v in DENSE_PROBE.to_dict().items() if k != "baselines"}
    assert {k: result["probe_config"][k] for k in fixed} == fixed
    assert result["protocol"] == {"name": "dense-v1", "labeled_set": None}
    assert "not one of its labeled sets" in capsys.readouterr().out
    plain = tmp_path / "plain"
    write_phantom_collection(plain, PhantomConfig(num_volumes=4, shape=(32, 32, 32)))
    assert main([str(checkpoint), "--labeled", str(plain), "-protocol", "dense"]) == 2
    assert "lists none" in capsys.readouterr().err


def test_generate_phantoms_paired_and_protocol_set_flags(tmp_path, capsys):
    out = tmp_path / "paired"
    assert generate_phantoms_main(["-o", str(out), "--num_volumes", "4", "--shape", "24", "24", "24",
                                   "--paired_organs"]) == 0
    assert read_json(out / "cases.json")["context_labels"] == list(CONTEXT_LABELS)
    assert read_json(out / "dataset_description.json")["nnssl_phantom_config"]["paired_organs"] is True
    assert generate_phantoms_main(["-o", str(tmp_path / "p"), "--protocol_set", "test", "--seed", "3",
                                   "--num_volumes", "4"]) == 2
    err = capsys.readouterr().err
    assert "--protocol_set test fixes" in err and "--num_volumes" in err and "--seed" in err
