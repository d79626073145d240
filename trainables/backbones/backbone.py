"""The `Backbone` object: one built model plus its input contract.

This is what the embedding cache and the decoder fine-tune call. The image geometry lives here,
shared by every family and chosen by the spec's ``resize``:

- ``longest_side`` (segment-anything, micro-sam, LiteMedSAM): the image is resized so its longest
  side is S = ``input_size`` keeping the aspect ratio (new side = ``int(side * S / max(H, W) +
  0.5)``, segment-anything's ``ResizeLongestSide.get_preprocess_shape``), normalised, then padded
  with zeros at the bottom and right to S×S. Coordinates scale by ``new_w / W`` and ``new_h / H``.
  Mask logits are upsampled to S×S, the padding is cut off, and the rest is resized to H×W.
- ``square`` (SAM 2, MedSAM): the image is stretched to S×S; coordinates scale by ``S / W`` and
  ``S / H``; mask logits are resized straight to H×W.

Resizing is bilinear with antialiasing on float values. SAM 2's own transform does exactly this;
segment-anything resizes with PIL (bilinear), LiteMedSAM with OpenCV (area) and MedSAM with skimage
(bicubic), on uint8, so values can differ by a few grey levels at sharp edges (a test bounds the
difference to segment-anything's pipeline below one grey level on a smooth image). Subclasses
supply ``encode`` and ``decode`` and say where the image encoder, prompt encoder and mask decoder
sit in the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foundation.errors import UserError
from trainables.backbones.adaptation import Adaptation, add_lora
from trainables.backbones.spec import BackboneSpec, ParamCounts


def longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the longest side equal to ``size``, as segment-anything rounds it."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def count_parameters(model: nn.Module, backbone_class: type[Backbone]) -> ParamCounts:
    """Parameters of ``model`` by part, the parts named by ``backbone_class``."""

    def count(module: nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    image_encoder = count(getattr(model, backbone_class.IMAGE_ENCODER))
    prompt_encoder = count(getattr(model, backbone_class.PROMPT_ENCODER))
    mask_decoder = count(getattr(model, backbone_class.MASK_DECODER))
    return ParamCounts(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        other=count(model) - image_encoder - prompt_encoder - mask_decoder,
    )


def _with_prefix_removed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


class _NoImageEncoder(nn.Module):
    """Stands in for an image encoder a trial does not build (`Backbone.drop_image_encoder`)."""

    def __init__(self, backbone: str):
        super().__init__()
        self.backbone = backbone

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.backbone} was built without its image encoder (a trial on cached features); "
                           f"its images must be encoded into the embedding cache first")


class Backbone:
    """A frozen image encoder with a trainable prompt encoder and mask decoder.

    Attributes: ``spec`` (its `BackboneSpec`), ``model`` (the whole ``nn.Module``), ``input_size``
    (S, the square encoder input side), ``weights_id`` (sha256 of the checkpoint file, or
    ``"random"``), ``checkpoint_path`` (None for random weights), ``device``.

    At build time the image encoder (and everything outside the two trainable parts) has
    ``requires_grad=False``; the mask decoder's trainable parameters are on, the prompt encoder's
    off, until `trainable_parameters` says otherwise.
    """

    IMAGE_ENCODER: ClassVar[str] = "image_encoder"
    PROMPT_ENCODER: ClassVar[str] = "prompt_encoder"
    MASK_DECODER: ClassVar[str] = "mask_decoder"
    # Mask-decoder parameters that are used at encode time and therefore stay frozen.
    FROZEN_DECODER_PREFIXES: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        *,
        input_size: int,
        weights_id: str,
        checkpoint_path: Path | None,
        device: torch.device | str,
    ) -> None:
        self.spec = spec
        self.model = model
        self.input_size = int(input_size)
        self.weights_id = weights_id
        self.checkpoint_path = checkpoint_path
        self.device = torch.device(device)
        self.adaptation = Adaptation()
        self.trainable_parameters(train_prompt_encoder=False)

    # ----------------------------------------------------------------------------- parts
    @property
    def image_encoder(self) -> nn.Module:
        return getattr(self.model, self.IMAGE_ENCODER)

    @property
    def prompt_encoder(self) -> nn.Module:
        return getattr(self.model, self.PROMPT_ENCODER)

    @property
    def mask_decoder(self) -> nn.Module:
        return getattr(self.model, self.MASK_DECODER)

    @property
    def embedding_hw(self) -> tuple[int, int]:
        """(h, w) of the image embedding grid: input_size / 16 (LiteMedSAM: / 4)."""
        height, width = self.prompt_encoder.image_embedding_size
        return int(height), int(width)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.spec.name!r}, input_size={self.input_size}, "
            f"weights_id={self.weights_id[:12]!r}, device={str(self.device)!r})"
        )

    # ----------------------------------------------------------------------------- images
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB images (N, H, W, 3), all one size, -> encoder input (N, 3, S, S) float32.

        Resize as the spec says (see the module docstring), then the spec's normalisation:
        mean/std per channel, or min-max to [0, 1] per image over the resized image before padding
        (the MedSAM/LiteMedSAM recipe: ``(x - x.min()) / clip(x.max() - x.min(), 1e-8)``).
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"preprocess expects uint8 images shaped (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        size = self.input_size
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        pixels = pixels.permute(0, 3, 1, 2).to(torch.float32)
        height, width = pixels.shape[-2:]
        new_h, new_w = (size, size) if self.spec.resize == "square" else longest_side_shape(height, width, size)
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)

        normalisation = self.spec.normalisation
        if normalisation.kind == "min_max":
            low = pixels.amin(dim=(1, 2, 3), keepdim=True)
            high = pixels.amax(dim=(1, 2, 3), keepdim=True)
            pixels = (pixels - low) / (high - low).clamp_min(1e-8)
        else:
            mean = torch.tensor(normalisation.mean, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(normalisation.std, device=self.device).view(1, 3, 1, 1)
            pixels = (pixels / normalisation.value_scale - mean) / std

        if (new_h, new_w) != (size, size):
            pixels = F.pad(pixels, (0, size - new_w, 0, size - new_h))
        return pixels.contiguous()

    def to_input_frame(self, coords_xy: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """Map (x, y) coordinates in original-image pixels to the encoder's input frame.

        ``coords_xy`` is (..., 2); a box (x0, y0, x1, y1) is two points, so (..., 4) is accepted
        too. Returns float32 of the same shape.
        """
        coords = np.array(coords_xy, dtype=np.float64, copy=True)
        if coords.shape[-1] not in (2, 4):
            raise ValueError(f"coordinates must end in 2 (x, y) or 4 (box), got shape {coords.shape}")
        height, width = original_hw
        if self.spec.resize == "square":
            scale_x, scale_y = self.input_size / width, self.input_size / height
        else:
            new_h, new_w = longest_side_shape(height, width, self.input_size)
            scale_x, scale_y = new_w / width, new_h / height
        coords[..., 0::2] *= scale_x
        coords[..., 1::2] *= scale_y
        return coords.astype(np.float32)

    def postprocess(self, logits: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
        """Mask logits (N, K, lh, lw) -> logits at the original size (N, K, H, W), differentiably."""
        height, width = int(original_hw[0]), int(original_hw[1])
        if self.spec.resize == "square":
            return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        size = self.input_size
        if tuple(logits.shape[-2:]) != (size, size):
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        new_h, new_w = longest_side_shape(height, width, size)
        logits = logits[..., :new_h, :new_w]
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------- model
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(
        self,
        features: dict[str, torch.Tensor],
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and predicted IoU for N rows of prompts in the input frame. `mask_input`
        (N, 1, 4h, 4w): earlier low-resolution logits fed back as a dense prompt (SAM's and SAM 2's
        `mask_input`, what corrective clicks use), or None."""
        raise NotImplementedError

    def use_official_inference(self, enabled: bool) -> None:
        """Decode with the official predictor's inference-time settings (zero-shot evaluation).

        Only SAM 2 has such a setting (`Sam2Backbone`); for the other families the official
        predictor decodes exactly as `decode` does, so this does nothing.
        """

    # ----------------------------------------------------------------------------- adaptation
    # What a family calls a block and how its encoder runs in two parts (the frozen prefix, then
    # blocks[start:] and the neck); `trainables.backbones.adaptation` says what each arm trains.

    def encoder_blocks(self) -> list[nn.Module]:
        """The image encoder's blocks, in order (see `trainables.backbones.adaptation`)."""
        raise NotImplementedError

    def encoder_prefix(self, pixels: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """The encoder up to block `start` (excluded): what `encoder_suffix` resumes from."""
        raise NotImplementedError

    def encoder_suffix(self, state: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        """The decoder's features (what `encode` returns) from `encoder_prefix(pixels, start)`."""
        raise NotImplementedError

    def tuned_encoder_modules(self, start: int) -> list[nn.Module]:
        """The encoder modules `encoder_suffix(state, start)` runs: the late_blocks arm trains them."""
        raise NotImplementedError

    @property
    def encoder_depth(self) -> int:
        return len(self.encoder_blocks())

    def cache_features(self, pixels: torch.Tensor, tuned_blocks: int | None = None) -> dict[str, torch.Tensor]:
        """What a cache entry holds for encoder input `pixels`: the encoder's output (`encode`), or,
        with `tuned_blocks` k, the frozen prefix's output before the last k blocks."""
        if tuned_blocks is None:
            return self.encode(pixels)
        self._eval_image_encoder()
        with torch.no_grad():
            return self.encoder_prefix(pixels.to(self.device, torch.float32), self.encoder_depth - tuned_blocks)

    def adapt(self, adaptation: Adaptation) -> None:
        """Make this model train as `adaptation` says (LoRA adapters are added here); once per build."""
        if adaptation.kind == "decoder":
            return
        if self.adaptation.kind != "decoder":
            raise RuntimeError(f"{self.spec.name} was adapted already ({self.adaptation.kind})")
        depth = self.encoder_depth
        if adaptation.source == "prefix" and not 1 <= adaptation.blocks <= depth:
            raise UserError(f"adapt_blocks is {adaptation.blocks}, but {self.spec.name}'s encoder has {depth} "
                            f"blocks: set factors.adapt_blocks between 1 and {depth}.")
        if adaptation.kind == "lora":
            start = adaptation.first_tuned_block(depth)
            add_lora(self.encoder_blocks()[start:], adaptation.lora_rank, adaptation.lora_alpha)
        self.adaptation = adaptation
        self.trainable_parameters(train_prompt_encoder=False)

    def adapted_features(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's features from what a trial's feature source gives (`Adaptation.source`):
        the cached embeddings as they are, the cached prefix through the tuned blocks and the
        neck, or ``{"pixels": encoder input}`` through the whole encoder."""
        source = self.adaptation.source
        if source == "embeddings":
            return features
        if source == "pixels":
            features = self.encoder_prefix(features["pixels"].to(self.device, torch.float32), 0)
        return self.encoder_suffix(features, self.adaptation.first_tuned_block(self.encoder_depth))

    def train_mode(self, training: bool) -> None:
        """Training or evaluation mode. A frozen encoder always runs in eval mode, and so do the
        BatchNorm layers of a tuned one (TinyViT's): their running statistics are the pretrained
        ones and stay so (a batch of a few slices would estimate them poorly)."""
        self.model.train(training)
        if not training:
            return
        if self.adaptation.kind == "decoder":
            self._eval_image_encoder()
        else:
            for module in self.image_encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _frozen_decoder_prefixes(self) -> tuple[str, ...]:
        # SAM 2's conv_s0/conv_s1 run at encode time: frozen, unless the trial runs the neck itself.
        return () if self.adaptation.kind in ("late_blocks", "full") else self.FROZEN_DECODER_PREFIXES

    def _trainable_decoder_items(self):
        frozen = self._frozen_decoder_prefixes()
        for name, parameter in self.mask_decoder.named_parameters():
            if not name.startswith(frozen):
                yield name, parameter

    def _tuned_encoder_items(self) -> list[tuple[str, nn.Parameter]]:
        """(name within the image encoder, parameter) of what the adaptation trains in the encoder."""
        kind = self.adaptation.kind
        items = list(self.image_encoder.named_parameters())
        if kind == "full":
            return items
        if kind == "lora":
            return [(name, p) for name, p in items if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")]
        if kind == "late_blocks":
            tuned = {id(p) for module in self.tuned_encoder_modules(self.encoder_depth - self.adaptation.blocks)
                     for p in module.parameters()}
            return [(name, p) for name, p in items if id(p) in tuned]
        return []

    def trainable_parameters(self, train_prompt_encoder: bool) -> list[nn.Parameter]:
        """The parameters a fine-tune updates: the mask decoder, what the adaptation trains in the
        encoder, optionally the prompt encoder.

        Also sets ``requires_grad`` so that exactly these parameters need gradients and the rest
        of the model (the frozen encoder above all) stays frozen.
        """
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        parameters = [parameter for _, parameter in self._trainable_decoder_items()]
        parameters += [parameter for _, parameter in self._tuned_encoder_items()]
        if train_prompt_encoder:
            parameters += list(self.prompt_encoder.parameters())
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def _trained_items(self) -> list[tuple[str, torch.Tensor]]:
        """(name as in the official model, tensor) of everything `trained_state_dict` holds."""
        frozen = self._frozen_decoder_prefixes()
        items = [(f"mask_decoder.{name}", tensor) for name, tensor in self.mask_decoder.state_dict().items()
                 if not name.startswith(frozen)]
        items += [(f"prompt_encoder.{name}", tensor) for name, tensor in self.prompt_encoder.state_dict().items()]
        items += [(f"image_encoder.{name}", parameter) for name, parameter in self._tuned_encoder_items()]
        return items

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of what a trial may train, named as in the official model (the encoder's
        entries are ``image_encoder.<name>``, its LoRA adapters ``...qkv.lora_a``): ``mask_decoder.*``
        (less projections frozen at encode time), ``prompt_encoder.*`` (always included: it is
        small, and this way a checkpoint restores whether or not it was trained), and the
        encoder parameters the adaptation trains. A trial's checkpoints hold this and nothing else."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self._trained_items()}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `trained_state_dict` returned (onto a model built from the official
        checkpoint and adapted the same way); keys and shapes must match exactly."""
        expected = {name for name, _ in self._trained_items()}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(
                f"Trained state does not fit backbone '{self.spec.name}' ({self.adaptation.kind}): missing "
                f"{missing[:4]}, unexpected {unexpected[:4]}. Was it saved from another backbone or adaptation?"
            )
        parts = {"mask_decoder.": self.mask_decoder, "prompt_encoder.": self.prompt_encoder,
                 "image_encoder.": self.image_encoder}
        try:
            for prefix, module in parts.items():
                part = _with_prefix_removed(state, prefix)
                if part:  # the keys were checked above; strict loading would ask for every frozen one
                    module.load_state_dict(part, strict=False)
        except RuntimeError as error:
            raise UserError(
                f"Trained state does not fit backbone '{self.spec.name}' "
                f"(input size {self.input_size}): {str(error).splitlines()[0]}"
            ) from None
        self.train_mode(self.model.training)  # modules that cache derived weights in eval mode (TinyViT) renew them

    def param_counts(self) -> dict[str, int]:
        """Parameters of this built model by part (image_encoder, prompt_encoder, mask_decoder,
        other, total) plus ``trainable_mask_decoder`` (the mask decoder less frozen projections).
        At the spec's input size these equal ``spec.params``."""
        counts = count_parameters(self.model, type(self)).as_dict()
        counts["trainable_mask_decoder"] = sum(parameter.numel() for _, parameter in self._trainable_decoder_items())
        return counts

    def drop_image_encoder(self) -> None:
        """Remove the image encoder (a trial on cached features never runs it) and free its memory.

        The model then holds the prompt encoder, the mask decoder and the family's small other
        parts only; `encode` raises. Parameter counts for reports come from `spec.params`.
        """
        setattr(self.model, self.IMAGE_ENCODER, _NoImageEncoder(self.spec.name))

    def _eval_image_encoder(self) -> None:
        # The encoder is frozen: always run it in eval mode, even if a caller put the whole model
        # in training mode (TinyViT has BatchNorm, whose statistics must not move).
        self.image_encoder.eval()
