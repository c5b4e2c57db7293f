"""Training configuration: nested dataclasses, read from YAML, with ``key.sub=value`` overrides.

``TrainerConfig`` holds what every task shares and the generic trainer reads (seed, optimizer,
schedule, run). A task's configuration subclasses it with the task's own sections
(:mod:`rba_core.tasks` keeps those beside each task). Every field is checked after loading and
after overrides; a bad value raises :class:`rba_core.errors.ConfigError` naming the dotted field
and its allowed range, and the ``check_*`` helpers here give task sections the same messages.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from rba_core.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "constant")


def invalid(name: str, allowed: str, value: Any) -> NoReturn:
    """Raise the one ConfigError shape every config field uses: ``NAME must be ALLOWED``."""
    raise ConfigError(f"{name} must be {allowed} (got {value!r})")


def check_finite(name: str, value: float, low: float | None = None,
                 high: float | None = None, *, low_open: bool = False, high_open: bool = False,
                 allowed: str) -> None:
    if not math.isfinite(value):
        invalid(name, allowed, value)
    if low is not None and (value < low or (low_open and value == low)):
        invalid(name, allowed, value)
    if high is not None and (value > high or (high_open and value == high)):
        invalid(name, allowed, value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        invalid(name, "one of " + ", ".join(choices), value)


def check_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        invalid(name, f"an integer >= {low}", value)


@dataclass
class OptimConfig:
    """AdamW over the task's trainable parameters, with clipping and gradient accumulation."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1

    def validate(self, prefix: str = "optim") -> None:
        check_finite(f"{prefix}.lr", self.lr, 0.0, low_open=True, allowed="a finite number > 0")
        if len(self.betas) != 2:
            invalid(f"{prefix}.betas", "a pair [beta1, beta2], each in [0, 1)", list(self.betas))
        for index, beta in enumerate(self.betas):
            check_finite(f"{prefix}.betas[{index}]", beta, 0.0, 1.0, high_open=True,
                         allowed="a number in [0, 1)")
        check_finite(f"{prefix}.eps", self.eps, 0.0, low_open=True, allowed="a finite number > 0")
        check_finite(f"{prefix}.weight_decay", self.weight_decay, 0.0,
                     allowed="a finite number >= 0")
        check_finite(f"{prefix}.grad_clip", self.grad_clip, 0.0,
                     allowed="a finite number >= 0 (0 turns clipping off)")
        check_at_least(f"{prefix}.grad_accum", self.grad_accum, 1)


@dataclass
class ScheduleConfig:
    """Linear warm-up from lr/warmup_steps to lr, then cosine decay to lr * min_lr_ratio."""

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self, prefix: str = "schedule") -> None:
        check_choice(f"{prefix}.kind", self.kind, SCHEDULES)
        check_at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        check_finite(f"{prefix}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0,
                     allowed="a number in [0, 1]")


@dataclass
class RunConfig:
    """How long to train, on what, and what to write where."""

    output_dir: str = "runs/train"
    max_steps: int = 0
    max_epochs: int = 1
    # A wall-clock budget for the optimizer steps (0 = none), so that methods whose steps cost
    # differently can be compared at equal compute; the LR schedule still spans max_steps.
    time_budget_minutes: float = 0.0
    device: str = "auto"
    dtype: str = "auto"
    strategy: str = "ddp"
    log_every: int = 1
    checkpoint_every: int = 100
    keep_last: int = 3
    resume: str = "auto"
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True

    def validate(self, prefix: str = "run") -> None:
        if not self.output_dir:
            invalid(f"{prefix}.output_dir", "a folder path", self.output_dir)
        check_at_least(f"{prefix}.max_steps", self.max_steps, 0)
        check_at_least(f"{prefix}.max_epochs", self.max_epochs, 0)
        check_finite(f"{prefix}.time_budget_minutes", self.time_budget_minutes, 0.0,
                     allowed="a number of minutes >= 0 (0 = no budget)")
        if self.max_steps == 0 and self.max_epochs == 0:
            invalid(f"{prefix}.max_steps / {prefix}.max_epochs",
                    "set so that at least one is > 0 (0 means no limit from that field)", 0)
        check_choice(f"{prefix}.device", self.device, DEVICES)
        check_choice(f"{prefix}.dtype", self.dtype, DTYPES)
        check_choice(f"{prefix}.strategy", self.strategy, STRATEGIES)
        check_at_least(f"{prefix}.log_every", self.log_every, 1)
        check_at_least(f"{prefix}.checkpoint_every", self.checkpoint_every, 0)
        check_at_least(f"{prefix}.keep_last", self.keep_last, 1)
        if not self.resume:
            invalid(f"{prefix}.resume", "'auto', 'never' or a checkpoint folder", self.resume)
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            invalid(f"{prefix}.resume", "'auto', 'never' or an existing checkpoint folder",
                    self.resume)


