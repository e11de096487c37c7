from pathlib import Path

import pytest

from tlops.config.settings import Config, load_config
from tlops.errors import TlopsError


def test_defaults_are_the_reference_and_round_trip_through_json() -> None:
    cfg = load_config()
    assert cfg.backbone == "efficientnet_lite0"
    assert cfg.preprocess.image_size is None  # no deviation from the backbone's own preprocessing
    assert Config.from_json(cfg.to_json()) == cfg
    assert cfg.config_hash() == Config.from_json(cfg.to_json()).config_hash()


def test_overrides_apply_after_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\nbackbone: resnet18\n")
    cfg = load_config(f, ["train.epochs=9", "preprocess.mean=0.485,0.456,0.406"])
    assert cfg.train.epochs == 9 and cfg.backbone == "resnet18"
    assert cfg.preprocess.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("train: [1, 2]\n", [], "field train"),
        ("nonsense: 1\n", [], "field nonsense"),
        ("train:\n  epochs: 0\n", [], "train.epochs"),
        ("{", [], "not valid YAML"),
        ("", ["train.epochs"], "expected KEY=VALUE"),
        ("", ["data.test_fraction=0.6", "data.val_fraction=0.5"], "val_fraction + test_fraction"),
        ("", ["registry.model_name=bad name!"], "registry.model_name"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(TlopsError, match=message.replace("+", r"\+")):
        load_config(f, overrides)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(TlopsError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_train_field_is_in_the_checkpoint_key_unless_declared_runtime() -> None:
    """The checkpoint key takes every train field but those marked RUNTIME where they are declared: a new field
    is in the key by default, and one that only says how a run executes is marked beside it."""
    from pydantic import Field

    from tlops.config.settings import RUNTIME, TrainConfig

    class Extended(TrainConfig):
        new_knob: int = 0
        new_runtime_knob: int = Field(0, json_schema_extra=RUNTIME)

    fields = Extended().result_fields()
    assert "new_knob" in fields and "new_runtime_knob" not in fields
    assert {"lr", "epochs", "strategy", "augment", "seed"} <= set(fields)
    assert not {"device", "num_workers", "processes", "checkpoint_dir", "resume", "accelerator"} & set(fields)
