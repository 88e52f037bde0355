"""What a page's handler reads of its request: the cortex's :class:`~.app.WebApp`, and
which socket the request came in on (a portal's own, or the admin socket). Its own module so
that :mod:`.console` and :mod:`.portal_site` need not import :mod:`.app`, which imports them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import WebApp


def web() -> WebApp:
    """The :class:`WebApp` of the request being handled."""
    from quart import current_app

    return current_app.extensions["helexa"]  # type: ignore[no-any-return]


def socket_portal() -> str | None:
    from quart import request

    return request.scope.get("helexa.portal")


def socket_admin() -> bool:
    from quart import request

    return bool(request.scope.get("helexa.admin"))
