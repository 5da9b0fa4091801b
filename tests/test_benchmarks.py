"""`python -m benchmarks`: subsets run alone (`--only CASE:N,N`, `--suite`), best of repeated runs, the table."""

from __future__ import annotations

import pytest

import benchmarks.__main__ as bench


def test_only_and_suites_choose_the_cases(monkeypatch, tmp_path):
    assert bench.parse_only(["forward:512,1024", "stream_scan:2048"]) == [
        ("forward", 512), ("forward", 1024), ("stream_scan", 2048)]
    with pytest.raises(SystemExit, match="CASE one of"):
        bench.parse_only(["warp:512"])
    assert ("stream_scan", 32768) in bench.SUITES["stream_long"]
    assert {n for _, n in bench.SUITES["stream"]} == {512, 1024, 2048, 4096}
    ran, commands = [], []
    seconds = iter([3.0, 2.0, 5.0, 1.0, 4.0, 1.5])

    def fake(case, n, model, device=None, dtype=None, batch=1):
        ran.append((case, n))
        return {"case": case, "tokens": n, "batch": batch, "seconds": next(seconds), "extra_peak_mb": 1.0,
                "peak_mb": 2.0, "device": "cpu", "dtype": "float32"}

    monkeypatch.setattr(bench, "run_isolated", fake)
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, check: commands.append(cmd))
    out = tmp_path / "bench.md"
    assert bench.main(["--only", "forward:512", "--only", "stream_scan:512", "--suite", "long_scan", "--repeat", "3",
                       "--out", str(out)]) == 0
    assert ran == [("forward", 512)] * 3 + [("stream_scan", 512)] * 3  # only what was asked, 3 times each
    assert commands and commands[0][2] == "benchmarks.long_scan" and str(tmp_path / "long_scan.md") in commands[0]
    text = out.read_text()
    assert "| 512 | 1 | forward | 2.00 | 1.00 |" in text  # best of 3 (3, 2, 5)
    assert "| 512 | 1 | stream_scan | 1.00 | 0.50 |" in text  # best of (1, 4, 1.5), over the best forward


def test_passkey_long_reports_every_depth_with_its_interval(tmp_path):
    import benchmarks.passkey_long as passkey_long

    out = tmp_path / "passkey.md"
    assert passkey_long.main(["--model", "tiny-rope", "--length", "420", "--depths", "2", "--trials", "2",
                              "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0%") or line.startswith("| 100%")]
    assert len(rows) == 2 and all(line.split("|")[2].strip() == "2" for line in rows)  # n = 2 trials per depth
    assert all(len(line.replace("\\|", "").split("|")) == 8 for line in rows)  # 6 cells: completions escaped
    assert "Wilson" in text and "peak RSS" in text and "filler generated" in text
    with pytest.raises(SystemExit):  # a prompt longer than the model's window is refused before any pass
        passkey_long.main(["--model", "tiny-rope", "--length", "100000", "--out", str(out)])
