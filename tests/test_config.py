"""The grid.yaml schema: the example is accepted as written, defaults resolve, mistakes are named."""

from pathlib import Path

import pytest
import yaml

from study.plan import search_plan
from study.config import config_hash, load_config, write_resolved
from foundation.errors import UserError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grid.example.yaml"
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_example_grid_is_accepted_with_every_key_as_written():
    config = load_config(EXAMPLE)
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert config.data.slicing.min_area == raw["data"]["slicing"]["min_area"] == 250
    assert config.factors.backbone == tuple(raw["factors"]["backbone"])
    assert config.factors.grad_accum == (4,)
    assert config.resources.gpus_per_trial == 0.25
    assert config.study_dir == Path("runs/brats-decoder-ablation")
    assert search_plan(config).total_trials == 5 * 3 * 3 * 4 == 180
    assert search_plan(config).trials_per_level()["backbone"]["sam2_l"] == 36
    assert len(search_plan(config).cells) == 180


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_presets_load(path):
    assert search_plan(load_config(path)).total_trials >= 1


def test_defaults_resolve_and_round_trip_with_a_stable_hash(tmp_path):
    config = load_config(write(tmp_path, "study: {name: s1}\n"))
    assert config.data.reader == "phantom" and config.factors.backbone == ("litemedsam",)
    assert config.experiment_name == "s1" and config.cache_dir == Path("runs/cache")
    resolved = write_resolved(config, tmp_path / "study")
    again = load_config(resolved)
    assert config_hash(again) == config_hash(config)
    # key order and formatting do not change the hash; a value does
    assert config_hash(load_config(write(tmp_path, "study:\n  seed: 0\n  name: s1\n"))) == config_hash(config)
    assert config_hash(load_config(write(tmp_path, "study: {name: s1, seed: 1}\n"))) != config_hash(config)


def test_seeds_and_evaluation_load_count_and_are_resolved(tmp_path):
    config = load_config(write(tmp_path, "study: {name: s1}\n"))
    assert config.search.seeds == 1
    assert (config.evaluation.single_point_multimask, config.evaluation.nsd_tolerance_mm,
            config.evaluation.hd95_penalty) == (True, 2.0, "diagonal")
    text = ("study: {name: s1}\nfactors: {optimizer: [adam, sgd]}\nsearch: {seeds: 3}\n"
            "evaluation: {single_point_multimask: false, nsd_tolerance_mm: 1.5, hd95_penalty: diagonal}\n")
    config = load_config(write(tmp_path, text))
    assert config.search.seeds == 3 and config.search.num_samples == 1
    assert config.evaluation.single_point_multimask is False and config.evaluation.nsd_tolerance_mm == 1.5
    assert search_plan(config).total_trials == 2 * 3
    assert search_plan(config).trials_per_level()["optimizer"] == {"adam": 3, "sgd": 3}
    resolved = yaml.safe_load(write_resolved(config, tmp_path / "study").read_text())
    assert resolved["search"]["seeds"] == 3
    assert resolved["evaluation"] == {"single_point_multimask": False, "nsd_tolerance_mm": 1.5,
                                      "hd95_penalty": "diagonal", "clicks": 0, "click_rule": "center"}
    again = load_config(tmp_path / "study" / "resolved.yaml")
    assert again.search == config.search and again.evaluation == config.evaluation
    assert config_hash(again) == config_hash(config)


def test_seeds_and_evaluation_are_part_of_the_hash(tmp_path):
    base = config_hash(load_config(write(tmp_path, "study: {name: quickstart}\n")))
    assert config_hash(load_config(write(tmp_path, "search: {seeds: 2}\n"))) != base
    assert config_hash(load_config(write(tmp_path, "evaluation: {nsd_tolerance_mm: 1.0}\n"))) != base
    assert config_hash(load_config(write(tmp_path, "evaluation: {single_point_multimask: false}\n"))) != base
    assert config_hash(load_config(write(tmp_path, "evaluation: {nsd_tolerance_mm: 2.0}\n"))) == base


