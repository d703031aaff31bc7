"""The encoder feature API (`nnssl.export.features`) and `nnssl_evaluate`.

Checkpoints are written in the contract's format (documentation/finetuning_nnunet.md) by the helpers
below, from the same constructors training uses, so a loader that drifts from the format fails
here: loaded tokens must equal the source encoder's tokens exactly.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnssl.cli.evaluate import main
from nnssl.data.phantom_files import write_phantom_collection
from nnssl.data.phantoms import PhantomConfig
from nnssl.evaluation.labeled import (
    InvalidLabeledSet,
    Preparation,
    centre_crop_or_pad,
    load_labeled_set,
    prepare_case,
    token_labels,
)
from nnssl.evaluation.probe import ProbeConfig, case_splits, nested_subsets
from nnssl.export.features import (
    InvalidCheckpoint,
    load_pretrained_encoder,
    random_encoder_like,
)
from nnssl.models.primus import (
    PrimusTokenEncoder,
    build_primus,
    primus_arch_kwargs,
    primus_backbone_spec,
)
from nnssl.models.registry import nnunet_architecture_plans
from nnssl.models.resenc import (
    build_resenc_l,
    resenc_backbone_spec,
    resenc_l_arch_kwargs,
)


def _plan(spec, patch, spacing=(1.0, 1.0, 1.0)) -> dict:
    return {"architecture_plans": nnunet_architecture_plans(spec),
            "pretrain_plan": {"plans_name": "nnsslPlans", "transpose_forward": [0, 1, 2],
                              "normalization_per_modality": {"T1w": {"scheme": "ZScoreNormalization"}},
                              "configurations": {"onemmiso": {"spacing": list(spacing), "patch_size": list(patch),
                                                              "normalization_schemes": ["ZScoreNormalization"]}}},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": list(patch), **spec.transfer_keys()}


def write_primus_checkpoint(path: Path, seed: int = 1, describe: bool = True):
    torch.manual_seed(seed)
    primus = build_primus("Tiny", input_shape=(32, 32, 32))
    spec = primus_backbone_spec(primus, primus_arch_kwargs("Tiny", 1, (8, 8, 8), (32, 32, 32)))
    checkpoint = {"network_weights": PrimusTokenEncoder(primus).encoder_state_dict(),
                  "nnssl_adaptation_plan": _plan(spec, (32, 32, 32)), "trainer_name": "IJEPATrainer_Tiny_P32"}
    if describe:
        checkpoint["nnssl_backbone"] = spec.to_dict()
    torch.save(checkpoint, path)
    return primus, checkpoint


def write_resenc_checkpoint(path: Path, seed: int = 2):
    torch.manual_seed(seed)
    network = build_resenc_l(preset="Tiny")
    spec = resenc_backbone_spec(network, resenc_l_arch_kwargs(preset="Tiny"), (64, 64, 64))
    weights = {k: v.clone() for k, v in network.state_dict().items()
               if k.startswith(("encoder.stem", "encoder.stages"))}
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": _plan(spec, (64, 64, 64)),
                "nnssl_backbone": spec.to_dict()}, path)
    return network


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labeled")
    write_phantom_collection(folder, PhantomConfig(num_volumes=8, shape=(32, 32, 32), seed=3))
    return folder


# ---------------------------------------------------------------------------- feature API

def test_primus_checkpoint_gives_the_source_encoders_tokens(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    primus, _ = write_primus_checkpoint(path)
    encoder = load_pretrained_encoder(path)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = PrimusTokenEncoder(primus.eval())(x)
    tokens = encoder.tokens(x)
    assert tokens.shape == (2, 64, 96)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder.pooled(x), expected.mean(1), rtol=1e-5, atol=1e-5)
    assert (encoder.grid, encoder.embed_dim, encoder.patch_size) == ((4, 4, 4), 96, (32, 32, 32))
    assert encoder.spacing == (1.0, 1.0, 1.0) and encoder.family == "primus"
    assert not any(p.requires_grad for p in encoder.network.parameters()) and not encoder.network.training


def test_layer_readout_concatenates_every_depth_and_ends_with_the_final_tokens(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    primus, _ = write_primus_checkpoint(path)
    encoder = load_pretrained_encoder(path)
    x = torch.randn(2, 1, 32, 32, 32)
    layers = encoder.layers(x)
    depth = len(primus.eva.blocks)
    assert len(layers) == depth + 2 and all(t.shape == (2, 64, 96) for t in layers)
    torch.testing.assert_close(layers[-1], encoder.tokens(x))
    tokens = PrimusTokenEncoder(primus.eval())
    with torch.no_grad():
        torch.testing.assert_close(layers[0], tokens.embed(x))  # patch embedding + positions
        torch.testing.assert_close(layers[1], primus.eva.blocks[0](tokens.embed(x), rope=tokens.rope_for(None)))
    pooled = encoder.layer_pooled(x)
    assert pooled.shape == (2, 96 * (depth + 2))
    torch.testing.assert_close(pooled[:, -96:], encoder.pooled(x))

    resenc = load_pretrained_encoder(write_resenc_checkpoint(tmp_path / "r.pth") and tmp_path / "r.pth")
    stages = resenc.layers(torch.randn(1, 1, 64, 64, 64))
    assert [t.shape[-1] for t in stages] == list(resenc.network.encoder.output_channels)
    assert resenc.layer_pooled(torch.randn(1, 1, 64, 64, 64)).shape == (1, sum(resenc.network.encoder.output_channels))


def test_checkpoint_without_nnssl_backbone_is_rebuilt_from_the_adaptation_plan(tmp_path):
    """Third-party (reference nnssl) checkpoints carry only the adaptation plan."""
    path = tmp_path / "reference.pth"
    primus, _ = write_primus_checkpoint(path, describe=False)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = PrimusTokenEncoder(primus.eval())(x)
    torch.testing.assert_close(load_pretrained_encoder(path).tokens(x), expected, rtol=1e-5, atol=1e-5)


def test_preset_name_without_arch_kwargs_builds_the_preset_at_the_plans_patch_size(tmp_path):
    torch.manual_seed(0)
    primus = build_primus("S", input_shape=(32, 32, 32))
    spec = primus_backbone_spec(primus, primus_arch_kwargs("S", 1, (8, 8, 8), (32, 32, 32)))
    plan = _plan(spec, (32, 32, 32))
    assert plan["architecture_plans"]["arch_class_name"] == "PrimusS"
    plan["architecture_plans"].update(arch_kwargs=None, arch_kwargs_requiring_import=[])
    path = tmp_path / "primus_s.pth"
    torch.save({"network_weights": PrimusTokenEncoder(primus).encoder_state_dict(),
                "nnssl_adaptation_plan": plan}, path)
    encoder = load_pretrained_encoder(path)
    assert (encoder.embed_dim, encoder.grid) == (396, (4, 4, 4))
    torch.testing.assert_close(encoder.network.eva.pos_embed, primus.eva.pos_embed)


def test_resenc_checkpoint_gives_the_bottleneck_flattened_in_c_order(tmp_path):
    path = tmp_path / "resenc.pth"
    network = write_resenc_checkpoint(path)
    encoder = load_pretrained_encoder(path)
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        bottleneck = network.eval().encoder(x)[-1]  # [2, 64, 2, 2, 2]
    tokens = encoder.tokens(x)
    assert (encoder.family, encoder.grid, encoder.embed_dim) == ("resenc", (2, 2, 2), 64)
    assert tokens.shape == (2, 8, 64)
    # token n sits at grid position unravel_index(n, grid)
    torch.testing.assert_close(tokens[:, 5], bottleneck[:, :, 1, 0, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, bottleneck.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_random_encoder_like_has_the_architecture_but_not_the_weights(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(path)
    pretrained = load_pretrained_encoder(path)
    a, b, c = (random_encoder_like(pretrained, seed=s) for s in (0, 0, 1))
    ref = pretrained.network.state_dict()
    sa, sb, sc = (e.network.state_dict() for e in (a, b, c))
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded
    assert not torch.equal(sa["eva.blocks.0.attn.q_proj.weight"], sc["eva.blocks.0.attn.q_proj.weight"])
    assert not torch.equal(sa["eva.blocks.0.attn.q_proj.weight"], ref["eva.blocks.0.attn.q_proj.weight"])
    assert (a.grid, a.spacing, a.patch_size) == (pretrained.grid, pretrained.spacing, pretrained.patch_size)


def test_missing_encoder_weights_name_the_file_and_the_keys(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    _, checkpoint = write_primus_checkpoint(path)
    del checkpoint["network_weights"]["eva.pos_embed"]
    del checkpoint["network_weights"]["down_projection.proj.bias"]
    torch.save(checkpoint, path)
    with pytest.raises(InvalidCheckpoint) as e:
        load_pretrained_encoder(path)
    message = str(e.value)
    assert str(path) in message and "eva.pos_embed" in message and "down_projection.proj.bias" in message
    assert "missing" in message and "nnssl_export" in message


def test_wrongly_rooted_weights_are_unexpected_keys(tmp_path):
    """`eva_ema.*` starts with `eva`: nnU-Net's prefix match selects it and its strict load fails."""
    path = tmp_path / "checkpoint_final.pth"
    _, checkpoint = write_primus_checkpoint(path)
    weights = checkpoint["network_weights"]
    weights["eva_ema.norm.weight"] = weights["eva.norm.weight"].clone()
    weights["eva.blocks.0.attn.q_proj.weight"] = weights["eva.blocks.0.attn.q_proj.weight"][:10]
    torch.save(checkpoint, path)
    with pytest.raises(InvalidCheckpoint) as e:
        load_pretrained_encoder(path)
    message = str(e.value)
    assert "unexpected" in message and "eva_ema.norm.weight" in message
    assert "shape mismatch eva.blocks.0.attn.q_proj.weight" in message


