#!/usr/bin/env python3
"""(Copied from ../shared/bench/bench.py; streams are checked by token count, not event count.)
LLM gateway benchmark: direct (fake backend) vs gateway, interleaved A B A B.
Non-stream: wrk (-t1, Lua POST body) -> req/s at each concurrency, p50/p99 at c=1.
Stream: built-in asyncio+aiohttp closed-loop client -> TTFC and total time per stream.
Usage: bench.py --gateway http://127.0.0.1:4000 [--direct http://127.0.0.1:9000] [--model fake]
       [--key sk-..] [--rounds 3] [--dur 8] [--cpus 0]   (needs: wrk, aiohttp; uvloop optional)
"""
import argparse, asyncio, json, os, re, statistics as st, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = os.path.join(HERE, "post.lua")
TOK = re.compile(rb"tok\d+")  # the fake backend and helexa's synthetic backend both say "tok0 tok1 ..."


def cpu_s(pid):
    """utime+stime (s) of pid and all its descendant processes (all threads included)."""
    if not pid: return 0.0
    kids, stats, tot, tck = {}, {}, 0.0, os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = f; kids.setdefault(int(f[1]), []).append(int(d))
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            tot += (int(stats[p][11]) + int(stats[p][12])) / tck
        todo += kids.get(p, [])
    return tot


def wrk(base, c, dur, model, key, cpus):
    cmd = ["wrk", "-t1", f"-c{c}", f"-d{dur}s", "--timeout", "10s", "-s", LUA, base + "/v1/chat/completions"]
    cmd = (["taskset", "-c", cpus] if cpus else []) + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=dur + 30,
                         env=dict(os.environ, GW_MODEL=model, GW_KEY=key)).stdout
    line = next((l for l in out.splitlines() if l.startswith("JSON ")), None)
    if line is None: sys.exit("wrk failed:\n" + out)
    return json.loads(line[5:])


async def _stream(base, c, dur, model, key, chunks, max_n):
    import aiohttp
    url = base + "/v1/chat/completions"
    body = json.dumps({"model": model, "stream": True, "max_tokens": chunks,
                       "messages": [{"role": "user", "content": "Say hello"}]}).encode()
    hdr = {"Content-Type": "application/json", "Authorization": "Bearer " + key}
    ttfc, tot, bad, events = [], [], 0, []
    deadline = time.perf_counter() + dur
    conn = aiohttp.TCPConnector(limit=c, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def worker():
            nonlocal bad
            while time.perf_counter() < deadline and len(tot) < max_n:
                t0 = time.perf_counter(); first = None; buf = bytearray()
                try:
                    async with s.post(url, data=body, headers=hdr) as r:
                        async for data in r.content.iter_any():
                            if first is None and data.strip():
                                first = time.perf_counter()
                            buf += data
                        # Every token must arrive; a gateway may coalesce several into one
                        # event (helexa does when a reader falls behind), so count tokens.
                        ok = r.status == 200 and b"[DONE]" in buf and len(TOK.findall(buf)) >= chunks
                        if ok:
                            events.append(buf.count(b"data:"))
                except Exception:
                    ok = False
                t1 = time.perf_counter()
                if ok:
                    ttfc.append((first - t0) * 1e3); tot.append((t1 - t0) * 1e3)
                else:
                    bad += 1
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(c)])
        el = time.perf_counter() - t0
    q = lambda xs, p: st.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))
    return {"ttfc_p50": q(ttfc, 50), "ttfc_p99": q(ttfc, 99), "tot_p50": q(tot, 50), "tot_p99": q(tot, 99),
            "sps": len(tot) / el, "n": len(tot), "errors": bad,
            "events": st.mean(events) if events else float("nan")}


