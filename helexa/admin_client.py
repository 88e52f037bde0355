"""Talking to a cortex's admin API from the command line (``helexa status``, ``helexa keys``,
``helexa usage``): finding the admin token, and one request at a time with readable errors.

The token comes from, in order: ``--admin-token-file``, ``HELEXA_ADMIN_TOKEN``, the
``admin-token`` file in ``--data-dir``, the one in the default data directory. It is sent
as ``Authorization: Bearer`` and never printed.
"""

from __future__ import annotations

import os
from pathlib import Path
import json as jsonlib
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_CORTEX = "http://127.0.0.1:8080"


class AdminError(RuntimeError):
    """The admin API could not be reached, or answered with an error (the message says which)."""


def find_token(*, token_file: Path | None = None, data_dir: Path | None = None) -> str:
    """The admin token (see the module docstring). Raises :class:`AdminError` if none is found."""
    from helexa.roles.cortex import admin_token
    from helexa.roles.cortex.config import default_data_dir

    if token_file is not None:
        return _read(token_file)
    env = os.environ.get("HELEXA_ADMIN_TOKEN", "").strip()
    if env:
        return env
    path = admin_token.path_in(data_dir or default_data_dir())
    if data_dir is not None or path.exists():
        return _read(path)
    raise AdminError("no admin token: pass --data-dir (the cortex's) or --admin-token-file, or set HELEXA_ADMIN_TOKEN")


def _read(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise AdminError(f"cannot read the admin token in {path}: {exc.strerror or exc}") from None
    if not token:
        raise AdminError(f"{path} is empty")
    return token


def no_route_hint(base: str, path: str, serves_admin: bool) -> str:
    """Why an admin route was not found at ``base``: a cortex that serves the admin API
    there (``serves_admin``) but not ``path`` is of an earlier release than this command;
    otherwise the admin API answers on the admin socket only, when the cortex has one."""
    if serves_admin and path != "/admin/fleet":
        return (f"{base} serves the admin API, but not this route: the cortex runs an earlier release than "
                "this command; upgrade it, or use the helexa command of its release")
    return (f"{base} serves no admin API: with admin_socket set in cortex.toml, pass "
            "--cortex http://ADMIN_HOST:PORT, that socket")


class AdminClient:
    """Requests to the admin API at ``cortex_url`` with ``token``."""

    def __init__(self, cortex_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.base = cortex_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"}
        self.timeout = timeout

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: Any = None, raw: bool = False, wait: float | None = None) -> Any:
        """The answer's JSON (its text with ``raw``). ``wait``: seconds the answer may take
        once the request is sent (default: ``timeout``), for an action the cortex carries
        out before it answers (an unload drains the model's running requests first).
        Raises :class:`AdminError`."""
        url = self.base + path
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        read = self.timeout if wait is None else max(wait, self.timeout)
        try:
            resp = httpx.request(method, url, params=clean, json=json, headers=self._headers,
                                 timeout=httpx.Timeout(self.timeout, read=read))
        except httpx.ReadTimeout:
            raise AdminError(f"the cortex at {self.base} did not answer {method} {path} within {read:g}s "
                             "(it may still be carrying it out)") from None
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the cortex at {self.base}: {exc}") from None
        if resp.status_code >= 400:
            raise self._refused(resp, method, path)
        if raw:
            return resp.text
        try:
            return resp.json()
        except ValueError:
            raise AdminError(f"the cortex sent something that is not JSON for {method} {path}") from None

    def _refused(self, resp: httpx.Response, method: str, path: str) -> AdminError:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        if resp.status_code == 404 and str(message).startswith("no route /admin"):
            message += f" ({no_route_hint(self.base, path, self._serves_admin())})"
        return AdminError(f"the cortex answered {resp.status_code} for {method} {path}: {message}")

    def _serves_admin(self) -> bool:
        """Whether ``base`` serves the admin API at all: ``/admin/fleet``, which every
        release with one has, answers other than 404."""
        try:
            probe = httpx.get(self.base + "/admin/fleet", headers=self._headers, timeout=self.timeout)
        except httpx.HTTPError:
            return False
        return probe.status_code != 404

    def stream(self, method: str, path: str, *, json: Any = None, timeout: float | None = None) -> Iterator[Any]:
        """The answer's lines as JSON objects, as they arrive (an NDJSON stream of progress
        events). ``timeout``: seconds between two lines (default none: loads take long).
        Raises :class:`AdminError`."""
        url = self.base + path
        try:
            with httpx.stream(method, url, json=json, headers=self._headers,
                              timeout=httpx.Timeout(self.timeout, read=timeout)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise self._refused(resp, method, path)
                for line in resp.iter_lines():
                    if line.strip():
                        try:
                            yield jsonlib.loads(line)
                        except ValueError:
                            raise AdminError(f"the cortex sent something that is not JSON for {method} {path}") from None
        except httpx.ReadTimeout:
            raise AdminError(f"the cortex at {self.base} sent nothing for {timeout:g}s during {method} {path}: "
                             "it or the network to it is gone (the work may go on there)") from None
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the cortex at {self.base}: {exc}") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)
