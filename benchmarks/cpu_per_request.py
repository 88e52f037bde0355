"""What the in-process CPU benchmarks share (``cortex_app_bench.py``,
``federation_cpu_bench.py``): one request's CPU time and Python calls measured in blocks,
and the same script run against other source trees, interleaved, for a before/after."""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable


async def report(one: Callable[[], Awaitable[object]], requests: int, blocks: int) -> None:
    """Run ``one()`` in ``blocks`` blocks of ``requests`` and print the process's CPU
    microseconds per request (best and median block) and the Python calls per request
    (``cProfile``'s count over one more block: the same on a busy machine as on a quiet
    one), labelled with the source tree ``helexa`` was imported from."""
    import helexa

    per: list[float] = []
    for _ in range(blocks):
        t0 = time.process_time()
        for _ in range(requests):
            await one()
        per.append((time.process_time() - t0) / requests * 1e6)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(requests):
        await one()
    profile.disable()
    stats = pstats.Stats(profile)
    calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    per.sort()
    tree = os.path.dirname(os.path.dirname(helexa.__file__))
    print(f"{tree}: {per[0]:.0f} us/request best, "
          f"{per[len(per) // 2]:.0f} median; {calls / requests:.0f} Python calls/request", flush=True)
    if TOP:
        from cortex_profile import print_profile

        print_profile(tree, stats, requests, TOP)


TOP = 0
"""``--top N``: also print the calls per request by step of the request path and the ``N``
functions called most (``cortex_profile.print_profile``)."""


_FROM_SRC = """\
import sys
src = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]  # the checkout's import hook
sys.path.insert(0, src)
sys.path.insert(1, {here!r})
sys.argv[0] = {script!r}
exec(compile(open({script!r}).read(), {script!r}, "exec"), {{"__name__": "__main__", "__file__": {script!r}}})
"""


def main(script: str, doc: str, measure: Callable[..., None], *, requests: int,
         flags: dict[str, str] | None = None) -> None:
    """The command line: ``--requests``, ``--blocks`` and ``--src TREE`` (repeatable: each
    tree run twice, in alternating order, in a process that imports ``helexa`` from it).
    ``flags``: the script's own on/off options (name: help), passed to ``measure`` as
    keyword arguments and on to the runs of the other trees."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--requests", type=int, default=requests, help="requests per block")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--src", action="append", default=[], help="another source tree (repeatable)")
    ap.add_argument("--top", type=int, default=0,
                    help="also print the calls per request by step, and the N functions called most")
    for name, text in (flags or {}).items():
        ap.add_argument(f"--{name}", action="store_true", help=text)
    a = ap.parse_args()
    chosen = {name: getattr(a, name) for name in flags or {}}
    global TOP
    TOP = a.top
    if not a.src:
        measure(a.requests, a.blocks, **chosen)
        return
    script = os.path.abspath(script)
    runner = _FROM_SRC.format(script=script, here=os.path.dirname(script))
    for order in (a.src, a.src[::-1]):
        for src in order:
            subprocess.run([sys.executable, "-c", runner, os.path.abspath(src),
                            "--requests", str(a.requests), "--blocks", str(a.blocks), "--top", str(a.top),
                            *(f"--{name}" for name, on in chosen.items() if on)], check=True)
