"""The training configuration: one dataclass, validated once, shipped as JSON.

The coordinator holds the cluster's configuration and hands it to every shard and
worker when they register, so a worker started by hand on another machine needs
only the coordinator's address and the model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dsgd.errors import ConfigError
from dsgd.model import parse_model_args
from dsgd.optim import OPTIMIZERS
from dsgd.wire import DEFAULT_CHUNK_BYTES, VALUE_DTYPES

DEFAULT_MODEL = "dsgd.examples.digits:digits_cnn"
DEFAULT_TARGET = "accuracy>=0.97"
# the most the evaluator's final evaluation of the whole held-out split may take (longer:
# it reports the last sample's result); members' exit deadlines allow for it
FINAL_EVALUATION_SECONDS = 45.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run. Defaults train the bundled example."""

    model: str = DEFAULT_MODEL
    data: str = ""  # the data directory handed to the model factory (its data= argument)
    model_args: str = ""  # NAME=VALUE,... keywords for the model factory
    num_workers: int = 2
    num_shards: int = 2
    replicas: int = 1  # processes holding each shard's range: a primary and replicas-1 backups
    optimizer: str = "adagrad"
    lr: float = 0.05
    momentum: float = 0.9  # of --optimizer momentum and nesterov
    weight_decay: float = 1e-4  # of --optimizer adamw (decoupled)
    local_lr: float | None = None  # worker-side step between fetches; None: same as lr, 0: none
    n_fetch: int = 1
    n_push: int = 1
    overlap: bool = False  # fetch and push while the next gradient computes
    batch_size: int = 0  # 0: the model's own default
    target: str = DEFAULT_TARGET  # METRIC>=X or METRIC<=X on the test split, or "none"
    max_seconds: float = 300.0
    max_steps: int = 0  # per worker; 0: no limit
    seed: int = 0
    eval_every: float = 1.0  # seconds between evaluations of the test split
    eval_sample: int = 1000  # held-out examples each periodic evaluation uses (0: all)
    evaluator: bool = True  # an evaluator judges the target (workers start once it has read)
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.5
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_inflight: int = 4  # un-acknowledged pushes per shard before a worker waits
    density: float = 1.0  # fraction of an update's entries a push sends (1.0: dense)
    value_dtype: str = "float32"
    density_warmup: int = 0  # pushes over which density decays from 1 to --density
    staleness: str = "none"  # none | drop:K | scale
    checkpoint_every: float = 5.0  # seconds between shard checkpoints (at least; see shard/process)
    checkpoint_keep: int = 3  # checkpoints kept per shard

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = _FIELD_TYPES[str(f.type)]
            if type(value) not in allowed:  # bool is not an int here
                kinds = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ConfigError(f"{_flag(f.name)} must be of type {kinds}, got {value!r}")
        self._check_values()

    def _check_values(self) -> None:
        """One line per rule; the first broken one is the error (naming its flag). Longer
        than most functions on purpose: one flat list of rules is easier to check by eye."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(
            ":" in self.model,
            f"--model must look like package.module:factory, got {self.model!r}",
        )
        parse_model_args(self.model_args)
        need(self.num_workers >= 1, f"--workers must be >= 1, got {self.num_workers}")
        need(self.num_shards >= 1, f"--shards must be >= 1, got {self.num_shards}")
        need(1 <= self.replicas <= 8, f"--replicas must be 1..8, got {self.replicas}")
        need(
            self.optimizer in OPTIMIZERS,
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        need(_positive(self.lr), f"--lr must be a positive number, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(0 <= self.weight_decay < math.inf, f"--weight-decay must be >= 0: {self.weight_decay}")
        need(
            self.local_lr is None or (math.isfinite(self.local_lr) and self.local_lr >= 0),
            f"--local-lr must be >= 0, got {self.local_lr}",
        )
        need(self.n_fetch >= 1, f"--n-fetch must be >= 1, got {self.n_fetch}")
        need(self.n_push >= 1, f"--n-push must be >= 1, got {self.n_push}")
        need(self.batch_size >= 0, f"--batch-size must be >= 0, got {self.batch_size}")
        parse_target(self.target)
        need(_positive(self.max_seconds), f"--max-seconds must be > 0, got {self.max_seconds}")
        need(self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}")
        need(_positive(self.eval_every), f"--eval-every must be > 0, got {self.eval_every}")
        need(self.eval_sample >= 0, f"--eval-sample must be >= 0, got {self.eval_sample}")
        need(
            _positive(self.heartbeat_interval),
            f"--heartbeat-interval must be > 0, got {self.heartbeat_interval}",
        )
        need(
            self.heartbeat_timeout > self.heartbeat_interval,
            f"--heartbeat-timeout ({self.heartbeat_timeout}) must exceed "
            f"--heartbeat-interval ({self.heartbeat_interval})",
        )
        need(
            4096 <= self.chunk_bytes <= 64 << 20,
            f"--chunk-bytes must be between 4096 and {64 << 20}, got {self.chunk_bytes}",
        )
        need(self.max_inflight >= 1, f"--max-inflight must be >= 1, got {self.max_inflight}")
        need(0.0 < self.density <= 1.0, f"--density must be in (0, 1], got {self.density}")
        need(
            self.value_dtype in VALUE_DTYPES,
            f"--value-dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.value_dtype!r}",
        )
        parse_staleness(self.staleness)
        need(self.density_warmup >= 0, f"--density-warmup must be >= 0, got {self.density_warmup}")
        need(
            _positive(self.checkpoint_every),
            f"--checkpoint-every must be > 0, got {self.checkpoint_every}",
        )
        need(
            self.checkpoint_keep >= 1,
            f"--checkpoint-keep must be >= 1, got {self.checkpoint_keep}",
        )

    @property
    def worker_lr(self) -> float:
        """The learning rate of the worker's local step between fetches."""
        return self.lr if self.local_lr is None else self.local_lr

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("configuration must be a JSON object of TrainConfig fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; is dsgd the same version?")
        return cls(**raw)

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "float | None": (int, float, type(None)),
    "str": (str,),
    "bool": (bool,),
}
_FLAGS = {
    "num_workers": "--workers",
    "num_shards": "--shards",
    "evaluator": "--no-evaluator",
    "overlap": "--overlap",
}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@dataclass(frozen=True)
class Target:
    """When a run has trained enough: ``metric >= value`` or ``metric <= value`` on the
    held-out split (``metric`` is any name the model's metrics return, or ``loss``)."""

    metric: str
    op: str  # ">=" or "<="
    value: float

    def reached(self, metrics: dict[str, float]) -> bool:
        got = metrics[self.metric]
        return got >= self.value if self.op == ">=" else got <= self.value

    def better(self, a: float, b: float) -> float:
        """The better of two values of the metric."""
        return max(a, b) if self.op == ">=" else min(a, b)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


