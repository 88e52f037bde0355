"""What a ``hf://`` source is made of, asked of the model hub through ``huggingface_hub``.

:func:`resolve` turns a hub source into the commit it resolves to and the files to fetch
(their sizes and the hub's own hashes: the SHA-256 of LFS files, the git blob id of the
others), with URLs pinned to that commit so the bytes cannot change under a resumed
download. It uses the library's public calls only (``hf_hub_url``,
``get_hf_file_metadata``: ``HEAD /{repo}/resolve/{rev}/{file}``; ``HfApi.model_info``
with ``files_metadata``: ``GET /api/models/{repo}/revision/{rev}``; ``build_hf_headers``
for the token), so the hub's protocol is never written here.

The bytes themselves are fetched by :mod:`helexa.roles.neuron.download`, not by
``hf_hub_download``: that one deletes its partial file when a download fails (so a neuron
restarted mid-way would start from zero), checks no hash, and blocks a thread that can only
be stopped between 10 MB chunks. Files are fetched over HTTP, which the hub serves for
every file (``hf_xet`` is not used).

The calls block: run :func:`resolve` on a worker thread. Endpoint: ``hf_endpoint`` from
the neuron's config, else ``HF_ENDPOINT``, else the public hub. Token: the config's, else
what ``huggingface_hub`` finds (``HF_TOKEN``, a stored login), else none. Errors are
:class:`~helexa.roles.neuron.download.DownloadError` with ``model_not_found``,
``unauthorized`` or ``download_failed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from helexa.protocol import ModelSource

from .download import DownloadError, RemoteFile

DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint_from(configured: str | None) -> str:
    return (configured or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True, slots=True)
class HubPlan:
    commit: str
    files: tuple[RemoteFile, ...]


def resolve(source: ModelSource, *, endpoint: str, token: str | None, timeout: float) -> HubPlan:
    """The commit and files of a hub source (blocking: call it on a worker thread)."""
    import huggingface_hub
    from huggingface_hub.utils import build_hf_headers

    assert source.repo is not None
    revision = source.revision or "main"
    try:
        headers = build_hf_headers(token=token, library_name="helexa")
        if source.filename is not None:
            url = huggingface_hub.hf_hub_url(source.repo, source.filename, revision=revision, endpoint=endpoint)
            meta = huggingface_hub.get_hf_file_metadata(url, token=token, timeout=timeout, endpoint=endpoint,
                                                        library_name="helexa")
            if not meta.commit_hash or not meta.etag:
                raise DownloadError(f"{source.location}: the hub gave no commit or hash for the file")
            return HubPlan(meta.commit_hash, (_remote(source.repo, source.filename, meta.commit_hash, endpoint,
                                                      meta.size, meta.etag, headers),))
        info = huggingface_hub.HfApi(endpoint=endpoint, token=token, library_name="helexa").model_info(
            source.repo, revision=revision, files_metadata=True, timeout=timeout
        )
        if not info.sha or info.siblings is None:
            raise DownloadError(f"{source.location}: the hub gave no commit or file list")
        files = tuple(
            _remote(source.repo, s.rfilename, info.sha, endpoint, s.lfs.size if s.lfs else s.size,
                    s.lfs.sha256 if s.lfs else s.blob_id, headers)
            for s in info.siblings
        )
        return HubPlan(info.sha, files)
    except DownloadError:
        raise
    except Exception as exc:  # huggingface_hub's errors, its HTTP client's, OSError
        raise _hub_error(source, exc) from None


def _remote(repo: str, filename: str, commit: str, endpoint: str, size: int | None, etag: str | None,
            headers: dict[str, str]) -> RemoteFile:
    import huggingface_hub

    etag = (etag or "").strip('"')
    return RemoteFile(
        rel=filename,
        url=huggingface_hub.hf_hub_url(repo, filename, revision=commit, endpoint=endpoint),
        size=size,
        sha256=etag if len(etag) == 64 else None,
        git_sha1=etag if len(etag) == 40 else None,
        headers=headers,
    )


def _hub_error(source: ModelSource, exc: Exception) -> DownloadError:
    from huggingface_hub import errors

    what = source.location
    if isinstance(exc, errors.GatedRepoError):
        return DownloadError(f"{what}: the repository is gated; the neuron needs a token with access",
                             code="unauthorized")
    if isinstance(exc, errors.RevisionNotFoundError):
        return DownloadError(f"{what}: no such revision on the hub", code="model_not_found")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DownloadError(f"{what}: no such repository on the hub (or it is private)", code="model_not_found")
    if isinstance(exc, errors.EntryNotFoundError):
        return DownloadError(f"{what}: no such file in the repository", code="model_not_found")
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return DownloadError(f"{what}: the hub refused access (HTTP {status})", code="unauthorized")
        return DownloadError(f"{what}: the hub answered HTTP {status}")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return DownloadError(f"{what}: HF_HUB_OFFLINE is set and the model is not in the cache")
    return DownloadError(f"{what}: cannot reach the hub: {type(exc).__name__}: {exc}")
