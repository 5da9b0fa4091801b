"""evaluate_positions(prefill_chunk=...): the choice reaches the HF adapter's KV-cached greedy and leaves the answers
unchanged; an access whose greedy takes no such choice refuses anything but "auto" (issue 20, chunked prefill)."""

from __future__ import annotations

import pandas as pd
import pytest

from posprobe.errors import InputError
from posprobe.tasks import evaluate_positions
from tests.tasks.test_evaluate import LostInTheMiddle


def test_prefill_chunk_reaches_greedy_and_keeps_the_records(tiny_rope, monkeypatch):
    seen = []
    greedy = tiny_rope.greedy

    def recording(ids, *args, **kwargs):
        seen.append(kwargs.get("prefill_chunk", "(not given)"))
        return greedy(ids, *args, **kwargs)

    monkeypatch.setattr(tiny_rope, "greedy", recording)
    tables = {chunk: evaluate_positions(tiny_rope, "kv_words", 4, [0, 3], n_trials=2, progress=False,
                                        prefill_chunk=chunk) for chunk in ("auto", None, 7)}
    assert seen == ["(not given)"] * 2 + [None] * 2 + [7] * 2
    for chunk in (None, 7):
        assert tables[chunk].attrs["prefill_chunk"] == chunk
        pd.testing.assert_frame_equal(pd.DataFrame(tables[chunk].attrs["trials"]),
                                      pd.DataFrame(tables["auto"].attrs["trials"]))


def test_a_greedy_without_prefill_chunks_refuses_a_choice():
    assert evaluate_positions(LostInTheMiddle(), "kv_words", 3, 2, n_trials=1, progress=False)["n"].sum() == 2
    with pytest.raises(InputError, match="prefill_chunk=64.*does not prefill"):
        evaluate_positions(LostInTheMiddle(), "kv_words", 3, 2, n_trials=1, progress=False, prefill_chunk=64)
    with pytest.raises(InputError, match="prefill_chunk must be"):
        evaluate_positions(LostInTheMiddle(), "kv_words", 3, 2, n_trials=1, progress=False, prefill_chunk=0)
