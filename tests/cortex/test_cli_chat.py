"""``helexa chat`` against a keyed portal: the key comes from ``HELEXA_API_KEY``,
``--api-key`` or ``--api-key-file``, goes out as ``Authorization: Bearer``, and is never
printed (not even when it is wrong or cannot be sent)."""

from __future__ import annotations

import os
import sys

import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, new_key, portals

HELEXA = [sys.executable, "-m", "helexa.cli"]


async def chat(url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``helexa chat`` in a process of its own: its exit code, stdout and stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "HELEXA_API_KEY"} | (env or {})
    done = await trio.run_process([*HELEXA, "chat", "--gateway", url, "--model", "fast", "--max-tokens", "3", *args,
                                   "hi"], capture_stdout=True, capture_stderr=True, check=False, env=environ)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_chat_sends_the_api_key_to_a_keyed_portal_from_each_source_and_never_prints_it(tmp_path) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    (tmp_path / "key").write_text(key + "\n")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        url = urls["acme"]
        code, out, err = await chat(url)
        assert code == 1 and "401" in err and "HELEXA_API_KEY" in err, err
        for args, env in (((), {"HELEXA_API_KEY": key}), (("--api-key", key), None),
                          (("--api-key-file", str(tmp_path / "key")), None)):
            code, out, err = await chat(url, *args, env=env)
            assert code == 0, err
            assert out.strip() == "t0 t1 t2" and "3 completion tokens" in err
            assert key not in out + err
        wrong = key[:-4] + "zzzz"
        code, out, err = await chat(url, env={"HELEXA_API_KEY": wrong})
        assert code == 1 and "401" in err and wrong not in out + err
        unsendable = key + "\u00e9\n"
        code, out, err = await chat(url, "--api-key", "x" + unsendable)
        assert code == 1 and "cannot carry" in err and key not in out + err
    assert len(neuron.requests) == 3


async def test_chat_reports_its_errors_as_the_other_commands_do(tmp_path) -> None:
    fleet = Fleet()
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        code, _, err = await chat(urls["acme"])  # no key: a 401
    assert code == 1 and err.startswith("helexa: error: the gateway answered 401") and "Error:" not in err, err
    closed = urls["acme"]  # the gateway has stopped: nothing listens there now
    code, _, err = await chat(closed)
    assert code == 1 and err.startswith("helexa: error: cannot talk to the gateway") and "Error:" not in err, err
    status = await trio.run_process([*HELEXA, "status", "--cortex", closed, "--admin-token-file",
                                     str(tmp_path / "none")], capture_stderr=True, check=False)
    assert status.returncode == 1 and status.stderr.decode().startswith("helexa: error: ")
