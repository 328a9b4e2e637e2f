#!/usr/bin/env python3
"""Idle-connection memory test helper (adapted from the shared peer harness).
  hold.py server PORT                  -> echo server that keeps connections open until the peer closes
  hold.py client PORT N HOLD READYFILE -> open N connections to 127.0.0.1:PORT, check each end-to-end
                                          with a 4-byte echo, write READYFILE, hold HOLD s, close all.
Everything is bounded by timeouts (the client gives up after max(120, N/40) s)."""
import asyncio, resource, sys, time


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    if soft == resource.RLIM_INFINITY or soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def handle(r, w):
    try:
        while True:
            d = await r.read(4096)
            if not d:
                break
            w.write(d)
            await w.drain()
    except Exception:
        pass
    w.close()


async def server(port):
    srv = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096, reuse_address=True)
    async with srv:
        await srv.serve_forever()


async def one(port, sem):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        try:
            w.write(b"ping")
            await w.drain()
            d = await asyncio.wait_for(r.readexactly(4), 10)
            assert d == b"ping", d
        except BaseException:
            w.close()
            raise
        return w


async def client(port, n, hold, ready):
    sem = asyncio.Semaphore(32)
    t0 = time.time()
    res = await asyncio.gather(*[one(port, sem) for _ in range(n)], return_exceptions=True)
    ok = [w for w in res if not isinstance(w, BaseException)]
    errs = [repr(e) for e in res if isinstance(e, BaseException)]
    print(f"hold: {len(ok)}/{n} connections ok in {time.time()-t0:.2f}s" +
          (f", first error {errs[0]}" if errs else ""), flush=True)
    with open(ready, "w") as f:
        f.write(f"{len(ok)}\n")
    await asyncio.sleep(hold)
    for w in ok:
        w.close()
    await asyncio.sleep(0.5)


if sys.argv[1] == "server":
    raise_nofile(65536)
    asyncio.run(server(int(sys.argv[2])))
else:
    n = int(sys.argv[3])
    raise_nofile(max(20000, n + 1000))
    limit = max(120.0, n / 40.0) + float(sys.argv[4])
    asyncio.run(asyncio.wait_for(client(int(sys.argv[2]), n, float(sys.argv[4]), sys.argv[5]), limit))
