"""The catalogue: parsing models.toml and feasibility on a neuron's hardware."""

from __future__ import annotations

import pytest

from helexa.protocol import Workload
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, CatalogueError, Priority, default_catalogue
from neuron_double import hardware

TOML = """
[models."big"]
backend = "exllamav2"
memory_mb = 40000
min_devices = 2
min_device_vram_mb = 20000
pinned_on = ["beast"]
priority = "high"
max_context = 32768
max_output = 4096
price_in = 0.5
price_out = 1.5
keep_warm = true
idle_ttl = 0

[models."big".config]
metadata = { path = "/models/big" }

[models."embed"]
backend = "embeddings"
workloads = ["embedding"]
memory_mb = 100
idle_ttl = 300
"""


def test_parses_every_field(tmp_path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(TOML)
    cat = Catalogue.load(path)
    big = cat.get("big")
    assert big is not None and len(cat) == 2
    assert big.priority is Priority.HIGH and big.pinned_on == ("beast",) and big.keep_warm
    assert (big.price_in, big.price_out, big.max_output) == (0.5, 1.5, 4096)
    config = big.model_config_for_neuron()
    assert config.backend_kind == "exllamav2" and config.metadata == {"path": "/models/big"}
    assert config.capability.min_devices == 2
    assert cat.get("embed").workloads == (Workload.EMBEDDING,)
    assert cat.get("embed").idle_ttl == 300


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[models."x"]\nmemory_mb = 1\n', "models.x.backend"),
        ('[models."x"]\nbackend = "s"\npriority = "urgent"\n', "unknown priority"),
        ('[models."x"]\nbackend = "s"\nmemory_mb = -1\n', "models.x.memory_mb"),
        ('[models."x"]\nbackend = "s"\nbogus = 1\n', "models.x.bogus"),
        ("[models\n", "not valid TOML"),
        # what a cortex takes from its neurons' reports: at most 256 printable characters
        (f'[models."{"x" * 257}"]\nbackend = "s"\n', r"models.'x{64}'.id: the model id 'x{64}'... is 257 characters"),
        ('[models."a\\nb"]\nbackend = "s"\n', r"models.'a\\nb'.id: the model id 'a\\nb' holds a control"),
    ],
)
def test_bad_files_are_rejected_naming_the_field(tmp_path, text, fragment) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(CatalogueError, match=fragment):
        Catalogue.load(path)


def test_a_file_saved_in_another_encoding_is_a_catalogue_error(tmp_path) -> None:
    """A Latin-1 accent in a comment was a UnicodeDecodeError: a traceback at start, and a
    SIGHUP reload that stopped the cortex."""
    path = tmp_path / "models.toml"
    path.write_bytes('# caf\xe9\n[models."x"]\nbackend = "s"\n'.encode("latin-1"))
    with pytest.raises(CatalogueError, match="not UTF-8 text"):
        Catalogue.load(path)


def test_a_missing_file_is_a_catalogue_error(tmp_path) -> None:
    with pytest.raises(CatalogueError, match="cannot read"):
        Catalogue.load(tmp_path / "absent.toml")


def entry(**kw) -> CatalogueEntry:
    return CatalogueEntry(id="m", backend="s", **kw)


@pytest.mark.parametrize(
    ("kw", "hw", "feasible"),
    [
        ({"memory_mb": 2000}, hardware(ram_gb=1), False),
        ({"memory_mb": 2000}, hardware(ram_gb=2), True),
        ({"memory_mb": 20000, "min_devices": 1}, hardware(gpus=(24,)), True),
        ({"memory_mb": 20000, "min_devices": 1}, hardware(gpus=(12,)), False),
        ({"memory_mb": 40000, "min_devices": 2}, hardware(gpus=(24, 24)), True),
        ({"memory_mb": 40000, "min_devices": 2}, hardware(gpus=(24,)), False),
        ({"memory_mb": 40000, "min_devices": 2, "min_device_vram_mb": 30000}, hardware(gpus=(24, 24)), False),
        ({"memory_mb": 40000, "min_devices": 2, "min_device_vram_mb": 20000}, hardware(gpus=(24, 12, 24)), True),
    ],
)
def test_feasibility_follows_devices_and_vram(kw, hw, feasible) -> None:
    assert entry(**kw).is_feasible_on(hw) is feasible


def test_pinning_is_a_preference_not_a_restriction() -> None:
    assert entry(memory_mb=10, pinned_on=("elsewhere",)).is_feasible_on(hardware())


def test_the_built_in_catalogue_has_a_chat_and_an_embedding_model() -> None:
    workloads = {w for e in default_catalogue() for w in e.workloads}
    assert Workload.CHAT in workloads and Workload.EMBEDDING in workloads


