"""A cortex whose web pages fail to build keeps serving its API (helexa/roles/cortex/web/app.py):
a real cortex in this trio run, on real sockets, with the pages' builder made to fail."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex
from helexa.roles.cortex.web.app import WebApp


def broken_build(self: WebApp):  # noqa: ANN201
    raise RuntimeError("template folder /nowhere/templates is unreadable")


async def test_a_failed_page_build_logs_one_error_and_the_api_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(WebApp, "build", broken_build)
    config = CortexConfig(data_dir=tmp_path / "cortex", control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0",
                          usage_store=":memory:")
    cortex = Cortex(config)
    caplog.set_level(logging.DEBUG, logger="helexa.roles.cortex.web")
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        with trio.fail_after(30):
            await cortex.gateway.web._built.wait()  # the build was tried, and failed
        async with httpx.AsyncClient(base_url=addrs.gateway_url, timeout=10) as http:
            models = await http.get("/v1/models")
            pages = {path: await http.get(path) for path in ("/", "/console/", "/portal/", "/static/style.css")}
        cortex.stop()
        nursery.cancel_scope.cancel()
    assert models.status_code == 200 and models.json()["object"] == "list"
    for path, page in pages.items():
        assert page.status_code == 503, path
        assert page.headers["content-type"].startswith("text/plain")
        assert "web console failed to start" in page.text and "log" in page.text, path
        assert "RuntimeError" not in page.text and "Traceback" not in page.text  # the reason stays in the log
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("helexa.roles.cortex.web")]
    assert len(errors) == 1
    (line,) = errors
    assert "web console failed to start" in line.getMessage()
    assert "template folder /nowhere/templates is unreadable" in line.getMessage()
    assert "\n" not in line.getMessage() and line.exc_info is None  # one line; the traceback only at debug
