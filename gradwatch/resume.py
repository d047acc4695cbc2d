"""Plain forms of the monitor's tensor state, so ``Monitor.state_dict()`` loads with ``torch.load`` defaults.

``torch.load`` reads only tensors, numbers, strings, lists, tuples and dicts unless told
``weights_only=False`` (which would run arbitrary pickled code from a checkpoint). The monitor's warm-start
vectors and kept probes are dataclasses; these functions turn them into dicts of tensors and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gradwatch.capture.hooks import CellCall, FusedCall
from gradwatch.estimators.layer import WarmStart

Probe = FusedCall | list[CellCall]


class ResumeStateError(ValueError):
    """A monitor state_dict entry that is not what Monitor.state_dict() writes."""


def warm_start_to_state(warm: WarmStart) -> dict[str, Any]:
    """A WarmStart as a dict of tensors (None where absent) and a list of lags."""
    return {
        "step_vectors": warm.step_vectors,
        "weight_vector": warm.weight_vector,
        "lag_vectors": warm.lag_vectors,
        "lags": list(warm.lags),
    }


def warm_start_from_state(state: Mapping[str, Any]) -> WarmStart:
    """Inverse of :func:`warm_start_to_state`."""
    try:
        warm = WarmStart(
            step_vectors=_tensor(state["step_vectors"], "step_vectors"),
            weight_vector=_optional_tensor(state.get("weight_vector"), "weight_vector"),
            lag_vectors=_optional_tensor(state.get("lag_vectors"), "lag_vectors"),
            lags=tuple(int(lag) for lag in state.get("lags", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ResumeStateError(
            f"not a gradwatch warm-start state (from Monitor.state_dict()): {exc!r}"
        ) from exc
    return warm


def probe_to_state(probe: Probe) -> dict[str, Any]:
    """A kept probe (the recorded call of a fused RNN, or a chain of cell calls) as dicts of tensors."""
    if isinstance(probe, FusedCall):
        return {"kind": "fused", **{f.name: getattr(probe, f.name) for f in dataclasses.fields(FusedCall)}}
    return {
        "kind": "cell",
        "calls": [{"x": c.x, "state_in": list(c.state_in), "state_out": list(c.state_out)} for c in probe],
    }


def probe_from_state(state: Mapping[str, Any]) -> Probe:
    """Inverse of :func:`probe_to_state`."""
    try:
        if state["kind"] == "fused":
            fields = {f.name: state[f.name] for f in dataclasses.fields(FusedCall)}
            for name, value in fields.items():
                _optional_tensor(value, name)
            return FusedCall(**fields)
        if state["kind"] == "cell":
            return [
                CellCall(
                    x=_tensor(call["x"], "x"),
                    state_in=tuple(_tensor(t, "state_in") for t in call["state_in"]),
                    state_out=tuple(_tensor(t, "state_out") for t in call["state_out"]),
                )
                for call in state["calls"]
            ]
        raise ValueError(f"probe kind must be 'fused' or 'cell', got {state['kind']!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeStateError(f"not a gradwatch probe state (from Monitor.state_dict()): {exc!r}") from exc


def _tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    return value


def _optional_tensor(value: Any, name: str) -> Tensor | None:
    return None if value is None else _tensor(value, name)
