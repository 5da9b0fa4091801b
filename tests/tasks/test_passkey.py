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


def test_repeat_filler_is_the_papers_sentences_and_keeps_the_answer_invariant():
    from posprobe.errors import UnknownNameError
    from posprobe.tasks.needle import REPEAT_FILLER, make_passkey_trials

    access = PlantedAccess(planted_info())
    task = get_task("passkey", context_length=1200, filler="repeat")
    prompts = [task.make(access, 3, k, seed=s) for s in (0, 1) for k in range(3)]
    sentences = {s.strip() + "." for s in REPEAT_FILLER.split(".") if s.strip()}
    for prompt in prompts:
        text = access.decode(prompt.input_ids)
        needle = f" The pass key is {prompt.answer}. Remember it. {prompt.answer} is the pass key."
        assert text.count(needle) == 1
        # everything between the header and the question, the needle taken out, is the paper's filler: whole
        # sentences only, in its order
        hay = text.split("important information there.", 1)[1].split("\n\nWhat is the pass key?")[0]
        hay = hay.replace(needle, "").strip()
        parts = [part.strip() + "." for part in hay.rstrip(".").split(". ")]
        assert len(parts) > 20 and set(parts) <= sentences
        assert parts[:5] == [s.strip() + "." for s in REPEAT_FILLER.split(".") if s.strip()]
    # the filler is the same for every seed (only the key differs), unlike the generated filler
    one, two = (get_task("passkey", context_length=1200, filler=f).make(access, 3, 1, seed=s)
                for f in ("repeat",) for s in (0, 1))
    assert one.answer != two.answer
    assert one.input_ids[:one.gold_span[0]] == two.input_ids[:two.gold_span[0]]
    generated = [get_task("passkey", context_length=1200).make(access, 3, 1, seed=s) for s in (0, 1)]
    assert generated[0].input_ids[:generated[0].gold_span[0]] != generated[1].input_ids[:generated[1].gold_span[0]]
    trials = make_passkey_trials(access, [1200], [0.0, 1.0], filler="repeat")
    assert [t.input_ids[t.answer_span[0]:t.answer_span[1]] for t in trials] == [t.answer_ids for t in trials]
    with pytest.raises(UnknownNameError, match="filler"):
        get_task("passkey", filler="lorem")