def test_random_and_optuna_count_draws_times_seeds(tmp_path):
    text = ("factors: {optimizer: [adam, sgd], lr: {loguniform: [1.0e-5, 1.0e-3]}}\n"
            "search: {algorithm: random, num_samples: 4, seeds: 2}\n")
    config = load_config(write(tmp_path, text))
    assert search_plan(config).total_trials == 2 * 4 * 2
    assert search_plan(config).trials_per_level()["optimizer"] == {"adam": 8, "sgd": 8}


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, "study: {name: quickstart}\n"))
    with pytest.raises(Exception):
        config.study.seed = 3


def test_ranges_need_a_searcher_and_are_kept(tmp_path):
    text = "factors:\n  lr: {loguniform: [1.0e-5, 1.0e-3]}\n"
    with pytest.raises(UserError, match=r"line 2.*factors.lr is a range.*random or optuna"):
        load_config(write(tmp_path, text))
    config = load_config(write(tmp_path, text + "search: {algorithm: optuna, num_samples: 4}\n"))
    assert (config.factors.lr.kind, config.factors.lr.low, config.factors.lr.high) == ("loguniform", 1e-5, 1e-3)
    assert search_plan(config).total_trials == 4


@pytest.mark.parametrize("text, expected", [
    ("data:\n  slicing: {min_aera: 3}\n", [r"line 2", r"unknown key 'data.slicing.min_aera'", r"Did you mean 'min_area'"]),
    ("studdy: {name: x}\n", [r"line 1", r"unknown key 'studdy'", r"Did you mean 'study'"]),
    ("factors:\n  backbone: [sam2_s, sam2_xl]\n", [r"line 2", r"factors.backbone.1 = 'sam2_xl'", r"Valid backbone names: .*sam2_l"]),
    ("factors:\n  loss: dice_ce\n", [r"factors.loss.0 = 'dice_ce'", r"dice_bce"]),
    ("factors:\n  prompt: [centre_point]\n", [r"'centre_point' is not a known prompt", r"center_point"]),
    ("factors:\n  optimizer: rmsprop\n", [r"'rmsprop' is not a known optimizer", r"adamw"]),
    ("data:\n  reader: nifti\n", [r"data.reader = 'nifti' is not a known reader", r"msd_brain"]),
    ("factors:\n  lr: fast\n", [r"factors.lr", r"'fast'", r"valid number"]),
    ("factors:\n  epochs: -1\n", [r"factors.epochs", r"at least 1"]),
    ("data:\n  split: {val: 0.6, test: 0.5}\n", [r"data.split", r"leave subjects for training"]),
    ("resources: {gpus_per_trial: -0.5}\n", [r"resources.gpus_per_trial = -0.5", r"greater than or equal to 0"]),
    ("search: {algorithm: bayes}\n", [r"search.algorithm = 'bayes'", r"'grid', 'random' or 'optuna'"]),
    ("weights:\n  files: {sam_xl: random}\n", [r"weights.files.sam_xl", r"not a known backbone"]),
    ("factors:\n  epochs: 2\nscheduler: {kind: asha, grace_period: 3}\n", [r"grace_period = 3", r"epochs"]),
    ("data:\n  split: {val: 0, test: 0.2}\n", [r"line 2", r"data.split.val = 0", r"best epoch",
                                               r"Set data.split.val to a fraction > 0, e.g. 0.1"]),
    ("data:\n  split:\n    val: 0.1\n    test: 0\n", [r"line 4", r"data.split.test = 0", r"fraction > 0"]),
    ("search:\n  algorithm: grid\n  num_samples: 3\n", [r"line 3", r"search.num_samples = 3",
                                                       r"search.algorithm: grid", r"search.seeds: 3"]),
    ("search: {algorithm: random, num_samples: 2}\n", [r"search.num_samples = 2", r"no factor is a range",
                                                      r"search.seeds: 2"]),
    ("search: {seeds: 0}\n", [r"search.seeds = 0", r"greater than or equal to 1"]),
    ("evaluation: {nsd_tolerance_mm: 0}\n", [r"evaluation.nsd_tolerance_mm = 0", r"greater than 0"]),
    ("evaluation: {hd95_penalty: nan}\n", [r"evaluation.hd95_penalty = 'nan'", r"'diagonal'"]),
    ("evaluation: {click: 3}\n", [r"unknown key 'evaluation.click'", r"Did you mean 'clicks'"]),
    ("evaluation: {clicks: -1}\n", [r"evaluation.clicks = -1", r"greater than or equal to 0"]),
    ("evaluation: {click_rule: centre}\n", [r"evaluation.click_rule = 'centre'", r"'center' or 'random'"]),
    ("factors: {train_clicks: [0, -2]}\n", [r"factors.train_clicks", r">= 0, got -2"]),
    ("baseline:\n  unet: {optimizer: rmsprop}\n", [r"line 2", r"baseline.unet.optimizer = 'rmsprop'", r"adamw"]),
    ("baseline:\n  unet: {input_size: 130}\n", [r"baseline.unet.input_size = 130", r"multiple of 4"]),
    ("baseline:\n  unet: {box_chanel: true}\n", [r"unknown key 'baseline.unet.box_chanel'", r"Did you mean 'box_channel'"]),
    ("factors: [1, 2\n", [r"line 2", r"not valid YAML"]),
    ("- a\n- b\n", [r"mapping of sections"]),
    ("", [r"the study file is empty", r"examples/quickstart.yaml"]),
    ("# only a comment\n", [r"the study file is empty"]),
])
def test_bad_input_is_named(tmp_path, text, expected):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "grid.yaml" in message and "\n" not in message
    for pattern in expected:
        assert __import__("re").search(pattern, message), (pattern, message)


