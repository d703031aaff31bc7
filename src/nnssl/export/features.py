"""The encoder-only feature API: frozen features of an exported checkpoint.

Evaluation (and any user script) needs the encoder exactly as nnU-Net will receive it, not the
training-time modules, so `load_pretrained_encoder` reads only what the downstream handshake
reads (documentation/finetuning_nnunet.md): it rebuilds the network from the checkpoint's description
and loads `network_weights` the way nnU-Net's `load_pretrained_weights` does - keys selected by
`startswith(key_to_encoder)` / `startswith(key_to_stem)`, the prefix stripped, one strict
`load_state_dict` per submodule. A checkpoint that would fail in nnU-Net fails here too, with
every missing, unexpected or mis-shaped key listed at once.

`random_encoder_like` builds the same architecture at random initialisation: the reference
point every probe result is compared against (pretraining that does not beat it did nothing).

Features:
- Primus: all tokens of `PrimusTokenEncoder` (patch embedding + positions, Eva blocks, final
  norm), in Primus's token order `b c w h d -> b (w h d) c`.
- U-Nets (ResEnc, PlainConvUNet): the bottleneck `network.encoder(x)[-1]` [B, C, gx, gy, gz],
  flattened in the same C order, so a token index means the same grid position for every family.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnssl.errors import InvalidInput
from nnssl.log import get_logger
from nnssl.models.backbone import BackboneSpec, plain_arch_kwargs

logger = get_logger(__name__)

PRIMUS_PRESET_NAMES = ("PrimusS", "PrimusB", "PrimusM", "PrimusL")
PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQUIRED_KEYS = ("network_weights", "nnssl_adaptation_plan")
REQUIRED_PLAN_KEYS = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "key_to_encoder",
                      "key_to_stem")


class InvalidCheckpoint(InvalidInput):
    """A checkpoint that cannot be loaded as an nnssl encoder; the message names the file."""


class PretrainedEncoder:
    """A frozen encoder (eval mode, no gradients) with its pretraining geometry.

    `patch_size` is the input shape the network was built for (the pretraining patch size),
    `grid` the token grid it produces, `embed_dim` the feature width. From the pretrain plan:
    `pretrain_plan` (the whole pruned plan), `plan` (its configuration: normalisation, spacing,
    patch), `spacing` (None for a `noresample` plan) and `transpose_forward`, so volumes can be
    prepared as pretraining prepared them (`nnssl.evaluation.labeled.Preparation`).
    """

    def __init__(self, network: nn.Module, spec: BackboneSpec, pretrain_plan: dict[str, Any] | None = None,
                 source: str = "<memory>", device: str | torch.device = "cpu") -> None:
        self.network = network.to(device).eval().requires_grad_(False)
        self.spec = spec
        self.device = torch.device(device)
        self.source = source
        self.patch_size: tuple[int, int, int] = tuple(int(s) for s in spec.input_shape)  # type: ignore[assignment]
        self.pretrain_plan = dict(pretrain_plan or {})
        self.plan = pretrain_configuration({"pretrain_plan": self.pretrain_plan}, source) if pretrain_plan else {}
        spacing = self.plan.get("spacing")
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        transpose = self.pretrain_plan.get("transpose_forward") or (0, 1, 2)
        self.transpose_forward: tuple[int, int, int] = tuple(int(a) for a in transpose)  # type: ignore
        # from the network itself: the first convolution (patch embedding or stem) sets the channels
        self.in_channels = int(next(m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)).in_channels)
        self.family = _family(network)
        if self.family == "primus":
            from nnssl.models.primus import PrimusTokenEncoder

            self._tokens = PrimusTokenEncoder(network)
            self.grid: tuple[int, int, int] = self._tokens.grid
            self.embed_dim = self._tokens.embed_dim
        else:
            strides = [math.prod(axis) for axis in zip(*network.encoder.strides)]
            if any(s % t for s, t in zip(self.patch_size, strides)):
                raise InvalidCheckpoint(f"{source}: patch size {self.patch_size} is not a multiple of the "
                                        f"encoder's total stride {tuple(strides)}")
            self.grid = tuple(s // t for s, t in zip(self.patch_size, strides))  # type: ignore[assignment]
            self.embed_dim = int(network.encoder.output_channels[-1])

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def _check(self, volumes: torch.Tensor) -> torch.Tensor:
        if volumes.ndim != 5 or volumes.shape[1] != self.in_channels or tuple(volumes.shape[2:]) != self.patch_size:
            raise InvalidInput(f"the encoder of {self.source} takes volumes [B, {self.in_channels}, "
                               f"{', '.join(map(str, self.patch_size))}] (its pretraining patch size), got "
                               f"{list(volumes.shape)}; crop or pad them first (nnssl.evaluation.labeled)")
        return volumes.to(self.device, torch.float32)

    @torch.no_grad()
    def tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] at `patch_size` -> dense features [B, N, E] (float32, on `device`),
        token n at grid position `unravel_index(n, grid)` (C order)."""
        x = self._check(volumes)
        if self.family == "primus":
            return self._tokens(x).float()
        bottleneck = self.network.encoder(x)[-1]  # [B, E, gx, gy, gz]
        return bottleneck.flatten(2).transpose(1, 2).float()

    @torch.no_grad()
    def pooled(self, volumes: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] -> [B, E]: the mean over all tokens."""
        return self.tokens(volumes).mean(1)

    @torch.no_grad()
    def layer_pooled(self, volumes: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] -> [B, F]: the multi-layer read-out, every depth mean-pooled and
        concatenated. Primus: the patch embedding (+ positions), each block's output and the
        final norm (F = E * (depth + 2)); U-Nets: every encoder stage's output (F = the sum of
        the stage widths). Linear probes of frozen ViTs read several layers (DINO's and
        I-JEPA's "last 4 layers" evaluations) because early layers keep local detail that the
        last one, trained to predict semantics, may have averaged away."""
        return concat_layer_means(self.layers(volumes))

    @torch.no_grad()
    def layers(self, volumes: torch.Tensor) -> list[torch.Tensor]:
        """Features at every depth as token tensors [B, N_l, E_l] (float32), the last one being
        `tokens(volumes)`: Primus's embedding, blocks and final norm (all [B, N, E]); ResEnc's
        stage outputs, each flattened in C order."""
        x = self._check(volumes)
        if self.family == "primus":
            return [t.float() for t in self._tokens.layer_outputs(x)]
        return [s.flatten(2).transpose(1, 2).float() for s in self.network.encoder(x)]

    @torch.no_grad()
    def layer_maps(self, volumes: torch.Tensor) -> list[torch.Tensor]:
        """`layers` as feature maps [B, E_l, *grid_l] (the grid each depth lives on: Primus's
        token grid for every depth, ResEnc's stage resolutions from input / 1 to input / 32), so
        read-outs can place every depth on one grid (`readout_tokens`)."""
        x = self._check(volumes)
        if self.family == "primus":
            return [self._tokens.tokens_to_volume(t.float()) for t in self._tokens.layer_outputs(x)]
        return [s.float() for s in self.network.encoder(x)]

    @torch.no_grad()
    def dense_tokens(self, volumes: torch.Tensor, readout: str = "final",
                     grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Dense features [B, N, F] on `grid` (default: the encoder's token grid), token n at
        `unravel_index(n, grid)`: `readout="final"` is the last depth (F = E; `tokens` when the
        grid is the encoder's), `"layers"` every depth concatenated (F = the sum of the depth
        widths, as `layer_pooled` but per token). See `readout_tokens`."""
        return readout_tokens(self.layer_maps(volumes), readout, grid or self.grid)


TOKEN_READOUTS = ("final", "layers")


def readout_tokens(maps: list[torch.Tensor], readout: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """Feature maps [B, E_l, *grid_l] (`PretrainedEncoder.layer_maps`) -> tokens [B, prod(grid), F].

    "final" reads the last map, "layers" every map, channels concatenated in depth order. Each
    map is brought to `grid` first: averaged over each cell where it is finer (ResEnc's early
    stages: a cell's mean feature, which is what a token of that cell would summarise), repeated
    where it is coarser (ResEnc's bottleneck on a finer probe grid: every cell gets the feature of
    the bottleneck cell that holds it). Primus maps are already on its grid and pass unchanged.
    """
    import torch.nn.functional as F

    if readout not in TOKEN_READOUTS:
        raise InvalidInput(f"token read-out {readout!r} must be one of {', '.join(TOKEN_READOUTS)}")
    grid = tuple(int(g) for g in grid)
    out = []
    for m in (maps if readout == "layers" else maps[-1:]):
        have = tuple(m.shape[2:])
        if have != grid:
            if all(h % g == 0 for h, g in zip(have, grid)):
                m = F.avg_pool3d(m, kernel_size=tuple(h // g for h, g in zip(have, grid)))
            elif all(g % h == 0 for h, g in zip(have, grid)):
                m = F.interpolate(m, size=grid, mode="nearest")
            else:
                raise InvalidInput(f"a feature map on grid {have} cannot be placed on the probe grid {grid}: one "
                                   "must divide the other on every axis; choose a probe cell size that divides "
                                   "the input shape like the encoder's strides do")
        out.append(m.flatten(2).transpose(1, 2))
    return torch.cat(out, dim=2)


def concat_layer_means(layers: list[torch.Tensor]) -> torch.Tensor:
    """[B, N_l, E_l] per depth -> [B, sum E_l]: the multi-layer read-out of `layers()`' output
    (shared with the evaluation, which gets the layers and the final tokens in one pass)."""
    return torch.cat([t.mean(1) for t in layers], dim=1)


def _family(network: nn.Module) -> str:
    """"primus", or the U-Net family ("plainconv", else "resenc"): every U-Net is read the same
    way (its encoder's stage outputs), the name is what evaluation reports."""
    from dynamic_network_architectures.architectures.primus import Primus
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    if isinstance(network, Primus):
        return "primus"
    encoder = getattr(network, "encoder", None)
    if encoder is not None and hasattr(encoder, "stages") and hasattr(encoder, "strides"):
        return "plainconv" if isinstance(network, PlainConvUNet) else "resenc"
    raise InvalidInput(f"no feature extraction for {type(network).__name__}: nnssl supports Primus and "
                       "dynamic-network-architectures U-Nets (ResEnc, PlainConvUNet)")


# ---------------------------------------------------------------------------- checkpoint reading

def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidCheckpoint(f"{path}: checkpoint not found; pass the checkpoint_final.pth of a training "
                                "run or of an nnssl_export folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable checkpoint"
        raise InvalidCheckpoint(f"{path}: cannot be read with torch.load(weights_only=True) "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the file is "
                                "corrupt or not an nnssl checkpoint, re-export it with nnssl_export") from e
    if not isinstance(checkpoint, dict):
        raise InvalidCheckpoint(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    problems = [f"missing {key!r}" for key in REQUIRED_KEYS if key not in checkpoint]
    plan = checkpoint.get("nnssl_adaptation_plan")
    if isinstance(plan, dict):
        problems += [f"nnssl_adaptation_plan lacks {key!r}" for key in REQUIRED_PLAN_KEYS if key not in plan]
    elif plan is not None:
        problems.append("nnssl_adaptation_plan is not a dict")
    if "network_weights" in checkpoint and not isinstance(checkpoint["network_weights"], dict):
        problems.append("network_weights is not a state dict")
    if problems:
        raise InvalidCheckpoint(f"{path}: not an nnssl encoder checkpoint (keys: {sorted(checkpoint)}); export "
                                "it with nnssl_export:", problems)
    return checkpoint


def pretrain_configuration(adaptation_plan: dict[str, Any], source: str = "<plan>") -> dict[str, Any]:
    """The configuration the encoder was pretrained with (the plan is pruned to it; `onemmiso`
    is taken when an unpruned plan lists several)."""
    configs = (adaptation_plan.get("pretrain_plan") or {}).get("configurations") or {}
    if len(configs) == 1:
        return dict(next(iter(configs.values())))
    if "onemmiso" in configs:
        return dict(configs["onemmiso"])
    raise InvalidCheckpoint(f"{source}: the pretrain plan lists the configurations {sorted(configs)}, so the "
                            "pretraining spacing and patch size are unknown; export the checkpoint with nnssl_export")


def _spec_from_plan(plan: dict[str, Any], source: str) -> BackboneSpec:
    """Rebuild the description of a third-party (reference nnssl) checkpoint from its adaptation
    plan: a preset name with `arch_kwargs: None` means nnU-Net's preset at the plan's patch size,
    `PrimusX` what `PretrainedTrainer_Primusx` builds from its kwargs, a class path that class
    with the plan's kwargs (nnU-Net passes the channels and classes itself)."""
    arch = plan["architecture_plans"]
    name, kwargs = arch.get("arch_class_name"), arch.get("arch_kwargs")
    patch = tuple(int(p) for p in pretrain_configuration(plan, source).get("patch_size") or ())
    channels = int(plan["pretrain_num_input_channels"])
    keys = {"key_to_encoder": plan["key_to_encoder"], "key_to_stem": plan["key_to_stem"],
            "keys_to_in_proj": tuple(plan.get("keys_to_in_proj") or ()), "key_to_lpe": plan.get("key_to_lpe")}
    is_primus = name in PRIMUS_PRESET_NAMES or name == "PrimusX" or str(name).endswith(".Primus")
    if name == "PrimusX":
        from nnssl.models.primus import InvalidPrimusConfig, primus_kwargs_from_primusx

        try:
            kwargs = primus_kwargs_from_primusx(kwargs or {}, channels, patch)
        except InvalidPrimusConfig as e:
            raise InvalidCheckpoint(f"{source}: {e}") from e
        requiring = []
    elif kwargs is None:
        if name in PRIMUS_PRESET_NAMES:
            from nnssl.models.primus import primus_arch_kwargs

            kwargs = primus_arch_kwargs(name[len("Primus"):], channels, (8, 8, 8), patch)
        elif name == "ResEncL":
            from nnssl.models.resenc import resenc_l_arch_kwargs

            kwargs = resenc_l_arch_kwargs(channels)
        else:
            raise InvalidCheckpoint(f"{source}: architecture {name!r} has no arch_kwargs and is not a preset "
                                    f"({', '.join(PRIMUS_PRESET_NAMES)}, ResEncL); re-export it with its arch_kwargs")
        kwargs, requiring = plain_arch_kwargs(kwargs)
    else:
        requiring = list(arch.get("arch_kwargs_requiring_import") or [])
        # nnU-Net passes the channels and classes itself; our rebuild needs values
        kwargs = {"input_channels": channels, "num_classes": 1, **kwargs}
    if is_primus:
        network_class = PRIMUS_CLASS
        input_shape = tuple(kwargs.get("input_shape") or patch)
    else:
        network_class = RESENC_CLASS if name == "ResEncL" else str(name)
        input_shape = patch
    if len(input_shape) != 3:
        raise InvalidCheckpoint(f"{source}: the pretrain plan has no 3D patch_size ({input_shape})")
    return BackboneSpec(arch_class_name=str(name), network_class=network_class, arch_kwargs=dict(kwargs),
                        arch_kwargs_requiring_import=requiring, input_shape=input_shape,  # type: ignore[arg-type]
                        shape_kwarg="input_shape" if is_primus else None, **keys)


def _spec(checkpoint: dict[str, Any], source: str) -> BackboneSpec:
    described = checkpoint.get("nnssl_backbone")
    if described is None:
        return _spec_from_plan(checkpoint["nnssl_adaptation_plan"], source)
    try:
        return BackboneSpec.from_dict(described)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidCheckpoint(f"{source}: nnssl_backbone is incomplete ({type(e).__name__}: {e}); re-export "
                                "the checkpoint with nnssl_export") from e


def load_encoder_weights(network: nn.Module, weights: dict[str, torch.Tensor], key_to_encoder: str,
                         key_to_stem: str, source: str = "<weights>") -> None:
    """nnU-Net's loading procedure: per submodule key, select `startswith(key)`, strip the key
    and its dot, strict `load_state_dict`. Keys under neither prefix are ignored, as nnU-Net
    ignores them. Raises `InvalidCheckpoint` listing every mismatch of both submodules."""
    problems = []
    loads = []
    for key in dict.fromkeys((key_to_encoder, key_to_stem)):  # ordered, de-duplicated
        try:
            module = network.get_submodule(key)
        except AttributeError:
            problems.append(f"the network has no submodule {key!r} named by the adaptation plan")
            continue
        selected = {name[len(key):].removeprefix("."): tensor for name, tensor in weights.items()
                    if name.startswith(key)}
        expected = module.state_dict()
        missing = sorted(set(expected) - set(selected))
        unexpected = sorted(set(selected) - set(expected))
        shapes = [f"{key}.{n}: checkpoint {list(selected[n].shape)}, network {list(expected[n].shape)}"
                  for n in sorted(set(selected) & set(expected)) if selected[n].shape != expected[n].shape]
        if missing:
            problems.append(f"{len(missing)} missing under {key!r}: {_few(key, missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected under {key!r} (nnU-Net's strict load rejects them): "
                            f"{_few(key, unexpected)}")
        problems += [f"shape mismatch {s}" for s in shapes]
        loads.append((module, selected))
    if problems:
        raise InvalidCheckpoint(f"{source}: network_weights do not fit the architecture of its adaptation plan "
                                "(nnU-Net would fail the same way); re-export the checkpoint with nnssl_export:",
                                problems)
    for module, selected in loads:
        module.load_state_dict(selected, strict=True)


def _few(key: str, names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"{key}{'.' if n and not n.startswith('_') else ''}{n}" for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_pretrained_encoder(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> PretrainedEncoder:
    """The frozen pretrained encoder of an nnssl checkpoint (ours or the reference's)."""
    path = Path(checkpoint_path)
    checkpoint = _read(path)
    plan = checkpoint["nnssl_adaptation_plan"]
    spec = _spec(checkpoint, str(path))
    channels = int(plan["pretrain_num_input_channels"])
    try:
        network = spec.build(input_channels=channels, input_shape=spec.input_shape)
    except InvalidInput:
        raise
    except Exception as e:  # a constructor rejecting the kwargs: the plan does not describe a network
        raise InvalidCheckpoint(f"{path}: cannot build {spec.arch_class_name} from the adaptation plan "
                                f"({type(e).__name__}: {e}); re-export the checkpoint with nnssl_export") from e
    load_encoder_weights(network, checkpoint["network_weights"], plan["key_to_encoder"], plan["key_to_stem"],
                         str(path))
    logger.debug("loaded %s encoder (%s) from %s", spec.arch_class_name, type(network).__name__, path)
    return PretrainedEncoder(network, spec, pretrain_plan=plan.get("pretrain_plan"), source=str(path), device=device)


def random_encoder_like(encoder_or_spec: PretrainedEncoder | BackboneSpec, seed: int = 0,
                        device: str | torch.device | None = None) -> PretrainedEncoder:
    """The same architecture at random initialisation (torch's default init, seeded), with the
    same geometry as the pretrained encoder: the reference point for every probe."""
    if isinstance(encoder_or_spec, PretrainedEncoder):
        ref, spec = encoder_or_spec, encoder_or_spec.spec
    else:
        ref, spec = None, encoder_or_spec
    channels = ref.in_channels if ref is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        network = spec.build(input_channels=channels, input_shape=spec.input_shape)
    return PretrainedEncoder(network, spec, pretrain_plan=ref.pretrain_plan if ref is not None else None,
                             source=f"random init (seed {seed})", device=device or (ref.device if ref else "cpu"))
