"""Token-level access to ResEnc-L for JEPA: a SparK-style sparse student and the dense teacher.

A CNN cannot drop tokens the way a ViT does, so the student *emulates* sparsity (documentation/ijepa_resenc.md,
option A; SparK, Spark3D, CNN-JEPA): the tokens are the cells of the bottleneck grid (input / 32,
so 5³ cells of 32³ voxels at 160³) and, for the context cells `keep`,

* the input is zeroed outside the kept cells;
* every conv output (3³ convs, strided convs, the 1×1 skip projections) and every pooling output
  is multiplied by the active mask at its resolution, the bottleneck mask repeated into exact
  cubes (32³ voxels at the input, 2^k times smaller at stage k);
* every InstanceNorm computes its per-(sample, channel) statistics over the active voxels only,
  applies the affine there, and outputs exactly 0 elsewhere; LeakyReLU keeps 0 at 0 and
  residual sums of masked branches stay masked;
* the tokens are the bottleneck features at the kept cells.

Without the masked norm, the zeros of the masked cells would shift every statistic, so features
would depend on how much was masked (the train/fine-tune shift SparK removes); without the
re-masking, a 3³ conv would grow the active region by one voxel per layer and context features
would read the zeros it spread. Active voxels next to a masked cell do see zeros in their
receptive field, as in SparK. Nothing of the masked cells' content can reach a kept cell (test
C3/E9): the input there is zero before the first conv.

How: the real dynamic-network-architectures modules run their own block code; for the duration
of one sparse call (`ResEncTokenEncoder.sparse_masking`) forward hooks re-mask the conv and
pooling outputs, and each InstanceNorm's `forward` is replaced on the instance by the masked
norm; both are undone in `finally`. So the dense path (`keep=None`, the teacher's) is the stock
`network.encoder` without any hook, and nothing is left on the modules between calls: the
teacher, a deep copy of the student, can never inherit a mask. The hooks are prepended, so
hooks a user registered earlier see the masked outputs.

Compute stays dense (no sparse kernels, spec option D); only the semantics are sparse.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.regularization import DropPath
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd

from nnssl.errors import InvalidInput

Shape = tuple[int, int, int]

# Modules whose output must be re-masked: they mix neighbouring voxels, so they spread values
# into masked voxels. (Pooling windows are aligned with the cells, so they never mix a kept and
# a masked cell; masking them only pins the exact zeros.)
_SPREADING = (_ConvNd, _AvgPoolNd, _MaxPoolNd)
# Containers and element-wise modules that map 0 to 0 and need nothing.
_PASSIVE = (ResidualEncoder, StackedConvBlocks, ConvDropoutNormReLU, StackedResidualBlocks, BasicBlockD, BottleneckD,
            nn.Sequential, nn.Identity, nn.LeakyReLU, nn.ReLU, _DropoutNd, DropPath)


class InvalidResEncEncoder(InvalidInput, ValueError):
    """A ResEnc network, patch size, input or index tensor the sparse JEPA encoder cannot use."""


# ---- masks -----------------------------------------------------------------------------------------

def cell_mask(keep: torch.Tensor, grid: Shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, K] cell indices (C-order, n = (i·Gy + j)·Gz + k) -> [B, 1, gx, gy, gz], 1 at kept cells."""
    mask = torch.zeros(keep.shape[0], math.prod(grid), dtype=dtype, device=keep.device)
    mask.scatter_(1, keep, 1.0)
    return mask.view(keep.shape[0], 1, *grid)


