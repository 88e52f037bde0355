"""Which identity key each node id is bound to: trust on first use, forgotten by the operator.

The first neuron that joins under a node id with an identity key binds the id to that key
(:mod:`helexa.protocol.join` refuses later joins of the id with any other key, or none).
The bindings live in ``DATA_DIR/neuron-keys.json`` so they survive a restart; each change
rewrites the file whole: a temporary file, synced, renamed over it, the folder synced, so
a ``kill -9`` leaves the old file or the new one, never half of one. A change that cannot
be written is undone in memory too (:meth:`NeuronKeys.bind` raises ``OSError``; the control
server then turns the join away to retry): a binding held in memory only would let another
key take the id after a restart.

``helexa neurons keys`` lists them and ``helexa neurons forget NODE_ID`` drops one (a new
machine under an old node id): the neuron joined under it stays connected, and the next
join of the id binds its key again.

The file::

    {"version": 1, "bindings": {"<node id>": {"public_key": "<64 hex>", "bound_at": <unix s>}}}
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from helexa import secret_files
from helexa.identity import fingerprint

log = logging.getLogger(__name__)

FILE_NAME = "neuron-keys.json"
_FORMAT = 1


def path_in(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


@dataclass(frozen=True, slots=True)
class Binding:
    node_id: str
    public_key: bytes
    bound_at: float

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "fingerprint": self.fingerprint, "public_key": self.public_key.hex(),
                "bound_at": self.bound_at}


def parse(text: str) -> dict[str, Binding]:
    """The bindings in a file's ``text``. Raises ``ValueError`` when it is not such a file."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != _FORMAT or not isinstance(data.get("bindings"), dict):
        raise ValueError(f"not a version-{_FORMAT} bindings file")
    out: dict[str, Binding] = {}
    for node_id, entry in data["bindings"].items():
        try:
            key = bytes.fromhex(entry["public_key"])
            bound_at = float(entry["bound_at"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"the binding of {node_id!r} is malformed") from None
        if len(key) != 32:
            raise ValueError(f"the binding of {node_id!r} holds a key of {len(key)} bytes, not 32")
        out[node_id] = Binding(node_id, key, bound_at)
    return out


def render(bindings: dict[str, Binding]) -> str:
    entries = {b.node_id: {"public_key": b.public_key.hex(), "bound_at": b.bound_at}
               for b in sorted(bindings.values(), key=lambda b: b.node_id)}
    return json.dumps({"version": _FORMAT, "bindings": entries}, indent=1) + "\n"


class NeuronKeys:
    """The node id -> identity key bindings of one cortex.

    Args:
        path: the bindings file (read now when it exists; None: kept in memory only, for
            tests of other parts).
        clock: Unix time, for ``bound_at``.

    Raises (on construction): ``ValueError`` for a file that is not a bindings file,
    ``OSError`` for one that cannot be read.
    """

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._bindings: dict[str, Binding] = {}
        if path is not None and path.exists():
            self._bindings = parse(path.read_text())
        self._writing = trio.Lock() if path is not None else None
        self._saving: dict[str, trio.Event] = {}  # node id -> set when its new binding's write ended

    def bound(self, node_id: str) -> bytes | None:
        """The key ``node_id`` is bound to (None: none yet)."""
        binding = self._bindings.get(node_id)
        return binding.public_key if binding is not None else None

    def get(self, node_id: str) -> Binding | None:
        return self._bindings.get(node_id)

    def list(self) -> list[Binding]:
        return sorted(self._bindings.values(), key=lambda b: b.node_id)

    def __len__(self) -> int:
        return len(self._bindings)

    async def bind(self, node_id: str, public_key: bytes) -> bool:
        """Bind ``node_id`` to ``public_key`` if it is bound to none; True when it was bound
        now. The binding holds in memory at once (a join that comes meanwhile sees it) and
        on disk when this returns; a bind of the same key meanwhile waits for the write.

        Raises ``ValueError`` when ``node_id`` is bound to another key (the join's check
        and this call are one step of the trio thread, so only a caller's bug gets here);
        ``OSError`` when the file cannot be written: then the binding is dropped again (a
        binding that would not survive a restart would let another key take the id after
        one), and a bind of the same key that waited for it raises ``OSError`` too.
        """
        current = self.bound(node_id)
        if current is not None:
            if current != public_key:
                raise ValueError(f"node id {node_id!r} is bound to another identity key")
            saving = self._saving.get(node_id)
            if saving is not None:
                await saving.wait()
                if self.bound(node_id) != public_key:
                    raise OSError(f"the binding of node id {node_id!r} could not be written")
            return False
        binding = self._bindings[node_id] = Binding(node_id, public_key, self._clock())
        saving = self._saving[node_id] = trio.Event()
        try:
            await self._save()
        except BaseException:
            if self._bindings.get(node_id) is binding:
                del self._bindings[node_id]
            raise
        finally:
            del self._saving[node_id]
            saving.set()
        return True

    async def forget(self, node_id: str) -> Binding | None:
        """Drop ``node_id``'s binding (its next join binds again); the binding dropped, or
        None when there was none. Raises ``OSError`` when the file cannot be written: the
        binding then holds again, as it does on disk."""
        binding = self._bindings.pop(node_id, None)
        if binding is not None:
            try:
                await self._save()
            except BaseException:
                self._bindings.setdefault(node_id, binding)
                raise
        return binding

    async def _save(self) -> None:
        if self.path is None or self._writing is None:
            return
        path = self.path
        async with self._writing:  # one writer at a time; each writes the state as it is then
            await trio.to_thread.run_sync(secret_files.write, path, render(self._bindings).rstrip("\n"))