@dataclass
class TrainerConfig:
    """Everything the generic :class:`rba_core.train.Trainer` reads."""

    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if not 0 <= self.seed < 2**63:
            invalid("seed", "an integer in [0, 2**63)", self.seed)
        self.optim.validate()
        self.schedule.validate()
        self.run.validate()


C = TypeVar("C")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's declared type, or a ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(name, value, inner[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            fields = ", ".join(f.name for f in dataclasses.fields(annotation))
            invalid(name, f"a mapping of {fields}", value)
        return _build(annotation, value, name)
    if annotation is bool:
        if not isinstance(value, bool):
            invalid(name, "true or false", value)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            invalid(name, "an integer", value)
        return value
    if annotation is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string, a common surprise in learning rates.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                invalid(name, "a number", value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            invalid(name, "a number", value)
        return float(value)
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            invalid(name, "a string", value)
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            invalid(name, "a list", value)
        return tuple(_coerce(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            invalid(name, f"a list of {len(args)} numbers", value)
        if len(value) != len(args):
            invalid(name, f"a list of exactly {len(args)} items", list(value))
        return tuple(_coerce(f"{name}[{i}]", item, arg)
                     for i, (item, arg) in enumerate(zip(value, args)))
    raise TypeError(f"unsupported config annotation {annotation!r} for {name}")


def _build(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    # A config class may name keys it used to have (``MOVED = {"old": "what to write now"}``),
    # so that an old file fails with the fix instead of a bare "unknown field".
    moved: dict[str, str] = getattr(cls, "MOVED", {})
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names and key in moved:
            raise ConfigError(f"config field {full!r} is no longer read: {moved[key]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            suggestion = (prefix + "." if prefix else "") + close[0] if close else ""
            hint = f"; did you mean {suggestion!r}?" if close else ""
            raise ConfigError(f"unknown config field {full!r}{hint} (known fields"
                              f"{' of ' + prefix if prefix else ''}: {', '.join(names)})")
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) that YAML and JSON can write and ``build_config`` reads."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


@functools.cache
def _yaml_loader() -> type:
    """yaml's safe loader, refusing a key written twice in one mapping: plain yaml keeps the
    last silently, so a setting made twice in a file would look set to the first value."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    # ``<<`` merges another mapping in, where overriding its keys is the point.
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        repeated = key in seen
                    except TypeError:
                        continue  # an unhashable key, which yaml itself refuses below
                    if repeated:
                        # A plain YAMLError: its message is one line, without yaml's excerpt.
                        raise yaml.YAMLError(f"{key!r} is set twice in one section (lines "
                                             f"{seen[key]} and {line}); yaml would keep only "
                                             "the last, so delete one")
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def apply_override(values: dict[str, Any], override: str) -> None:
    """Set ``values[a][b] = yaml(v)`` for one ``a.b=v`` string, creating sections as needed."""
    import yaml

    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like section.field=value "
                          "(for example optim.lr=3e-4)")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error})") from None
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def with_overrides(values: dict[str, Any] | None,
                   overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of the nested ``values`` with each ``a.b=value`` override applied in order."""
    merged = _deep_copy(values or {})
    for override in overrides:
        apply_override(merged, override)
    return merged


def build_config(cls: type[C], values: dict[str, Any] | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> C:
    """A validated ``cls`` from a nested dict plus ``a.b=value`` overrides."""
    config = _build(cls, with_overrides(values, overrides))
    config.validate()  # type: ignore[attr-defined]
    return config


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of sections a YAML config file holds (an empty file is no sections)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist; pass a YAML file (see "
                          "rba_core/tasks/configs/ for examples)")
    try:
        values = _load_yaml(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {file}: not valid YAML ({error})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {file}: must hold a mapping of sections, found "
                          f"{type(values).__name__}")
    return values


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                cls: type[C] = TrainerConfig) -> C:  # type: ignore[assignment]
    """Read a YAML file into ``cls``, then apply overrides. A task's file (one with ``task:``)
    loads through :func:`rba_core.tasks.load_task_config`, which picks the task's class."""
    return build_config(cls, read_config_file(path), overrides)


def _deep_copy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}
