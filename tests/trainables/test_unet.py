"""The U-Net baseline: nnU-Net's 2D layout, the box channel against the SAM trials' box prompt, a
falling loss, deep-supervision weights, and a trial killed after an epoch resuming exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables.fine_tune import DecoderFineTune, EncoderInTheLoop, TrialSpec
from trainables.backbones import RANDOM_WEIGHTS, build_backbone
from trainables.unet import UNET, UNET_BOX, UNetTrainer, build_unet, nnunet_layout, run_unet_trial

SIZE = 64


def _spec(backbone=UNET, **overrides) -> TrialSpec:
    values = dict(trial_id=f"{backbone}-test", backbone=backbone, weights=RANDOM_WEIGHTS, stage="unet",
                  prompt="box" if backbone == UNET_BOX else "none", epochs=3, lr=1e-3, batch_size=8,
                  input_size=SIZE, schedule="cosine")
    return TrialSpec(**{**values, **overrides})


def test_the_network_is_nnunets_2d_layout():
    """Pooling halves the input down to a 4-pixel feature map (nnU-Net's rule), 3 x 3 kernels,
    filters 32 doubling to 512, instance norm with affine weights, leaky ReLU with slope 0.01."""
    assert nnunet_layout(128) == ([3] * 6, [1, 2, 2, 2, 2, 2])  # 128 / 2^5 = 4
    assert nnunet_layout(256)[1] == [1, 2, 2, 2, 2, 2, 2]  # 7 levels at most
    assert nnunet_layout(512)[1] == [1, 2, 2, 2, 2, 2, 2]
    assert nnunet_layout(48)[1] == [1, 2, 2, 2]  # 48 -> 24 -> 12 -> 6; 3 would be under 4
    with pytest.raises(ValueError, match="input_size"):
        nnunet_layout(12)
    net = build_unet(4, SIZE)
    assert net.filters == [32, 64, 128, 256, 512]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert norms and all(m.affine for m in norms) and acts and all(m.negative_slope == 0.01 for m in acts)
    assert net(torch.zeros(2, 4, SIZE, SIZE)).shape == (2, 1, SIZE, SIZE)


def test_the_box_channel_is_the_box_prompt_the_sam_trials_get(phantom_dataset):
    """unet_box's fourth channel is 1 exactly inside the box SAM trials with the `box` prompt get for
    the same image (inclusive pixel extent, at the original resolution) and 0 elsewhere; resized
    to the input size like the mask."""
    _, dataset = phantom_dataset
    trainer = UNetTrainer(_spec(UNET_BOX), dataset)
    sam = build_backbone("sam_b", RANDOM_WEIGHTS, input_size=64)
    decoder_trial = DecoderFineTune(TrialSpec(trial_id="sam", backbone="sam_b", weights=RANDOM_WEIGHTS, prompt="box",
                                              input_size=64, epochs=0), dataset, sam, EncoderInTheLoop(sam, dataset),
                                    epochs=0)
    records = dataset.records_for("test")[:4]
    inputs = trainer.inputs(records)
    assert inputs.shape == (4, 4, SIZE, SIZE)
    for index, (record, prompt) in enumerate(zip(records, decoder_trial.prompts(records, "box", None))):
        x0, y0, x1, y1 = prompt.boxes[0].astype(int)
        mask = trainer.mask(record)
        rows, cols = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())  # the tight box
        channel = trainer.box_channel_of(record, mask)
        expected = np.zeros(mask.shape, np.float32)
        expected[y0:y1 + 1, x0:x1 + 1] = 1
        np.testing.assert_array_equal(channel, expected)
        resized = torch.nn.functional.interpolate(torch.from_numpy(expected)[None, None], size=(SIZE, SIZE),
                                                  mode="nearest")[0, 0]
        assert torch.equal(inputs[index, 3], resized)
    assert UNetTrainer(_spec(UNET), dataset).inputs(records).shape[1] == 3  # the plain arm has no box


def test_deep_supervision_weighs_the_heads_as_nnunet():
    """Heads (full resolution first) weighted 1, 1/2, 1/4, ... normalised to sum 1."""
    trainer = UNetTrainer.__new__(UNetTrainer)
    trainer.loss_fn = lambda output, target: (output - target).abs().mean()
    target = torch.zeros(2, 1, 4, 4)
    output = torch.stack([torch.full((2, 1, 4, 4), float(v)) for v in (1, 2, 4)], dim=1)
    assert trainer._loss(output, target).item() == pytest.approx((1 * 1 + 0.5 * 2 + 0.25 * 4) / 1.75)


class _Crash(Exception):
    pass


def test_a_unet_trial_trains_and_resumes_exactly_after_a_crash(phantom_dataset, tmp_path):
    """Its training loss falls; a crash after epoch 1's checkpoint, then the same call, gives the
    history, best epoch and test Dice of an uninterrupted run (data order, MONAI's augmentation
    draws, optimizer and learning-rate schedule restored)."""
    _, dataset = phantom_dataset
    spec = _spec(UNET_BOX, epochs=2)
    straight = run_unet_trial(spec, dataset, checkpoint_dir=tmp_path / "straight")
    losses = [row["train_loss"] for row in straight.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "straight" / "best_unet.pt").is_file()
    assert straight.summary["model_params"] == sum(p.numel() for p in build_unet(4, SIZE).parameters())
    assert {row["prompt"] for row in straight.per_image} == {"box"} and straight.per_subject

    def crash_after_epoch_1(metrics):
        if metrics["epoch"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        run_unet_trial(spec, dataset, checkpoint_dir=tmp_path / "a", on_epoch=crash_after_epoch_1)
    resumed = run_unet_trial(spec, dataset, checkpoint_dir=tmp_path / "a")

    def without_seconds(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert without_seconds(resumed.history) == without_seconds(straight.history)
    assert resumed.summary["best_epoch"] == straight.summary["best_epoch"]
    assert [row["dice"] for row in resumed.per_image] == [row["dice"] for row in straight.per_image]