def stream(base, c, dur, model, key, chunks, cpus):
    code = ("import sys,json,asyncio;sys.path.insert(0,%r);import bench;"
            "\ntry:\n import uvloop; uvloop.install()\nexcept ImportError: pass\n"
            "print(json.dumps(asyncio.run(bench._stream(%r,%d,%f,%r,%r,%d,%d))))"
            % (HERE, base, c, dur, model, key, chunks, 100000))
    cmd = (["taskset", "-c", cpus] if cpus else []) + [sys.executable, "-c", code]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=dur + 90, check=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True); ap.add_argument("--direct", default="http://127.0.0.1:9000")
    ap.add_argument("--model", default="fake", help="model name sent to the gateway")
    ap.add_argument("--direct-model", default="fake-model"); ap.add_argument("--key", default="sk-fake")
    ap.add_argument("--rounds", type=int, default=3); ap.add_argument("--dur", type=int, default=8)
    ap.add_argument("--conc", default="1,16,64"); ap.add_argument("--sconc", default="1,16")
    ap.add_argument("--chunks", type=int, default=64); ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpus", default="0", help="taskset CPU list for load generators ('' = no pinning)")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--direct-pid", type=int, help="backend pid: report its CPU ms/request")
    ap.add_argument("--gw-pid", type=int, help="gateway pid: report its (+children) CPU ms/request")
    a = ap.parse_args()
    tgt = {"direct": (a.direct.rstrip("/"), a.direct_model), "gateway": (a.gateway.rstrip("/"), a.model)}
    pids = {"direct": a.direct_pid, "gateway": a.gw_pid}
    raw = {}  # (test, target) -> list of result dicts
    for base, model in tgt.values():  # warm-up (lazy imports, connection pools); not recorded
        if a.warmup:
            wrk(base, 4, a.warmup, model, a.key, a.cpus); stream(base, 2, a.warmup, model, a.key, a.chunks, a.cpus)
    for r in range(a.rounds):
        for name in ("direct", "gateway"):  # interleaved A B A B
            base, model = tgt[name]
            for c in map(int, a.conc.split(",")):
                c0 = cpu_s(pids[name]); res = wrk(base, c, a.dur, model, a.key, a.cpus)
                res["cpu_ms"] = (cpu_s(pids[name]) - c0) * 1e3 / max(res["n"], 1)
                raw.setdefault((f"ns_c{c}", name), []).append(res)
                print(f"# r{r} {name:7s} nonstream c={c:<3d} {res}", file=sys.stderr, flush=True)
            for c in map(int, a.sconc.split(",")):
                c0 = cpu_s(pids[name]); res = stream(base, c, a.dur, model, a.key, a.chunks, a.cpus)
                res["cpu_ms"] = (cpu_s(pids[name]) - c0) * 1e3 / max(res["n"], 1)
                raw.setdefault((f"st_c{c}", name), []).append(res)
                print(f"# r{r} {name:7s} stream    c={c:<3d} {res}", file=sys.stderr, flush=True)
    med = lambda t, n, k: st.median(x[k] for x in raw[(t, n)])
    rows = []
    for c in map(int, a.conc.split(",")):
        rows.append((f"non-stream req/s c={c}", med(f"ns_c{c}", "direct", "rps"), med(f"ns_c{c}", "gateway", "rps")))
        if a.gw_pid or a.direct_pid:
            rows.append((f"non-stream CPU ms/req c={c}", med(f"ns_c{c}", "direct", "cpu_ms"),
                         med(f"ns_c{c}", "gateway", "cpu_ms")))
    c1 = f"ns_c{a.conc.split(',')[0]}"
    for k in ("p50_ms", "p99_ms"):
        rows.append((f"non-stream {k} c={a.conc.split(',')[0]}", med(c1, "direct", k), med(c1, "gateway", k)))
    for c in map(int, a.sconc.split(",")):
        for k, lab in (("ttfc_p50", "TTFC p50 ms"), ("ttfc_p99", "TTFC p99 ms"), ("tot_p50", "total p50 ms"),
                       ("tot_p99", "total p99 ms"), ("sps", "streams/s"), ("cpu_ms", "CPU ms/stream")):
            if k == "cpu_ms" and not (a.gw_pid or a.direct_pid):
                continue
            rows.append((f"stream{a.chunks} {lab} c={c}", med(f"st_c{c}", "direct", k), med(f"st_c{c}", "gateway", k)))
    errs = {n: sum(x.get("errors", 0) for (t, nn), v in raw.items() if nn == n for x in v) for n in tgt}
    print(f"\nmedians of {a.rounds} interleaved rounds, {a.dur:g}s each; gateway={a.gateway}")
    print(f"{'metric':34s} {'direct':>10s} {'gateway':>10s} {'gw/direct':>9s} {'gw-direct':>10s}")
    for lab, d, g in rows:
        print(f"{lab:34s} {d:10.2f} {g:10.2f} {g / d if d else float('nan'):9.3f} {g - d:10.2f}")
    print(f"errors: direct={errs['direct']} gateway={errs['gateway']}")
    if a.json:
        json.dump({f"{t}|{n}": v for (t, n), v in raw.items()}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
