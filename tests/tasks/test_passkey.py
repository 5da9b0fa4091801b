"""The passkey task in the Task API (a wrapper over posprobe.tasks.needle)."""

from __future__ import annotations

import pytest

from posprobe.errors import InputError
from posprobe.tasks import get_task
from posprobe.testing import PlantedAccess, planted_info


def test_passkey_slots_cover_the_haystack_and_gold_holds_the_needle():
    access = PlantedAccess(planted_info())
    task = get_task("passkey", context_length=1200)
    prompts = [task.make(access, 5, k, seed=2) for k in range(5)]
    assert len({p.n_tokens for p in prompts}) == 1 and len({p.answer for p in prompts}) == 1
    for k, prompt in enumerate(prompts):
        assert abs(prompt.gold_index - k) <= 1
        a, b = prompt.gold_span
        assert "pass key" in access.decode(prompt.input_ids[a:b + 12])
        spans = prompt.spans
        assert all(s[1] == t[0] for s, t in zip(spans, spans[1:]))
    assert prompts[0].gold_index == 0 and prompts[-1].gold_index == 4
    assert task.score(prompts[0], f" {prompts[0].answer}.")
    with pytest.raises(InputError):
        get_task("passkey", context_length=50).make(access, 5, 0, seed=0)
