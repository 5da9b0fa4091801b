"""The analyses' quick variants run end to end (issue 17: the context-extension analysis's quick variant in CI).

`analyses/context_extension.py --variant quick` on its seeded tiny Llama (native window 256): every method of the
analysis evaluated at 1x / 1.5x / 2x without a failed trial, the rescan at 2x for every method that can be scanned,
and the report written. Its accuracies are ~0 by construction (random weights); what is checked is that every
method runs past the window and that the tables hold what the report says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_context_extension_quick_variant_runs_every_method_past_the_window(tmp_path):
    out = tmp_path / "ce"
    proc = subprocess.run([sys.executable, str(ROOT / "analyses" / "context_extension.py"), "--variant", "quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert {"plain", "pi", "ntk", "dynamic", "yarn", "string", "self_extend", "streaming_llm", "lm_infinite", "logn",
            "ms_poe", "buckets"} <= set(methods)
    native = summary["native"]
    acc = pd.read_csv(out / "accuracy.csv")
    assert set(acc["method"]) == set(methods)
    assert sorted(set(acc["ratio"])) == [1.0, 1.5, 2.0] and set(acc["length"]) == {native, native * 3 // 2, 2 * native}
    assert (acc["n_errors"] == 0).all() and (acc["n"] > 0).all()  # nothing failed, nothing silently dropped
    for _, cells in acc.groupby("method"):  # each method: the key-value task at every length, passkey where it fits
        assert set(cells.loc[cells["task"].str.startswith("kv"), "length"]) == set(acc["length"])
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()
    rescan = pd.read_csv(out / "rescan.csv")
    scanned = rescan[rescan["sink_mass"].notna()]
    assert set(scanned["method"]) == {"plain @1x"} | (set(methods) - {"buckets"})  # buckets: not a single model
    assert scanned["sink_mass"].between(0, 1).all() and scanned["entropy_norm"].between(0, 1.0001).all()
    assert scanned["top10_kept"].between(0, 10).all()
    assert scanned["needles_answered"].str.fullmatch(r"\d+/4").all()  # quick default: 4 retrieval trials
    report = (out / "report.md").read_text()
    assert "Wilson" in report and all(f"| {m}" in report for m in methods)


def test_context_extension_rescan_alone_takes_its_sizes_from_the_cli(tmp_path):
    out = tmp_path / "ce"
    proc = subprocess.run([sys.executable, str(ROOT / "analyses" / "context_extension.py"), "--variant", "quick",
                           "--no-accuracy", "--methods", "plain", "yarn", "--rescan-texts", "1", "--rescan-queries",
                           "16", "--rescan-trials", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "accuracy.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] is None and summary["rescan"] == {"texts": 1, "queries": 16, "trials": 2,
                                                                 "include_wrong": True}
    rescan = pd.read_csv(out / "rescan.csv")
    assert list(rescan["method"]) == ["plain @1x", "plain", "yarn"]
    assert (rescan["needles_answered"].str.split("/").str[1] == "2").all()
    report = (out / "report.md").read_text()
    assert "accuracy not run" in report and "2 retrieval needle trials" in report
