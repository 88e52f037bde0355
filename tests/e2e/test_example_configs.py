"""The commented example configs in ``examples/`` stay valid as the settings change."""

from __future__ import annotations

from pathlib import Path

from helexa.config import load_config
from helexa.roles.cortex.catalogue import Catalogue
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.neuron.config import NeuronConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_cortex_config_loads() -> None:
    config = load_config(CortexConfig, file=EXAMPLES / "cortex.toml", environ={})
    assert config.gateway.server == "helexa"
    assert list(config.portals) == ["default", "acme", "lab"]  # the example shows two portals
    assert config.portals["acme"].keyed and config.portals["acme"].aliases == {"fast": "smollm2-135m-instruct"}
    assert config.portals["default"].auth is None and config.portals["default"].listen == ["127.0.0.1:8080"]


def test_the_example_neuron_config_loads() -> None:
    config = load_config(NeuronConfig, file=EXAMPLES / "neuron.toml", environ={})
    assert config.cortex.startswith("ws")


def test_the_example_catalogue_loads() -> None:
    assert len(list(Catalogue.load(EXAMPLES / "models.toml"))) > 0
