"""The segment-anything family: SAM ViT-B/L/H, micro-sam's light-microscopy models, MedSAM.

All of them are segment-anything's ``Sam`` (ViT image encoder, prompt encoder, two-way-transformer
mask decoder); they differ in weights, checkpoint layout and input contract only. LiteMedSAM
(`trainables.backbones.litemedsam`) has the same prompt encoder and mask decoder and uses
`SamFamilyBackbone` too.

Batched decoding. segment-anything's ``MaskDecoder.predict_masks`` is written for one image and
many prompts: it ``repeat_interleave``s the image embedding once per prompt, so a batch of N
(image, prompt) rows would become N×N. `predict_masks_batched` does the same computation with the
decoder's own submodules for N rows, each row one image embedding with its own prompt, in one
call (MedSAM's and LiteMedSAM's decoders skip the repeat when the batch sizes agree; this is that
path). A test checks it against the stock decoder row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from trainables.backbones.backbone import Backbone
from trainables.backbones.spec import (
    MIN_MAX_NORMALISATION,
    SAM_NORMALISATION,
    BackboneSpec,
    ParamCounts,
)

SAM_INPUT_SIZE = 1024
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class VitConfig:
    """A segment-anything ViT image encoder (segment_anything/build_sam.py)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


VIT_B = VitConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
VIT_L = VitConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
VIT_H = VitConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))


