"""`Scan.explore()` in a real Jupyter kernel: the explorer is served on localhost and shown inline as an IFrame."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat / nbclient / ipykernel (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient (the dev extra)")
pytest.importorskip("ipykernel", reason="needs ipykernel (the dev extra)")

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_explore_inline_in_a_kernel():
    port = _free_port()
    source = "\n".join([
        f"import sys; sys.path.insert(0, {str(ROOT)!r})",
        "from tests.app.synthetic import synthetic_scan",
        f"app = synthetic_scan(name='in-notebook').explore(port={port})",
        "import urllib.request",
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/_dash-layout').read().decode()[:20000])",
    ])
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if o.get("output_type") == "display_data")
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "<iframe" in html and f"src=\"http://127.0.0.1:{port}/\"" in html
    assert '"in-notebook"' in printed  # the served page lists the scan
