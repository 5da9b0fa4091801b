"""Shared fixtures: seeded tiny models (no download) and, in the `real_model` tier, the embedded Gemma 3 270M.

Run everything: `pytest`. Skip the real-model tier locally: `pytest -m "not real_model"`.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

pytest_plugins = ["pytester"]  # tests of the test tier's own policies (tests/app/test_browser_policy.py)

# --- posprobe's own deprecated calls are errors -------------------------------------------------------------------
# A DeprecationWarning / FutureWarning whose nearest caller outside installed libraries and the standard library is
# posprobe's own code means posprobe calls an API that is going away (e.g. transformers' `past_key_values`, removed
# in 5.40): the test fails at once, so the next removal breaks CI before it breaks a user. pytest's filterwarnings
# cannot express this: libraries attribute such warnings to their caller's caller (torch's Module.__call__).
_PACKAGE_DIR = str(__import__("pathlib").Path(__import__("posprobe").__file__).resolve().parent)
_LIBRARY_DIRS = tuple({__import__("sysconfig").get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _nearest_own_frame(frame):
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            return filename
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True, scope="session")
def _posprobe_deprecations_are_errors():
    import sys
    import warnings

    original = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(cat, (DeprecationWarning, FutureWarning)):
            # start where the warning is attributed (stacklevel): posprobe's own deprecations of its own API, warned
            # with stacklevel=2, point at their caller and are not posprobe calling a deprecated API
            caller = _nearest_own_frame(sys._getframe(stacklevel))
            if caller is not None and caller.startswith(_PACKAGE_DIR):
                raise cat(f"posprobe called a deprecated API (from {caller}): {message}")
        return original(message, category, stacklevel + 1, source, **kwargs)

    warnings.warn = warn
    yield
    warnings.warn = original


@pytest.fixture(scope="session")
def tiny_rope():
    from posprobe.models import load_model

    return load_model("tiny-rope")


@pytest.fixture(scope="session")
def tiny_nope():
    from posprobe.models import load_model

    return load_model("tiny-nope")


@pytest.fixture(scope="session")
def tiny_absolute():
    from posprobe.models import load_model

    return load_model("tiny-absolute")


@pytest.fixture(scope="session")
def gemma():
    """The embedded default model (converted once into the posprobe cache)."""
    from posprobe.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def gemma_quick_scan(gemma):
    """One quick scan of Gemma 3 270M with the streaming head probes, shared by real-model tests."""
    import posprobe

    return posprobe.scan(gemma, probes=["head_basics", "attention_entropy"], budget="quick", progress=False)
