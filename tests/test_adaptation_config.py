"""The adaptation factors and per-arm resources in grid.yaml: accepted, resolved, planned, and
mistakes named with the fix."""

from __future__ import annotations

import math

import pytest

from foundation.errors import UserError
from study.config import config_from_dict
from study.plan import cached_prefixes, trial_resources
from trainables.backbones.parameter_counts import cache_entry_shapes


def test_adaptation_factors_and_per_arm_resources_resolve():
    config = config_from_dict({
        "factors": {"adaptation": ["decoder", "late_blocks", "lora"], "adapt_blocks": [1, 3], "lora_blocks": "last"},
        "resources": {"gpus_per_trial": {"decoder": 0.25, "late_blocks": 0.5, "lora": 2}},
    })
    assert config.factors.adaptation == ("decoder", "late_blocks", "lora")
    assert cached_prefixes(config) == [1, 3]
    resources = trial_resources(config.resources)
    assert resources.gpus_for({"adaptation": "decoder"}) == 0.25
    assert resources.gpus_for({"adaptation": "lora"}) == 2
    assert resources.workers_for({"adaptation": "lora"}) == 2  # two GPUs: two data-parallel workers
    assert resources.workers_for({"adaptation": "late_blocks"}) == 1
    assert config.resources.most_gpus == 2
    # LoRA on every block and full fine-tuning read no partial cache
    every = config_from_dict({"factors": {"adaptation": ["lora", "full"], "adapt_blocks": 4}})
    assert cached_prefixes(every) == []


@pytest.mark.parametrize("raw, expected", [
    ({"factors": {"adaptation": "lora_all"}}, r"factors.adaptation.*'decoder', 'late_blocks', 'lora' or 'full'"),
    ({"factors": {"backbone": "litemedsam", "adaptation": "late_blocks", "adapt_blocks": 11}},
     r"adapt_blocks = 11, but litemedsam's image encoder has 10 blocks"),
    ({"factors": {"adapt_blocks": 0}}, r"adapt_blocks.*at least 1"),
    ({"factors": {"adaptation": ["decoder", "full"]}, "resources": {"gpus_per_trial": {"decoder": 0.5}}},
     r"resources.gpus_per_trial is given per adaptation but has no entry for full"),
    ({"resources": {"gpus_per_trial": {"decoder": -1}}}, r"greater than or equal to 0"),
])
def test_adaptation_mistakes_are_named(raw, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict(raw)


def test_the_partial_cache_entry_size_of_the_plan_is_the_models_own():
    """The dry run's size per image of a prefix cache: ViT-B's token map entering its 11th block at
    1024 px is 64 x 64 tokens of 768 channels (float16: 6.3 MB); SAM 2 Hiera-T's also holds the
    outputs of its first three stages, which its FPN neck reads."""
    assert cache_entry_shapes("sam_b", 2) == {"tokens": (64, 64, 768)}
    assert cache_entry_shapes("sam_b", None) == {"image_embed": (256, 64, 64)}
    hiera = cache_entry_shapes("sam2_t", 2)
    assert hiera == {"stage_0": (96, 256, 256), "stage_1": (192, 128, 128), "stage_2": (384, 64, 64),
                     "tokens": (64, 64, 384)}
    assert sum(math.prod(shape) for shape in hiera.values()) * 2 == 25_165_824