def test_missing_study_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: no such study file"):
        load_config(tmp_path / "nope.yaml")


def test_a_target_list_is_a_grid_axis_and_one_target_keeps_the_trial_ids(tmp_path):
    from search_spaces.space import trial_id

    several = load_config(write(tmp_path, "data:\n  target: [whole_tumor, tumor_core]\nfactors:\n  lr: [1.0e-4, 1.0e-3]\n"))
    assert several.data.targets() == ("whole_tumor", "tumor_core") and several.data.multi_target
    assert search_plan(several).total_trials == 4
    cells = search_plan(several).cells
    assert [c["target"] for c in cells] == ["whole_tumor", "whole_tumor", "tumor_core", "tumor_core"]
    assert search_plan(several).trials_per_level()["target"] == {"whole_tumor": 2, "tumor_core": 2}
    write_resolved(several, tmp_path / "several")
    assert yaml.safe_load((tmp_path / "several" / "resolved.yaml").read_text())["data"]["target"] == [
        "whole_tumor", "tumor_core"]

    single = load_config(write(tmp_path, "data:\n  target: whole_tumor\nfactors:\n  lr: [1.0e-4, 1.0e-3]\n"))
    assert single.data.targets() == ("whole_tumor",) and not single.data.multi_target
    assert all("target" not in c for c in search_plan(single).cells)  # no target param: trial ids unchanged
    assert [trial_id(c) for c in search_plan(single).cells] == [trial_id({k: v for k, v in c.items() if k != "target"})
                                                        for c in cells[:2]]
    one_listed = load_config(write(tmp_path, "data:\n  target: [whole_tumor]\nfactors:\n  lr: [1.0e-4, 1.0e-3]\n"))
    assert one_listed.data.target == "whole_tumor" and config_hash(one_listed) == config_hash(single)
    assert load_config(write(tmp_path, "study: {name: x}\n")).data.targets() == (None,)  # the reader's default


@pytest.mark.parametrize("text, expected", [
    ("data:\n  target: [whole_tumor, tumor_core, whole_tumor]\n",
     [r"line 2", r"data.target\[2\] = 'whole_tumor' repeats data.target\[0\]"]),
    ("data:\n  target: [whole_tumor, 3]\n", [r"data.target\[1\] = 3 is not a target name"]),
    ("data:\n  target: []\n", [r"at least one name"]),
])
def test_bad_target_lists_name_the_index(tmp_path, text, expected):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text))
    for pattern in expected:
        assert __import__("re").search(pattern, str(info.value)), (pattern, str(info.value))
