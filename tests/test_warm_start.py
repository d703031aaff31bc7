"""`nnssl_train -pretrained_weights` with a reference nnssl checkpoint: its `network_weights` is
the whole pretraining network (decoder, `mask_token`); the encoder and stem named by its
adaptation plan are loaded, everything else is ignored and reported, as nnU-Net does."""

from __future__ import annotations

import logging

import pytest
import torch

from nnssl.checkpoints.format import CheckpointError
from nnssl.checkpoints.handshake import adaptation_plan
from nnssl.methods.factory import build_method
from nnssl.models.primus import build_primus
from nnssl.models.resenc import build_resenc_l
from nnssl.training.names import resolve_config
from nnssl.training.warm_start import load_pretrained_weights
from test_export_handshake import _plans


class _Messages(logging.Handler):
    """nnssl's logger does not propagate to the root logger (pytest's caplog), so listen on it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def nnssl_messages():
    logger, handler = logging.getLogger("nnssl"), _Messages()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _method(trainer: str, patch: int):
    return build_method(resolve_config(trainer, overrides={"patch_size": (patch,) * 3}))


def _reference_checkpoint(path, network, method):
    """What the reference nnssl saves: every tensor of its network, and its adaptation plan."""
    torch.save({"network_weights": network.state_dict(),
                "nnssl_adaptation_plan": adaptation_plan(method.backbone, _plans(), "onemmiso", 1)}, path)
    return network.state_dict()


def test_reference_primus_checkpoint_loads_the_encoder_and_reports_the_rest(tmp_path, nnssl_messages, one_thread):
    torch.manual_seed(1)
    method = _method("IJEPATrainer_Tiny", 32)
    reference = build_primus("Tiny", input_shape=(32, 32, 32))
    with torch.no_grad():
        reference.mask_token.normal_()  # the reference's MAE mask token lives in network_weights
    weights = _reference_checkpoint(tmp_path / "ref.pth", reference, method)
    assert any(k.startswith("up_projection.") for k in weights) and "mask_token" in weights
    loaded = load_pretrained_weights(method, tmp_path / "ref.pth")
    encoder = {k: v for k, v in weights.items() if k.startswith(("eva.", "down_projection."))}
    assert loaded == len(encoder)
    state = method.state_dict()
    for key, value in encoder.items():
        assert torch.equal(state["student.primus." + key], value) and torch.equal(state["teacher.primus." + key], value)
    ignored = len(weights) - len(encoder)
    assert any(f"ignored {ignored} tensors" in m and "up_projection (" in m and "mask_token (1)" in m
               for m in nnssl_messages), nnssl_messages
    # the reference's decoder never reaches ours (the student's Primus keeps its own, unused one)
    decoder = [k for k in weights if k.startswith("up_projection.") and weights[k].ndim > 1]
    assert decoder and not any(torch.equal(state["student.primus." + k], weights[k]) for k in decoder)


def test_reference_resenc_checkpoint_skips_the_decoder_and_its_encoder_aliases(tmp_path, nnssl_messages, one_thread):
    torch.manual_seed(2)
    method = _method("MAETrainer_ResEncTiny", 64)
    reference = build_resenc_l(preset="Tiny")
    weights = _reference_checkpoint(tmp_path / "ref.pth", reference, method)
    assert any(k.startswith("decoder.encoder.stages.") for k in weights)  # the U-Net's alias of its encoder
    before = {k: v.clone() for k, v in method.state_dict().items() if k.startswith("network.decoder.")}
    load_pretrained_weights(method, tmp_path / "ref.pth")
    state = method.state_dict()
    for key, value in weights.items():
        if key.startswith(("encoder.stem.", "encoder.stages.")):
            assert torch.equal(state["network." + key], value), key
    # the decoder's own layers keep their initialisation
    own_decoder = [k for k in before if not k.startswith("network.decoder.encoder.")]
    assert own_decoder and all(torch.equal(state[k], before[k]) for k in own_decoder)
    assert any("ignored" in m and "decoder (" in m for m in nnssl_messages), nnssl_messages


def test_a_checkpoint_of_another_backbone_is_refused_with_the_file_named(tmp_path, one_thread):
    torch.manual_seed(3)
    method = _method("IJEPATrainer_Tiny", 32)
    other = build_primus("S", input_shape=(32, 32, 32))
    _reference_checkpoint(tmp_path / "primus_s.pth", other, method)
    with pytest.raises(CheckpointError, match="primus_s.pth.*(another backbone|same backbone)"):
        load_pretrained_weights(method, tmp_path / "primus_s.pth")
    torch.save({"network_weights": {"decoder.w": torch.zeros(1)}}, tmp_path / "no_encoder.pth")
    with pytest.raises(CheckpointError, match="no_encoder.pth: no network_weights under the encoder / stem keys"):
        load_pretrained_weights(method, tmp_path / "no_encoder.pth")
