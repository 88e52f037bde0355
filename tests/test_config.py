"""Loading configuration from a file and ``HELEXA_*`` environment variables (``helexa/config.py``)."""

from __future__ import annotations

from helexa.config import ConfigError, load_config
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.neuron.config import NeuronConfig


def test_a_list_setting_from_the_environment_may_be_comma_separated() -> None:
    # docs/mesh.md: HELEXA_FEDERATION__DENY_OPERATORS=op-c; config.py: "JSON or comma-separated"
    config = load_config(CortexConfig, file=None, environ={
        "HELEXA_FEDERATION__DENY_OPERATORS": "op-c",
        "HELEXA_GATEWAY__ADMIN_CLIENTS": "10.0.0.1, ::1",
        "HELEXA_FEDERATION__MODELS": "a,b",  # list[str] | None
        "HELEXA_MESH__BOOTSTRAP": '["/ip4/10.0.0.2/tcp/4001"]',  # JSON still works
    })
    assert config.federation.deny_operators == ["op-c"]
    assert config.gateway.admin_clients == ["10.0.0.1", "::1"]
    assert config.federation.models == ["a", "b"]
    assert config.mesh.bootstrap == ["/ip4/10.0.0.2/tcp/4001"]


def test_a_string_setting_from_the_environment_keeps_its_commas() -> None:
    config = load_config(CortexConfig, file=None, environ={"HELEXA_OPERATOR": "acme, inc"})
    assert config.operator == "acme, inc"
    neuron = load_config(NeuronConfig, file=None, environ={"HELEXA_CPU_POLICY": "batch"})
    assert neuron.cpu_policy == "batch"


def test_a_check_across_keys_names_them_without_a_placeholder() -> None:
    # docs/portals.md quotes the line: portals.acme: listens on 0.0.0.0:8443, which is not loopback: ...
    try:
        load_config(CortexConfig, file=None, environ={}, overrides={"portals": {"acme": {"listen": ["0.0.0.0:8443"]}}})
    except ConfigError as exc:
        assert str(exc).startswith("portals.acme: listens on 0.0.0.0:8443, which is not loopback: set auth"), str(exc)
    else:
        raise AssertionError("a non-loopback portal without auth was accepted")
