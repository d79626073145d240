"""Encoder adaptation (trainables/backbones/adaptation.py): the split encoder, the partial-encoder
cache, what each arm trains, LoRA, and what a trial's checkpoint holds.

One backbone per family: SAM ViT-B and SAM 2 Hiera-T with random weights at 64 pixels, and
LiteMedSAM's TinyViT with its real packaged weights (it has one input size, 256). The reference
for "the full encoder's output" is the official forward (`Backbone.encode`: segment-anything's
``ImageEncoderViT.forward``, sam2's ``SAM2Base.forward_image``, TinyViT's ``forward``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from foundation.embedding_cache import EmbeddingCache
from trainables.backbones import BACKBONES, build_backbone, resolve_weights
from trainables.backbones.adaptation import Adaptation, merge_lora
from trainables.backbones.parameter_counts import _MetaDeviceBuild
from trainables.fine_tune import DecoderFineTune, EncoderInput, EncoderInTheLoop, MappedEmbeddings, TrialSpec

SMALL = 64
FAMILIES = ["sam_b", "sam2_t", "litemedsam"]
TUNED = 2


def build(name: str, weights: str | None = None):
    if name == "litemedsam":
        return build_backbone(name, weights or str(resolve_weights("litemedsam", None, {})))
    return build_backbone(name, weights or "random", input_size=SMALL)


def pixels(backbone, n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 96, 80, 3), generator=generator, dtype=torch.uint8).numpy()
    return backbone.preprocess(images)


class FewImages:
    """The fixture's dataset with its first `n` training images (and their views) and `n` validation
    and test slices: a training epoch on it is a few steps (LiteMedSAM's encoder takes about a
    second per image on two CPU cores)."""

    def __init__(self, dataset, n: int = 2):
        self.dataset = dataset
        self.keep = {r.image_id for r in dataset.records_for("train")[:n]}
        self.n = n

    def records_for(self, split: str, views: bool = False):
        records = self.dataset.records_for(split, views=views)
        return [r for r in records if r.image_id in self.keep] if split == "train" else records[:self.n]

    def __getattr__(self, name):
        return getattr(self.dataset, name)


def max_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-6)) for k in a)


def state_of(backbone) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in backbone.model.named_parameters()}


def spec_for(name: str, **changes) -> TrialSpec:
    spec = TrialSpec(trial_id="adapt", backbone=name, weights="random", input_size=None if name == "litemedsam" else SMALL,
                     epochs=1, batch_size=4, prompt="box", lr=1e-3)
    return dataclasses.replace(spec, **changes)


def test_every_spec_states_its_encoders_block_count():
    for name, entry in BACKBONES.items():
        with _MetaDeviceBuild("meta"):
            model = entry.build_model(entry.spec.input_size)
        backbone = entry.backbone_class(entry.spec, model, input_size=entry.spec.input_size, weights_id="meta",
                                        checkpoint_path=None, device="meta")
        assert backbone.encoder_depth == entry.spec.encoder_blocks, name


@pytest.mark.parametrize("name", FAMILIES)
def test_a_late_block_trial_on_the_cached_prefix_computes_the_full_encoder_and_trains_only_its_part(
        name, phantom_dataset, tmp_path):
    dataset = FewImages(phantom_dataset[1])
    backbone = build(name)
    x = pixels(backbone)
    reference = backbone.encode(x)
    depth = backbone.encoder_depth
    # the split at the late-block cut (every cut for the small ViT) equals the official forward in fp32
    for start in (range(depth + 1) if name == "sam_b" else (depth - TUNED,)):
        with torch.no_grad():
            split = backbone.encoder_suffix(backbone.encoder_prefix(x, start), start)
        assert max_error(split, reference) < 1e-5, (name, start)

    # the partial-encoder cache holds the prefix, rounded to float16 as every entry is
    records = dataset.records_for("train", views=True)
    cache = EmbeddingCache.for_backbone(tmp_path, backbone, dataset.key, tuned_blocks=TUNED)
    assert cache.namespace.name.endswith(f"-prefix{TUNED}")
    cache.ensure(backbone, dataset, records, verify=False, progress=False)
    image = np.stack([dataset.load(records[0])[0]])
    expected = backbone.cache_features(backbone.preprocess(image), TUNED)
    stored = cache.load_batch(records[:1])
    assert stored.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(stored[key], expected[key].half().float(), rtol=0, atol=0)

    # one training step of the late_blocks arm changes the tuned blocks, the neck and the decoder only
    backbone.adapt(Adaptation("late_blocks", TUNED))
    before = state_of(backbone)
    spec = spec_for(name, adaptation="late_blocks", adapt_blocks=TUNED, lr=1e-2, batch_size=2)
    fine_tune = DecoderFineTune(spec, dataset, backbone, MappedEmbeddings(cache), epochs=1)
    fine_tune.train_epoch(1)
    changed = {n for n, p in backbone.model.named_parameters() if not torch.equal(p, before[n])}
    tuned = {f"{backbone.IMAGE_ENCODER}.{n}" for n, p in backbone.image_encoder.named_parameters()
             if any(p is q for m in backbone.tuned_encoder_modules(depth - TUNED) for q in m.parameters())}
    decoder = {f"{backbone.MASK_DECODER}.{n}" for n, _ in backbone.mask_decoder.named_parameters()}
    assert changed <= tuned | decoder
    assert changed & tuned and changed & decoder
    frozen_blocks = {f"{backbone.IMAGE_ENCODER}.{n}" for n, p in backbone.image_encoder.named_parameters()
                     if any(p is q for block in backbone.encoder_blocks()[:depth - TUNED] for q in block.parameters())}
    assert frozen_blocks and not changed & frozen_blocks
    assert not any(n.startswith(backbone.PROMPT_ENCODER) for n in changed)
    assert fine_tune.trainable_params == sum(before[n].numel() for n in tuned | decoder)


def test_the_cached_prefix_and_the_prefix_computed_in_the_loop_train_the_same_numbers(phantom_dataset, tmp_path):
    """What benchmarks/adaptation_cost.py compares: the same trial fed by the cache or by the prefix
    run for every batch (rounded to float16 like a cache entry) takes the same steps."""
    dataset = FewImages(phantom_dataset[1], 4)
    runs = []
    for source in ("cache", "loop"):
        backbone = build("sam_b")
        backbone.adapt(Adaptation("late_blocks", TUNED))
        if source == "cache":
            cache = EmbeddingCache.for_backbone(tmp_path, backbone, dataset.key, tuned_blocks=TUNED)
            cache.ensure(backbone, dataset, dataset.records_for("train", views=True), verify=False, progress=False)
            features = MappedEmbeddings(cache)
        else:
            features = EncoderInTheLoop(backbone, dataset, max_batch=1, tuned_blocks=TUNED)  # as the cache fills
        fine_tune = DecoderFineTune(spec_for("sam_b", adaptation="late_blocks"), dataset, backbone, features, epochs=1)
        runs.append((fine_tune.train_epoch(1), backbone.trained_state_dict()))
    (loss_cache, state_cache), (loss_loop, state_loop) = runs
    assert loss_cache == loss_loop
    assert all(torch.equal(state_cache[k], state_loop[k]) for k in state_cache)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_starts_as_the_pretrained_model_and_merges_into_it_after_training(name, phantom_dataset):
    dataset = FewImages(phantom_dataset[1])
    backbone = build(name)
    x = pixels(backbone)
    pretrained = backbone.encode(x)
    backbone.adapt(Adaptation("lora", lora_rank=4, lora_alpha=8.0))
    adapters = [n for n, _ in backbone.image_encoder.named_parameters() if n.endswith(("lora_a", "lora_b"))]
    assert len(adapters) == 2 * 2 * backbone.encoder_depth  # A and B on qkv and proj of every block
    with torch.no_grad():
        untrained = backbone.adapted_features({"pixels": x})
    for key in pretrained:
        assert torch.equal(untrained[key], pretrained[key]), key  # B = 0: exactly the pretrained output

    spec = spec_for(name, adaptation="lora", lora_rank=4, lora_alpha=8.0, lr=1e-2, batch_size=2)
    fine_tune = DecoderFineTune(spec, dataset, backbone, EncoderInput(backbone, dataset), epochs=1)
    before = state_of(backbone)
    fine_tune.train_epoch(1)
    changed = {n for n, p in backbone.model.named_parameters() if not torch.equal(p, before[n])}
    encoder_changes = {n for n in changed if n.startswith(f"{backbone.IMAGE_ENCODER}.")}
    assert encoder_changes and all(n.endswith("lora_b") or n.endswith("lora_a") for n in encoder_changes)
    backbone.train_mode(False)
    with torch.no_grad():
        trained = backbone.adapted_features({"pixels": x})
    assert max_error(trained, pretrained) > 1e-4  # the adapters moved the output
    assert merge_lora(backbone.model) == len(adapters) // 2
    assert not any("lora" in n for n, _ in backbone.model.named_parameters())
    merged = backbone.encode(x)  # the official forward of the merged weights
    assert max_error(merged, trained) < 1e-5


@pytest.mark.parametrize("kind", ["late_blocks", "lora"])
def test_a_checkpoint_holds_only_what_was_trained_and_loads_onto_the_official_checkpoint(kind, phantom_dataset,
                                                                                         tmp_path):
    dataset = FewImages(phantom_dataset[1])
    official = tmp_path / "sam_vit_b_random.pth"  # segment-anything's format: the model's state dict
    torch.save(build("sam_b").model.state_dict(), official)
    arm = Adaptation(kind, TUNED, lora_rank=4, lora_blocks="last")
    backbone = build("sam_b", str(official))
    backbone.adapt(arm)
    cache = EmbeddingCache.for_backbone(tmp_path, backbone, dataset.key, tuned_blocks=TUNED)
    cache.ensure(backbone, dataset, dataset.records_for("train", views=True), verify=False, progress=False)
    spec = spec_for("sam_b", weights=str(official), adaptation=kind, lora_rank=4, lora_blocks="last", lr=1e-2)
    DecoderFineTune(spec, dataset, backbone, MappedEmbeddings(cache), epochs=1).train_epoch(1)
    state = backbone.trained_state_dict()

    encoder_keys = {k.removeprefix("image_encoder.") for k in state if k.startswith("image_encoder.")}
    if kind == "late_blocks":
        assert {k.split(".")[0] for k in encoder_keys} == {"blocks", "neck"}
        assert {int(k.split(".")[1]) for k in encoder_keys if k.startswith("blocks.")} == {10, 11}
    else:
        assert encoder_keys and all(k.endswith(("lora_a", "lora_b")) for k in encoder_keys)
        assert {int(k.split(".")[1]) for k in encoder_keys} == {10, 11}
    assert {k.split(".")[0] for k in state} == {"mask_decoder", "prompt_encoder", "image_encoder"}

    fresh = build("sam_b", str(official))
    fresh.adapt(arm)
    fresh.load_trained_state_dict(state)
    x = pixels(fresh)
    with torch.no_grad():
        prefix = fresh.cache_features(x, TUNED)
        ours, theirs = backbone.adapted_features(prefix), fresh.adapted_features(prefix)
    for key in ours:
        assert torch.equal(ours[key], theirs[key])
    with pytest.raises(Exception, match="does not fit"):
        build("sam_b", str(official)).load_trained_state_dict(state)  # not adapted: the encoder keys do not fit
