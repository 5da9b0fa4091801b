"""The probe registry: names -> probe objects, with discovery and helpful errors.

Owns `register`, `get_probe`, `list_probes`. Built-in probes are listed in ONE block below as import paths and
imported on first use (no work at import time). A new probe is one module in this package plus one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from posprobe.errors import ProbeError, UnknownNameError
from posprobe.probes.base import (
    BUDGETS,
    Budget,
    ProbeResult,
    ScanContext,
    StreamingProbe,
    get_budget,
    per_level,
    probe_problems,
)

# --- built-in registrations (name -> "module:attribute") ------------------------------------------------------
_BUILTIN: dict[str, str] = {
    "attention_entropy": "posprobe.probes.attention_entropy:PROBE",
    "head_basics": "posprobe.probes.head_basics:PROBE",
    "implicit_position": "posprobe.probes.implicit_position:PROBE",
    "induction": "posprobe.probes.induction:PROBE",
    "pattern_examples": "posprobe.probes.pattern_examples:PROBE",
    "position_bias": "posprobe.probes.position_bias:PROBE",
    "positional_heads": "posprobe.probes.positional_heads:PROBE",
    "retrieval": "posprobe.probes.retrieval:PROBE",
    "rope_frequency": "posprobe.probes.rope_frequency:PROBE",
}
# ---------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Any] = {}


def register(probe: Any, *, replace: bool = False) -> Any:
    """Register a probe object (see `posprobe.probes.base.Probe`). Returns it, so it can decorate a factory.

    The probe is checked first (`probe_problems`: name, description, a frozen Config whose fields all have
    defaults, budget knobs, the reducer / run method); a ProbeError lists everything that is wrong.
    """
    problems = probe_problems(probe)
    if problems:
        raise ProbeError(f"Cannot register {getattr(probe, 'name', probe)!r} as a probe:\n- " + "\n- ".join(problems)
                         + "\nSee the docs page 'How to add a probe'.")
    name = probe.name
    if not replace and (name in _REGISTRY or name in _BUILTIN):
        raise ProbeError(f"A probe named {name!r} is already registered; pass replace=True to override it.")
    _REGISTRY[name] = probe
    return probe


def get_probe(name: str) -> Any:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        probe = getattr(importlib.import_module(module), attr)
        problems = probe_problems(probe)
        if problems or probe.name != name:
            raise ProbeError(f"The built-in probe {name!r} ({_BUILTIN[name]}) is malformed: "
                             f"{'; '.join(problems) or f'its name is {probe.name!r}'}. This is a bug in posprobe.")
        _REGISTRY[name] = probe
        return probe
    raise UnknownNameError("probe", name, list_probes())


def list_probes() -> list[str]:
    """Names of every registered probe, built-in and user-registered."""
    return sorted({*_BUILTIN, *_REGISTRY})


__all__ = ["BUDGETS", "Budget", "ProbeResult", "ScanContext", "StreamingProbe", "get_budget", "get_probe",
           "list_probes", "per_level", "register"]
