"""Prompts into mask-decoder rows, and one batched decoder call per prompt structure.

`rows_for` maps each image's prompt (original pixels) into the backbone's input frame as one
decoder row per box (several with `box_per_component`); `decode_rows` decodes the rows and unites
an image's rows into its logits. `lowest_loss` is SAM's rule for training on three masks.
`seeded_rng` is the one source of randomness of a trial (prompts, data order), seeded by names.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from trainables.backbones import Backbone
from trainables.prompts import Prompt


def seeded_rng(*parts) -> np.random.Generator:
    """A generator seeded by a tuple of ints and strings, stable across processes."""
    ints = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng(ints)


@dataclass
class DecoderRows:
    """Decoder rows of a batch: which image each row belongs to, and its prompt in the input frame."""

    image_index: list[int]
    points: list[np.ndarray]  # (P, 2) input-frame xy; P may be 0
    labels: list[np.ndarray]  # (P,)
    boxes: list[np.ndarray | None]  # (4,) input-frame xyxy or None


def rows_for(prompts: list[Prompt], sizes: list[tuple[int, int]], backbone: Backbone) -> DecoderRows:
    rows = DecoderRows([], [], [], [])
    for index, (prompt, hw) in enumerate(zip(prompts, sizes)):
        if prompt.points is not None and len(prompt.points):
            points = backbone.to_input_frame(np.asarray(prompt.points, np.float32), hw)
            labels = np.asarray(prompt.point_labels, np.int64)
        else:
            points, labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
        boxes = prompt.boxes if prompt.boxes is not None and len(prompt.boxes) else [None]
        for box in boxes:
            mapped = None if box is None else backbone.to_input_frame(np.asarray(box, np.float32).reshape(2, 2), hw).reshape(4)
            rows.image_index.append(index)
            rows.points.append(points)
            rows.labels.append(labels)
            rows.boxes.append(mapped)
    return rows


def decode_rows(backbone: Backbone, features: dict[str, torch.Tensor], rows: DecoderRows, n_images: int, masks: str,
                device, single_point: str | None = None,
                mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution logits (N,K,h,w) and predicted IoU (N,K) per image, from its rows.

    `masks`: "single" (token 0), "best_iou" (three masks, the highest predicted IoU kept) or
    "all" (three masks kept, for the lowest-loss training rule). `single_point`, when given, is
    the mode for rows of exactly one point and no box (the single-point protocol). K is 3 when
    any group is decoded with "all", else 1; a one-mask group then repeats its mask three times,
    so its lowest loss is its only loss.

    Rows are decoded in groups of the same prompt structure (with or without a box, the same
    number of points), each group one batched decoder call; a row without any prompt gets one
    padding point (label -1), SAM's encoding of "no point". An image with several rows gets the
    element-wise maximum of their logits (the union of their masks) and their best predicted IoU.

    `mask_input` (N,1,h,w), when given, is each image's earlier low-resolution logits, fed back as
    the dense prompt of every row of that image (corrective clicks: the mask the user sees).
    """
    groups: dict[tuple[bool, int], list[int]] = defaultdict(list)
    for r in range(len(rows.image_index)):
        has_box = rows.boxes[r] is not None
        groups[(has_box, len(rows.points[r]))].append(r)
    modes = {key: single_point if single_point and key == (False, 1) else masks for key in groups}
    keep = 3 if "all" in modes.values() else 1
    row_logits: list[torch.Tensor] = [None] * len(rows.image_index)  # type: ignore[list-item]
    row_iou: list[torch.Tensor] = [None] * len(rows.image_index)  # type: ignore[list-item]
    for (has_box, n_points), members in groups.items():
        mode = modes[(has_box, n_points)]
        index = [rows.image_index[r] for r in members]
        feats, dense = features, mask_input
        if index != list(range(n_images)):
            index_tensor = torch.tensor(index, device=device)
            feats = {name: value.index_select(0, index_tensor) for name, value in features.items()}
            dense = None if mask_input is None else mask_input.index_select(0, index_tensor)
        points = labels = boxes = None
        width = n_points if n_points or has_box else 1  # a row with no prompt: one padding point
        if width:
            points_np = np.zeros((len(members), width, 2), np.float32)
            labels_np = np.full((len(members), width), -1, np.int64)
            for i, r in enumerate(members):
                p = len(rows.points[r])
                points_np[i, :p] = rows.points[r]
                labels_np[i, :p] = rows.labels[r]
            points, labels = torch.from_numpy(points_np).to(device), torch.from_numpy(labels_np).to(device)
        if has_box:
            boxes = torch.from_numpy(np.stack([rows.boxes[r] for r in members])).to(device)
        logits, iou_pred = backbone.decode(feats, points, labels, boxes, multimask=mode != "single",
                                           mask_input=dense)
        if mode == "best_iou":
            best = iou_pred.argmax(dim=1)
            logits = logits[torch.arange(len(members), device=device), best].unsqueeze(1)
            iou_pred = iou_pred.gather(1, best[:, None])
        if logits.shape[1] != keep:
            logits, iou_pred = logits.expand(-1, keep, -1, -1), iou_pred.expand(-1, keep)
        for i, r in enumerate(members):
            row_logits[r], row_iou[r] = logits[i], iou_pred[i]
    if rows.image_index == list(range(n_images)):  # one row per image, in order: nothing to unite
        return torch.stack(row_logits), torch.stack(row_iou)
    per_image: list[list[int]] = [[] for _ in range(n_images)]
    for r, image in enumerate(rows.image_index):
        per_image[image].append(r)
    logits = torch.stack([torch.stack([row_logits[r] for r in rs]).amax(dim=0) for rs in per_image])
    iou_out = torch.stack([torch.stack([row_iou[r] for r in rs]).amax(dim=0) for rs in per_image])
    return logits, iou_out


def lowest_loss(loss_fn, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch mean over images of the lowest loss among each image's K masks (N, K, H, W).

    Each image's loss is `loss_fn` on that image alone, which equals its share of the batched
    loss (every registered loss is a mean over images of per-image terms). With K = 1 this is
    `loss_fn(logits, target)`.
    """
    return lowest_loss_and_mask(loss_fn, logits, target)[0]


def lowest_loss_and_mask(loss_fn, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`lowest_loss`, and per image the index (N,) of the mask it took (all 0 with K = 1)."""
    if logits.shape[1] == 1:
        return loss_fn(logits, target), torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    per_mask = torch.stack([torch.stack([loss_fn(logits[n:n + 1, k:k + 1], target[n:n + 1])
                                         for k in range(logits.shape[1])]) for n in range(logits.shape[0])])
    lowest = per_mask.min(dim=1)
    return lowest.values.mean(), lowest.indices
