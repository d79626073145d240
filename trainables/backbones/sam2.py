"""SAM 2.1 (Hiera tiny / small / base+ / large) through the ``sam2`` package, on single images.

What is cached, and what stays frozen. SAM 2's mask decoder takes two high-resolution feature
maps besides the image embedding. ``SAM2ImagePredictor.set_image`` computes them once per image:
``SAM2Base.forward_image`` runs the Hiera encoder and FPN neck and then projects the two
highest-resolution levels with the *decoder's* ``conv_s0`` (256 -> 32 channels) and ``conv_s1``
(256 -> 64 channels); the lowest-resolution level gets ``no_mem_embed`` added (the model was
trained with it there when ``directly_add_no_mem_embed``). `Sam2Backbone.encode` does exactly this
and returns the maps *after* the projections:

    {"image_embed": (N, 256, S/16, S/16), "high_res_0": (N, 32, S/4, S/4), "high_res_1": (N, 64, S/8, S/8)}

so ``sam_mask_decoder.conv_s0`` and ``conv_s1`` are part of the frozen encoder side: they are
excluded from `trainable_parameters` and from the decoder state of trial checkpoints. (The other
choice, caching the 256-channel maps before the projection, would make cache entries 8x and 4x
larger at those resolutions.)

Decoding mirrors ``SAM2ImagePredictor._predict``: a box becomes two points labelled 2 and 3 placed
before the clicks, everything goes to the prompt encoder as points (so a padding point is always
appended), and the decoder runs with ``repeat_image=False``, which is already one row per
(image, prompt). The SAM 2.1 configs give ``iou_prediction_use_sigmoid: true``, so the IoU
predictions are in [0, 1]. The object-score head is computed but not applied, as in the image
predictor. The models are built from the YAML as it ships, without the "dynamic multimask via
stability" fallback that ``build_sam2(apply_postprocessing=True)`` (the official builder's
default) adds, so token 0 is the single-mask output in training and in the evaluation of a
fine-tuned decoder (the token that was trained). Zero-shot evaluation switches the fallback on
(`use_official_inference`), with the builder's delta 0.05 and threshold 0.98: a single-mask
request then falls back to the best of the three multimask outputs when token 0's mask is
unstable, exactly as ``SAM2ImagePredictor`` on a model from ``build_sam2`` does.

Hydra. ``sam2/__init__.py`` calls ``initialize_config_module("sam2")`` at import, which leaves a
process-wide ``GlobalHydra`` behind (and breaks another ``initialize`` later, e.g. in a Ray
worker that also uses Hydra). Here sam2 is imported through `import_sam2`, which clears that state
again if it was not there before, and models are built without ``compose``: the YAML is read
from the package with OmegaConf and passed to ``hydra.utils.instantiate``.
"""

from __future__ import annotations

import importlib.resources
import sys

import torch
from torch import nn

from trainables.backbones.backbone import Backbone
from trainables.backbones.sam import point_prompts
from trainables.backbones.spec import SAM2_NORMALISATION, BackboneSpec, ParamCounts

SAM2_INPUT_SIZE = 1024
SAM2_STRIDE = 16
# Hiera's first stage runs at S/4 and tiles an 8x8 window position embedding over it.
_SMALLEST_SIZE = 32

