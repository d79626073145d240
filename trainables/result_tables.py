"""The columns of the tables a trial writes, in order: one row per test image, one per test subject.

Kept apart from the trainable (which imports torch) so that the driver can write and read the
study's tables without importing the training code.

per-image: grid.example.yaml's per_image.csv plus the seed, hd95_mm, hd95_penalised (1 where HD95
is the empty-mask penalty) and nsd; the metric definitions are in `trainables.metrics`.
per-subject: 3D metrics over a test subject's stacked slices (`trainables.evaluation.subject_rows`).
"""

PER_IMAGE_COLUMNS = ("trial_id", "stage", "seed", "image_id", "subject", "slice", "area", "prompt",
                     "dice", "iou", "miou", "hd95", "hd95_mm", "hd95_penalised", "nsd")
PER_SUBJECT_COLUMNS = ("trial_id", "stage", "seed", "subject", "prompt", "dice_3d", "hd95_3d", "hd95_3d_mm",
                       "hd95_3d_penalised", "nsd_3d", "slices", "voxels")
