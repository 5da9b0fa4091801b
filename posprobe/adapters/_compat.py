"""Calling transformers the way the installed version asks: one place for keyword renames across 5.x releases.

Owns `cache_kwargs(model, cache)`: the decoder-cache keyword of a model's forward. transformers 5.x renamed
`past_key_values` to `cache` (the old name is deprecated and removed in 5.40); older 5.x releases only accept the old
name. The name is read from the forward signature of the model being called, so posprobe passes what that model
takes and never triggers the deprecation path.
"""

from __future__ import annotations

import inspect
from typing import Any

_KEYWORDS: dict[type, str] = {}  # forward-owning class -> its cache keyword (signatures do not change at run time)


def _cache_keyword(forward_owner: type) -> str:
    if forward_owner in _KEYWORDS:
        return _KEYWORDS[forward_owner]
    _KEYWORDS[forward_owner] = keyword = _read_cache_keyword(forward_owner)
    return keyword


def _read_cache_keyword(forward_owner: Any) -> str:
    try:
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / C forwards
        return "past_key_values"
    if "cache" in params:
        return "cache"
    return "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{"cache": cache}` or `{"past_key_values": cache}`, whichever `model.forward` takes."""
    return {_cache_keyword(type(model)): cache}
