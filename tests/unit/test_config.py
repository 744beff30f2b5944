import pytest

from kka_synth.config import ConfigError, RunConfig, profile_defaults


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = RunConfig()
    path = tmp_path / "run.yaml"
    config.to_yaml(path)
    assert RunConfig.from_yaml(path) == config


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"iterations": 0}, "iterations"),
        ({"mode": "both"}, "mode"),
        ({"profile": "cloud"}, "profile"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset"),
        ({"data": {"dataset": "mvtec_ad"}}, "data.root"),
        ({"proposer": {"temperature": 0}}, "proposer.temperature"),
        ({"evaluator": {"folds": 1}}, "evaluator.folds"),
        ({"filters": {"band_quantiles": [0.9, 0.1]}}, "filters.band_quantiles"),
        ({"colour": "red"}, "colour"),
        ({"data": {"size": 3}}, "data.size"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert field in str(info.value)


def test_dpo_and_lora_sections_merge_with_defaults():
    config = RunConfig.from_dict({"alignment": {"dpo": {"beta": 0.3}}})
    assert config.alignment.dpo["beta"] == 0.3
    assert config.alignment.dpo["learning_rate"] == 5e-4


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(bad)


def test_hub_profile_changes_proposer():
    assert profile_defaults("hub")["proposer"]["backend"] == "transformers"
    with pytest.raises(ConfigError):
        profile_defaults("cloud")
