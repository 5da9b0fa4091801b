"""`python -m benchmarks.gpu_check` end to end on the CPU with a tiny model (the GPU run itself needs a GPU), and
its refusal, with the reason, where no CUDA device is visible."""

from __future__ import annotations

import torch

from benchmarks import gpu_check


def test_smoke_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--device", "cpu", "--model", "tiny-rope", "--tokens", "48", "--batch", "1", "2",
                           "--budget", "quick", "--out", str(out)]) == 0
    text = out.read_text()
    for case in gpu_check.CASES:
        assert f"| {case} |" in text
    assert "| 48 | 2 | stream_sampled |" in text and "| sink_mass | 1.0000 |" in text and "CPU (no GPU)" in text


def test_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
