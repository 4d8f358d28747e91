"""The aggregator registry: every aggregator module registers itself, and both the server
(:func:`make_strategy`) and the config (``distill.aggregator``) read this one registry.

Adding an aggregator is one file in ``feddistill/strategies/`` with one registration::

    @register_aggregator("trimmed-mean", reads={"beta": "distill.trim-beta", "probabilities": probability_answers})
    class TrimmedMeanAnswers(AnswerStrategy): ...

``reads`` maps each constructor keyword to where its value comes from: a config key (dotted,
``-`` or ``_``) or a function of the config. Nothing else changes: the modules of this package are
imported, and so register, the first time anything reads the registry (the config's validation,
:func:`make_strategy`). An aggregator that needs a setting the config does not have yet adds that
config field (config.py, with its range, and ``pyproject.toml``'s table) too.

This module imports nothing of the project but :mod:`feddistill.registry` (the config imports it);
the registrations' config functions take the config object without importing its module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from feddistill.registry import Registry

__all__ = ["AGGREGATORS", "Aggregator", "make_strategy", "register_aggregator", "setting_name"]

PACKAGE = __name__.rpartition(".")[0]  # feddistill.strategies

Source = str | Callable[[Any], Any]  # a config key, or a function of the config


@dataclass(frozen=True)
class Aggregator:
    """A registered aggregator: its factory (an ``AnswerStrategy`` class, or a function taking the
    same keywords) and the config values each of its constructor keywords reads."""

    name: str
    factory: Callable[..., Any]
    reads: Mapping[str, Source] = field(default_factory=dict)

    def settings(self) -> dict[str, str]:
        """Setting name -> constructor keyword (see :func:`setting_name`)."""
        return {setting_name(keyword, source): keyword for keyword, source in self.reads.items()}


def _discover() -> None:
    """Import every module of the package: each aggregator module registers itself on import."""
    package = importlib.import_module(PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{PACKAGE}.{module.name}")


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", discover=_discover)


_F = TypeVar("_F", bound=Callable[..., Any])


@overload
def register_aggregator(
    name: str, factory: None = None, *, reads: Mapping[str, Source] | None = None
) -> Callable[[_F], _F]: ...
@overload
def register_aggregator(name: str, factory: _F, *, reads: Mapping[str, Source] | None = None) -> _F: ...
def register_aggregator(
    name: str, factory: Callable[..., Any] | None = None, *, reads: Mapping[str, Source] | None = None
) -> Callable[..., Any]:
    """Register ``factory`` as aggregator ``name``; without ``factory``, a class decorator.

    A class gets ``name`` as its ``name`` attribute (the strategy's name in logs)."""
    for keyword, source in (reads or {}).items():
        if not (callable(source) or (isinstance(source, str) and source)):
            raise ValueError(
                f"aggregator {name!r}: {keyword!r} must read a config key or a function of the config, got {source!r}"
            )

    def add(target: _F) -> _F:
        if isinstance(target, type):
            setattr(target, "name", name)  # noqa: B010  # `type` has no declared `name`
        AGGREGATORS.register(name, Aggregator(name, target, dict(reads or {})))
        return target

    return add if factory is None else add(factory)


def setting_name(keyword: str, source: Source) -> str:
    """What :func:`make_strategy` calls a value in its ``settings``: a config key's last part
    (``"distill.trim-beta"`` -> ``trim_beta``), or the keyword itself for a function of the config."""
    if callable(source):
        return keyword
    return source.rpartition(".")[2].replace("-", "_")


def config_value(cfg: Any, key: str) -> Any:
    """The value of a dotted config key (``"distill.trim-beta"``) in a ``RunConfig``."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part.replace("-", "_"))
    return value


def make_strategy(
    aggregator: str, *, sampling_rate: float, sampling: str, seed: int, cfg: Any = None, **settings: Any
) -> Any:
    """Build the registered aggregator ``aggregator``.

    Each keyword it reads takes its value from ``settings`` (by :func:`setting_name`:
    ``trim_beta=0.3``, ``probabilities=False``), else from ``cfg`` (a ``RunConfig``), else the
    factory's default. A setting no registered aggregator reads is an error."""
    entry = AGGREGATORS.lookup(aggregator)
    known = {name for agg in AGGREGATORS.values() for name in agg.settings()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(
            f"make_strategy: no aggregator reads {', '.join(unknown)} (settings: {', '.join(sorted(known))})"
        )
    options: dict[str, Any] = {}
    for keyword, source in entry.reads.items():
        name = setting_name(keyword, source)
        if name in settings:
            options[keyword] = settings[name]
        elif cfg is not None:
            options[keyword] = source(cfg) if callable(source) else config_value(cfg, source)
    return entry.factory(sampling_rate=sampling_rate, sampling=sampling, seed=seed, **options)
