import pytest

from medseg.config import Config, config_from_dict, field_docs, load_config
from medseg.errors import ConfigError


def test_defaults_follow_nnunet_recipe():
    cfg = Config()
    assert cfg.train.optimizer == "sgd" and cfg.train.learning_rate == 1e-2 and cfg.train.momentum == 0.99
    assert cfg.loss.name == "dice_ce"


def test_yaml_and_overrides_are_applied(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_epochs: 7\nmodel:\n  name: deeplabv3plus\n")
    cfg = load_config(path, overrides=["train.learning_rate=0.001", "data.patch_size=[32, 32, 16]"])
    assert cfg.train.max_epochs == 7 and cfg.train.learning_rate == 0.001
    assert cfg.model.name == "deeplabv3plus" and cfg.data.patch_size == [32, 32, 16]


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rte: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rte'.*Did you mean 'learning_rate'"):
        load_config(path)


def test_unknown_section_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown section.*'trian'.*Did you mean 'train'"):
        load_config(None, overrides=["trian.max_epochs=3"])


def test_wrong_type_is_refused_with_the_expected_type():
    with pytest.raises(ConfigError, match=r"train.max_epochs in --set train.max_epochs=ten must be an integer, got 'ten'"):
        load_config(None, overrides=["train.max_epochs=ten"])


def test_out_of_range_values_are_refused():
    with pytest.raises(ConfigError, match=r"infer.overlap must be in \[0, 1\)"):
        load_config(None, overrides=["infer.overlap=1.5"])


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"train: !!python/object/apply:os.makedirs ['{marker}']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    assert not marker.exists()


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 40
    assert all(doc.strip() for _, _, _, doc in rows)


@pytest.mark.parametrize("value", ["largest", "LARGEST", " none ", "min-size=5", "Min-Size=12"])
def test_the_config_file_accepts_every_postprocess_value_inference_accepts(value):
    from medseg.inference.postprocess import parse_postprocess

    assert config_from_dict({"infer": {"postprocess": value}}).infer.postprocess == value
    parse_postprocess(value)


@pytest.mark.parametrize("value", ["biggest", "min-size=0", "min-size=x"])
def test_the_config_file_refuses_postprocess_values_inference_refuses(value):
    from medseg.inference.postprocess import parse_postprocess

    with pytest.raises(ConfigError, match=rf"postprocess '{value}' is not valid; use none, largest"):
        config_from_dict({"infer": {"postprocess": value}})
    with pytest.raises(ConfigError, match=rf"postprocess '{value}' is not valid; use none, largest"):
        parse_postprocess(value)
