"""Live reload of a running cortex's ``cortex.toml`` and ``models.toml`` (on ``SIGHUP`` or
``POST /admin/reload``; ``helexa reload``).

The pure part, :func:`plan_reload`, compares the running config with the one just read
and sorts every changed key into what applies live and what waits for a restart:

* live: the catalogue (entries added, removed, changed; and ``models_file`` itself), each
  existing portal's settings (auth, models, aliases, prices, quotas, limits, routing,
  priority, weight, theme...), ``[orchestrator]``, ``[federation]``'s policies,
  ``gateway.admin_clients``, ``enrolment`` and ``log_level``;
* restart: everything bound to a socket, a file opened at start or an identity
  (``*_socket``, ``data_dir``, TLS files, ``[mesh]``, a portal added or removed or its
  ``listen`` / TLS / ``surfaces`` changed, the rest of ``[gateway]``, heartbeats...).

A reload never closes a socket or touches a request in flight: requests already admitted
finish under what they were admitted with, new ones see the new settings. A file that
fails validation is refused whole (:class:`~helexa.config.ConfigError`, one line naming
the key) and the running config stays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import CortexConfig

if TYPE_CHECKING:
    from .portal.keys import ApiKey

PORTAL_RESTART_FIELDS = frozenset({"listen", "tls_cert_file", "tls_key_file", "surfaces"})
"""A portal's settings bound to its sockets and routes: kept as started until a restart."""
_LIVE_TOP = frozenset({"orchestrator", "federation", "log_level", "models_file", "enrolment"})
_FEDERATION_RESTART = frozenset({"spare_slots_per_neuron"})


@dataclass(frozen=True)
class ReloadPlan:
    """What changed between two configs: dotted keys, sorted."""

    live: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    portals: tuple[str, ...] = ()
    """Existing portals whose live settings changed (reconfigured in place)."""


@dataclass
class ReloadReport:
    """The outcome of a reload, for the log line and the admin API's answer."""

    catalogue: dict[str, list[str]] = field(default_factory=lambda: {"added": [], "removed": [], "changed": []})
    live: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    pins_dropped: list[str] = field(default_factory=list)
    """``MODEL on NEURON``: pins of the models the catalogue dropped, dropped with them."""
    warnings: list[str] = field(default_factory=list)
    """What the operator must act on, one sentence each (keys whose ``models`` name a
    name their portal no longer serves: :func:`stranded_keys`)."""

    def line(self) -> str:
        """One log line: what changed live and what needs a restart."""
        c = self.catalogue
        parts = [f"{sign}{m}" for sign, key in (("+", "added"), ("-", "removed"), ("~", "changed")) for m in c[key]]
        applied = ([f"catalogue {' '.join(parts)}"] if parts else []) + self.live
        text = "reload: " + ("applied " + ", ".join(applied) if applied else "nothing changed")
        if self.restart:
            text += "; needs a restart to apply: " + ", ".join(self.restart)
        if self.warnings:
            text += "; warnings: " + "; ".join(self.warnings)
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"catalogue": self.catalogue, "applied": self.live, "needs_restart": self.restart,
                "pins_dropped": self.pins_dropped, "warnings": self.warnings, "message": self.line()}


def stranded_keys(portal_id: str, keys: Iterable[ApiKey], served_before: Callable[[str], str | None],
                  served_after: Callable[[str], str | None], aliases_after: dict[str, str]) -> list[str]:
    """Warnings for the keys of ``portal_id`` restricted (``models``) to a name the portal
    served before a reload and no longer does (an alias renamed or removed, a model no
    longer listed), one per name. Such a key keeps its list as it is: it may not use the
    name's new alias (a reload never widens a restricted key's access), and the old name
    is refused with a 404 that says why, until the operator updates the key's models.
    ``served_before`` / ``served_after``: the portal's ``serves`` before and after."""
    by_name: dict[str, list[str]] = {}
    for key in keys:
        if key.portal != portal_id or key.models is None or key.revoked_at is not None:
            continue
        for name in key.models:
            if served_after(name) is None and served_before(name) is not None:
                by_name.setdefault(name, []).append(key.key_id)
    out = []
    for name, key_ids in sorted(by_name.items()):
        target = served_before(name)
        now_as = sorted(alias for alias, model in aliases_after.items() if model == target)
        if served_after(target or "") is not None and target not in now_as:
            now_as.append(str(target))
        renamed = f" (its model is now served as {', '.join(repr(n) for n in now_as)})" if now_as else ""
        out.append(f"portal {portal_id} no longer serves {name!r}{renamed}, which the models of key"
                   f"{'s' if len(key_ids) > 1 else ''} {', '.join(sorted(key_ids))} name: refused (404) to "
                   f"them until `helexa keys update KEY --models ...`")
    return out


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def plan_reload(old: CortexConfig, new: CortexConfig) -> ReloadPlan:
    """Sort the keys that differ between ``old`` and ``new`` (see the module docstring)."""
    live: set[str] = set()
    restart: set[str] = set()
    portals: set[str] = set()
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for name in sorted(set(a) | set(b)):
        if name == "portals":
            continue
        if a.get(name) == b.get(name):
            continue
        if name == "gateway":
            for key in _changed(a[name], b[name]):
                (live if key.split(".")[0] == "admin_clients" else restart).add(f"gateway.{key.split('.')[0]}")
        elif name == "federation":
            for key in _changed(a[name], b[name]):
                top = key.split(".")[0]
                (restart if top in _FEDERATION_RESTART else live).add(f"federation.{top}")
        elif name in _LIVE_TOP:
            live.add(name)
        else:
            restart.add(name)
    old_p, new_p = a["portals"], b["portals"]
    for pid in sorted(set(old_p) ^ set(new_p)):
        restart.add(f"portals.{pid} ({'added' if pid in new_p else 'removed'})")
    for pid in sorted(set(old_p) & set(new_p)):
        for key in _changed(old_p[pid], new_p[pid]):
            top = key.split(".")[0]
            if top in PORTAL_RESTART_FIELDS:
                restart.add(f"portals.{pid}.{top}")
            else:
                live.add(f"portals.{pid}.{top}")
                portals.add(pid)
    return ReloadPlan(tuple(sorted(live)), tuple(sorted(restart)), tuple(sorted(portals)))
