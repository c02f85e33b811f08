"""The strong-lens finder: torchvision's Mask R-CNN over the LVM encoder (or a ResNet50 baseline).

Architecture (Fu et al. 2024, §"object detection"): the LVM's four Swin encoder stages (strides 4,
8, 16 and 32) feed a feature pyramid (:class:`encoder.models.LVMBackbone`), whose maps feed
torchvision's region-proposal network, box head and mask head. Only the encoder is carried: the
U-Net decoder and the embedding projection are dropped. The baseline is the same detector with a
ResNet50 + FPN backbone (``torchvision.models.resnet50(weights=None)``: no weights can be
downloaded here, so it starts from scratch, with trainable BatchNorm as torchvision does for
backbones trained from scratch).

Everything outside the backbone is identical for both, and sized for survey stamps instead of
torchvision's 800 px ImageNet default:

* the input is the model input of :func:`encoder.data.to_model_input` at ``image_size`` (96 px by
  default: the shipped encoder's size), with ``min_size = max_size = image_size`` so the detector
  never resizes; normalisation is the identity for the LVM (it was pretrained on exactly these
  values) and fixed per-channel statistics of stretched survey stamps for the ResNet50;
* anchors of 8-64 px at 96 px (scaled with ``image_size``; 30″ fields put an Einstein ring of
  θ_E = 1-3″ at 7-20 px across), aspect ratios 0.5, 1, 2;
* small sampling budgets (64 anchors and 64 RoIs per image, 600/300 proposals in training), a
  64-channel pyramid, a 256-wide box head and a two-layer mask head: CPU training fits minutes,
  and the shipped checkpoint stays a few MB.

:class:`LensFinder` is what the detector service uses: ``LensFinder.load(path)`` checks the card
(backbone, image size, preprocessing version, band contract) and ``detect(images)`` returns a
:class:`LensDetection` per image, whose ``score`` (the top detection score, 0 when nothing is
found) is the tile's lens score.

Checkpoints are written like the encoder's (:mod:`encoder.checkpoint`): a safetensors file of the
state dict and a JSON card beside it; weights are never loaded inside a builder's constructor.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from encoder import checkpoint as enc_ckpt
from galsift.bands import ACCEPTED_BAND_SETS

if TYPE_CHECKING:
    from torchvision.models.detection import MaskRCNN

#: the backbones a lens detector can have
BACKBONES = ("lvm", "resnet50")
#: side of the model input of the shipped detector (the shipped encoder's input size)
DEFAULT_IMAGE_SIZE = 96
#: the shipped encoder checkpoint, the LVM backbone's initialisation
DEFAULT_ENCODER_CHECKPOINT = Path(enc_ckpt.__file__).resolve().parent / "checkpoints" / "lvm_tiny.safetensors"
#: where the detector the service uses is shipped
DEFAULT_LENS_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "lens_lvm.safetensors"
#: written into every detector card; bump when the layout changes
LENS_CHECKPOINT_FORMAT = "galsift-lens-detector/1"
#: score at which an image counts as a detected lens (detection accuracy, ``LensFinder.detect``)
DETECTION_THRESHOLD = 0.5
#: anchor side per pyramid level (strides 4, 8, 16, 32, 64) at 96 px
ANCHOR_SIZES_96 = (8, 16, 24, 40, 64)
#: per-channel mean and spread of model input (red channel first), rounded from the training
#: simulations and real survey stamps (DR9 FITS, Galaxy Zoo DECaLS and CFHTLS JPEGs): the ResNet50's
#: input normalisation (the LVM takes model input as it was pretrained on it)
STAMP_MEAN = (0.10, 0.095, 0.09)
STAMP_STD = (0.18, 0.17, 0.16)
#: LVM parts from the input side; ``trainable_layers = k`` leaves the last k trainable
LVM_LAYERS = ("stem", "stage0", "stage1", "stage2", "stage3")
#: torchvision's ResNet layer names from the input side (``conv1`` includes ``bn1``)
RESNET_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")


class LensFinderError(RuntimeError):
    """A lens detector that cannot be built, loaded or run as asked."""


class IncompatibleDetector(LensFinderError):  # noqa: N818 - named for what it is, like its parent
    """A well-formed detector checkpoint made for another backbone, input size or input contract."""


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of a lens detector (no weights): everything its card needs to rebuild it.

    Attributes
    ----------
    backbone
        ``lvm`` or ``resnet50``.
    image_size
        Side of the square model input in pixels (no resizing inside the detector).
    trainable_layers
        Backbone parts left trainable, counted from the deepest (0-5): for the LVM the last k of
        :data:`LVM_LAYERS`, for the ResNet50 the last k of :data:`RESNET_LAYERS`.
    fpn_channels
        Channels of every pyramid level (the backbone's ``out_channels``).
    box_representation
        Width of the two fully connected layers of the box head.
    mask_layers
        Channels of the mask head's 3×3 convolutions.
    anchor_sizes
        One anchor side per pyramid level (5 levels: strides 4-32 and the extra max-pool).
    aspect_ratios
        Anchor height/width ratios, the same at every level.
    image_mean, image_std
        Per-channel normalisation of the model input inside the detector.
    lvm_variant
        Registered LVM variant of the backbone (LVM only).
    lvm_config
        The LVM's config (:meth:`encoder.models.LVMConfig.to_dict`; LVM only).
    rpn_batch_size_per_image, box_batch_size_per_image
        Anchors and RoIs sampled per image for the losses.
    rpn_pre_nms_train, rpn_post_nms_train, rpn_pre_nms_test, rpn_post_nms_test
        Proposals kept before and after NMS.
    detections_per_img
        Most detections returned per image.
    score_thresh
        Lowest detection score returned; tiny, so that every image gets a ranked top score.
    """

    backbone: str
    image_size: int = DEFAULT_IMAGE_SIZE
    trainable_layers: int = 5
    fpn_channels: int = 64
    box_representation: int = 256
    mask_layers: tuple[int, ...] = (64, 64)
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES_96
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    lvm_variant: str | None = None
    lvm_config: dict[str, Any] | None = field(default=None, hash=False)
    rpn_batch_size_per_image: int = 64
    box_batch_size_per_image: int = 64
    rpn_pre_nms_train: int = 600
    rpn_post_nms_train: int = 300
    rpn_pre_nms_test: int = 300
    rpn_post_nms_test: int = 100
    detections_per_img: int = 10
    score_thresh: float = 1e-3

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise LensFinderError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not 0 <= self.trainable_layers <= 5:
            raise LensFinderError(f"trainable_layers must be within 0..5, got {self.trainable_layers}")
        if self.image_size < 32 or self.image_size % 32:
            raise LensFinderError(f"image_size must be a multiple of 32 (>= 32), got {self.image_size}")
        if len(self.anchor_sizes) != 5:
            raise LensFinderError("anchor_sizes needs one size per pyramid level (5)")
        if self.backbone == "lvm" and (self.lvm_variant is None or self.lvm_config is None):
            raise LensFinderError("an LVM backbone needs lvm_variant and lvm_config")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); :meth:`from_dict` reverses it."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DetectorConfig:
        """Build a config from :meth:`to_dict` output, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise LensFinderError(f"unknown detector config keys: {sorted(unknown)}")
        cleaned: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) and k != "lvm_config" else v for k, v in values.items()
        }
        return cls(**cleaned)


def default_trainable_layers(backbone: str, *, pretrained: bool) -> int:
    """Trainable backbone parts by default: 3 when pretrained, all 5 from scratch (as torchvision)."""
    if backbone not in BACKBONES:
        raise LensFinderError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return 3 if pretrained else 5


def scaled_anchor_sizes(image_size: int) -> tuple[int, ...]:
    """:data:`ANCHOR_SIZES_96` scaled to another input size (same angular sizes at 30″ fields)."""
    return tuple(max(2, round(s * image_size / 96)) for s in ANCHOR_SIZES_96)


# ---------------------------------------------------------------------------------- backbones
def _freeze(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def lvm_encoder_backbone(lvm: nn.Module, *, out_channels: int, trainable_layers: int) -> nn.Module:
    """The detection backbone of an LVM: its encoder stages and an FPN, the decoder dropped.

    Parameters
    ----------
    lvm
        An :class:`encoder.models.LVM` (weights already loaded, if any).
    out_channels
        Channels of every pyramid level.
    trainable_layers
        How many of :data:`LVM_LAYERS`, counted from the deepest, stay trainable; the others
        (stem and patch embedding first) are frozen.

    Returns
    -------
    torch.nn.Module
        :class:`encoder.models.LVMBackbone` (``out_channels`` + an ordered dict of 5 maps).
    """
    backbone = lvm.backbone(out_channels)  # type: ignore[operator]
    body = backbone.body
    # encoder only: the decoder and the embedding projection are not part of the detector
    del body.decoder
    del body.embed_proj
    parts: list[list[nn.Module]] = [[body.stem, body.patch_embed]] + [
        [body.stages[i], body.stage_norms[i]] for i in range(4)
    ]
    frozen = parts[: len(parts) - trainable_layers]
    _freeze([m for group in frozen for m in group])
    body.mask_token.requires_grad_(False)  # used only by masked image modelling
    return backbone


def resnet50_fpn_backbone(*, out_channels: int, trainable_layers: int) -> nn.Module:
    """The ResNet50 + FPN detection backbone of torchvision, randomly initialised (``weights=None``).

    BatchNorm is trainable (``nn.BatchNorm2d``): torchvision's frozen BatchNorm is meant for
    pretrained weights and would leave a from-scratch network unnormalised.
    """
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    net = resnet50(weights=None, norm_layer=nn.BatchNorm2d)
    by_name = dict(net.named_children())
    parts = [[by_name["conv1"], by_name["bn1"]]] + [[by_name[n]] for n in RESNET_LAYERS[1:]]
    frozen = parts[: len(parts) - trainable_layers]
    _freeze([m for group in frozen for m in group])
    return BackboneWithFPN(
        net,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[256, 512, 1024, 2048],
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


# ---------------------------------------------------------------------------------- detector
def _maskrcnn(backbone: nn.Module, config: DetectorConfig) -> MaskRCNN:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    c = config.fpn_channels
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in config.anchor_sizes),
        aspect_ratios=(tuple(config.aspect_ratios),) * len(config.anchor_sizes),
    )
    mask_layers = list(config.mask_layers)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.image_size,
        max_size=config.image_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_head=TwoMLPHead(c * 7 * 7, config.box_representation),
        box_predictor=FastRCNNPredictor(config.box_representation, 2),
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_detections_per_img=config.detections_per_img,
        box_score_thresh=config.score_thresh,
        mask_head=MaskRCNNHeads(c, mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], 2),
    )
    return model


def _build_from_config(config: DetectorConfig, lvm: nn.Module | None = None) -> MaskRCNN:
    """The detector of ``config``; ``lvm`` (LVM backbone only) carries pretrained weights."""
    if config.backbone == "lvm":
        if lvm is None:
            from encoder.models import create_model

            if config.lvm_variant is None or config.lvm_config is None:
                raise LensFinderError("an LVM backbone needs lvm_variant and lvm_config")
            try:
                lvm = create_model(config.lvm_variant, **config.lvm_config)
            except (KeyError, ValueError, TypeError) as exc:
                raise LensFinderError(f"cannot build LVM {config.lvm_variant!r}: {exc}") from exc
        img = int(getattr(lvm, "img_size", -1))
        if img != config.image_size:
            raise LensFinderError(f"the LVM takes {img} px inputs but the detector {config.image_size} px")
        backbone = lvm_encoder_backbone(
            lvm, out_channels=config.fpn_channels, trainable_layers=config.trainable_layers
        )
    else:
        backbone = resnet50_fpn_backbone(
            out_channels=config.fpn_channels, trainable_layers=config.trainable_layers
        )
    model = _maskrcnn(backbone, config)
    model.config = config
    return model


def build_lens_detector(
    backbone: str,
    *,
    lvm_checkpoint: Path | None = DEFAULT_ENCODER_CHECKPOINT,
    lvm_variant: str = "lvm_tiny",
    lvm_overrides: Mapping[str, Any] | None = None,
    trainable_layers: int | None = None,
    image_size: int | None = None,
    fpn_channels: int = 64,
    seed: int | None = None,
) -> MaskRCNN:
    """Build a 2-class (background, lens) Mask R-CNN with an LVM or ResNet50 FPN backbone.

    Parameters
    ----------
    backbone
        ``lvm`` or ``resnet50``.
    lvm_checkpoint
        Encoder checkpoint that initialises the LVM backbone, loaded by
        :func:`encoder.checkpoint.load_model` (which refuses another preprocessing version or other
        input channels); its card gives the variant and config. None: a randomly initialised
        ``lvm_variant`` (tests). Ignored for ``resnet50``.
    lvm_variant
        Registered variant when ``lvm_checkpoint`` is None.
    lvm_overrides
        Config overrides of that variant (e.g. ``{"img_size": 64, "window_size": 4}``).
    trainable_layers
        Backbone parts left trainable, counted from the deepest (0-5); default 3 for a pretrained
        LVM and 5 for a backbone that starts from random weights (torchvision's habit).
    image_size
        Side of the model input; default: the LVM's input size, or 96 px for the ResNet50.
    fpn_channels
        Channels of the pyramid (the same for both backbones).
    seed
        Seed of the random initialisation of everything not loaded from a checkpoint.

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        In training mode, with its :class:`DetectorConfig` as ``model.config``.

    Raises
    ------
    LensFinderError
        For an unknown backbone, a bad size, or an LVM whose input size differs from ``image_size``.
    encoder.checkpoint.CheckpointError
        If the encoder checkpoint is missing, incompatible or does not match its architecture.
    """
    if backbone not in BACKBONES:
        raise LensFinderError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        lvm: Any = None
        lvm_variant_name: str | None = None
        lvm_config: dict[str, Any] | None = None
        pretrained = False
        if backbone == "lvm":
            if lvm_checkpoint is not None:
                lvm, _card = enc_ckpt.load_model(Path(lvm_checkpoint))
                lvm.train()
                pretrained = True
                if lvm_overrides:
                    raise LensFinderError("lvm_overrides apply to a random LVM only (lvm_checkpoint=None)")
            else:
                from encoder.models import create_model

                lvm = create_model(lvm_variant, **dict(lvm_overrides or {}))
            lvm_variant_name = str(lvm.variant)
            lvm_config = lvm.config.to_dict()
            size = int(image_size or lvm.img_size)
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            size = int(image_size or DEFAULT_IMAGE_SIZE)
            mean, std = STAMP_MEAN, STAMP_STD
        layers = (
            trainable_layers
            if trainable_layers is not None
            else default_trainable_layers(backbone, pretrained=pretrained)
        )
        config = DetectorConfig(
            backbone=backbone,
            image_size=size,
            trainable_layers=layers,
            fpn_channels=fpn_channels,
            anchor_sizes=scaled_anchor_sizes(size),
            image_mean=mean,
            image_std=std,
            lvm_variant=lvm_variant_name,
            lvm_config=lvm_config,
        )
        model = _build_from_config(config, lvm)
    return model.train()


def detector_config(model: nn.Module) -> DetectorConfig:
    """The :class:`DetectorConfig` a detector was built with."""
    config = getattr(model, "config", None)
    if not isinstance(config, DetectorConfig):
        raise LensFinderError("not a lens detector built by build_lens_detector (no DetectorConfig)")
    return config


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts of the backbone and the heads."""
    out = {"backbone_trainable": 0, "backbone_frozen": 0, "heads": 0}
    for name, p in model.named_parameters():
        if name.startswith("backbone.body."):
            out["backbone_trainable" if p.requires_grad else "backbone_frozen"] += p.numel()
        else:
            out["heads"] += p.numel()
    return out


# ---------------------------------------------------------------------------------- checkpoints
def _band_labels() -> list[str]:
    return [s.label for s in ACCEPTED_BAND_SETS]


def save_detector(
    path: Path, model: nn.Module, *, card: Mapping[str, Any], half: bool = False
) -> dict[str, Any]:
    """Write a detector's weights (safetensors) and card (JSON beside it).

    Parameters
    ----------
    path
        ``*.safetensors`` file; the card is the same name with ``.json``.
    model
        A detector from :func:`build_lens_detector`.
    card
        Fields to record (data, training arguments, metrics, ...); format, backbone, config,
        image size, input contract, sizes, sha256, version, git commit and date are filled in.
    half
        Store floating-point parameters as float16 (shipping); buffers stay as they are.

    Returns
    -------
    dict
        The card as written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LensFinderError(f"checkpoint path must end in .safetensors, got {path}")
    config = detector_config(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = {name for name, _ in model.named_parameters()}
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu", copy=True).contiguous()
        if half and name in params and t.is_floating_point():
            t = t.half()
        weights[name] = t
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(weights, str(tmp), metadata={"format": LENS_CHECKPOINT_FORMAT, "backbone": config.backbone})
    tmp.chmod(0o644)
    tmp.replace(path)
    digest = enc_ckpt.file_sha256(path)
    name = f"lens_{config.backbone}"
    full: dict[str, Any] = {
        **enc_ckpt.input_contract(),
        **dict(card),
        "format": LENS_CHECKPOINT_FORMAT,
        "kind": "lens_detector",
        "backbone": config.backbone,
        "image_size": config.image_size,
        "config": config.to_dict(),
        "detection_threshold": DETECTION_THRESHOLD,
        "dtype": "float16" if half else "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": digest,
        "version": f"{name}-{digest[:10]}",
        "git_commit": card.get("git_commit") or enc_ckpt.git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    cp = enc_ckpt.card_path(path)
    tmp_card = cp.with_name(f".{cp.name}.{os.getpid()}.tmp")
    tmp_card.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp_card.replace(cp)
    return full


def read_detector_card(path: Path) -> dict[str, Any]:
    """The card of a detector checkpoint, format checked."""
    cp = enc_ckpt.card_path(Path(path))
    if not cp.is_file():
        raise LensFinderError(f"no card {cp} next to {path}")
    card: dict[str, Any] = json.loads(cp.read_text(encoding="utf-8"))
    if card.get("format") != LENS_CHECKPOINT_FORMAT:
        raise LensFinderError(f"{cp}: format {card.get('format')!r}, expected {LENS_CHECKPOINT_FORMAT!r}")
    return card


def check_detector_card(
    card: Mapping[str, Any],
    path: Path,
    *,
    backbone: str | None = None,
    image_size: int | None = None,
) -> DetectorConfig:
    """Refuse a card that does not describe a detector this code can run as asked.

    Checks the backbone and image size (against the card's own config, and against what the
    caller expects when given), the preprocessing version and input channels
    (:func:`encoder.checkpoint.check_compatible`) and the band contract (the card's band sets
    must be those of :mod:`galsift.bands`).

    Returns
    -------
    DetectorConfig
        The architecture to build.

    Raises
    ------
    IncompatibleDetector
        On any mismatch.
    """
    try:
        config = DetectorConfig.from_dict(card.get("config") or {})
    except (TypeError, LensFinderError) as exc:
        raise LensFinderError(f"{path}: unreadable detector config: {exc}") from exc
    if card.get("backbone") != config.backbone:
        raise IncompatibleDetector(
            f"{path}: card backbone {card.get('backbone')!r} != config {config.backbone!r}"
        )
    if int(card.get("image_size", -1)) != config.image_size:
        raise IncompatibleDetector(
            f"{path}: card image_size {card.get('image_size')} != config {config.image_size}"
        )
    if backbone is not None and config.backbone != backbone:
        raise IncompatibleDetector(f"{path}: a {config.backbone} detector, expected {backbone}")
    if image_size is not None and config.image_size != image_size:
        raise IncompatibleDetector(f"{path}: takes {config.image_size} px inputs, expected {image_size}")
    try:
        enc_ckpt.check_compatible(card, Path(path))
    except enc_ckpt.IncompatibleCheckpoint as exc:
        raise IncompatibleDetector(str(exc)) from exc
    bands = list(card.get("band_sets", []))
    if bands != _band_labels():
        raise IncompatibleDetector(
            f"{path}: trained for band sets {bands}, this code's band contract is {_band_labels()}"
        )
    return config


def load_detector(
    path: Path,
    *,
    device: str | torch.device = "cpu",
    backbone: str | None = None,
    image_size: int | None = None,
) -> tuple[MaskRCNN, dict[str, Any]]:
    """Build the detector a card describes and load its weights (strictly), in eval mode.

    Raises
    ------
    IncompatibleDetector
        If the card fails :func:`check_detector_card`.
    LensFinderError, encoder.checkpoint.CheckpointError
        If card or weights are missing or do not match the architecture.
    """
    path = Path(path)
    card = read_detector_card(path)
    config = check_detector_card(card, path, backbone=backbone, image_size=image_size)
    model = _build_from_config(config)
    enc_ckpt.load_weights(model, path)
    return model.to(device).eval(), card


# ---------------------------------------------------------------------------------- the finder
@dataclass(frozen=True)
class LensDetection:
    """What the lens finder says about one image.

    Attributes
    ----------
    score
        The tile's lens score: the top detection score in [0, 1], 0 when nothing was detected.
    boxes
        ``float32`` (K, 4) boxes ``x0, y0, x1, y1`` in model-input pixels of the kept detections
        (score ≥ the ``min_score`` of :meth:`LensFinder.detect`), best first.
    scores
        ``float32`` (K,) their scores.
    masks
        ``bool`` (K, S, S) their masks (mask probability ≥ 0.5), in model-input pixels.
    """

    score: float
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


class LensFinder:
    """A trained lens detector, ready to score model-input images.

    Use :meth:`load`; the images given to :meth:`detect` must come from
    :func:`encoder.data.to_model_input` with ``size=finder.image_size``.

    Parameters
    ----------
    model
        A detector from :func:`build_lens_detector` or :func:`load_detector`.
    card
        Its checkpoint card (an in-memory detector may pass ``{}``).
    device
        Where it runs.
    """

    def __init__(
        self, model: nn.Module, card: Mapping[str, Any], *, device: str | torch.device = "cpu"
    ) -> None:
        self.config = detector_config(model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.card = dict(card)

    @classmethod
    def load(
        cls,
        checkpoint: Path = DEFAULT_LENS_CHECKPOINT,
        *,
        device: str | torch.device = "cpu",
        backbone: str | None = None,
        image_size: int | None = None,
    ) -> LensFinder:
        """Load a detector checkpoint, checking its card (see :func:`check_detector_card`).

        Parameters
        ----------
        checkpoint
            ``*.safetensors`` with its ``.json`` card; default: the shipped LVM detector.
        device
            Where to run.
        backbone, image_size
            What the caller expects; a checkpoint that differs is refused.
        """
        model, card = load_detector(Path(checkpoint), device=device, backbone=backbone, image_size=image_size)
        return cls(model, card, device=device)

    @property
    def version(self) -> str:
        """Name of this detector in the model registry (``lens_<backbone>-<sha256[:10]>``)."""
        return str(self.card.get("version") or f"lens_{self.config.backbone}-unsaved")

    @property
    def backbone(self) -> str:
        """``lvm`` or ``resnet50``."""
        return self.config.backbone

    @property
    def image_size(self) -> int:
        """Side of the model input this detector takes."""
        return self.config.image_size

    def _check(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        s = self.image_size
        if arr.ndim != 4 or arr.shape[1:] != (3, s, s):
            raise LensFinderError(f"expected (N, 3, {s}, {s}) model input, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise LensFinderError(f"expected float model input, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise LensFinderError("model input contains NaN or infinite values")
        return np.ascontiguousarray(arr, dtype=np.float32)

    @torch.no_grad()
    def detect(
        self, images: np.ndarray, *, min_score: float = DETECTION_THRESHOLD, batch_size: int = 16
    ) -> list[LensDetection]:
        """Detect lenses in model-input images.

        Parameters
        ----------
        images
            ``float32`` (N, 3, S, S) from :func:`encoder.data.to_model_input` with
            ``size = self.image_size``.
        min_score
            Detections kept in ``boxes``/``masks``; the image ``score`` is always the top score.
        batch_size
            Images per forward pass.

        Returns
        -------
        list of LensDetection
            One per image, in order.

        Raises
        ------
        LensFinderError
            If the images have the wrong shape or type or are not finite.
        """
        arr = self._check(images)
        out: list[LensDetection] = []
        s = self.image_size
        for start in range(0, len(arr), max(1, batch_size)):
            chunk = torch.from_numpy(arr[start : start + batch_size]).to(self.device)
            preds = self.model(list(chunk))
            for p in preds:
                scores = p["scores"].float().cpu().numpy()
                top = float(scores.max()) if scores.size else 0.0
                keep = scores >= min_score
                masks = p["masks"][:, 0].cpu().numpy() >= 0.5 if keep.any() else np.zeros((0, s, s), bool)
                out.append(
                    LensDetection(
                        score=top,
                        boxes=p["boxes"].float().cpu().numpy()[keep].astype(np.float32).reshape(-1, 4),
                        scores=scores[keep].astype(np.float32),
                        masks=masks[keep] if keep.any() else masks,
                    )
                )
        return out

    def scores(self, images: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
        """Top detection score per image (0 where nothing was detected), ``float64`` (N,)."""
        dets = self.detect(images, min_score=1.1, batch_size=batch_size)
        return np.asarray([d.score for d in dets], dtype=np.float64)
