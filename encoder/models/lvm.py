"""The large vision model (LVM): a SUNet-style Swin-Transformer U-Net (Fan et al. 2022).

Architecture (Fu et al. 2024, after SUNet, arXiv 2202.14009)::

    x (B,3,H,W) ─ 3×3 conv stem ─ patch embed (4×4) ─ stage 0 ─ stage 1 ─ stage 2 ─ stage 3 (bottleneck)
                                                         │ skip    │ skip    │ skip       │
    reconstruction ◄─ 3×3 conv ◄─ dual up ×4 ◄─ dec 0 ◄─ dual up ◄─ dec 1 ◄─ dual up ◄─ dec 2 ◄─ dual up

The Swin blocks, windowed attention and patch merging are timm's
(:class:`timm.models.swin_transformer.SwinTransformerStage`); this module only wires them into a
U-Net. "Dual up-sample" is SUNet's: a pixel-shuffle branch and a bilinear branch, concatenated
and fused by a 1×1 convolution.

Only the architecture lives here; weights are loaded by :mod:`encoder.checkpoint`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import SwinTransformerStage
from torch import Tensor, nn

from encoder.models._registry import register_model
from galsift.constants import EMBEDDING_DIM

#: number of per-band input statistics appended to the embedding (see :func:`input_statistics`)
N_INPUT_STATS = 22


class InputSizeError(ValueError):
    """Raised when an input does not have the shape the model was built for."""


@dataclass(frozen=True)
class LVMConfig:
    """Hyper-parameters of one LVM variant (architecture only, no weights).

    Attributes
    ----------
    img_size
        Side of the square input in pixels; must be divisible by ``patch_size * 8``.
    in_chans
        Input bands (g, r, z).
    stem_chans
        Channels of the 3×3 convolution stem (``None``: ``embed_dim``).
    patch_size
        Side of the patch embedding, in pixels.
    window_size
        Side of the attention window in tokens; stages whose map is smaller use the whole map.
    embed_dim
        Channels of the first stage; each later stage doubles them.
    depths
        Swin blocks per encoder stage (4 stages).
    num_heads
        Attention heads per encoder stage.
    decoder_depths
        Swin blocks per decoder stage, from the deepest (next to the bottleneck) to the shallowest;
        ``None`` mirrors ``depths[:-1]``.
    mlp_ratio
        Hidden width of each block's MLP relative to its channels.
    drop_path_rate
        Stochastic depth at the deepest block (linearly increasing with depth).
    embedding_dim
        Size of :meth:`LVM.embed` (``galsift.constants.EMBEDDING_DIM``).
    stats_weight
        Weight of the standardised input statistics inside the embedding, relative to one
        (layer-normalised) learned feature.
    """

    img_size: int = 128
    in_chans: int = 3
    stem_chans: int | None = None
    patch_size: int = 4
    window_size: int = 8
    embed_dim: int = 96
    depths: tuple[int, ...] = (8, 8, 8, 8)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    decoder_depths: tuple[int, ...] | None = None
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    embedding_dim: int = EMBEDDING_DIM
    stats_weight: float = 2.0

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("depths and num_heads need one entry per stage (4 stages)")
        if self.decoder_depths is not None and len(self.decoder_depths) != 3:
            raise ValueError("decoder_depths needs 3 entries (one per decoder stage)")
        if self.img_size % (self.patch_size * 8):
            raise ValueError(
                f"img_size {self.img_size} must be divisible by patch_size*8 = {self.patch_size * 8}"
            )
        if self.embedding_dim <= N_INPUT_STATS:
            raise ValueError(f"embedding_dim must exceed the {N_INPUT_STATS} input statistics")

    @property
    def dims(self) -> tuple[int, ...]:
        """Channels of the four encoder stages."""
        return tuple(self.embed_dim * 2**i for i in range(4))

    @property
    def grid(self) -> int:
        """Side of the token map after the patch embedding."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LVMConfig:
        """Build a config from :meth:`to_dict` output, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LVM config keys: {sorted(unknown)}")
        cleaned: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**cleaned)


class DualUpsample(nn.Module):
    """SUNet's dual up-sampling: pixel-shuffle and bilinear branches, fused by a 1×1 conv.

    Works on NCHW maps: ``(B, in_ch, H, W) -> (B, out_ch, H*factor, W*factor)``.
    """

    def __init__(self, in_ch: int, out_ch: int, factor: int) -> None:
        super().__init__()
        # as in SUNet: the pixel-shuffle branch halves the channels for a 2× step
        shuffled = in_ch // 2 if factor == 2 else in_ch
        self.pixel = nn.Sequential(
            nn.Conv2d(in_ch, shuffled * factor * factor, 1, bias=False),
            nn.PReLU(),
            nn.PixelShuffle(factor),
            nn.Conv2d(shuffled, out_ch, 1, bias=False),
        )
        self.bilinear = nn.Sequential(
            nn.Conv2d(in_ch, in_ch, 1),
            nn.PReLU(),
            nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
        )
        self.fuse = nn.Conv2d(2 * out_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Up-sample ``x`` by the factor given at construction."""
        return self.fuse(torch.cat([self.pixel(x), self.bilinear(x)], dim=1))


