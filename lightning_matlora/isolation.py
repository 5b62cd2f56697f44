"""Running a LightningModule's step again without its side effects counting twice (the one home of it).

The callback calls the user's step more than once: ``training_step`` in the low pass of a ``max_pass`` step, and
``validation_step``/``test_step`` at every eval rank. Inside :func:`isolated`:

- ``self.log`` and ``self.log_dict`` do nothing (the step's logs come from Lightning's own call only);
- every torchmetrics ``Metric`` that is a submodule of the module (also inside an ``nn.ModuleDict``, a
  ``MetricCollection`` or a plain submodule) is replaced by a stand-in: an empty copy of it whose updates are
  discarded when the block ends. The module's own metrics are never touched, so each counts one update per
  batch. Metrics that ``keep`` selects (the ``RankCurveMetric``s during the per-rank validation) stay in place.

What is not isolated happens once per call: counters, lists, metrics held outside the module tree (in a plain
Python list or dict), and reading a metric's accumulated value inside the repeated call (the stand-in is empty).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

from torch import nn
from torchmetrics import Metric

_LOGGING = ("log", "log_dict")
# id(metric) → (a weak reference to it, its stand-in): made once per metric (a copy, reset), reset after each use.
# Keyed by id: a torchmetrics Metric hashes by its state and overloads ==, so it cannot key a dict itself.
_STAND_INS: dict[int, tuple[weakref.ref, Metric]] = {}


def _never(_metric: Metric) -> bool:
    return False


def module_metrics(module: nn.Module, keep: Callable[[Metric], bool] = _never
                   ) -> list[tuple[nn.Module, str, Metric]]:
    """(parent, attribute name, metric) of every outermost torchmetrics ``Metric`` below ``module`` that ``keep``
    does not select (a metric's own inner metrics go with it)."""
    found: list[tuple[nn.Module, str, Metric]] = []

    def walk(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, Metric):
                if not keep(child):
                    found.append((parent, name, child))
            else:
                walk(child)

    walk(module)
    return found


def _stand_in(metric: Metric) -> Metric:
    key = id(metric)
    ref, sink = _STAND_INS.get(key, (None, None))
    if ref is None or ref() is not metric or sink.device != metric.device:
        sink = metric.clone()
        sink.reset()
        _STAND_INS[key] = (weakref.ref(metric, lambda _ref, key=key: _STAND_INS.pop(key, None)), sink)
    return sink


@contextlib.contextmanager
def isolated(module: nn.Module, keep: Callable[[Metric], bool] = _never) -> Iterator[None]:
    """Inside the block, ``module``'s logging does nothing and its torchmetrics metrics (but those ``keep``
    selects) are replaced by stand-ins whose updates are discarded; everything is put back on exit, also on an
    exception. See the module docstring for what a repeated step may rely on."""
    swapped = [(parent, name, metric, _stand_in(metric)) for parent, name, metric in module_metrics(module, keep)]
    shadowed = {n: module.__dict__[n] for n in _LOGGING if n in module.__dict__}
    for n in _LOGGING:  # instance attributes shadowing the methods, removed after
        object.__setattr__(module, n, _no_log)
    for parent, name, _metric, sink in swapped:
        parent.register_module(name, sink)
    try:
        yield
    finally:
        for parent, name, metric, sink in swapped:
            parent.register_module(name, metric)
            sink.reset()
        for n in _LOGGING:
            if n in shadowed:
                object.__setattr__(module, n, shadowed[n])
            else:
                module.__dict__.pop(n, None)


def _no_log(*args: object, **kwargs: object) -> None:
    return None
