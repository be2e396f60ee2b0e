"""Every YAML under configs/ parses into the typed config of its folder; unknown keys are errors."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from univg.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# configs/<folder>/*.yaml -> the dataclass it must parse into ("module:Class"). A new kind of config
# gets a line here; a YAML in a folder missing from this mapping fails the test below.
CONFIG_CLASSES = {
    "corpus": "shards.config:CorpusConfig",
    "pretrain": "pretrain.config:PretrainConfig",
    "finetune": "finetune.config:FinetuneConfig",
}


def _config_class(folder: str) -> type:
    module, name = CONFIG_CLASSES[folder].split(":")
    return getattr(importlib.import_module(module), name)


def _yaml_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_configs_to_check() -> None:
    assert any(p.relative_to(CONFIGS).parts[0] == "corpus" for p in _yaml_files())


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_parses_into_its_dataclass(path: Path) -> None:
    folder = path.relative_to(CONFIGS).parts[0]
    assert folder in CONFIG_CLASSES, (
        f"{path}: no config class registered for configs/{folder}/ in CONFIG_CLASSES"
    )
    cls = _config_class(folder)
    cfg: object = load_config(cls, path)
    assert isinstance(cfg, cls)


@pytest.mark.parametrize("folder", sorted(CONFIG_CLASSES))
def test_unknown_key_is_an_error_naming_it(folder: str, tmp_path: Path) -> None:
    source = next(p for p in _yaml_files() if p.relative_to(CONFIGS).parts[0] == folder)
    bad = tmp_path / "bad.yaml"
    bad.write_text(source.read_text() + "\nnot_a_field_xyz: 1\n")
    with pytest.raises(ConfigError, match="not_a_field_xyz"):
        load_config(_config_class(folder), bad)


def test_corpus_configs_hold_their_promises() -> None:
    from shards.config import load_corpus_config

    full = load_corpus_config(CONFIGS / "corpus" / "univg58k.yaml")
    assert (full.num_samples, full.engine.image_size_px, len(full.engine.modalities)) == (58689, 512, 5)
    tiny = load_corpus_config(CONFIGS / "corpus" / "tiny.yaml")
    assert tiny.num_samples <= 1000 and tiny.engine.image_size_px <= 64 and tiny.num_shards > 1


def test_an_empty_value_of_a_string_field_is_the_empty_string(tmp_path: Path) -> None:
    """`key:` in a YAML and `key=` on the command line clear a string (a profile's start: from scratch)."""
    from finetune.config import load_finetune_config

    profile = CONFIGS / "finetune" / "cpu-fast.yaml"
    assert load_finetune_config(profile).pretrained_segmenter  # the profile names a start
    cleared = load_finetune_config(profile, ["pretrained_segmenter=", "rehearsal.corpus="])
    assert cleared.pretrained_segmenter == "" and cleared.rehearsal.corpus == ""
    bare = tmp_path / "bare.yaml"
    bare.write_text("pretrained_segmenter:\n")
    assert load_finetune_config(bare).pretrained_segmenter == ""
    with pytest.raises(ConfigError, match=r"pretrained_segmenter must be a string, got \[1\]"):
        load_finetune_config(profile, ["pretrained_segmenter=[1]"])