def build_sam_vit(vit: VitConfig, input_size: int) -> nn.Module:
    """segment-anything's ``Sam`` with ``vit``, untrained, for a square input of ``input_size``.

    The same construction as ``segment_anything.build_sam._build_sam`` with the image size as a
    parameter (the embedding grid is ``input_size / 16``; position embeddings and the global
    blocks' relative-position tables scale with it, so only 1024 fits the official weights).
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if input_size % PATCH_SIZE:
        raise ValueError(f"SAM input size must be a multiple of {PATCH_SIZE}, got {input_size}")
    grid = input_size // PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=vit.depth,
            embed_dim=vit.embed_dim,
            img_size=input_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=vit.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=vit.global_attn_indexes,
            window_size=14,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(input_size, input_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def build_vit_b(input_size: int) -> nn.Module:
    return build_sam_vit(VIT_B, input_size)


def build_vit_l(input_size: int) -> nn.Module:
    return build_sam_vit(VIT_L, input_size)


def build_vit_h(input_size: int) -> nn.Module:
    return build_sam_vit(VIT_H, input_size)


def predict_masks_batched(
    mask_decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All mask tokens' logits (N, 4, 4h, 4w) and IoU predictions (N, 4) for N rows.

    Row i pairs ``image_embeddings[i]`` (N, 256, h, w) with ``sparse_prompt_embeddings[i]``
    (N, T, 256) and ``dense_prompt_embeddings[i]``; ``image_pe`` is (1, 256, h, w). The arithmetic
    is segment-anything's ``MaskDecoder.predict_masks`` without the per-prompt repeat, computed
    with the decoder's own submodules by `two_way_transformer` and `upscaled_masks` (the same
    sums in another order: equal to the stock modules within float32 rounding, tested).
    """
    rows = image_embeddings.shape[0]
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(rows, -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

    src = image_embeddings + dense_prompt_embeddings
    height, width = src.shape[-2:]
    hs, image_tokens = two_way_transformer(mask_decoder.transformer, src, image_pe, tokens)
    masks = upscaled_masks(mask_decoder, hs[:, 1 : 1 + mask_decoder.num_mask_tokens, :], image_tokens, height, width)
    iou_pred = mask_decoder.iou_prediction_head(hs[:, 0, :])
    return masks, iou_pred


# --- the decoder's arithmetic, made cheaper ------------------------------------------------------
#
# A cached-embedding epoch is nothing but mask-decoder steps, so their cost is the cost of a trial.
# Profiled with torch.profiler (LiteMedSAM, 8 images, box prompts, forward and backward on 2 CPU
# cores), the stock decoder spent about half of a step in its output upscaling: the backward of
# its two ConvTranspose2d layers (0.44 s) and of the GELUs after them (0.23 s), and copies between
# layouts (0.28 s in 770 copy calls); the linear layers of the attention blocks took the rest.
# The functions below compute the same thing with the same parameters:
#
# - `attention`: segment-anything's `Attention` with `F.scaled_dot_product_attention` (the fused
#   kernel; its default scale is the official 1 / sqrt(head dim)) in place of matmul, softmax, matmul.
# - `upscaled_masks`: a ConvTranspose2d of kernel 2 and stride 2 writes each input pixel's 2 x 2
#   output block from that pixel alone, so it is one matrix product over pixels. Kept in
#   pixels-by-channels layout (the transformer's own), with LayerNorm2d as `F.layer_norm` over
#   the channels, the two upscalings and the hypernetwork product are three matrix products and
#   only the small mask output is rearranged into image order.


def attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` (transformer.py) with its product-softmax-product
    as one ``F.scaled_dot_product_attention`` call."""
    heads = module.num_heads
    q = module._separate_heads(module.q_proj(q), heads)
    k = module._separate_heads(module.k_proj(k), heads)
    v = module._separate_heads(module.v_proj(v), heads)
    return module.out_proj(module._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def two_way_block(block: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                  key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayAttentionBlock.forward``, line for line, with `attention`; ``keys + key_pe``, which the
    stock code computes twice with the same keys, once."""
    if block.skip_first_layer_pe:
        queries = attention(block.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attention(block.self_attn, q, q, queries)
    queries = block.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = block.norm2(queries + attention(block.cross_attn_token_to_image, q, k, keys))
    queries = block.norm3(queries + block.mlp(queries))
    q = queries + query_pe
    keys = block.norm4(keys + attention(block.cross_attn_image_to_token, k, q, queries))
    return queries, keys


def two_way_transformer(transformer: nn.Module, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                        point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward``: (tokens (N, T, C), image tokens (N, h*w, C)). ``image_pe`` may be
    (1, C, h, w) for every row (it is added, so broadcasting stands for the stock code's copies)."""
    keys = image_embedding.flatten(2).transpose(1, 2).contiguous()  # one copy, not one per use
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    queries = point_embedding
    for layer in transformer.layers:
        queries, keys = two_way_block(layer, queries, keys, point_embedding, key_pe)
    q, k = queries + point_embedding, keys + key_pe
    queries = transformer.norm_final_attn(queries + attention(transformer.final_attn_token_to_image, q, k, keys))
    return queries, keys


def upscaled_masks(mask_decoder: nn.Module, mask_tokens: torch.Tensor, image_tokens: torch.Tensor,
                   height: int, width: int) -> torch.Tensor:
    """Mask logits (N, M, 4h, 4w) of the M mask tokens (N, M, C) over the image tokens (N, h*w, C).

    The stock ``output_upscaling`` (ConvTranspose2d 2x2/2, LayerNorm2d, GELU, ConvTranspose2d
    2x2/2, GELU) and hypernetwork product of ``MaskDecoder.predict_masks``, as matrix products
    over pixels: the kernel's four taps become four column blocks, ordered (tap row, tap column,
    channel) so that the channels stay last, and every pixel's 2 x 2 block stays beside it until
    the end, when (row, tap, tap) and (column, tap, tap) are put back in raster order.
    """
    up1, norm, act1, up2, act2 = mask_decoder.output_upscaling
    rows, _, channels = image_tokens.shape
    c1, c2 = up1.out_channels, up2.out_channels
    x = torch.addmm(up1.bias.repeat(4), image_tokens.reshape(-1, channels),
                    up1.weight.permute(0, 2, 3, 1).reshape(channels, 4 * c1))
    x = act1(F.layer_norm(x.view(-1, c1), (c1,), norm.weight, norm.bias, norm.eps))
    x = act2(torch.addmm(up2.bias.repeat(4), x, up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)))
    hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(mask_decoder.output_hypernetworks_mlps)],
                        dim=1)
    masks = torch.bmm(x.view(rows, -1, c2), hyper.transpose(1, 2))  # (N, h*w*16, M): (y, x, a, b, a2, b2)
    masks = masks.view(rows, height, width, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(rows, -1, 4 * height, 4 * width)


class SamFamilyBackbone(Backbone):
    """segment-anything-style model: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    ``encode`` returns ``{"image_embed": (N, 256, S/16, S/16)}`` (LiteMedSAM: S/4). ``decode`` takes
    prompts already in the input frame (see `Backbone.to_input_frame`), exactly as
    ``SamPredictor.predict_torch`` does: points with labels (1 foreground, 0 background, -1
    padding; a padding point is appended when there is no box, as segment-anything does), boxes
    as (x0, y0, x1, y1). Token 0 is the single-mask output, tokens 1-3 the multimask outputs.
    """

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self._eval_image_encoder()
        return {"image_embed": self.image_encoder(pixels.to(self.device, torch.float32))}

    # segment-anything's ImageEncoderViT.forward in two parts: patch embedding, position
    # embedding and blocks[:start]; then blocks[start:] and the neck. The state between them is
    # the token map entering block `start`, (N, S/16, S/16, C).

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.image_encoder.blocks)

    def encoder_prefix(self, pixels: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        encoder = self.image_encoder
        x = encoder.patch_embed(pixels)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks[:start]:
            x = block(x)
        return {"tokens": x}

    def encoder_suffix(self, state: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        encoder = self.image_encoder
        x = state["tokens"].to(self.device, torch.float32)
        for block in encoder.blocks[start:]:
            x = block(x)
        return {"image_embed": encoder.neck(x.permute(0, 3, 1, 2))}

    def tuned_encoder_modules(self, start: int) -> list[nn.Module]:
        return [*self.image_encoder.blocks[start:], self.image_encoder.neck]

    def decode(
        self,
        features: dict[str, torch.Tensor],
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (N, K, 4h, 4w) and predicted IoU (N, K), K = 3 if ``multimask`` else 1."""
        image_embed = features["image_embed"].to(self.device, torch.float32)
        rows = image_embed.shape[0]
        point_input = point_prompts(points, point_labels, rows, self.device)
        box_input = None if boxes is None else boxes.to(self.device, torch.float32).reshape(rows, 4)

        masks = None if mask_input is None else mask_input.to(self.device, torch.float32)
        sparse, dense = self.prompt_encoder(points=point_input, boxes=box_input, masks=masks)
        if sparse.shape[0] != rows:  # no prompt at all: the prompt encoder answers for one row
            sparse = sparse.expand(rows, -1, -1)
            dense = dense.expand(rows, -1, -1, -1)
        masks, iou_pred = predict_masks_batched(
            self.mask_decoder, image_embed, self.prompt_encoder.get_dense_pe(), sparse, dense
        )
        chosen = slice(1, None) if multimask else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]


def point_prompts(
    points: torch.Tensor | None, point_labels: torch.Tensor | None, rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(points float32 (N, P, 2), labels (N, P)) on ``device``, shapes checked; None if no points."""
    if points is None:
        return None
    if point_labels is None:
        raise ValueError("points need point_labels (1 foreground, 0 background, -1 padding)")
    points = points.to(device, torch.float32)
    point_labels = point_labels.to(device)
    if points.ndim != 3 or points.shape[0] != rows or points.shape[-1] != 2:
        raise ValueError(f"points must be (N={rows}, P, 2), got {tuple(points.shape)}")
    if tuple(point_labels.shape) != tuple(points.shape[:2]):
        raise ValueError(f"point_labels must be {tuple(points.shape[:2])}, got {tuple(point_labels.shape)}")
    return points, point_labels


# ------------------------------------------------------------------------------------ specs
# Parameter counts: meta-device builds of the 1024-pixel architectures (see ParamCounts).
_VIT_B_PARAMS = ParamCounts(image_encoder=89_670_912, prompt_encoder=6_220, mask_decoder=4_058_340)
_VIT_L_PARAMS = ParamCounts(image_encoder=308_278_272, prompt_encoder=6_220, mask_decoder=4_058_340)
_VIT_H_PARAMS = ParamCounts(image_encoder=637_026_048, prompt_encoder=6_220, mask_decoder=4_058_340)

_SAM_SOURCE = "https://dl.fbaipublicfiles.com/segment_anything/"
# sha256 of the official files, as listed in micro-sam's model registry (micro_sam/util.py,
# releases before 1.0, "registry_sha256").
SAM_B = BackboneSpec(
    name="sam_b",
    family="sam",
    checkpoint_file="sam_vit_b_01ec64.pth",
    source_url=_SAM_SOURCE + "sam_vit_b_01ec64.pth",
    download_url=_SAM_SOURCE + "sam_vit_b_01ec64.pth",
    format="state_dict",
    sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    input_size=SAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=SAM_NORMALISATION,
    params=_VIT_B_PARAMS,
    encoder_blocks=VIT_B.depth,
    note="Segment Anything ViT-B (Kirillov et al. 2023), trained on SA-1B natural images.",
)
SAM_L = BackboneSpec(
    name="sam_l",
    family="sam",
    checkpoint_file="sam_vit_l_0b3195.pth",
    source_url=_SAM_SOURCE + "sam_vit_l_0b3195.pth",
    download_url=_SAM_SOURCE + "sam_vit_l_0b3195.pth",
    format="state_dict",
    sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    input_size=SAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=SAM_NORMALISATION,
    params=_VIT_L_PARAMS,
    encoder_blocks=VIT_L.depth,
    note="Segment Anything ViT-L, trained on SA-1B natural images.",
)
SAM_H = BackboneSpec(
    name="sam_h",
    family="sam",
    checkpoint_file="sam_vit_h_4b8939.pth",
    source_url=_SAM_SOURCE + "sam_vit_h_4b8939.pth",
    download_url=_SAM_SOURCE + "sam_vit_h_4b8939.pth",
    format="state_dict",
    sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    input_size=SAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=SAM_NORMALISATION,
    params=_VIT_H_PARAMS,
    encoder_blocks=VIT_H.depth,
    note="Segment Anything ViT-H, trained on SA-1B natural images.",
)

_MICRO_SAM_DECODER_NOTE = (
    " A 'decoder_state' in the file (micro-sam's UNETR decoder for automatic instance "
    "segmentation) is skipped: it is not part of the SAM model fine-tuned here."
)
# Current micro-sam generalist light-microscopy models (micro_sam/util.py, models()); micro-sam
# publishes xxh128 checksums only, so no sha256 here.
MICROSAM_B = BackboneSpec(
    name="microsam_b",
    family="microsam",
    checkpoint_file="vit_b_lm.pt",
    source_url="https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/diplomatic-bug/1.2/files/vit_b.pt",
    download_url="https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/diplomatic-bug/1.2/files/vit_b.pt",
    format="micro_sam",
    sha256=None,
    input_size=SAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=SAM_NORMALISATION,
    params=_VIT_B_PARAMS,
    encoder_blocks=VIT_B.depth,
    note="micro-sam ViT-B generalist light-microscopy model vit_b_lm (Archit et al. 2025), "
    "saved as vit_b_lm.pt." + _MICRO_SAM_DECODER_NOTE,
)
MICROSAM_L = BackboneSpec(
    name="microsam_l",
    family="microsam",
    checkpoint_file="vit_l_lm.pt",
    source_url="https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/idealistic-rat/1.2/files/vit_l.pt",
    download_url="https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/idealistic-rat/1.2/files/vit_l.pt",
    format="micro_sam",
    sha256=None,
    input_size=SAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=SAM_NORMALISATION,
    params=_VIT_L_PARAMS,
    encoder_blocks=VIT_L.depth,
    note="micro-sam ViT-L generalist light-microscopy model vit_l_lm, saved as vit_l_lm.pt."
    + _MICRO_SAM_DECODER_NOTE,
)
# The last ViT-H generalist micro-sam published (v1, 2023); micro-sam dropped it in January 2024
# (commit 102c4a4, "Update to new finetuned models"). sha256 from micro-sam's registry of that time.
MICROSAM_H = BackboneSpec(
    name="microsam_h",
    family="microsam",
    checkpoint_file="vit_h_lm.pth",
    source_url="https://zenodo.org/record/8250299",
    download_url="https://zenodo.org/record/8250299/files/vit_h_lm.pth?download=1",
    format="micro_sam",
    sha256="9a65ee0cddc05a98d60469a12a058859c89dc3ea3ba39fed9b90d786253fbf26",
    input_size=SAM_INPUT_SIZE,
    resize="longest_side",
    normalisation=SAM_NORMALISATION,
    params=_VIT_H_PARAMS,
    encoder_blocks=VIT_H.depth,
    note="LEGACY FILE THE USER SUPPLIES: micro-sam no longer publishes a ViT-H generalist "
    "light-microscopy model; this reads the legacy v1 vit_h_lm.pth (zenodo record 8250299, 2023) "
    "or your own micro-sam ViT-H file given in weights.files.microsam_h." + _MICRO_SAM_DECODER_NOTE,
)
MEDSAM = BackboneSpec(
    name="medsam",
    family="medsam",
    checkpoint_file="medsam_vit_b.pth",
    source_url="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
    download_url=None,
    format="state_dict",
    sha256=None,
    input_size=SAM_INPUT_SIZE,
    resize="square",
    normalisation=MIN_MAX_NORMALISATION,
    params=_VIT_B_PARAMS,
    encoder_blocks=VIT_B.depth,
    note="MedSAM ViT-B (Ma et al. 2024), SAM fine-tuned on 1.5M medical image-mask pairs with box "
    "prompts. Official inference (MedSAM_Inference.py) stretches the image to 1024x1024 and "
    "min-max normalises it; so does this entry. The official source is a Google Drive folder: "
    "download medsam_vit_b.pth by hand.",
)