CONFIG_FILES = {
    "sam2_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2_bplus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def import_sam2() -> None:
    """Import the ``sam2`` package without leaving Hydra's global state initialised by it."""
    if "sam2" in sys.modules:
        return
    from hydra.core.global_hydra import GlobalHydra

    initialised_before = GlobalHydra.instance().is_initialized()
    import sam2  # noqa: F401  (its __init__ initialises GlobalHydra)

    if not initialised_before and GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


def build_sam2_model(config_file: str, input_size: int) -> nn.Module:
    """``SAM2Base`` from a packaged SAM 2.1 YAML, untrained, with ``image_size = input_size``."""
    if input_size % SAM2_STRIDE or input_size < _SMALLEST_SIZE:
        raise ValueError(
            f"SAM 2 input size must be a multiple of {SAM2_STRIDE} and >= {_SMALLEST_SIZE}, got {input_size}"
        )
    import_sam2()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    text = importlib.resources.files("sam2").joinpath(config_file).read_text()
    config = OmegaConf.create(text)
    config.model.image_size = input_size
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


def build_sam2_t(input_size: int) -> nn.Module:
    return build_sam2_model(CONFIG_FILES["sam2_t"], input_size)


def build_sam2_s(input_size: int) -> nn.Module:
    return build_sam2_model(CONFIG_FILES["sam2_s"], input_size)


def build_sam2_bplus(input_size: int) -> nn.Module:
    return build_sam2_model(CONFIG_FILES["sam2_bplus"], input_size)


def build_sam2_l(input_size: int) -> nn.Module:
    return build_sam2_model(CONFIG_FILES["sam2_l"], input_size)


class Sam2Backbone(Backbone):
    """SAM 2.1 on single images; see the module docstring for what encode caches."""

    IMAGE_ENCODER = "image_encoder"
    PROMPT_ENCODER = "sam_prompt_encoder"
    MASK_DECODER = "sam_mask_decoder"
    FROZEN_DECODER_PREFIXES = ("conv_s0.", "conv_s1.")

    def use_official_inference(self, enabled: bool) -> None:
        """Switch `build_sam2(apply_postprocessing=True)`'s dynamic multimask via stability on or off."""
        decoder = self.mask_decoder
        decoder.dynamic_multimask_via_stability = bool(enabled)
        decoder.dynamic_multimask_stability_delta = 0.05
        decoder.dynamic_multimask_stability_thresh = 0.98

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self._eval_image_encoder()
        backbone_out = self.model.forward_image(pixels.to(self.device, torch.float32))  # applies conv_s0/conv_s1
        return self._decoder_features(backbone_out["backbone_fpn"])

    def _decoder_features(self, backbone_fpn: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`SAM2ImagePredictor.set_image`'s features from the FPN levels (after conv_s0/conv_s1)."""
        model = self.model
        feature_maps = backbone_fpn[-model.num_feature_levels :]
        image_embed = feature_maps[-1]
        if model.directly_add_no_mem_embed:
            image_embed = image_embed + model.no_mem_embed.reshape(1, -1, 1, 1)
        return {"image_embed": image_embed, "high_res_0": feature_maps[0], "high_res_1": feature_maps[1]}

    # Hiera's forward and SAM2Base.forward_image in two parts: patch and position embedding and
    # blocks[:start]; then blocks[start:], the FPN neck (which reads every stage's output), the
    # scalp and conv_s0/conv_s1. The state between them is the token map entering block `start`,
    # (N, h, w, C), plus the outputs of the stages that ended before it (`stage_<i>`, (N, C, h, w)).

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.image_encoder.trunk.blocks)

    def _stage_output(self, index: int) -> bool:
        trunk = self.image_encoder.trunk
        return index == trunk.stage_ends[-1] or (index in trunk.stage_ends and trunk.return_interm_layers)

    def encoder_prefix(self, pixels: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        trunk = self.image_encoder.trunk
        x = trunk.patch_embed(pixels)
        x = x + trunk._get_pos_embed(x.shape[1:3])
        state = {}
        for index, block in enumerate(trunk.blocks[:start]):
            x = block(x)
            if self._stage_output(index):
                state[f"stage_{len(state)}"] = x.permute(0, 3, 1, 2)
        return {**state, "tokens": x}

    def encoder_suffix(self, state: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        encoder, model = self.image_encoder, self.model
        outputs = [state[f"stage_{i}"].to(self.device, torch.float32) for i in range(len(state) - 1)]
        x = state["tokens"].to(self.device, torch.float32)
        for index in range(start, len(encoder.trunk.blocks)):
            x = encoder.trunk.blocks[index](x)
            if self._stage_output(index):
                outputs.append(x.permute(0, 3, 1, 2))
        features, _ = encoder.neck(outputs)
        if encoder.scalp > 0:
            features = features[: -encoder.scalp]
        if model.use_high_res_features_in_sam:
            features = [model.sam_mask_decoder.conv_s0(features[0]), model.sam_mask_decoder.conv_s1(features[1]),
                        *features[2:]]
        return self._decoder_features(features)

    def tuned_encoder_modules(self, start: int) -> list[nn.Module]:
        return [*self.image_encoder.trunk.blocks[start:], self.image_encoder.neck]

    def decode(
        self,
        features: dict[str, torch.Tensor],
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (N, K, S/4, S/4) and predicted IoU (N, K), K = 3 if ``multimask`` else 1."""
        image_embed = features["image_embed"].to(self.device, torch.float32)
        high_res = [features[key].to(self.device, torch.float32) for key in ("high_res_0", "high_res_1")]
        rows = image_embed.shape[0]

        point_input = point_prompts(points, point_labels, rows, self.device)
        coords = labels = None
        if boxes is not None:
            coords = boxes.to(self.device, torch.float32).reshape(rows, 2, 2)
            label_dtype = point_input[1].dtype if point_input is not None else torch.int64
            labels = torch.tensor([[2, 3]], dtype=label_dtype, device=self.device).expand(rows, 2)
        if point_input is not None:
            coords = point_input[0] if coords is None else torch.cat([coords, point_input[0]], dim=1)
            labels = point_input[1] if labels is None else torch.cat([labels, point_input[1]], dim=1)

        sparse, dense = self.prompt_encoder(
            points=None if coords is None else (coords, labels), boxes=None,
            masks=None if mask_input is None else mask_input.to(self.device, torch.float32),
        )
        if sparse.shape[0] != rows:  # no prompt at all: the prompt encoder answers for one row
            sparse = sparse.expand(rows, -1, -1)
            dense = dense.expand(rows, -1, -1, -1)
        masks, iou_pred, _, _ = self.mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        return masks, iou_pred


_SAM2_SOURCE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
# Parameter counts: meta-device builds of the 1024-pixel architectures (see ParamCounts); "other"
# is SAM 2's video memory machinery, loaded from the checkpoint but unused on single images.
_SAM2_PROMPT = 6_220
_SAM2_DECODER = 4_215_109
_SAM2_OTHER = 7_522_033
_SAM2_NOTE = (
    " Trained on SA-1B and SA-V video (Ravi et al. 2024). Its decoder's conv_s0/conv_s1 "
    "projections run at encode time and stay frozen. Meta publishes no checksums."
)


def _sam2_spec(name: str, file: str, image_encoder_params: int, size_name: str, blocks: int) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        family="sam2",
        checkpoint_file=file,
        source_url=_SAM2_SOURCE + file,
        download_url=_SAM2_SOURCE + file,
        format="model_key",
        sha256=None,
        input_size=SAM2_INPUT_SIZE,
        resize="square",
        normalisation=SAM2_NORMALISATION,
        params=ParamCounts(
            image_encoder=image_encoder_params,
            prompt_encoder=_SAM2_PROMPT,
            mask_decoder=_SAM2_DECODER,
            other=_SAM2_OTHER,
        ),
        encoder_blocks=blocks,
        note=f"SAM 2.1 Hiera-{size_name} ({CONFIG_FILES[name]} in the sam2 package)." + _SAM2_NOTE,
    )


# Hiera blocks per stage (the configs' stages): T 1+2+7+2, S 1+2+11+2, B+ 2+3+16+3, L 2+6+36+4.
SAM2_T = _sam2_spec("sam2_t", "sam2.1_hiera_tiny.pt", 27_219_136, "T", 12)
SAM2_S = _sam2_spec("sam2_s", "sam2.1_hiera_small.pt", 34_316_992, "S", 16)
SAM2_BPLUS = _sam2_spec("sam2_bplus", "sam2.1_hiera_base_plus.pt", 69_106_816, "B+", 24)
SAM2_L = _sam2_spec("sam2_l", "sam2.1_hiera_large.pt", 212_703_280, "L", 48)
