"""Loading configuration from a file and ``HELEXA_*`` environment variables (``helexa/config.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_a_cortex_toml_of_an_earlier_release_is_refused_saying_where_its_keys_went() -> None:
    """The release of 2026-11-23 had [gateway.provisioner] and [gateway.dispatch], whose keys
    are [orchestrator]'s now: its cortex.toml was refused as 'unknown key (+1 more)', which
    said neither where they went nor which the other was."""
    old = Path(__file__).parent / "fixtures" / "cortex_2026-11-23.toml"
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=old, environ={})
    assert str(err.value) == (f"gateway.provisioner: unknown key (an earlier release's: its keys are [orchestrator]'s "
                              f"now) (in {old}) (+1 more: gateway.dispatch)")
    with pytest.raises(ConfigError, match=r"^busy_silence: unknown key \(an earlier release's: no longer a setting"):
        load_config(CortexConfig, file=None, environ={}, overrides={"busy_silence": 3})
    with pytest.raises(ConfigError, match=r"^gatway: unknown key \(from the command line\)$"):  # a typo: no hint
        load_config(CortexConfig, file=None, environ={}, overrides={"gatway": {}})


def test_a_bad_value_from_the_environment_or_a_flag_is_not_blamed_on_the_file(tmp_path) -> None:
    """README: a TOML file per role, overridden by HELEXA_* variables, overridden by flags; a
    wrong value stops the process with one line naming the key. That line said "(in
    cortex.toml)" for a value the file did not hold: the operator looked in the wrong place."""
    toml = tmp_path / "cortex.toml"
    toml.write_text('gateway_socket = "127.0.0.1:8080"\n[orchestrator]\nretry_after = 5.0\nload_timeout = 0\n')
    env = {"HELEXA_ORCHESTRATOR__RETRY_AFTER": "-1"}
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ=env, overrides={"gateway_socket": None})
    assert str(err.value) == ("orchestrator.load_timeout: Input should be greater than 0 (in "
                              f"{toml}) (+1 more: orchestrator.retry_after)")  # the first is the file's
    toml.write_text('gateway_socket = "127.0.0.1:8080"\n[orchestrator]\nretry_after = 5.0\n')
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ=env)
    assert str(err.value) == ("orchestrator.retry_after: Input should be greater than 0 "
                              "(from HELEXA_ORCHESTRATOR__RETRY_AFTER)")
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ={}, overrides={"gateway_socket": "nonsense"})
    assert str(err.value) == "gateway_socket: expected HOST:PORT, got 'nonsense' (from the command line)"
    with pytest.raises(ConfigError) as err:
        load_config(NeuronConfig, file=None, environ={"HELEXA_CONNECT_TIMEOUT": "-1"})
    assert str(err.value) == "connect_timeout: Input should be greater than 0 (from HELEXA_CONNECT_TIMEOUT)"


def test_neuron_key_finds_the_data_dir_as_the_neuron_does(tmp_path, monkeypatch) -> None:
    """``helexa neuron-key`` and ``helexa neuron`` resolve the data directory one way:
    --data-dir, then ``HELEXA_DATA_DIR`` (what the systemd unit sets), then the config
    file's ``data_dir``, then the default; the key is made where the neuron would look."""
    from click.testing import CliRunner

    from helexa.cli import main

    config = tmp_path / "neuron.toml"
    config.write_text(f'cortex = "ws://127.0.0.1:1"\nnode_id = "n1"\ndata_dir = "{tmp_path / "file"}"\n')
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("HELEXA_DATA_DIR", raising=False)

    def key_in(*args: str, env: dict[str, str] | None = None) -> str:
        result = CliRunner().invoke(main, ["neuron-key", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    assert f"in {tmp_path / 'xdg' / 'helexa' / 'neuron'};" in key_in()
    assert f"in {tmp_path / 'file'};" in key_in("--config", str(config))
    env = {"HELEXA_DATA_DIR": str(tmp_path / "unit")}
    assert f"in {tmp_path / 'unit'};" in key_in("--config", str(config), env=env)
    assert load_config(NeuronConfig, file=config, environ=env).data_dir == tmp_path / "unit"  # as the neuron
    assert f"in {tmp_path / 'flag'};" in key_in("--config", str(config), "--data-dir", str(tmp_path / "flag"), env=env)
    assert (tmp_path / "unit" / "identity.key").exists() and (tmp_path / "flag" / "identity.key").exists()
    # Made now, it says so (a shell lacks the unit's HELEXA_DATA_DIR); found, it does not.
    assert "no identity key was in" in key_in("--data-dir", str(tmp_path / "new"))
    assert "no identity key was in" not in key_in("--data-dir", str(tmp_path / "new"))


def test_examples_cortex_toml_shows_every_orchestrator_key_with_its_default() -> None:
    """docs/operations.md: "every key is in examples/cortex.toml, with its default" for
    [orchestrator]; five were not (command_timeout, warm_retry, warm_start_delay,
    embed_timeout, route_timeout)."""
    import tomllib

    from helexa.roles.cortex.config import OrchestratorConfig

    example = Path(__file__).parent.parent / "examples" / "cortex.toml"
    shown = tomllib.loads(example.read_text())["orchestrator"]
    defaults = {name: field.default for name, field in OrchestratorConfig.model_fields.items()}
    assert shown == defaults


def test_a_default_portal_made_public_by_a_flag_or_variable_names_it_not_the_file(tmp_path) -> None:
    """docs/portals.md: a portal on a socket that is not loopback must say ``auth``. A
    ``--gateway-socket`` or ``HELEXA_GATEWAY_SOCKET`` of 0.0.0.0 made the default portal one,
    and the refusal said "(in cortex.toml)", a file that set neither."""
    toml = tmp_path / "cortex.toml"
    toml.write_text('operator = "acme"\n')
    line = 'portals.default: listens on 0.0.0.0:8080, which is not loopback: set auth = "keys"'
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ={}, overrides={"gateway_socket": "0.0.0.0:8080"})
    assert str(err.value).startswith(line) and str(err.value).endswith("(from the command line)"), str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ={"HELEXA_GATEWAY_SOCKET": "0.0.0.0:8080"})
    assert str(err.value).endswith("(from HELEXA_GATEWAY_SOCKET)"), str(err.value)
    toml.write_text('gateway_socket = "0.0.0.0:8080"\n')  # the file's own: the file is named
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ={})
    assert str(err.value).startswith(line) and str(err.value).endswith(f"(in {toml})"), str(err.value)
    toml.write_text('[portals.default]\nlisten = ["10.0.0.1:8443"]\n')  # another listen of the file's, under a flag
    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=toml, environ={}, overrides={"gateway_socket": "127.0.0.1:9090"})
    assert "10.0.0.1:8443" in str(err.value) and str(err.value).endswith(f"(in {toml})"), str(err.value)
