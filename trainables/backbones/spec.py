"""What a registered backbone is, as plain data.

A `BackboneSpec` says everything the rest of the harness needs to know about a backbone without
building it: which checkpoint file it reads and where that file officially comes from, how the
file is laid out, the image size and value range its image encoder expects, and how big its three
parts are. The numbers in here are facts about the published models; where each one comes from is
said next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["sam", "sam2", "microsam", "medsam", "litemedsam"]

CheckpointFormat = Literal["state_dict", "model_key", "micro_sam"]
"""How a checkpoint file is laid out.

- ``state_dict``: the file is the model's state dict itself (segment-anything, MedSAM, LiteMedSAM).
- ``model_key``: ``{"model": state_dict}`` (the SAM 2.1 release files).
- ``micro_sam``: ``{"model_state": {"sam.<key>": tensor}, "decoder_state": {...}}`` (micro-sam /
  torch_em); see `trainables.backbones.checkpoints` for what is read and what is skipped.
"""

Resize = Literal["longest_side", "square"]
"""How an image is brought to the encoder's square input.

- ``longest_side``: scale so the longest side is the input size, keep the aspect ratio, pad the
  bottom and right with zeros (after normalisation) — segment-anything's ``ResizeLongestSide`` and
  LiteMedSAM's ``resize_longest_side`` + ``pad_image``.
- ``square``: stretch to input×input, aspect ratio not kept — SAM 2's ``SAM2Transforms`` and
  MedSAM's ``MedSAM_Inference.py`` (``transform.resize(img, (1024, 1024))``).
"""

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "state_dict": "a raw state dict (the file is {parameter name: tensor})",
    "model_key": 'a dict {"model": state_dict} (the SAM 2.1 release format)',
    "micro_sam": 'micro-sam\'s dict {"model_state": {"sam.<name>": tensor}, optional "decoder_state"}',
}

# segment-anything's pixel statistics: the ImageNet mean and std expressed on 0..255
# (segment_anything/modeling/sam.py, Sam.__init__ defaults).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# SAM 2's pixel statistics: ImageNet mean and std on 0..1 (sam2/utils/transforms.py, SAM2Transforms).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalisation:
    """How pixel values (uint8, 0..255) become encoder input values.

    ``kind="mean_std"``: divide by ``value_scale`` (1 keeps 0..255, 255 gives 0..1), then subtract
    ``mean`` and divide by ``std`` per RGB channel.
    ``kind="min_max"``: per image, ``(x - min) / max(max - min, 1e-8)`` over all pixels and channels
    of the resized image, giving [0, 1] (MedSAM and LiteMedSAM's official inference recipe).
    """

    kind: Literal["mean_std", "min_max"]
    value_scale: float = 1.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def describe(self) -> str:
        if self.kind == "min_max":
            return "min-max to [0, 1] per image"
        scale = "0..255" if self.value_scale == 1.0 else f"0..255 / {self.value_scale:g}"
        return f"({scale} - mean {list(self.mean)}) / std {list(self.std)}"


SAM_NORMALISATION = Normalisation("mean_std", 1.0, SAM_PIXEL_MEAN, SAM_PIXEL_STD)
SAM2_NORMALISATION = Normalisation("mean_std", 255.0, IMAGENET_MEAN, IMAGENET_STD)
MIN_MAX_NORMALISATION = Normalisation("min_max")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the full-size architecture, by part.

    ``other`` counts parameters outside the three parts: SAM 2's video modules (memory attention,
    memory encoder, object-pointer projections, ``no_mem_embed``), built and loaded from the
    checkpoint but unused on single images except ``no_mem_embed``. Buffers are not counted.
    The numbers in the registry were measured once with a meta-device build
    (`trainables.backbones.parameter_counts.meta_parameter_counts`); a test keeps them honest.
    """

    image_encoder: int
    prompt_encoder: int
    mask_decoder: int
    other: int = 0

    @property
    def total(self) -> int:
        return self.image_encoder + self.prompt_encoder + self.mask_decoder + self.other

    def as_dict(self) -> dict[str, int]:
        return {
            "image_encoder": self.image_encoder,
            "prompt_encoder": self.prompt_encoder,
            "mask_decoder": self.mask_decoder,
            "other": self.other,
            "total": self.total,
        }


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """One registered backbone, as data (no code runs to read it).

    ``checkpoint_file`` is the file name looked for in the weights directory; ``source_url`` is
    the official page or file it comes from; ``download_url`` is a direct link that
    ``python -m study.weights --download`` can fetch, or None where the official source is a web
    page (Google Drive) or a package. ``sha256`` is the official checksum where the publisher
    gives one, else None. ``input_size`` is the square side the image encoder takes; the image
    embedding grid is ``input_size / 16`` (``/ 4`` for LiteMedSAM's TinyViT). ``encoder_blocks`` is
    the number of blocks a late-block adaptation can tune (a test checks it against the built model).
    """

    name: str
    family: Family
    checkpoint_file: str
    source_url: str
    download_url: str | None
    format: CheckpointFormat
    sha256: str | None
    input_size: int
    resize: Resize
    normalisation: Normalisation
    params: ParamCounts
    encoder_blocks: int  # the image encoder's blocks (trainables/backbones/adaptation.py says what a block is)
    note: str
