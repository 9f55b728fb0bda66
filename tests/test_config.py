"""TrainConfig: validation with messages that name the flag, JSON round trip, staleness."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, fields
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsgd.config import (
    DEFAULT_MODEL,
    Target,
    TrainConfig,
    add_config_arguments,
    config_from_arguments,
    parse_staleness,
    parse_target,
)
from dsgd.errors import ConfigError
from dsgd.optim import OPTIMIZERS
from dsgd.wire import DEFAULT_CHUNK_BYTES, VALUE_DTYPES


def test_defaults_are_valid() -> None:
    config = TrainConfig()
    assert config.model == DEFAULT_MODEL
    assert config.optimizer in OPTIMIZERS
    assert config.value_dtype in VALUE_DTYPES
    assert config.chunk_bytes == DEFAULT_CHUNK_BYTES
    assert config.heartbeat_timeout > config.heartbeat_interval
    assert parse_staleness(config.staleness) == ("none", 0)


def test_worker_lr_defaults_to_lr() -> None:
    assert TrainConfig(lr=0.3).worker_lr == 0.3
    assert TrainConfig(lr=0.3, local_lr=0.01).worker_lr == 0.01
    assert TrainConfig(lr=0.3, local_lr=0.0).worker_lr == 0.0


INVALID = [
    ("model", "dsgd.examples.digits", "--model"),
    ("model", "", "--model"),
    ("num_workers", 0, "--workers"),
    ("num_workers", -3, "--workers"),
    ("num_shards", 0, "--shards"),
    ("optimizer", "lamb", "--optimizer"),
    ("optimizer", "SGD", "--optimizer"),
    ("lr", 0.0, "--lr"),
    ("lr", -0.1, "--lr"),
    ("lr", math.nan, "--lr"),
    ("lr", math.inf, "--lr"),
    ("momentum", 1.0, "--momentum"),
    ("momentum", -0.1, "--momentum"),
    ("momentum", math.nan, "--momentum"),
    ("weight_decay", -1e-4, "--weight-decay"),
    ("weight_decay", math.nan, "--weight-decay"),
    ("weight_decay", math.inf, "--weight-decay"),
    ("local_lr", -0.01, "--local-lr"),
    ("local_lr", math.nan, "--local-lr"),
    ("local_lr", math.inf, "--local-lr"),
    ("n_fetch", 0, "--n-fetch"),
    ("n_push", 0, "--n-push"),
    ("batch_size", -1, "--batch-size"),
    ("model_args", "image_size", "--model-arg"),
    ("model_args", "1x=2", "--model-arg"),
    ("target", "accuracy>=1.01", "--target"),
    ("target", "accuracy>=0", "--target"),
    ("target", "accuracy>=nan", "--target"),
    ("target", "accuracy=0.9", "--target"),
    ("target", "loss<=", "--target"),
    ("target", ">=0.5", "--target"),
    ("max_seconds", 0.0, "--max-seconds"),
    ("max_seconds", -5.0, "--max-seconds"),
    ("max_seconds", math.nan, "--max-seconds"),
    ("max_steps", -1, "--max-steps"),
    ("eval_every", 0.0, "--eval-every"),
    ("eval_every", math.inf, "--eval-every"),
    ("eval_sample", -1, "--eval-sample"),
    ("heartbeat_interval", 0.0, "--heartbeat-interval"),
    ("heartbeat_interval", math.nan, "--heartbeat-interval"),
    ("heartbeat_interval", 5.0, "--heartbeat-timeout"),  # now exceeds the timeout
    ("heartbeat_timeout", 0.5, "--heartbeat-timeout"),  # equal to the interval
    ("heartbeat_timeout", math.nan, "--heartbeat-timeout"),
    ("chunk_bytes", 4095, "--chunk-bytes"),
    ("chunk_bytes", (64 << 20) + 1, "--chunk-bytes"),
    ("chunk_bytes", 0, "--chunk-bytes"),
    ("max_inflight", 0, "--max-inflight"),
    ("replicas", 0, "--replicas"),
    ("replicas", 9, "--replicas"),
    ("density", 0.0, "--density"),
    ("density", 1.5, "--density"),
    ("density", math.nan, "--density"),
    ("value_dtype", "float64", "--value-dtype"),
    ("value_dtype", "fp16", "--value-dtype"),
    ("staleness", "drop", "--staleness"),
    ("staleness", "sometimes", "--staleness"),
    ("density_warmup", -1, "--density-warmup"),
    ("checkpoint_every", 0.0, "--checkpoint-every"),
    ("checkpoint_every", math.nan, "--checkpoint-every"),
    ("checkpoint_keep", 0, "--checkpoint-keep"),
    ("evaluator", 1, "--no-evaluator"),  # a bool, not an int
    ("overlap", "yes", "--overlap"),
]


@pytest.mark.parametrize(("field", "value", "flag"), INVALID)
def test_invalid_values_raise_config_error_naming_the_flag(
    field: str, value: Any, flag: str
) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(flag), message
    assert "\n" not in message


def test_every_field_has_an_invalid_case() -> None:
    """A new field needs a validation test: list it in INVALID above."""
    tested = {field for field, _, _ in INVALID}
    # any seed is valid; a data directory is the model factory's to check
    assert {f.name for f in fields(TrainConfig)} - tested == {"seed", "data"}


@pytest.mark.parametrize(
    "changes",
    [
        {"chunk_bytes": 4096},
        {"chunk_bytes": 64 << 20},
        {"density": 1.0},
        {"density": 1e-6},
        {"target": "accuracy>=1"},
        {"target": "loss<=0.49"},
        {"target": "r2 >= 0.5"},
        {"target": "none"},
        {"local_lr": 0.0},
        {"batch_size": 0},
        {"max_steps": 0},
        {"num_workers": 64, "num_shards": 64},
        {"optimizer": "sgd"},
        {"optimizer": "nesterov", "momentum": 0.0},
        {"optimizer": "adamw", "weight_decay": 0.0},
        {"value_dtype": "bfloat16"},
        {"staleness": "drop:0"},
        {"staleness": "scale"},
        {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.11},
        {"model": "my_pkg.models:build"},
    ],
)
def test_boundary_values_are_accepted(changes: dict[str, Any]) -> None:
    config = TrainConfig(**changes)
    for key, value in changes.items():
        assert getattr(config, key) == value


def test_with_validates_the_new_values() -> None:
    config = TrainConfig().with_(num_workers=8, lr=0.1)
    assert (config.num_workers, config.lr) == (8, 0.1)
    with pytest.raises(ConfigError, match="--workers"):
        config.with_(num_workers=0)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("num_workers", 2.5, "--workers"),
        ("num_workers", "2", "--workers"),
        ("num_shards", None, "--shards"),
        ("lr", "0.1", "--lr"),
        ("max_seconds", None, "--max-seconds"),
        ("chunk_bytes", 65536.5, "--chunk-bytes"),
        ("model", 5, "--model"),
        ("optimizer", ["sgd"], "--optimizer"),
        ("staleness", 3, "--staleness"),
    ],
)
def test_values_of_the_wrong_type_raise_config_error_naming_the_flag(
    field: str, value: Any, flag: str
) -> None:
    """The coordinator ships the config as JSON, so the types have to be checked too."""
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match=flag):
        TrainConfig.from_json(json.dumps({field: value}))


# ---------------------------------------------------------------------------
# JSON

valid_configs = st.builds(
    TrainConfig,
    model=st.sampled_from([DEFAULT_MODEL, "dsgd.examples.digits:digits_mlp", "a.b:c"]),
    num_workers=st.integers(1, 1000),
    num_shards=st.integers(1, 1000),
    optimizer=st.sampled_from(OPTIMIZERS),
    lr=st.floats(1e-8, 10.0),
    momentum=st.floats(0.0, 0.999),
    weight_decay=st.floats(0.0, 1.0),
    local_lr=st.none() | st.floats(0.0, 10.0),
    n_fetch=st.integers(1, 100),
    n_push=st.integers(1, 100),
    overlap=st.booleans(),
    batch_size=st.integers(0, 4096),
    target=st.sampled_from(["none", "loss<=0.3", "r2>=-1"])
    | st.floats(1e-6, 1.0).map(lambda a: f"accuracy>={a!r}"),
    max_seconds=st.floats(1e-3, 1e6),
    max_steps=st.integers(0, 10**9),
    seed=st.integers(-(2**63), 2**63 - 1),
    eval_sample=st.integers(0, 10**6),
    eval_every=st.floats(1e-3, 1e3),
    heartbeat_interval=st.just(0.25),
    heartbeat_timeout=st.floats(0.5, 100.0) | st.just(math.inf),
    chunk_bytes=st.integers(4096, 64 << 20),
    max_inflight=st.integers(1, 64),
    density=st.floats(1e-6, 1.0).filter(lambda d: d > 0),
    value_dtype=st.sampled_from(sorted(VALUE_DTYPES)),
    staleness=st.sampled_from(["none", "scale"]) | st.integers(0, 10**6).map(lambda k: f"drop:{k}"),
)


@settings(deadline=None)
@given(config=valid_configs)
def test_json_round_trip(config: TrainConfig) -> None:
    text = config.to_json()
    assert json.loads(text) == {**asdict(config)}
    assert TrainConfig.from_json(text) == config
    assert TrainConfig.from_json(text).to_json() == text


def test_to_json_is_canonical() -> None:
    text = TrainConfig().to_json()
    assert list(json.loads(text)) == sorted(f.name for f in fields(TrainConfig))
    assert TrainConfig().to_json() == text


def test_from_json_fills_in_defaults() -> None:
    assert TrainConfig.from_json("{}") == TrainConfig()
    assert TrainConfig.from_json('{"num_workers": 5}') == TrainConfig(num_workers=5)


def test_from_json_rejects_unknown_keys() -> None:
    text = json.dumps({**asdict(TrainConfig()), "learning_rate": 0.1, "workers": 3})
    with pytest.raises(
        ConfigError, match=r"unknown configuration keys \['learning_rate', 'workers'\]"
    ):
        TrainConfig.from_json(text)


def test_from_json_validates_values() -> None:
    with pytest.raises(ConfigError, match="--density"):
        TrainConfig.from_json('{"density": 2.0}')


@pytest.mark.parametrize("text", ["", "{", "{'lr': 1}", "nope", '{"lr": 0.1,}'])
def test_from_json_rejects_invalid_json(text: str) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json(text)


@pytest.mark.parametrize("text", ["[]", '["lr"]', "5", "null", '"config"', "true"])
def test_from_json_rejects_documents_that_are_not_objects(text: str) -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        TrainConfig.from_json(text)


# ---------------------------------------------------------------------------
# staleness policy


@pytest.mark.parametrize(
    ("policy", "parsed"),
    [
        ("none", ("none", 0)),
        ("scale", ("scale", 0)),
        ("drop:0", ("drop", 0)),
        ("drop:3", ("drop", 3)),
        ("drop:1000000", ("drop", 1000000)),
    ],
)
def test_parse_staleness(policy: str, parsed: tuple[str, int]) -> None:
    assert parse_staleness(policy) == parsed
    assert TrainConfig(staleness=policy).staleness == policy


@pytest.mark.parametrize(
    "policy",
    [
        "",
        "drop",
        "drop:",
        "drop:-1",
        "drop:1.5",
        "drop:x",
        "drop: 3",
        "drop:3:4",
        "DROP:3",
        "None",
        "scale:2",
        "none:0",
        ":3",
        "drop:²",  # a digit to isdigit, not to int()
        "drop:٣",  # Arabic-Indic 3: int() reads it
    ],
)
def test_parse_staleness_rejects_other_policies(policy: str) -> None:
    with pytest.raises(ConfigError, match="--staleness"):
        parse_staleness(policy)


@settings(deadline=None)
@given(policy=st.text(max_size=12) | st.from_regex(r"drop:.{0,4}", fullmatch=True))
@example(policy="drop:\u00b9")  # found by this test: str.isdigit() is not int()'s idea of a digit
def test_parse_staleness_never_raises_anything_but_config_error(policy: str) -> None:
    try:
        kind, bound = parse_staleness(policy)
    except ConfigError:
        return
    assert kind in ("none", "scale", "drop")
    if kind == "drop":
        digits = policy.removeprefix("drop:")
        assert digits.isascii() and digits.isdigit()
        assert bound == int(digits)
    else:
        assert (policy, bound) == (kind, 0)


@pytest.mark.parametrize(
    ("text", "metric", "op", "value"),
    [
        ("accuracy>=0.97", "accuracy", ">=", 0.97),
        ("loss<=0.49", "loss", "<=", 0.49),
        (" r2 >= 0.5 ", "r2", ">=", 0.5),
        ("log_loss<=1e-2", "log_loss", "<=", 0.01),
        ("mse<=-1", "mse", "<=", -1.0),
    ],
)
def test_parse_target(text: str, metric: str, op: str, value: float) -> None:
    target = parse_target(text)
    assert target == Target(metric, op, value)


def test_parse_target_none_means_no_target() -> None:
    assert parse_target("none") is None
    assert parse_target("None") is None


def test_a_target_is_reached_in_its_direction() -> None:
    up, down = Target("accuracy", ">=", 0.9), Target("loss", "<=", 0.5)
    assert up.reached({"accuracy": 0.9}) and not up.reached({"accuracy": 0.89})
    assert down.reached({"loss": 0.5}) and not down.reached({"loss": 0.51})
    assert up.better(0.8, 0.9) == 0.9 and down.better(0.8, 0.9) == 0.8
    assert str(down) == "loss<=0.5"


@given(st.text(max_size=30))
def test_parse_target_never_raises_anything_but_config_error(text: str) -> None:
    try:
        parse_target(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def _parsed(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_arguments(parser.parse_args(list(argv)))


def test_target_accuracy_is_an_alias_of_target() -> None:
    assert _parsed().target == "accuracy>=0.97"
    assert _parsed("--target-accuracy", "0.9").target == "accuracy>=0.9"
    assert _parsed("--target", "loss<=0.3").target == "loss<=0.3"
    with pytest.raises(ConfigError, match="not both"):
        _parsed("--target", "loss<=0.3", "--target-accuracy", "0.9")
    with pytest.raises(ConfigError, match="--target none"):
        _parsed("--target-accuracy", "0")