_TARGET = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_./-]*)\s*(>=|<=)\s*(\S+)\s*")


def parse_target(text: str) -> Target | None:
    """``accuracy>=0.97`` / ``loss<=0.49`` / ``r2>=0.5`` -> a Target; ``none`` -> None."""
    if text.strip().lower() == "none":
        return None
    match = _TARGET.fullmatch(text)
    value = _float(match.group(3)) if match else None
    if match is None or value is None or not math.isfinite(value):
        raise ConfigError(
            f"--target must look like METRIC>=X or METRIC<=X (e.g. accuracy>=0.97, "
            f"loss<=0.49), or none; got {text!r}"
        )
    target = Target(match.group(1), match.group(2), value)
    if target.metric == "accuracy" and not (
        (target.op == ">=" and 0.0 < value <= 1.0) or (target.op == "<=" and 0.0 <= value < 1.0)
    ):
        raise ConfigError(
            f"--target {text}: an accuracy is between 0 and 1 and this target is met "
            "before training or never; use a value inside (0, 1], or --target none to "
            "train until the budget runs out"
        )
    return target


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_staleness(policy: str) -> tuple[str, int]:
    """``none`` | ``drop:K`` | ``scale`` -> (kind, bound)."""
    if policy in ("none", "scale"):
        return policy, 0
    kind, _, bound = policy.partition(":")
    if kind == "drop" and bound.isascii() and bound.isdigit():
        return "drop", int(bound)
    raise ConfigError(f"--staleness must be none, drop:K (K an integer) or scale, got {policy!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags shared by ``dsgd start`` and ``python -m dsgd.coordinator``."""
    d = TrainConfig()
    add = parser.add_argument
    add("--model", default=d.model, help=f"package.module:factory (default {d.model})")
    add("--data", help="data directory for the model factory (its data= argument)")
    add(
        "--model-arg",
        dest="model_args",
        action="append",
        help="NAME=VALUE keyword for the model factory (repeatable)",
    )
    add("--workers", dest="num_workers", type=int, default=d.num_workers, help="model replicas")
    add("--shards", dest="num_shards", type=int, default=d.num_shards, help="parameter shards")
    add(
        "--replicas",
        type=int,
        default=d.replicas,
        help="processes per shard range: a primary and REPLICAS-1 backups that fail over",
    )
    add("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="server-side optimizer")
    add("--lr", type=float, default=d.lr, help="server learning rate")
    add("--momentum", type=float, default=d.momentum, help="for momentum and nesterov")
    add("--weight-decay", type=float, default=d.weight_decay, help="adamw's weight decay")
    add("--local-lr", type=float, default=None, help="worker local-step lr (default: --lr)")
    add("--n-fetch", type=int, default=d.n_fetch, help="fetch parameters every K steps")
    add("--n-push", type=int, default=d.n_push, help="push accumulated updates every K steps")
    add("--batch-size", type=int, default=d.batch_size, help="0: the model's default")
    add(
        "--target",
        help=f"stop when METRIC>=X or METRIC<=X on the test split, or none (default {d.target})",
    )
    add("--target-accuracy", type=float, help="the same as --target accuracy>=A")
    add("--max-seconds", type=float, default=d.max_seconds, help="time budget of the run")
    add("--max-steps", type=int, default=d.max_steps, help="step budget per worker (0: none)")
    add("--seed", type=int, default=d.seed, help="seed of initial parameters and batches")
    add("--eval-every", type=float, default=d.eval_every, help="seconds between evaluations")
    add(
        "--eval-sample",
        type=int,
        default=d.eval_sample,
        help="held-out examples judged periodically; the whole split at the end (0: all)",
    )
    add(
        "--overlap",
        action="store_true",
        help="fetch and push while the next gradient computes (faster with one worker per "
        "host at 75M parameters; slower when workers share the cores)",
    )
    add(
        "--no-evaluator",
        dest="evaluator",
        action="store_false",
        help="run without an evaluator (the run then ends on its budgets only)",
    )
    add("--heartbeat-interval", type=float, default=d.heartbeat_interval, help="seconds")
    add("--heartbeat-timeout", type=float, default=d.heartbeat_timeout, help="seconds")
    add("--chunk-bytes", type=int, default=d.chunk_bytes, help="payload bytes per message")
    add("--max-inflight", type=int, default=d.max_inflight, help="unacked pushes per shard")
    add("--density", type=float, default=d.density, help="fraction of an update pushed")
    add("--value-dtype", default=d.value_dtype, choices=list(VALUE_DTYPES))
    add("--density-warmup", type=int, default=d.density_warmup, help="pushes to decay density")
    add("--staleness", default=d.staleness, help="none | drop:K | scale")
    add("--checkpoint-every", type=float, default=d.checkpoint_every, help="seconds")
    add("--checkpoint-keep", type=int, default=d.checkpoint_keep, help="checkpoints kept per shard")


def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """Build (and so validate) a TrainConfig from parsed flags."""
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if isinstance(given.get("model_args"), list):
        given["model_args"] = ",".join(given["model_args"])
    accuracy = getattr(args, "target_accuracy", None)
    if accuracy is not None:
        if "target" in given:
            raise ConfigError("give --target or --target-accuracy, not both")
        given["target"] = target_for_accuracy(accuracy)
    return TrainConfig(**given)


def target_for_accuracy(accuracy: float) -> str:
    """The ``--target`` that ``--target-accuracy A`` stands for."""
    return f"accuracy>={accuracy:g}"