def test_a_source_and_its_sha256_reach_the_neurons_config() -> None:
    sha = "ab" * 32
    cat = Catalogue.from_dict({"models": {"m": {"backend": "llama_cpp", "source": "hf://org/repo@v1/m.gguf",
                                                "sha256": sha}}})
    cfg = cat.get("m").model_config_for_neuron()
    assert (cfg.source, cfg.sha256) == ("hf://org/repo@v1/m.gguf", sha)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"source": "hf://org"}, "models.m.source: expected hf://ORG/REPO"),
        ({"source": "http://example.org/m.gguf"}, "models.m.source: 'http://example.org/m.gguf': plain http://"),
        ({"sha256": "ab" * 32}, "models.m: sha256 needs a source"),
        ({"source": "https://h.org/m", "sha256": "nothex"}, "models.m.sha256:"),
        ({"source": "/m.gguf", "config": {"metadata": {"path": "/n.gguf"}}}, "models.m: give either source or"),
    ],
)
def test_a_bad_source_is_refused_naming_the_field(table, message) -> None:
    with pytest.raises(CatalogueError) as err:
        Catalogue.from_dict({"models": {"m": {"backend": "llama_cpp", **table}}})
    assert message in str(err.value)


# --- the context one request gets, and features --------------------------------------------


def llama(**table) -> CatalogueEntry:
    return Catalogue.from_dict({"models": {"m": {"backend": "llama_cpp", **table}}}).get("m")


def test_max_context_is_per_request_and_kept_consistent_with_the_slots() -> None:
    assert llama(config={"metadata": {"n_ctx": 2048}}).max_context == 1024
    assert llama(config={"metadata": {"n_ctx": 4096, "n_parallel": 4}}).max_context == 1024
    assert llama().max_context == 2048  # the backend's defaults: 4096 over 2 slots
    entry = llama(max_context=3000)
    assert entry.config.metadata["n_ctx"] == 6000  # what gives each of 2 slots 3000
    assert llama(max_context=512, config={"metadata": {"n_ctx": 2048}}).max_context == 512


def test_a_max_context_no_request_gets_is_refused() -> None:
    with pytest.raises(CatalogueError, match=r"max_context 2048 is more than one request gets.*leaves 1024.*n_ctx = 4096"):
        llama(max_context=2048, config={"metadata": {"n_ctx": 2048}})


def embedder(**table) -> CatalogueEntry:
    return Catalogue.from_dict({"models": {"e": {"backend": "embeddings", **table}}}).get("e")


def test_an_embedding_models_max_context_is_what_its_backend_takes_per_input() -> None:
    # It was shown (/api/show, the fleet view) but not applied: the backend took 256 tokens whatever it said.
    assert embedder().max_context == 256 and embedder().config.metadata["max_seq_length"] == 256
    assert embedder(max_context=128).config.metadata["max_seq_length"] == 128
    wide = embedder(config={"metadata": {"max_seq_length": 512}})
    assert wide.max_context == 512 and embedder(max_context=512, config=wide.config.model_dump()).max_context == 512
    with pytest.raises(CatalogueError, match=r"max_context 1024 is more than the model takes: max_seq_length 256"):
        embedder(max_context=1024)


def test_the_built_in_and_example_catalogues_give_smollm2_2048_per_request() -> None:
    from pathlib import Path

    example = Catalogue.load(Path(__file__).parents[2] / "examples" / "models.toml")
    for catalogue in (default_catalogue(), example):
        entry = catalogue.get("smollm2-135m-instruct")
        assert entry.max_context == 2048 and entry.config.metadata["n_ctx"] == 4096


def test_features_default_to_the_backends_and_can_be_narrowed() -> None:
    from helexa.protocol import Feature
    from helexa.roles.cortex.catalogue import BACKEND_FEATURES
    from helexa.runtime import BACKENDS, backend_class

    for kind in BACKENDS:  # the catalogue's defaults are what each backend class declares
        assert BACKEND_FEATURES[kind] == backend_class(kind).features, kind
    assert llama().feature_set == {Feature.STRUCTURED_OUTPUT, Feature.TOOLS, Feature.LOGPROBS}
    assert llama(features=["logprobs"]).feature_set == {Feature.LOGPROBS}
    with pytest.raises(CatalogueError, match="features"):
        llama(features=["telepathy"])


def test_a_refused_sources_credentials_and_signature_are_not_in_the_error() -> None:
    with pytest.raises(CatalogueError) as err:
        Catalogue.from_dict({"models": {"m": {"backend": "synthetic", "memory_mb": 1,
                                              "source": "http://u:s3cret@h.example/x.gguf?token=TOK0456"}}})
    assert "http://***@h.example/x.gguf?***" in str(err.value)
    assert "s3cret" not in str(err.value) and "TOK0456" not in str(err.value)
