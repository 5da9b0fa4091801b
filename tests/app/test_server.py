"""The app factory and entry points: no work at import, localhost by default, HTTP requests that cannot open paths,
the `posprobe app` command and `Scan.explore()`."""

from __future__ import annotations

import json
import subprocess
import sys

import dash

import posprobe.app as explorer
from posprobe.app import create_app, ids
from posprobe.cli import main as cli_main
from tests.app.synthetic import synthetic_scan


def test_import_does_no_work():
    code = "import posprobe.app as app, dash._get_app as g; print(g.APP is None, hasattr(app, 'create_app'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]  # the factory is there, and no Dash app was built by importing the package


def _post_callback(client, outputs, inputs):
    body = {
        "output": ".." + "...".join(f"{i}.{p}" for i, p in outputs) + "..",
        "outputs": [{"id": i, "property": p} for i, p in outputs],
        "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
        "changedPropIds": [f"{i}.{p}" for i, p, _ in inputs],
        "state": [],
    }
    return client.post("/_dash-update-component", json=body)


def test_http_layout_and_callbacks(synthetic_dir, broken_dirs):
    application = create_app({"good": synthetic_dir, "bad": broken_dirs["garbage"]})
    client = application.server.test_client()
    assert client.get("/").status_code == 200
    layout = client.get("/_dash-layout").get_data(as_text=True)
    assert '"good"' in layout and '"bad"' in layout and str(synthetic_dir) not in layout  # names, never paths
    scan_outputs = [(ids.SCAN_ERROR, "children"), (ids.VIEWS, "style"), (ids.SCAN_SUMMARY, "children")]
    response = _post_callback(client, scan_outputs, [(ids.SCAN, "value", "good")])
    assert response.status_code == 200 and "synthetic" in response.get_data(as_text=True)
    for name, expected in (("bad", "not valid JSON"), (str(synthetic_dir), "There is no scan called"),
                           ("../../etc/passwd", "There is no scan called")):
        response = _post_callback(client, scan_outputs, [(ids.SCAN, "value", name)])
        text = response.get_data(as_text=True)
        assert response.status_code == 200 and expected in text and "Traceback" not in text
        assert json.loads(text)["response"][ids.VIEWS]["style"] == {"display": "none"}


def test_unexpected_server_errors_give_a_plain_page(synthetic_dir):
    application = create_app([synthetic_dir])

    @application.server.route("/boom")
    def boom():
        raise RuntimeError("secret internals")

    application.server.config["PROPAGATE_EXCEPTIONS"] = False
    response = application.server.test_client().get("/boom")
    text = response.get_data(as_text=True)
    assert response.status_code == 500 and "The explorer hit an error" in text and "secret internals" not in text


def test_layout_is_built_per_page_load_and_lists_new_scans(tmp_path):
    root = tmp_path / "scans"
    synthetic_scan(seed=0).save(root / "a")
    application = create_app([root])
    first = application.layout()
    synthetic_scan(seed=1).save(root / "b")
    second = application.layout()
    options = lambda layout: [o["value"] for o in layout.children[0].children[1].options]  # noqa: E731
    assert options(first) == ["a"] and options(second) == ["a", "b"]


def test_empty_catalogue_says_how_to_start():
    application = create_app([])
    text = json.dumps(application.layout().to_plotly_json(), default=lambda o: o.to_plotly_json())
    assert "No scans to show" in text and "posprobe app SCAN_DIR" in text


def test_serve_binds_localhost_by_default(monkeypatch, synthetic_dir, capsys):
    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kwargs: calls.append(kwargs))
    explorer.serve([synthetic_dir])
    assert calls == [{"host": "127.0.0.1", "port": 8050, "debug": False}]
    assert "open http://127.0.0.1:8050/" in capsys.readouterr().err
    explorer.serve([synthetic_dir], host="0.0.0.0", port=9000)
    assert calls[-1]["host"] == "0.0.0.0" and "warning: listening on 0.0.0.0" in capsys.readouterr().err


def test_cli_app_command(monkeypatch, synthetic_dir):
    seen = {}
    monkeypatch.setattr(explorer, "serve", lambda dirs, host, port: seen.update(dirs=dirs, host=host, port=port))
    assert cli_main(["app", str(synthetic_dir), "--port", "8123"]) == 0
    assert seen == {"dirs": [synthetic_dir], "host": "127.0.0.1", "port": 8123}


def test_run_explorer_and_scan_explore(monkeypatch):
    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kwargs: calls.append(kwargs))
    scan = synthetic_scan()
    application = explorer.run_explorer([scan], mode="inline", port=8061)
    assert calls[-1] == {"jupyter_mode": "inline", "host": "127.0.0.1", "port": 8061, "debug": False}
    assert application.catalog.names == ["synthetic"] and application.catalog.get("synthetic") is scan
    explorer.run_explorer(scan, mode="server")
    assert calls[-1] == {"host": "127.0.0.1", "port": 8050, "debug": False}
    opened = []
    monkeypatch.setattr(explorer, "run_explorer", lambda scans, **kwargs: opened.append((scans, kwargs)))
    scan.explore(mode="external")
    assert opened == [([scan], {"mode": "external"})]


def test_default_mode_outside_jupyter_is_a_local_server(monkeypatch):
    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kwargs: calls.append(kwargs))
    explorer.run_explorer([synthetic_scan()])
    assert calls == [{"host": "127.0.0.1", "port": 8050, "debug": False}]
