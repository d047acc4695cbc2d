"""Step boundaries from the optimizers: one process-wide optimizer step pre-hook and post-hook (nothing is
registered on an optimizer) dispatch each ``optimizer.step()`` to the monitors attached to that optimizer.

An optimizer replaced mid-run is followed: AWD-LSTM's NT-ASGD switch builds a new ``torch.optim.ASGD`` over
the same parameters and steps only that one from then on. A step of an optimizer no monitor is attached to
is checked once (again if its parameters change): when it holds every watched parameter the monitor's
current optimizer held, the monitor moves to it (logged at INFO), so its steps keep being counted. Two
optimizers over disjoint parts of a model (an encoder's and a decoder's) are never swapped for each other.
An optimizer that steps some of the watched parameters while the monitor's own optimizer has stopped
stepping (:data:`STRAY_STEPS` of its steps in a row) is told once: the monitor counts no steps then.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Protocol

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradwatch.policy.alerts import GradWatchWarning

logger = logging.getLogger("gradwatch")


class StepListener(Protocol):
    """What a monitor offers the optimizer hooks."""

    optimizer: torch.optim.Optimizer | None

    @property
    def run_id(self) -> str: ...

    def watched_parameter_ids(self) -> set[int]: ...

    def _end_of_step(self, optimizer: torch.optim.Optimizer | None, *, closure: bool = False) -> None: ...

    def _end_of_closure_step(self) -> None: ...


_listeners: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[StepListener]] = weakref.WeakKeyDictionary()
# Optimizers no monitor is attached to, with the parameter count they had when checked (checked again when
# it changes: add_param_group).
_checked: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()
# Per optimizer no monitor is attached to: the monitors some of whose watched parameters it holds.
_overlaps: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[weakref.ref[StepListener]]] = (
    weakref.WeakKeyDictionary()
)
# Per monitor: steps of other optimizers holding its parameters since its own optimizer last stepped.
_stray: weakref.WeakKeyDictionary[StepListener, int] = weakref.WeakKeyDictionary()
_told: weakref.WeakSet[StepListener] = weakref.WeakSet()
#: Steps of another optimizer over watched parameters, with none of the followed one, before it is told.
STRAY_STEPS = 2
_pre_handle: RemovableHandle | None = None
_post_handle: RemovableHandle | None = None


def attach_optimizer(optimizer: torch.optim.Optimizer, listener: StepListener) -> None:
    """Close ``listener``'s steps from ``optimizer.step()`` (installs the global hooks on first use)."""
    global _pre_handle, _post_handle
    _listeners.setdefault(optimizer, []).append(listener)
    _checked.pop(optimizer, None)
    if _pre_handle is None:
        _pre_handle = register_optimizer_step_pre_hook(_step_pre_hook)
    if _post_handle is None:
        _post_handle = register_optimizer_step_post_hook(_step_post_hook)


def detach_optimizer(optimizer: torch.optim.Optimizer, listener: StepListener) -> None:
    """Undo :func:`attach_optimizer`; the global hooks go when no optimizer has a listener."""
    global _pre_handle, _post_handle
    listeners = _listeners.get(optimizer, [])
    if listener in listeners:
        listeners.remove(listener)
    if not listeners:
        _listeners.pop(optimizer, None)
    if not _listeners:
        _checked.clear()
        _overlaps.clear()
        if _pre_handle is not None:
            _pre_handle.remove()
            _pre_handle = None
        if _post_handle is not None:
            _post_handle.remove()
            _post_handle = None


def hooks_installed() -> bool:
    """Are the global optimizer step hooks registered now (for tests)?"""
    return _pre_handle is not None or _post_handle is not None


def held_parameter_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Close the step of every monitor attached to this optimizer (a copy of it has none); an optimizer
    with none may be a replacement to follow."""
    listeners = _listeners.get(optimizer)
    if not listeners:
        listeners = _follow(optimizer)
        if not listeners:
            _count_stray_step(optimizer)
            return
    positional = args[1:] if args and args[0] is optimizer else args  # torch passes (self, *args)
    closure = kwargs.get("closure", positional[0] if positional else None)
    for listener in list(listeners):
        _stray.pop(listener, None)
        listener._end_of_step(optimizer, closure=callable(closure))


def _step_post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After ``optimizer.step(closure)``: measure a measured closure step (see Monitor._end_of_step)."""
    for listener in list(_listeners.get(optimizer, ())):
        listener._end_of_closure_step()


def _follow(optimizer: torch.optim.Optimizer) -> list[StepListener]:
    """Move to ``optimizer`` every monitor whose current optimizer's share of the watched parameters it
    holds entirely (a replacement, not a second optimizer for other parameters); checked once per
    optimizer and parameter count."""
    try:
        count = sum(len(group["params"]) for group in optimizer.param_groups)
    except Exception:
        return []
    if _checked.get(optimizer) == count:
        return []
    _checked[optimizer] = count
    held = held_parameter_ids(optimizer)
    moved: list[StepListener] = []
    overlapping: list[weakref.ref[StepListener]] = []
    for current, listeners in list(_listeners.items()):
        if current is optimizer:
            continue
        share = held_parameter_ids(current)
        for listener in list(listeners):
            if listener.watched_parameter_ids() & held:
                overlapping.append(weakref.ref(listener))
            watched = listener.watched_parameter_ids() & share
            if watched and watched <= held:
                detach_optimizer(current, listener)
                attach_optimizer(optimizer, listener)
                listener.optimizer = optimizer
                moved.append(listener)
                logger.info(
                    "gradwatch: run %s follows the new %s: it holds the watched parameters the %s given "
                    "before held, and steps them now (the steps are counted from it)",
                    listener.run_id,
                    type(optimizer).__name__,
                    type(current).__name__,
                )
    if moved:
        _checked.pop(optimizer, None)
    else:
        _overlaps[optimizer] = overlapping
    return moved


def _count_stray_step(optimizer: torch.optim.Optimizer) -> None:
    """A step of an optimizer that is not followed: for each monitor some of whose watched parameters it
    steps, count it; after :data:`STRAY_STEPS` in a row with no step of the monitor's own optimizer, say
    once that steps stopped arriving (a warning, or a log line when warnings are errors)."""
    for ref in _overlaps.get(optimizer, ()):
        listener = ref()
        if listener is None or listener.optimizer is None or listener in _told:
            continue
        _stray[listener] = count = _stray.get(listener, 0) + 1
        if count < STRAY_STEPS:
            continue
        _told.add(listener)
        followed = type(listener.optimizer).__name__
        message = (
            f"gradwatch: run {listener.run_id}: an optimizer gradwatch does not follow "
            f"({type(optimizer).__name__}) steps watched parameters, but the {followed} "
            f"it counts steps from has not stepped for {count} of its steps: no step is counted and nothing "
            "is measured while this goes on. Pass the "
            "optimizer that steps the watched parameters to watch() (a new one holding all of them is "
            "followed by itself), or watch with optimizer=None and call monitor.step() after backward()"
        )
        try:
            warnings.warn(message, GradWatchWarning, stacklevel=4)
        except Warning:  # warnings are errors: a notice must not stop the user's step
            logger.warning(message)
