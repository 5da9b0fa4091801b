"""posprobe: mechanistic interpretability of positional behaviour in transformer language models.

Explicit re-exports of the public API. Importing posprobe loads its dependencies but does no work: no model is
loaded, nothing is registered in other libraries, no file is written.
"""

from __future__ import annotations

from posprobe import interventions, tasks
from posprobe.errors import PosprobeError
from posprobe.models import list_models, load_model
from posprobe.probes import list_probes
from posprobe.scan import Scan, load, scan
from posprobe.tasks import evaluate_positions

__version__ = "0.1.0"

__all__ = [
    "PosprobeError",
    "Scan",
    "evaluate_positions",
    "interventions",
    "list_models",
    "list_probes",
    "load",
    "load_model",
    "scan",
    "tasks",
]