def input_statistics(x: Tensor) -> Tensor:
    """Simple photometric statistics of model inputs, invariant to flips and right-angle turns.

    They keep the flux, colour, concentration and shape information that a pooled transformer
    feature may discard, and are appended to the learned part of :meth:`LVM.embed`.

    Parameters
    ----------
    x
        Model inputs ``(B, 3, H, W)`` (the output of ``encoder.data.to_model_input``).

    Returns
    -------
    ``(B, N_INPUT_STATS)`` float32: per band the mean within radius H/16, H/8 and H/4 of the
    centre, the image mean and standard deviation (15); band differences (colours) within H/16
    and H/4 (4); core-minus-H/4 luminance (concentration, 1); second-moment radius and
    ellipticity modulus of the luminance within H/4 (2).
    """
    x = x.float()
    _b, c, h, w = x.shape
    if c != 3:
        raise InputSizeError(f"input_statistics needs 3 bands, got {c}")
    yy, xx = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2,
        torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2,
        indexing="ij",
    )
    r = torch.sqrt(xx**2 + yy**2)
    means = []
    for radius in (h / 16, h / 8, h / 4):
        m = (r < radius).float()
        means.append((x * m).sum(dim=(2, 3)) / m.sum())
    core, _, mid = means
    whole = x.mean(dim=(2, 3))
    std = x.std(dim=(2, 3))
    colours = torch.cat([core[:, :2] - core[:, 1:], mid[:, :2] - mid[:, 1:]], dim=1)
    lum = x.mean(dim=1)
    conc = (core.mean(dim=1) - mid.mean(dim=1))[:, None]
    inner = (r < h / 4).float()
    wgt = (lum - lum.flatten(1).median(dim=1).values[:, None, None]).clamp(min=0) * inner
    tot = wgt.sum(dim=(1, 2)).clamp(min=1e-6)
    mx = (wgt * xx).sum(dim=(1, 2)) / tot
    my = (wgt * yy).sum(dim=(1, 2)) / tot
    dx = xx[None] - mx[:, None, None]
    dy = yy[None] - my[:, None, None]
    qxx = (wgt * dx * dx).sum(dim=(1, 2)) / tot
    qyy = (wgt * dy * dy).sum(dim=(1, 2)) / tot
    qxy = (wgt * dx * dy).sum(dim=(1, 2)) / tot
    size = torch.sqrt((qxx + qyy).clamp(min=0)) / h
    ell = torch.sqrt((qxx - qyy) ** 2 + 4 * qxy**2) / (qxx + qyy).clamp(min=1e-6)
    return torch.cat([core, means[1], mid, whole, std, colours, conc, size[:, None], ell[:, None]], dim=1)