@pytest.mark.parametrize("content", ["missing", "not_torch", "no_plan"])
def test_unusable_checkpoint_files_are_reported_with_their_path(tmp_path, content):
    path = tmp_path / "model.pth"
    if content == "not_torch":
        path.write_text("definitely not a checkpoint")
    elif content == "no_plan":
        torch.save({"network_weights": {}}, path)
    with pytest.raises(InvalidCheckpoint) as e:
        load_pretrained_encoder(path)
    assert str(path) in str(e.value)
    if content == "no_plan":
        assert "nnssl_adaptation_plan" in str(e.value)


def test_wrong_input_shape_is_refused_with_the_expected_shape(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(path)
    with pytest.raises(Exception, match=r"\[B, 1, 32, 32, 32\]"):
        load_pretrained_encoder(path).tokens(torch.zeros(1, 1, 40, 32, 32))


# ---------------------------------------------------------------------------- preparation and probes

def test_token_labels_centre_and_majority():
    label = np.zeros((4, 4, 8), np.uint8)
    label[2:4, 0:2, 4:8] = 3  # cell (1, 0, 1) fully labeled 3
    label[0, 0, 0] = 5  # one voxel of cell (0, 0, 0), not its centre
    label[1, 1, 2] = 7  # centre voxel of cell (0, 0, 0) with cells of (2, 2, 4)
    centre = token_labels(label, (2, 2, 2), "centre")
    majority = token_labels(label, (2, 2, 2), "majority")
    assert centre.shape == (8,) and centre[5] == 3 and centre[0] == 7
    assert majority[5] == 3 and majority[0] == 0  # 14 of 16 voxels are 0


def test_centre_crop_or_pad_keeps_the_centre():
    a = np.arange(5 * 2 * 3, dtype=np.float32).reshape(1, 5, 2, 3)
    out = centre_crop_or_pad(a, (3, 4, 3))
    assert out.shape == (1, 3, 4, 3)
    np.testing.assert_array_equal(out[0, :, 1:3, :], a[0, 1:4])
    assert (out[0, :, 0] == 0).all() and (out[0, :, 3] == 0).all()


def test_splits_are_disjoint_seeded_and_subsets_nested_with_every_class():
    labels = np.array([0, 1] * 10)
    config = ProbeConfig(num_splits=3, seed=4)
    splits = case_splits(20, labels, config)
    again = case_splits(20, labels, config)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    assert not np.array_equal(splits[0][1], splits[1][1])
    for train, test in splits:
        assert not set(train) & set(test) and len(test) == 10
        assert set(labels[test]) == {0, 1}
        subsets = nested_subsets(train, labels, config.fractions, np.random.default_rng(0))
        assert [len(s) for s in subsets] == [2, 3, 5, 10]
        assert all(set(labels[s]) == {0, 1} for s in subsets)
        assert all(list(small) == list(big[: len(small)]) for small, big in itertools.pairwise(subsets))


def test_phantom_cases_are_prepared_at_the_encoder_shape_with_their_label_map(phantom_set):
    labeled = load_labeled_set(phantom_set)
    assert labeled.has_class_labels and labeled.has_label_maps and len(labeled.cases) == 8
    prep = Preparation(input_shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    volume, label = prepare_case(labeled.cases[0], prep)
    assert volume.shape == (1, 32, 32, 32) and volume.dtype == np.float32 and label.shape == (32, 32, 32)
    assert set(np.unique(label)) <= set(range(7)) and (label == 2).any()  # the key organ survives
    inside = volume[0][label > 0]
    assert abs(float(volume.mean())) < 1.0 and inside.std() > 0.1


# ---------------------------------------------------------------------------- nnssl_evaluate

def test_evaluate_end_to_end_writes_json_and_plot(tmp_path, phantom_set, capsys):
    checkpoint = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(checkpoint)
    out = tmp_path / "eval"
    code = main([str(checkpoint), "--labeled", str(phantom_set), "-o", str(out), "-num_splits", "2",
                 "-fractions", "0.5"])
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["data"]["num_cases"] == 8 and result["data"]["has_label_maps"]
    assert result["encoder"]["grid"] == [4, 4, 4] and result["probe_config"]["fractions"] == [0.5, 1.0]
    assert len(result["splits"]) == 2
    for name in ("pretrained", "random"):
        enc = result["encoders"][name]
        assert set(enc["collapse"]) == {"pooled_rankme", "token_rankme", "pooled_feature_std", "token_feature_std",
                                        "cos_within", "cos_across"}
        assert 1.0 <= enc["collapse"]["token_rankme"] <= 96 and enc["collapse"]["token_feature_std"] > 0
        for probe in ("volume_probe", "token_probe"):
            curve = enc[probe]["learning_curve"]
            assert [p["fraction"] for p in curve] == [0.5, 1.0]
            assert curve[0]["num_train_cases"] < curve[1]["num_train_cases"] == 4
            assert 0.0 <= enc[probe]["accuracy"] <= 1.0 and len(enc[probe]["accuracy_per_split"]) == 2
    diff = result["pretrained_minus_random"]
    assert diff["volume_probe_accuracy"] == pytest.approx(
        result["encoders"]["pretrained"]["volume_probe"]["accuracy"]
        - result["encoders"]["random"]["volume_probe"]["accuracy"])
    printed = capsys.readouterr().out
    assert "volume probe accuracy" in printed and "pretrained" in printed and str(out / "evaluation.json") in printed


def test_evaluate_with_the_layer_readout_probes_the_concatenated_features(tmp_path, phantom_set, capsys):
    checkpoint = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(checkpoint)
    out = tmp_path / "eval"
    assert main([str(checkpoint), "--labeled", str(phantom_set), "-o", str(out), "-num_splits", "1",
                 "-fractions", "1", "-pooling", "layers", "--no_plot"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["probe_config"]["pooling"] == "layers"
    for name in ("pretrained", "random"):
        probe = result["encoders"][name]["volume_probe"]
        assert probe["pooling"] == "layers" and probe["num_features"] == 96 * 4  # embedding, 2 blocks, norm
    assert "volume probe accuracy (layers)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(checkpoint), "--labeled", str(phantom_set), "-pooling", "cls"])


def test_evaluate_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--labeled", "-o", "-device", "-num_splits", "-test_fraction", "-C", "-fractions", "-token_label",
                 "-max_tokens_per_case", "-pooling", "-seed", "-random_seed", "-batch_size", "--no_plot", "--verbose",
                 "-token_readout", "-probe_cell", "--no_baselines", "-protocol"):
        assert flag in text, flag


def test_evaluate_rejects_unknown_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "c.pth"), "--labeled", str(tmp_path), "-num_split", "2"])
    assert e.value.code == 2


