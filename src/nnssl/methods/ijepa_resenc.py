"""I-JEPA on ResEnc-L (IJEPA_SPEC §3, option A): a SparK-style sparse student on the bottleneck
cell grid, the dense EMA teacher, and the same transformer predictor as for Primus.

The method itself is `nnssl.methods.ijepa.IJEPA` unchanged: it only needs the token-encoder
interface, which `ResEncTokenEncoder` implements on the real ResidualEncoderUNet. Tokens are
the 32³-voxel bottleneck cells (5³ at 160³), so the mask sampler runs on that grid; export is
the teacher's `encoder.stem.*` / `encoder.stages.*`, what nnU-Net's ResEncL fine-tuning loads.
"""

from __future__ import annotations

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from nnssl.errors import InvalidInput
from nnssl.methods.factory import mask_config
from nnssl.methods.ijepa import IJEPA, IJEPAConfig
from nnssl.methods.masks import MultiBlockMaskSampler
from nnssl.models.resenc import resenc_backbone_spec, resenc_l_arch_kwargs
from nnssl.models.sparse_resenc import ResEncTokenEncoder
from nnssl.training.config import TrainingConfig


def build_ijepa_resenc(config: TrainingConfig, input_channels: int = 1) -> IJEPA:
    """I-JEPA (random init) on the ResEnc preset of `config` ("L" = nnU-Net's ResEncL, "Tiny"
    for CPU runs), with the multi-block sampler on the bottleneck grid patch_size / 32."""
    problems = []
    if config.backbone_family != "resenc":
        problems.append(f"backbone {config.backbone!r} is not a ResEnc backbone; use build_ijepa_primus for Primus")
    if config.drop_path_rate:
        # nnU-Net's ResidualEncoderUNet has no stochastic-depth argument, so the rate would be
        # silently ignored; the network that is fine-tuned downstream has none either
        problems.append(f"drop_path_rate={config.drop_path_rate} is not supported by ResEnc-L "
                        "(ResidualEncoderUNet has no stochastic depth); set it to 0")
    if problems:
        raise InvalidInput("cannot build I-JEPA on ResEnc:", problems)
    kwargs = resenc_l_arch_kwargs(input_channels, num_classes=1, preset=config.primus_preset)
    network = ResidualEncoderUNet(**kwargs)
    encoder = ResEncTokenEncoder(network, config.patch_size)
    sampler = MultiBlockMaskSampler(encoder.grid, mask_config(config), seed=config.seed)
    method_config = IJEPAConfig(predictor_width=config.predictor_width, predictor_depth=config.predictor_depth,
                                loss=config.loss)
    return IJEPA(encoder, method_config, mask_sampler=sampler,
                 backbone=resenc_backbone_spec(network, kwargs, config.patch_size))
