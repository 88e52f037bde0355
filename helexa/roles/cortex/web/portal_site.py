"""Each portal's own pages, on the portal's sockets, in the portal's theme.

Pages: sign-in with an API key (a portal with ``auth = "keys"``), a chat playground, the
key holder's usage and remaining budget, and copy-ready snippets (``curl``, Python
``openai``) with this portal's base URL. The theme comes from the portal's config: its
``name``, ``theme.logo`` (a URL, or a file served at ``/portal/logo``) and
``theme.colors`` (``primary``, ``background``, ``text``, ``surface``), served as a
stylesheet (``/portal/theme.css``) so no page carries inline style.

The key stays in the browser: the sign-in page checks it against ``/v1/usage`` and keeps
it in the tab's ``sessionStorage`` (gone when the tab closes, never in a cookie, never sent
to these pages), and the pages' scripts call the portal's own API with it, the way any
client would: ``/v1/models`` for the model picker, ``/v1/chat/completions`` (streamed)
for the playground, whose stop button aborts the request so the portal cancels the
generation on the neuron, and ``/v1/usage``.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Any

from quart import Blueprint, Response, abort, render_template, request

from ..portal.portal import Portal
from .page_context import socket_portal, web

blueprint = Blueprint("portal", __name__, url_prefix="/portal")

_COLOR = re.compile(r"^(#[0-9a-fA-F]{3,8}|[a-zA-Z]{3,20}|(rgb|hsl)a?\([0-9., %]{5,40}\))$")
DEFAULT_COLORS = {"primary": "#2b59c3", "background": "#f7f8fa", "text": "#1c1f24", "surface": "#ffffff"}


def _portal() -> Portal:
    portal_id = socket_portal()
    if portal_id is None:
        abort(404)
    return web().gateway.portals[portal_id]


def colors(portal: Portal) -> dict[str, str]:
    """The portal's colours over the defaults; a value that is not a plain CSS colour is ignored."""
    out = dict(DEFAULT_COLORS)
    for name, value in portal.config.theme.colors.items():
        if name in out and _COLOR.match(value.strip()):
            out[name] = value.strip()
    out["on_primary"] = _readable_on(out["primary"])
    return out


def _readable_on(color: str) -> str:
    """Black or white, whichever reads better on ``color`` (a hex colour; white otherwise)."""
    if not color.startswith("#"):
        return "#ffffff"
    h = color[1:]
    if len(h) in (3, 4):
        h = "".join(c * 2 for c in h[:3])
    try:
        r, g, b = (int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))
    except ValueError:
        return "#ffffff"

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)
    return "#000000" if (lum + 0.05) / 0.05 > 1.05 / (lum + 0.05) else "#ffffff"


def logo_src(portal: Portal) -> str | None:
    """Where the pages load the portal's logo from: its ``https://`` URL (or a ``data:image/``
    one), or ``/portal/logo`` for a file path. An ``http://`` URL is left out, as a colour
    that is not a plain CSS colour is: the pages' Content-Security-Policy would block it
    (``img-src 'self' data: https:``) and an https portal would mix content."""
    logo = portal.config.theme.logo
    if not logo or logo.startswith("http://"):
        return None
    if logo.startswith(("https://", "data:image/")):
        return logo
    return "/portal/logo"


async def _render(template: str, **context: Any) -> str:
    portal = _portal()
    base = f"{request.scheme}://{request.host}"
    # The sign-in, the playground and the usage page call the portal's OpenAI API; a portal
    # that does not serve it gets pages that say so, and only the snippets it can answer.
    return await render_template(template, portal=portal, logo=logo_src(portal), keyed=portal.keyed,
                                 openai="openai" in portal.config.surfaces, base_url=base + "/v1",
                                 model_hint=next(iter([*portal.config.aliases, *(portal.config.models or ())]),
                                                 "MODEL"),
                                 section=template.split(".")[0], **context)


@blueprint.get("/")
@blueprint.get("")
async def signin() -> Any:
    return await _render("portal_signin.html")


@blueprint.post("/")
@blueprint.post("")
async def signin_without_script() -> Any:
    """The sign-in form, sent by the browser itself: the page's script (which checks the key
    and keeps it in the tab) was off or not loaded yet. The form is a POST so the key never
    lands in the URL (the address bar, the history, a proxy's access log); it is neither
    read nor kept here."""
    return await _render("portal_signin.html", error="Signing in needs this page's script (JavaScript): turn "
                         "it on, or wait for the page to finish loading, and sign in again. Your key was not "
                         "kept."), 400


@blueprint.get("/playground")
async def playground() -> Any:
    return await _render("portal_playground.html")


@blueprint.get("/usage")
async def usage() -> Any:
    return await _render("portal_usage.html")


@blueprint.get("/snippets")
async def snippets() -> Any:
    return await _render("portal_snippets.html")


@blueprint.get("/theme.css")
async def theme_css() -> Any:
    c = colors(_portal())
    css = (":root{" + "".join(f"--{k.replace('_', '-')}:{v};" for k, v in c.items()) + "}\n")
    return Response(css, mimetype="text/css", headers={"Cache-Control": "no-cache"})


@blueprint.get("/logo")
async def logo() -> Any:
    portal = _portal()
    path = portal.config.theme.logo
    if not path or path.startswith(("https://", "http://", "data:")):
        abort(404)
    file = Path(path).expanduser()
    kind = mimetypes.guess_type(file.name)[0] or ""
    if not kind.startswith("image/") or not file.is_file():
        abort(404)
    return Response(file.read_bytes(), mimetype=kind, headers={"Cache-Control": "max-age=3600"})