class LVMDecoder(nn.Module):
    """The mirrored Swin decoder with skip connections and SUNet's dual up-sampling.

    Kept as one module so that a task head (e.g. restoration) can own a copy of it.
    """

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        dims = config.dims
        grid = config.grid
        stem = config.stem_chans or config.embed_dim
        dec_depths = config.decoder_depths or tuple(reversed(config.depths[:-1]))
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.stages = nn.ModuleList()
        for j, i in enumerate((2, 1, 0)):
            self.ups.append(DualUpsample(dims[i + 1], dims[i], 2))
            self.fuse.append(nn.Linear(2 * dims[i], dims[i]))
            res = grid // 2**i
            self.stages.append(
                SwinTransformerStage(
                    dim=dims[i],
                    out_dim=dims[i],
                    input_resolution=(res, res),
                    depth=dec_depths[j],
                    downsample=False,
                    num_heads=config.num_heads[i],
                    window_size=config.window_size,
                    mlp_ratio=config.mlp_ratio,
                    drop_path=0.0,
                )
            )
        self.norm = nn.LayerNorm(dims[0])
        self.up_out = DualUpsample(dims[0], stem, config.patch_size)
        self.output = nn.Conv2d(stem, config.in_chans, 3, padding=1)

    def forward(self, feats: list[Tensor], bottleneck_norm: nn.Module) -> Tensor:
        """Reconstruct ``(B, C, H, W)`` from the raw NHWC encoder stage outputs."""
        t = bottleneck_norm(feats[-1])
        for j, i in enumerate((2, 1, 0)):
            up = self.ups[j](t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            t = self.fuse[j](torch.cat([up, feats[i]], dim=-1))
            t = self.stages[j](t)
        t = self.norm(t).permute(0, 3, 1, 2)
        return self.output(self.up_out(t))


class LVMBackbone(nn.Module):
    """torchvision detection backbone over an :class:`LVM`: encoder maps + a feature pyramid.

    Follows the torchvision contract (``models/detection``): an ``out_channels`` attribute and a
    forward that returns an ``OrderedDict`` of NCHW feature maps with that many channels
    (keys ``"0"``..``"3"`` for strides 4..32 and ``"pool"``), so it plugs into
    ``torchvision.models.detection.MaskRCNN(backbone, ...)``. Inputs must be
    ``img_size × img_size`` (set the detector transform's ``min_size``/``max_size`` to it).
    """

    def __init__(self, lvm: LVM, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = lvm
        self.fpn = FeaturePyramidNetwork(list(lvm.config.dims), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Feature pyramid of ``x``: ``OrderedDict`` of ``(B, out_channels, h, w)`` maps."""
        maps = self.body.forward_intermediates(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class LVM(nn.Module):
    """SUNet-style Swin U-Net with the galsift model API.

    Methods
    -------
    forward_features(x)
        Normalised bottleneck map ``(B, 8*embed_dim, H/32, W/32)``.
    forward_intermediates(x)
        Normalised NCHW maps of the 4 encoder stages (strides 4, 8, 16, 32).
    pooled(x)
        Concatenated global-average-pooled stage maps ``(B, 15*embed_dim)``.
    embed(x)
        ``(B, embedding_dim)`` L2-normalised embedding (see its docstring).
    forward(x)
        Decoder reconstruction ``(B, 3, H, W)``.
    backbone()
        torchvision detection backbone (:class:`LVMBackbone`).

    Every method accepts ``mask``: a ``(B, H/patch, W/patch)`` boolean token mask whose tokens are
    replaced by a learned mask token (masked image modelling).
    """

    stats_mean: Tensor
    stats_std: Tensor

    def __init__(self, config: LVMConfig, *, variant: str = "custom") -> None:
        super().__init__()
        self.config = config
        self.variant = variant
        self.img_size = config.img_size
        self.in_chans = config.in_chans
        self.embedding_dim = config.embedding_dim
        dims = config.dims
        grid = config.grid
        stem = config.stem_chans or config.embed_dim

        self.stem = nn.Conv2d(config.in_chans, stem, 3, padding=1)
        self.patch_embed = PatchEmbed(
            img_size=config.img_size,
            patch_size=config.patch_size,
            in_chans=stem,
            embed_dim=dims[0],
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
        )
        self.mask_token = nn.Parameter(torch.zeros(dims[0]))

        n_enc = sum(config.depths)
        dpr = [float(v) for v in torch.linspace(0, config.drop_path_rate, n_enc)]
        self.stages = nn.ModuleList()
        self.stage_norms = nn.ModuleList()
        start = 0
        for i in range(4):
            depth = config.depths[i]
            self.stages.append(
                SwinTransformerStage(
                    dim=dims[max(i - 1, 0)],
                    out_dim=dims[i],
                    input_resolution=(grid // 2 ** max(i - 1, 0), grid // 2 ** max(i - 1, 0)),
                    depth=depth,
                    downsample=i > 0,
                    num_heads=config.num_heads[i],
                    window_size=config.window_size,
                    mlp_ratio=config.mlp_ratio,
                    drop_path=dpr[start : start + depth],
                )
            )
            self.stage_norms.append(nn.LayerNorm(dims[i]))
            start += depth

        self.decoder = LVMDecoder(config)

        n_learned = config.embedding_dim - N_INPUT_STATS
        self.embed_proj = nn.Linear(sum(dims), n_learned)
        self.embed_norm = nn.LayerNorm(n_learned, elementwise_affine=False)
        # standardisation of the input statistics: persistent buffers, set from training data by
        # ``set_stats_normalisation`` before pretraining, so the embedding is a fixed function
        self.register_buffer("stats_mean", torch.zeros(N_INPUT_STATS))
        self.register_buffer("stats_std", torch.ones(N_INPUT_STATS))
        self.apply(self._init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ encoder
    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-2:] != (self.img_size,) * 2:
            raise InputSizeError(
                f"{self.variant} expects (B, {self.in_chans}, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Raw (not normalised) NHWC outputs of the 4 encoder stages, for the decoder and heads."""
        self._check(x)
        t = self.patch_embed(self.stem(x))
        if mask is not None:
            m = mask.to(t.dtype)[..., None]
            t = t * (1 - m) + self.mask_token.to(t.dtype) * m
        outs = []
        for stage in self.stages:
            t = stage(t)
            outs.append(t)
        return outs

    def forward_intermediates(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Layer-normalised NCHW maps of the 4 encoder stages, strides 4, 8, 16 and 32.

        Channels are ``embed_dim * (1, 2, 4, 8)``.
        """
        outs = self.encode(x, mask)
        return [n(t).permute(0, 3, 1, 2) for n, t in zip(self.stage_norms, outs, strict=True)]

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Layer-normalised bottleneck map ``(B, 8*embed_dim, H/32, W/32)`` (NCHW)."""
        return self.forward_intermediates(x, mask)[-1]

    def pooled(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Global-average-pooled maps of all 4 stages, concatenated: ``(B, 15*embed_dim)``."""
        return self.pooled_from(self.encode(x, mask))

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The stored embedding: ``(B, embedding_dim)``, L2-normalised.

        It concatenates (1) a learned linear projection of the pooled multi-scale features
        (:meth:`pooled`: all 4 stages, so fine texture and global shape both count),
        layer-normalised, ``embedding_dim - 22`` values; and (2) the 22 standardised per-band
        input statistics of :func:`input_statistics` (fluxes within 3 apertures, mean, spread,
        colours, concentration, size, ellipticity), times ``config.stats_weight``. Then it
        divides by the L2 norm, so cosine similarity is a dot product. Part (2) makes sure flux
        and colour, which a pooled transformer feature tends to discard, stay in the vector.
        """
        return self.embed_from(self.encode(x, mask), x)

    @torch.inference_mode()
    def embed_array(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """:meth:`embed` of (N, 3, S, S) model input in batches, on the model's device.

        Returns
        -------
        numpy.ndarray
            ``float32`` (N, ``embedding_dim``).
        """
        device = next(self.parameters()).device
        out = [np.zeros((0, self.embedding_dim), np.float32)]
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], np.float32))
            out.append(self.embed(x.to(device)).float().cpu().numpy())
        return np.concatenate(out)

    def pooled_from(self, feats: list[Tensor]) -> Tensor:
        """:meth:`pooled` from the raw stage outputs of :meth:`encode` (no second pass)."""
        return torch.cat([n(t).mean(dim=(1, 2)) for n, t in zip(self.stage_norms, feats, strict=True)], 1)

    def embed_from(self, feats: list[Tensor], x: Tensor) -> Tensor:
        """:meth:`embed` from the stage outputs of :meth:`encode` and the input ``x``."""
        learned = self.learned_embedding_from(feats)
        stats = (input_statistics(x) - self.stats_mean) / self.stats_std
        z = torch.cat([learned.float(), self.config.stats_weight * stats], dim=1)
        return F.normalize(z, dim=1)

    def learned_embedding_from(self, feats: list[Tensor]) -> Tensor:
        """The learned part of :meth:`embed` (before the statistics and the L2 norm).

        Self-supervised objectives act on this part alone, so that they cannot be solved by the
        fixed input statistics (which would leave the learned features untrained).
        """
        return self.embed_norm(self.embed_proj(self.pooled_from(feats)))

    def reconstruct_and_embed(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and :meth:`embed` of the same input from one encoder pass."""
        feats = self.encode(x, mask)
        return self.decode(feats), self.embed_from(feats, x)

    @torch.no_grad()
    def set_stats_normalisation(self, x: Tensor) -> None:
        """Set the standardisation of :func:`input_statistics` from a sample of model inputs."""
        s = input_statistics(x)
        self.stats_mean.copy_(s.mean(dim=0))
        self.stats_std.copy_(s.std(dim=0).clamp(min=1e-4))

    # ------------------------------------------------------------------ decoder
    def decode(self, feats: list[Tensor]) -> Tensor:
        """Reconstruct ``(B, in_chans, H, W)`` from the raw NHWC stage outputs of :meth:`encode`."""
        return self.decoder(feats, self.stage_norms[-1])

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Decoder reconstruction of ``x`` (restored / unmasked), ``(B, in_chans, H, W)``."""
        return self.decode(self.encode(x, mask))

    def backbone(self, out_channels: int = 256) -> LVMBackbone:
        """A torchvision detection backbone sharing this model's encoder (weights not copied)."""
        return LVMBackbone(self, out_channels)

    # ------------------------------------------------------------------ bookkeeping
    def encoder_parameters(self) -> int:
        """Number of encoder parameters (stem, patch embedding, stages and their norms)."""
        parts: list[nn.Module] = [self.stem, self.patch_embed, self.stages, self.stage_norms]
        return sum(p.numel() for m in parts for p in m.parameters()) + self.mask_token.numel()

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())


def _build(variant: str, defaults: LVMConfig, overrides: dict[str, Any]) -> LVM:
    config = LVMConfig.from_dict({**defaults.to_dict(), **overrides}) if overrides else defaults
    return LVM(config, variant=variant)


@register_model
def lvm_paper(**overrides: Any) -> LVM:
    """The paper's LVM: 128 px, patch 4, window 8, embed 96, depths 8/8/8/8, 8 heads (~100M)."""
    return _build("lvm_paper", LVMConfig(), overrides)


@register_model
def lvm_small(**overrides: Any) -> LVM:
    """128 px, embed 64, depths 2/2/6/2 (~14M): fits a short GPU run."""
    cfg = LVMConfig(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), decoder_depths=(2, 2, 2))
    return _build("lvm_small", cfg, overrides)


@register_model
def lvm_mini(**overrides: Any) -> LVM:
    """128 px, embed 48, depths 2/2/6/2 (~7.5M): a GPU-pretrained model still small enough to ship."""
    cfg = LVMConfig(
        embed_dim=48,
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 8, 16),
        decoder_depths=(1, 1, 1),
        mlp_ratio=3.0,
    )
    return _build("lvm_mini", cfg, overrides)


@register_model
def lvm_tiny(**overrides: Any) -> LVM:
    """96 px, window 6, embed 32, depths 2/2/2/2 (~3M): CPU tests, the demo, the shipped model."""
    cfg = LVMConfig(
        img_size=96,
        window_size=6,
        stem_chans=16,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        decoder_depths=(1, 1, 1),
        mlp_ratio=3.0,
        drop_path_rate=0.05,
    )
    return _build("lvm_tiny", cfg, overrides)


def describe(model: LVM) -> str:
    """One line with the variant, input and parameter counts."""
    total, enc = model.num_parameters(), model.encoder_parameters()
    return (
        f"{model.variant}: {model.img_size}px, {total / 1e6:.2f}M parameters "
        f"({enc / 1e6:.2f}M encoder, {(total - enc) / 1e6:.2f}M decoder and heads), "
        f"{model.config.dims[-1]}-channel bottleneck"
    )