def upsample_cell_mask(cells: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, 1, gx, gy, gz] -> [B, 1, *shape]: every cell becomes an exact cube of shape / grid
    voxels (nearest-neighbour with an integer factor per axis, written as repeats so no
    interpolation rounding is involved)."""
    grid = tuple(cells.shape[2:])
    factors = [s // g for s, g in zip(shape, grid)]
    if len(shape) != len(grid) or any(f < 1 or f * g != s for f, g, s in zip(factors, grid, shape)):
        raise InvalidResEncEncoder(f"a feature map of spatial shape {tuple(shape)} is not a whole number of cells "
                                   f"of the grid {grid}; the patch size must be a multiple of the encoder's total "
                                   "stride on every axis")
    for axis, factor in enumerate(factors):
        if factor > 1:
            cells = cells.repeat_interleave(factor, dim=2 + axis)
    return cells


def masked_instance_norm(x: torch.Tensor, active: torch.Tensor, norm: _InstanceNorm) -> torch.Tensor:
    """`norm` (InstanceNorm, optional affine) with statistics over the active voxels only.

    x [B, C, *S]; active [B, 1, *S] with 1 / 0 entries. Per (sample, channel): mean and biased
    variance over the active voxels (what InstanceNorm computes over a dense map), normalise,
    affine, then exactly 0 at inactive voxels. Statistics in at least fp32 whatever the autocast
    state.
    Plain multiplies and reductions: on a CPU this is faster than the stock instance norm
    (aten's batch-norm path), so the sparse student costs about what the dense encoder does."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, m = x.to(dtype), active.to(dtype)
    dims = tuple(range(2, x.ndim))
    count = m.sum(dims, keepdim=True).clamp_min(1.0)  # every sample keeps >= 1 cell; guard anyway
    masked = xf * m
    mean = masked.sum(dims, keepdim=True) / count
    centred = (masked - mean).mul_(m)
    var = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square() / count
    y = centred * torch.rsqrt(var + norm.eps)
    if norm.affine:
        view = (1, -1) + (1,) * (x.ndim - 2)
        # in place is safe: multiply and add do not need their outputs for backward
        y = y.mul_(norm.weight.view(view)).add_(norm.bias.view(view)).mul_(m)
    return y.to(x.dtype)


class _SparseMasking:
    """The active masks of one sparse forward, one per resolution (cached), and the two
    operations that use them. Only lives inside `ResEncTokenEncoder.sparse_masking`."""

    def __init__(self, cells: torch.Tensor) -> None:
        self.cells = cells
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask_for(self, t: torch.Tensor) -> torch.Tensor:
        """[B, 1, *S] mask for a feature map [B, C, *S], in its dtype and device."""
        key = (tuple(t.shape[2:]), t.dtype, t.device)
        if key not in self._masks:
            self._masks[key] = upsample_cell_mask(self.cells, tuple(t.shape[2:])).to(device=t.device, dtype=t.dtype)
        return self._masks[key]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.mask_for(t)

    def mask_output_(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # forward hook, in place: conv and pooling backward never read their output
        output.mul_(self.mask_for(output))

    def norm_forward(self, norm: _InstanceNorm, x: torch.Tensor) -> torch.Tensor:
        return masked_instance_norm(x, self.mask_for(x), norm)


def _check_sparse_supported(encoder: ResidualEncoder) -> None:
    """Refuse modules whose sparse semantics are unknown, instead of silently leaking: e.g.
    squeeze-excitation averages over all voxels, BatchNorm mixes samples, norms with running
    statistics would store statistics of masked maps."""
    problems = []
    for name, module in encoder.named_modules():
        if isinstance(module, _InstanceNorm):
            if module.track_running_stats:
                problems.append(f"{name}: InstanceNorm with track_running_stats=True would store statistics of "
                                "masked maps; build the network with norm_op_kwargs track_running_stats=False "
                                "(nnU-Net's ResEncL default)")
        elif not isinstance(module, _SPREADING + _PASSIVE):
            problems.append(f"{name}: {type(module).__name__} has no sparse (masked) version here; build the "
                            "ResEnc without it (nnU-Net's ResEncL: plain BasicBlockD, InstanceNorm, LeakyReLU)")
    if problems:
        raise InvalidResEncEncoder("this ResEnc encoder cannot run as a sparse JEPA student:", problems)


class ResEncTokenEncoder(nn.Module):
    """The JEPA encoder interface (`grid`, `num_tokens`, `embed_dim`, `num_heads`,
    `forward(x, keep)`, `encoder_named_parameters`, `encoder_state_dict`) on a real
    `ResidualEncoderUNet`.

    Tokens are the bottleneck cells in C-order (`x.flatten(2).transpose(1, 2)` of the
    [B, E, gx, gy, gz] bottleneck map). `keep=None`: the stock dense encoder on all cells (the
    teacher). `keep` [B, K]: the sparse student, see the module docstring.

    `network` is held as `.network`, so its own state-dict names stay recoverable: `encoder_state_dict`
    gives the downstream `encoder.stem.*` / `encoder.stages.*` keys. The U-Net decoder is never
    used by JEPA and is frozen (`requires_grad=False`), which keeps it out of optimizers, EMA and
    DDP's unused-parameter checks.
    """

    # only chooses the predictor's heads (IJEPAConfig.resolved_predictor_heads); 8 divides the
    # widths 384 (ResEnc-L) and 64 (Tiny)
    num_heads = 8

    def __init__(self, network: ResidualEncoderUNet, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        encoder = getattr(network, "encoder", None)
        if not isinstance(encoder, ResidualEncoder) or encoder.stem is None:
            raise InvalidResEncEncoder("ResEncTokenEncoder needs a dynamic-network-architectures ResidualEncoderUNet "
                                       "(an encoder with its default stem); build it with build_resenc_l()")
        _check_sparse_supported(encoder)
        stride = [math.prod(int(s[a]) for s in encoder.strides) for a in range(3)]
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or any(p < s or p % s for p, s in zip(patch_size, stride)):
            raise InvalidResEncEncoder(f"patch size {patch_size} must be a positive multiple of the encoder's total "
                                       f"stride {tuple(stride)} on every axis (one token per bottleneck cell); "
                                       "choose e.g. 160³ (5³ cells) or 192³ (6³)")
        self.network = network
        self.patch_size: Shape = patch_size  # type: ignore[assignment]
        self.grid: Shape = tuple(p // s for p, s in zip(patch_size, stride))  # type: ignore[assignment]
        self.num_tokens = math.prod(self.grid)
        self.embed_dim = int(encoder.output_channels[-1])
        self.in_channels = int(encoder.stem.convs[0].conv.in_channels)
        trained = {id(p) for p in encoder.parameters()}
        for p in network.parameters():
            if id(p) not in trained:  # the decoder (it also holds the encoder: skip by identity)
                p.requires_grad_(False)

    # ---- forward ---------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.patch_size:
            raise InvalidResEncEncoder(f"ResEncTokenEncoder expects volumes [B, {self.in_channels}, "
                                       f"{', '.join(map(str, self.patch_size))}] (the pretraining patch size, grid "
                                       f"{self.grid}), got {list(x.shape)}; crop the input or build the encoder for "
                                       "this patch size")
        # shape and dtype only: a value check would cost a device sync per step
        if keep is not None and (keep.dtype != torch.int64 or keep.ndim != 2 or keep.shape[0] != x.shape[0]):
            raise InvalidResEncEncoder(f"cell indices must be int64 [B={x.shape[0]}, K], got {keep.dtype} "
                                       f"{list(keep.shape)}")

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The stock encoder's deepest feature map [B, E, gx, gy, gz]."""
        out = self.network.encoder(x)
        return out[-1] if isinstance(out, (list, tuple)) else out

    @contextmanager
    def sparse_masking(self, keep: torch.Tensor) -> Iterator[_SparseMasking]:
        """Within the block, `self.network.encoder` runs sparse for the cells `keep` [B, K]:
        conv / pooling outputs are re-masked by forward hooks, and every InstanceNorm's `forward`
        is replaced on the instance by the masked norm (a hook could only overwrite the output
        after the stock norm had run, a wasted pass of 10-20% of the forward). Both are undone on
        exit, also after an error. Inputs must be masked with `.apply`."""
        masking = _SparseMasking(cell_mask(keep, self.grid))
        handles, patched = [], []
        try:
            for module in self.network.encoder.modules():
                if isinstance(module, _InstanceNorm):
                    if "forward" in vars(module):
                        raise RuntimeError(f"{module} already has a replaced forward: nested sparse_masking calls "
                                           "on one encoder are not supported")
                    module.forward = partial(masking.norm_forward, module)
                    patched.append(module)
                elif isinstance(module, _SPREADING):
                    # prepended, so hooks registered earlier (by users, tests) see masked outputs
                    handles.append(module.register_forward_hook(masking.mask_output_, prepend=True))
            yield masking
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, X, Y, Z]; keep int64 [B, K] or None (all N cells, dense) -> [B, K, E]."""
        self._check_input(x, keep)
        if keep is None:
            return self.bottleneck(x).flatten(2).transpose(1, 2)
        with self.sparse_masking(keep) as masking:
            tokens = self.bottleneck(masking.apply(x)).flatten(2).transpose(1, 2)   # [B, N, E]
        return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    # ---- the teacher's last blocks (I-JEPA's averaged targets) -----------------------------------

    def _bottleneck_blocks(self) -> tuple[list[nn.Module], nn.Sequential]:
        """(modules before the residual blocks of the last stage, those blocks)."""
        stage = self.network.encoder.stages[-1]
        before: list[nn.Module] = []
        if isinstance(stage, nn.Sequential) and not isinstance(stage, StackedResidualBlocks):
            before, stage = list(stage)[:-1], stage[-1]  # a pooling op precedes the blocks
        return before, stage.blocks

    @property
    def num_target_blocks(self) -> int:
        """How many blocks can feed I-JEPA's averaged targets (`IJEPAConfig.target_layers`): the
        residual blocks of the bottleneck stage, the only ones on the token grid (its first block
        strides down to it; earlier stages are 2, 4, ... times finer). ResEnc-L: 6; Tiny: 1."""
        return len(self._bottleneck_blocks()[1])

    def last_block_outputs(self, x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The dense encoder's last `count` residual-block outputs of the bottleneck stage as
        tokens [B, N, E] (C-order cells), shallowest first; the deepest is exactly
        `forward(x)` (the bottleneck). One forward pass of the stock modules."""
        if not 1 <= count <= self.num_target_blocks:
            raise InvalidResEncEncoder(f"count={count} must be between 1 and the {self.num_target_blocks} residual "
                                       "block(s) of the bottleneck stage")
        self._check_input(x, None)
        encoder = self.network.encoder
        h = encoder.stem(x)
        for stage in list(encoder.stages)[:-1]:
            h = stage(h)
        before, blocks = self._bottleneck_blocks()
        for module in before:
            h = module(h)
        outputs = []
        for block in blocks:
            h = block(h)
            outputs.append(h)
        return [y.flatten(2).transpose(1, 2) for y in outputs[len(outputs) - count:]]

    # ---- weights ---------------------------------------------------------------------------------

    def _transfer_prefixes(self) -> tuple[str, str]:
        return self.network.key_to_encoder, self.network.key_to_stem

    def encoder_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What JEPA trains and EMA-averages: stem + stages, named as in the network
        (`encoder.stem.*`, `encoder.stages.*`); never the frozen decoder."""
        return list(self.network.encoder.named_parameters(prefix="encoder"))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Stem and stage weights under the downstream ResidualEncoderUNet's own names (keys
        starting with `encoder.stem.` / `encoder.stages.`, aliases included, exactly as its
        `state_dict()` has them), detached contiguous CPU copies: what nnU-Net's loader selects by
        prefix and loads strictly. No decoder key, and no other key with those prefixes."""
        prefixes = tuple(p + "." for p in self._transfer_prefixes())
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.network.state_dict().items() if k.startswith(prefixes)}
