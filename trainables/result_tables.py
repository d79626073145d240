"""The columns of the tables a trial writes, in order: one row per test image, one per test subject.

Kept apart from the trainable (which imports torch) so that the driver can write and read the
study's tables without importing the training code.

per-image: grid.example.yaml's per_image.csv plus the seed, hd95_mm, hd95_penalised (1 where HD95
is the empty-mask penalty) and nsd; the metric definitions are in `trainables.metrics`.
per-subject: 3D metrics over a test subject's stacked slices (`trainables.evaluation.subject_rows`).
per-click: the corrective-click curve of every test image (`evaluation.clicks`): click 0 is the
prompt alone, click k the prediction after k clicks; click_x, click_y (original pixels) and
click_label (1 positive, 0 negative) are the click added at round k, empty at click 0 and once the
prediction was perfect (`trainables.fine_tune.DecoderFineTune.click_curve`).
"""

PER_IMAGE_COLUMNS = ("trial_id", "stage", "seed", "image_id", "subject", "slice", "area", "prompt",
                     "dice", "iou", "miou", "hd95", "hd95_mm", "hd95_penalised", "nsd")
PER_SUBJECT_COLUMNS = ("trial_id", "stage", "seed", "subject", "prompt", "dice_3d", "hd95_3d", "hd95_3d_mm",
                       "hd95_3d_penalised", "nsd_3d", "slices", "voxels")
PER_CLICK_COLUMNS = ("trial_id", "stage", "seed", "image_id", "subject", "prompt", "click", "dice", "iou",
                     "click_x", "click_y", "click_label")