def test_bad_labeled_folders_are_reported_before_any_model_work(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(checkpoint), "--labeled", str(empty), "--no_plot"]) == 2
    assert str(empty / "cases.json") in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cases.json").write_text(json.dumps({"cases": [
        {"case_id": "a", "image": "a.nii.gz", "class_label": 0},
        {"case_id": "b", "image": str(tmp_path / "b.nii.gz")}]}))
    assert main([str(checkpoint), "--labeled", str(broken), "--no_plot"]) == 2
    err = capsys.readouterr().err
    assert str(broken / "a.nii.gz") in err and str(tmp_path / "b.nii.gz") in err
    assert "neither class_label nor label_map" in err
    with pytest.raises(InvalidLabeledSet, match="1 of 2 cases have class_label"):
        load_labeled_set(broken)


def test_evaluate_checkpoint_is_usable_from_python_without_writing(tmp_path, phantom_set):
    from nnssl.evaluation.evaluate import evaluate_checkpoint

    checkpoint = tmp_path / "checkpoint_final.pth"
    write_primus_checkpoint(checkpoint)
    result = evaluate_checkpoint(checkpoint, phantom_set, None, probe=ProbeConfig(num_splits=1, fractions=(1.0,)))
    assert set(result["encoders"]) == {"pretrained", "random"} and not (tmp_path / "evaluation.json").exists()
    json.dumps(result, allow_nan=False)  # plain types only
