"""Gin binds the method classes and EngineConfig; every such setting is part of the results key."""

from __future__ import annotations

import dataclasses

import pytest

from sparse_jax.engine.generate import EngineConfig
from sparse_jax.pipeline.configurables import ENGINE_FIELDS_OF_THE_EXPERIMENT, method_classes
from sparse_jax.pipeline import resources, runner
from sparse_jax.pipeline.errors import ConfigError
from sparse_jax.pipeline.experiment import ENGINE_EXECUTION_FIELDS
from sparse_jax.pipeline.sweep import expand
from tests.test_pipeline_common import REPO, config_of, write_gin


def _other_value(value):
    """A value of the same kind that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_other"
    return 3  # None


def _method_fields():
    return [
        (name, cls.__name__, f.name, f.default)
        for name, cls in sorted(method_classes().items())
        for f in dataclasses.fields(cls)
        if f.name != "sparsity"
    ]


@pytest.fixture
def gin_file(tmp_path):
    return write_gin(tmp_path / "base.gin", tmp_path / "results")


@pytest.mark.parametrize("method, configurable, field, default", _method_fields(), ids=lambda v: str(v))
def test_every_method_hyper_parameter_is_in_the_results_key(gin_file, method, configurable, field, default):
    bind = [f"ExperimentConfig.method = {method!r}"]
    one = config_of(gin_file, *bind, f"{configurable}.{field} = {default!r}")
    other = config_of(gin_file, *bind, f"{configurable}.{field} = {_other_value(default)!r}")
    assert one.method_args == {field: default}
    assert one.run_key() != other.run_key()


def _engine_fields():
    skipped = set(ENGINE_FIELDS_OF_THE_EXPERIMENT) | {"sampling"}  # sampling is an object, not a literal
    return [f for f in dataclasses.fields(EngineConfig) if f.name not in skipped]


@pytest.mark.parametrize("field", _engine_fields(), ids=lambda f: f.name)
def test_engine_settings_are_in_the_key_unless_execution_only(gin_file, field):
    default = field.default
    one = config_of(gin_file, f"EngineConfig.{field.name} = {default!r}")
    other = config_of(gin_file, f"EngineConfig.{field.name} = {_other_value(default)!r}")
    assert one.engine_args == {field.name: default}
    same = one.run_key() == other.run_key()
    assert same == (field.name in ENGINE_EXECUTION_FIELDS)


def test_no_engine_binding_keeps_the_old_key_and_other_methods_bindings_are_ignored(gin_file):
    plain = config_of(gin_file)
    assert "engine_args" not in plain.key_fields()
    assert config_of(gin_file, "Quest.token_budget = 2048").run_key() == plain.run_key()  # method is dense


def test_fused_qkv_is_on_by_default_execution_only_and_reaches_the_model_load(gin_file, monkeypatch):
    default, separate = config_of(gin_file), config_of(gin_file, "ExperimentConfig.fused_qkv = False")
    assert default.fused_qkv and not separate.fused_qkv
    # Results written with either layout (the separate one before it became the default) resume.
    assert default.run_key() == separate.run_key() and default.run_dir() == separate.run_dir()
    assert "fused_qkv" not in default.key_fields()
    loads = []
    monkeypatch.setattr(resources, "load_bundle", lambda *args: loads.append(args))
    runner.run_bundle(default)
    runner.run_bundle(separate)
    assert [load[-1] for load in loads] == [True, False]  # load_bundle's fused_qkv
    with pytest.raises(ConfigError, match="fused_qkv must be True or False"):
        config_of(gin_file, "ExperimentConfig.fused_qkv = 'yes'")


def test_macros_and_the_saved_config_gin_give_back_the_same_config(gin_file, tmp_path):
    cfg = config_of(
        gin_file,
        "ExperimentConfig.method = 'quest'",
        "BUDGET = 2048",
        "Quest.token_budget = %BUDGET",
        "Quest.share_pages = False",
        "EngineConfig.bucket_granularity = 2048",
    )
    assert cfg.method_args == {"token_budget": 2048, "share_pages": False}
    assert cfg.engine_args == {"bucket_granularity": 2048}
    saved = tmp_path / "config.gin"
    saved.write_text(cfg.to_gin())
    assert "Quest.token_budget = 2048" in saved.read_text()
    assert config_of(saved) == cfg


def test_every_method_file_parses_into_its_class_bindings():
    for path in sorted((REPO / "configs" / "methods").glob("*.gin")):
        cfg = config_of(path)
        assert cfg.method == path.stem
        assert cfg.method_args or cfg.method == "dense", path


def test_a_sweep_axis_over_a_class_binding(tmp_path):
    axes = "Sweep.axes = {'ExperimentConfig.method': ['quest'], 'Quest.share_pages': [True, False]}"
    runs = expand(write_gin(tmp_path / "sweep.gin", tmp_path / "results", axes))
    assert sorted(r.method_args["share_pages"] for r in runs) == [False, True]
    assert len({r.run_key() for r in runs}) == 2
