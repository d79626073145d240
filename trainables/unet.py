"""The U-Net baseline: MONAI's DynUNet in nnU-Net's 2D layout, trained from scratch on the prepared slices.

`UNetTrainer(spec, dataset)` holds one baseline trial's network, data and optimizer. It offers
what the trial loop of trainables/trial.py needs (`train_epoch`, `evaluate`, `state_dict`,
`load_state_dict`, `weights`, `load_weights`, `mask`), so a U-Net trial is checkpointed, resumed,
selected on validation Dice and tested exactly like a decoder fine-tune, on the same slices,
splits and seeds, with the same metric code at the original resolution. `backbone` is `unet`, or
`unet_box` for the arm that also sees the prompt box.

Conventions, each a decision a reviewer should know:

- Network: `monai.networks.nets.DynUNet`, 2D, in nnU-Net's layout (`nnunet_layout`): 3 x 3
  convolutions; a first level at full resolution, then one stride-2 level per halving of the
  input while the feature map stays at least 4 pixels wide (at most 7 levels); DynUNet's nnU-Net
  filters (32, 64, ... capped at 512); instance norm with affine parameters; leaky ReLU (slope
  0.01). With `deep_supervision` the decoder levels above the lowest also predict, and their
  losses get nnU-Net's weights 1/2^i (i = 0 for the full-resolution output), normalised to sum 1.
- Input: the prepared slice (three channels, 0-255), each channel z-scored over the image (nnU-Net's
  per-image normalisation for MRI), resized to `input_size` x `input_size` (bilinear; the mask
  nearest). With `unet_box`, a fourth channel is 1 inside the prompt box and 0 outside: the `box`
  prompt (`trainables.prompts`: the mask's tight bounding box, inclusive) rasterised at the
  original resolution, then resized like the mask. In evaluation it is the very box a SAM trial
  with the `box` prompt gets for the image (`trainables.fine_tune.prompt_for`); in training the
  box of the augmented mask, as a SAM trial's training prompt comes from its augmented view.
- Training: the original slices (view 0: the augmented views of the prepared store were made for
  the encoders' cache), with MONAI augmentation on the fly, seeded per (study seed, training
  seed, epoch) so a resumed trial sees the same draws: a random affine (rotation within ±15°,
  scale within ±15 %, probability 0.5), Gaussian noise (σ 0.1, probability 0.15) and intensity
  scaling (±25 %, probability 0.15). The data order is seeded the same way.
- The loss is the study's loss function (`baseline.unet.loss`) at the input size; the validation
  loss, Dice and IoU and every test metric are computed at the original resolution on the logits
  upsampled bilinearly, thresholded at 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from foundation.prepared_store import PreparedDataset, SliceRecord
from trainables.decoding import seeded_rng
from trainables.fine_tune import TrialSpec, optimizer_steps, prompt_for, score_image, size_batches
from trainables.losses import build_loss
from trainables.optimizers import build_optimizer, build_schedule, resume_schedule
from trainables.prompts import PromptSettings
from trainables.trial import TrialResult, train_and_test

UNET, UNET_BOX = "unet", "unet_box"
UNET_BACKBONES = (UNET, UNET_BOX)
BOX_PROMPT = "box"
MIN_FEATURE_MAP = 4  # nnU-Net stops pooling before a feature map falls under 4 pixels
MAX_LEVELS = 7


def nnunet_layout(size: int) -> tuple[list[int], list[int]]:
    """(kernel sizes, strides) of a 2D DynUNet for square inputs of `size` pixels (module docstring)."""
    strides, side = [1], size
    while side % 2 == 0 and side // 2 >= MIN_FEATURE_MAP and len(strides) < MAX_LEVELS:
        strides.append(2)
        side //= 2
    if len(strides) < 3:
        raise ValueError(f"a U-Net input of {size} pixels allows {len(strides) - 1} downsampling level(s); DynUNet "
                         f"needs at least 2. Use baseline.unet.input_size of 16 or more, a multiple of 4.")
    return [3] * len(strides), strides


def build_unet(in_channels: int, size: int, deep_supervision: bool = False) -> torch.nn.Module:
    """The baseline network for `in_channels` input channels at `size` x `size` (module docstring)."""
    from monai.networks.nets import DynUNet

    kernels, strides = nnunet_layout(size)
    return DynUNet(spatial_dims=2, in_channels=in_channels, out_channels=1, kernel_size=kernels, strides=strides,
                   upsample_kernel_size=strides[1:], norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                   deep_supervision=deep_supervision, deep_supr_num=len(strides) - 2)


def box_channel(box: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """1 inside the box (x0, y0, x1, y1, inclusive pixel extent), 0 elsewhere; all 0 without a box."""
    channel = np.zeros(shape, np.float32)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        channel[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = 1.0
    return channel


def _augmentation():
    from monai.transforms import Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd

    return Compose([
        RandAffined(keys=["image", "label"], prob=0.5, rotate_range=math.radians(15), scale_range=0.15,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised(keys=["image"], prob=0.15, std=0.1),
        RandScaleIntensityd(keys=["image"], factors=0.25, prob=0.15),
    ])


class UNetTrainer:
    """One U-Net baseline trial's network, data and optimizer (see the module docstring)."""

    best_file = "best_unet.pt"

    def __init__(self, spec: TrialSpec, dataset: PreparedDataset):
        if spec.backbone not in UNET_BACKBONES:
            raise ValueError(f"a U-Net trial's backbone is one of {UNET_BACKBONES}, not {spec.backbone!r}")
        if not spec.input_size:
            raise ValueError("a U-Net trial needs its input size (baseline.unet.input_size)")
        self.spec, self.dataset = spec, dataset
        self.with_box = spec.backbone == UNET_BOX
        self.masks: dict[tuple[str, int], np.ndarray] = {}
        self.settings = PromptSettings(**spec.prompt_settings)
        torch.manual_seed(int(seeded_rng(spec.seed, "unet", spec.train_seed).integers(2**62)))
        self.model = build_unet(4 if self.with_box else 3, spec.input_size, spec.deep_supervision).to(spec.device)
        self.loss_fn = build_loss(spec.loss)
        self.train_records = dataset.records_for("train")
        self.optimizer = build_optimizer(spec.optimizer, self.model.parameters(), spec.lr, spec.weight_decay,
                                         spec.momentum)
        steps = self.steps_per_epoch()
        self.schedule = build_schedule(spec.schedule, self.optimizer, steps * spec.epochs,
                                       spec.warmup_epochs * steps)
        self.optimizer_steps = 0
        self.augment = _augmentation()

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- data

    def mask(self, record: SliceRecord) -> np.ndarray:
        key = (record.image_id, record.view)
        if key not in self.masks:
            self.masks[key] = self.dataset.load(record)[1]
        return self.masks[key]

    def _resized(self, array: np.ndarray, mode: str) -> torch.Tensor:
        """(C, H, W) float32 -> (C, S, S) at the input size."""
        tensor = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None]
        size = (self.spec.input_size, self.spec.input_size)
        if mode == "nearest":
            return F.interpolate(tensor, size=size, mode="nearest")[0]
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)[0]

    @staticmethod
    def _normalised(image: np.ndarray) -> np.ndarray:
        """(H, W, 3) 0-255 -> (3, H, W), each channel z-scored over the image."""
        channels = np.moveaxis(np.asarray(image, np.float32), -1, 0)
        mean = channels.mean(axis=(1, 2), keepdims=True)
        std = channels.std(axis=(1, 2), keepdims=True)
        return (channels - mean) / np.maximum(std, 1e-6)

    def box_channel_of(self, record: SliceRecord, mask: np.ndarray) -> np.ndarray:
        """The `box` prompt of `mask` as a channel of the mask's size (`unet_box`): for the original
        mask, the evaluation box SAM trials get for `record`; the rule draws nothing at random."""
        prompt = prompt_for(self.spec, self.settings, None, mask, record, BOX_PROMPT, None)
        return box_channel(None if prompt.boxes is None else prompt.boxes[0], mask.shape)

    def inputs(self, records: list[SliceRecord]) -> torch.Tensor:
        """The evaluation input of `records`: (N, 3 or 4, S, S)."""
        batch = []
        for record in records:
            image, mask = self.dataset.load(record)
            self.masks.setdefault((record.image_id, record.view), mask)  # read once: evaluate scores against it
            channels = [self._resized(self._normalised(image), "bilinear")]
            if self.with_box:
                channels.append(self._resized(self.box_channel_of(record, mask)[None], "nearest"))
            batch.append(torch.cat(channels))
        return torch.stack(batch).to(self.spec.device)

    def _training_example(self, record: SliceRecord, rng_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset.load(record)
        sample = {"image": self._resized(self._normalised(image), "bilinear"),
                  "label": self._resized(mask[None].astype(np.float32), "nearest")}
        self.augment.set_random_state(seed=rng_seed)
        sample = self.augment(sample)
        image_t, label = torch.as_tensor(sample["image"]), torch.as_tensor(sample["label"])
        if self.with_box:  # the box of the augmented mask, as a SAM trial's prompt comes from its augmented view
            box = self.box_channel_of(record, label[0].numpy() > 0.5)
            image_t = torch.cat([image_t, torch.from_numpy(box)[None]])
        return image_t.float(), (label > 0.5).float()

    def steps_per_epoch(self) -> int:
        return max(math.ceil(len(self.train_records) / self.spec.batch_size / self.spec.grad_accum), 1)

    # --- training

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.ndim == 5:  # deep supervision: (N, heads, 1, S, S), the full-resolution output first
            weights = torch.tensor([1 / 2 ** i for i in range(output.shape[1])])
            weights = weights / weights.sum()
            return sum(w * self.loss_fn(output[:, i], target) for i, w in enumerate(weights.tolist()))
        return self.loss_fn(output, target)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training slices; the mean training loss per slice."""
        spec = self.spec
        rng = seeded_rng(spec.seed, "unet", spec.train_seed, "epoch", epoch)
        order = [self.train_records[i] for i in rng.permutation(len(self.train_records))]
        seeds = rng.integers(2**31, size=len(order))
        batches = [list(range(i, min(i + spec.batch_size, len(order)))) for i in range(0, len(order), spec.batch_size)]
        self.model.train()

        def batch_loss(batch: list[int]) -> torch.Tensor:
            examples = [self._training_example(order[i], int(seeds[i])) for i in batch]
            images = torch.stack([e[0] for e in examples]).to(spec.device)
            targets = torch.stack([e[1] for e in examples]).to(spec.device)
            return self._loss(self.model(images), targets)

        loss, steps = optimizer_steps(spec, batches, batch_loss, self.optimizer, self.schedule, epoch,
                                      "A lower baseline.unet.lr usually helps.")
        self.optimizer_steps += steps
        self.model.eval()
        return loss

    # --- evaluation

    def logits(self, records: list[SliceRecord]) -> torch.Tensor:
        """Logits at the original resolution (N, 1, H, W) of records of one size."""
        with torch.no_grad():
            out = self.model(self.inputs(records))
        return F.interpolate(out, size=(records[0].height, records[0].width), mode="bilinear", align_corners=False)

    def evaluate(self, records: list[SliceRecord], prompt_name: str, *, full: bool = True, keep: dict | None = None,
                 click_rows: list | None = None) -> tuple[list[dict], float]:
        """Per-image metrics (`trainables.fine_tune.score_image`) and the mean loss, with the current
        network; `keep` receives image_id -> predicted mask. `prompt_name` names the rows' prompt
        (`none`, or `box` for unet_box); corrective clicks do not apply to a U-Net."""
        rows, loss_sum = [], 0.0
        self.model.eval()
        for batch in size_batches(records, self.spec.batch_size):
            logits = self.logits(batch)
            target = torch.from_numpy(np.stack([self.mask(r) for r in batch])).to(logits.device, torch.float32)
            loss_sum += float(self.loss_fn(logits, target[:, None])) * len(batch)
            for record, pred in zip(batch, (logits[:, 0] > 0).cpu().numpy()):
                if keep is not None:
                    keep[record.image_id] = pred
                rows.append(score_image(record, pred, self.mask(record), prompt_name, full, self.spec.nsd_tolerance))
        return rows, (loss_sum / len(records) if records else float("nan"))

    # --- checkpoints

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"model": self.weights(), "optimizer": self.optimizer.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_steps = state["optimizer_steps"]
        resume_schedule(self.schedule, self.optimizer_steps)


def run_unet_trial(spec: TrialSpec, dataset: PreparedDataset, *, checkpoint_dir: Path | None = None,
                   on_epoch=None, progress: bool = False) -> TrialResult:
    """Train and test one U-Net baseline trial, as `trainables.trial.run_trial` does a fine-tune
    (the same loop: checkpoints every epoch, resume, best epoch on validation, test metrics).
    The summary also holds `model_params`, the network's parameter count."""
    trainer = UNetTrainer(spec, dataset)
    return train_and_test(trainer, spec.epochs, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, progress=progress,
                          summary={"model_params": trainer.parameter_count, "trainable_params": trainer.parameter_count})
