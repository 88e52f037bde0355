"""The cortex's web pages: the operator's console and each portal's own front-end, served
by one quart-trio app in the cortex's process beside the lean API path (``docs/web.md``).

Modules: ``app`` (the quart-trio app and how each socket mounts it), ``console`` (the
console's pages and actions), ``portal_site`` (a portal's pages), ``sessions`` (console
sessions), ``fleet_feed`` (the fleet pushed to watchers), ``traffic`` (the last hour's
traffic), ``mesh_view`` (peers and the federation ledger). Templates and static files are
package data (``templates/``, ``static/``).
"""
