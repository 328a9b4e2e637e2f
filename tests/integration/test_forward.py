"""Direct-mode relay: byte-exact in both directions, many connections at once, half-close,
backpressure with bounded server memory, failed targets, remove closing live conns."""
import os
import random
import selectors
import socket
import subprocess
import time

from conftest import (Worker, connect, free_port, recv_all, recv_exact, recv_hash,
                      send_stream, stream_sha256, wait_until)

MiB = 1 << 20


def make_mapping(server, target_port, target_ip="127.0.0.1"):
    port = free_port()
    server.create_ok(port=port, target_ip=target_ip, target_port=target_port)
    return port


def test_relay_64mib_each_way_concurrently(server, stream_backend_factory):
    total = 64 * MiB
    backend = stream_backend_factory(send_total=total)
    port = make_mapping(server, backend.port)
    t0 = time.monotonic()
    with connect(port, timeout=60) as s:
        reader = Worker(recv_hash, s)
        reader.start()
        sent_sha = send_stream(s, total)
        got_count, got_sha = reader.join_result(60)
    assert wait_until(lambda: backend.results, timeout=30, desc="backend to finish")
    [res] = backend.results
    assert res["error"] is None, res
    # public client -> target
    assert res["recv_count"] == total
    assert res["recv_sha"] == sent_sha
    # target -> public client
    assert got_count == total
    assert got_sha == res["sent_sha"] == stream_sha256(total)
    elapsed = time.monotonic() - t0
    m = wait_until(lambda: (lambda x: x if x["active_connections"] == 0 else None)(
        server.mapping(port)), timeout=5, desc="connection to end")
    assert m["bytes_in"] == total and m["bytes_out"] == total, m
    assert m["total_connections"] == 1 and m["failed_connections"] == 0, m
    print(f"64 MiB each way in {elapsed:.2f}s")


def test_relay_echo_32mib(server, echo_backend):
    total = 32 * MiB
    port = make_mapping(server, echo_backend.port)
    with connect(port, timeout=60) as s:
        reader = Worker(recv_hash, s)
        reader.start()
        sent_sha = send_stream(s, total)
        count, sha = reader.join_result(60)
    assert count == total and sha == sent_sha


def test_500_concurrent_connections(server, echo_backend):
    n, size = 500, 64 * 1024
    port = make_mapping(server, echo_backend.port)
    payloads = [random.Random(i).randbytes(size) for i in range(n)]
    socks = []
    try:
        for _ in range(n):
            s = connect(port, timeout=10)
            socks.append(s)
        # Every one of them is open at once on the far side too.
        wait_until(lambda: echo_backend.active >= n, timeout=20,
                   desc=f"{n} concurrent backend connections (have {echo_backend.active})")
        sel = selectors.DefaultSelector()
        state = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            state[s] = {"i": i, "sent": 0, "got": bytearray(), "eof": False}
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        open_count = n
        deadline = time.monotonic() + 60
        while open_count and time.monotonic() < deadline:
            for key, ev in sel.select(0.5):
                s = key.fileobj
                st = state[s]
                if ev & selectors.EVENT_WRITE and st["sent"] < size:
                    try:
                        st["sent"] += s.send(payloads[st["i"]][st["sent"]:st["sent"] + 65536])
                    except BlockingIOError:
                        pass
                    if st["sent"] == size:
                        s.shutdown(socket.SHUT_WR)
                        sel.modify(s, selectors.EVENT_READ)
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    if data:
                        st["got"] += data
                        assert len(st["got"]) <= size, f"conn {st['i']}: too many bytes"
                    else:
                        st["eof"] = True
                        sel.unregister(s)
                        open_count -= 1
        sel.close()
        assert open_count == 0, f"{open_count} connections unfinished after 60s"
        bad = [st["i"] for st in state.values() if bytes(st["got"]) != payloads[st["i"]]]
        assert not bad, f"{len(bad)} connections got wrong bytes, e.g. #{bad[:5]}"
    finally:
        for s in socks:
            s.close()
    m = wait_until(lambda: (lambda x: x if x["active_connections"] == 0 else None)(
        server.mapping(port)), timeout=10, desc="all connections to end")
    assert m["total_connections"] == n and m["failed_connections"] == 0, m
    assert m["bytes_in"] == n * size and m["bytes_out"] == n * size, m


class AnswerAfterEofBackend:
    """Reads the request to EOF, then answers with a known reply and closes."""

    def __init__(self, reply_size):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.reply = random.Random(99).randbytes(reply_size)
        self.request = None
        self.worker = Worker(self._serve)
        self.worker.start()

    def _serve(self):
        self.sock.settimeout(20)
        c, _ = self.sock.accept()
        with c:
            c.settimeout(20)
            self.request = recv_all(c)  # only returns on the relayed FIN
            c.sendall(self.reply)
        self.sock.close()


def test_half_close_client_first(server):
    backend = AnswerAfterEofBackend(reply_size=3 * MiB + 5)
    port = make_mapping(server, backend.port)
    request = random.Random(5).randbytes(200 * 1024)
    with connect(port, timeout=20) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s)  # the whole answer, then EOF
    backend.worker.join_result(20)
    assert backend.request == request
    assert len(answer) == len(backend.reply) and answer == backend.reply


def test_half_close_backend_first(server):
    """The target says its piece and shuts its write side; the client gets EOF but can
    still send, and everything it sends afterwards arrives."""
    greeting = b"220 hello, I will only listen now\r\n" * 1000
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    lsock.settimeout(20)

    def serve():
        c, _ = lsock.accept()
        with c:
            c.settimeout(20)
            c.sendall(greeting)
            c.shutdown(socket.SHUT_WR)
            return recv_hash(c)

    w = Worker(serve)
    w.start()
    try:
        port = make_mapping(server, lsock.getsockname()[1])
        with connect(port, timeout=20) as s:
            assert recv_all(s) == greeting
            sent_sha = send_stream(s, 4 * MiB)
            count, sha = w.join_result(20)
            assert (count, sha) == (4 * MiB, sent_sha)
            assert s.recv(1) == b""
    finally:
        lsock.close()


def test_backpressure_bounded_memory(server, stream_backend_factory):
    """1 GiB into a target that first stops reading, then reads slowly, then fast.
    The server must hold back the sender instead of buffering: RSS stays < 64 MiB."""
    total = 1024 * MiB
    limit_kb = 64 * 1024
    backend = stream_backend_factory(paused=True, slow_chunk=64 * 1024, slow_sleep=0.005)
    port = make_mapping(server, backend.port)
    rss0 = server.rss_kb()
    sent = [0]
    samples = []

    def sample_for(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(server.rss_kb())
            time.sleep(0.02)

    s = connect(port, timeout=60)
    try:
        sender = Worker(send_stream, s, total, 1 * MiB,
                        lambda n: sent.__setitem__(0, n))
        sender.start()
        # Phase 1: target not reading. The sender must get stuck well short of 1 GiB.
        wait_until(lambda: sent[0] > 0, timeout=10, desc="sender to start")

        def stalled():
            a = sent[0]
            sample_for(0.5)
            return sent[0] == a

        wait_until(stalled, timeout=15, desc="sender to be held back by the server")
        stuck_at = sent[0]
        assert stuck_at < 256 * MiB, f"{stuck_at >> 20} MiB accepted while target reads nothing"
        # Phase 2: a slow reader (~ a few MiB/s).
        backend.slow.set()
        backend.paused.clear()
        sample_for(1.5)
        assert backend.progress > 0, "slow reader got nothing"
        # Phase 3: full speed to the end.
        backend.slow.clear()
        while sender.is_alive():
            samples.append(server.rss_kb())
            sender.join(0.05)
        sent_sha = sender.join_result(60)
        wait_until(lambda: backend.results, timeout=30, desc="target to reach EOF")
    finally:
        s.close()
    [res] = backend.results
    assert res["error"] is None, res
    assert res["recv_count"] == total
    assert res["recv_sha"] == sent_sha
    peak = max(samples)
    print(f"rss start {rss0} kB, peak {peak} kB over {len(samples)} samples, "
          f"sender held at {stuck_at >> 20} MiB")
    if server.sanitized():
        return  # ASan's quarantine alone is hundreds of MiB
    assert peak < limit_kb, f"server RSS peaked at {peak} kB (start {rss0} kB)"


def test_unreachable_target_counts_failed(server):
    dead = free_port()  # nothing listens there
    port = make_mapping(server, dead)
    with connect(port, timeout=10) as s:
        s.settimeout(10)
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b""
    m = wait_until(lambda: (lambda x: x if x["failed_connections"] >= 1 and
                            x["active_connections"] == 0 else None)(server.mapping(port)),
                   timeout=5, desc="failed connection to be counted")
    assert m["total_connections"] == 1 and m["failed_connections"] == 1, m
    assert m["status"] == "listening"


def test_remove_closes_live_connections(server, echo_backend):
    port = make_mapping(server, echo_backend.port)
    with connect(port, timeout=10) as s:
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += s.recv(4 - len(got))
        assert got == b"ping"
        status, body = server.remove(port)
        assert status == 200, body
        s.settimeout(3)
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b"", "live connection kept open after remove"
    wait_until(lambda: echo_backend.active == 0, timeout=5,
               desc="target side closed after remove")


def test_hostname_target(server, http_backend):
    """target_ip may be a host name: 'localhost' resolves to 127.0.0.1 here (and maybe
    ::1 first, where nothing listens -- the next address must then be tried)."""
    port = make_mapping(server, http_backend.port, target_ip="localhost")
    with connect(port, timeout=10) as s:
        s.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        resp = recv_all(s)
    assert resp.startswith(b"HTTP/1.0 200"), resp[:100]
    assert resp.endswith(http_backend.files["hello.txt"])


def test_max_connections_per_mapping(server_factory, echo_backend):
    srv = server_factory(config={"limits": {"max_connections_per_mapping": 3}})
    port = make_mapping(srv, echo_backend.port)
    held = []
    try:
        for i in range(3):
            s = connect(port)
            s.sendall(b"x%d" % i)
            assert s.recv(2) == b"x%d" % i
            held.append(s)
        # The fourth is closed at once, without reaching the target.
        with connect(port) as s:
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        assert echo_backend.accepted == 3
        m = srv.mapping(port)
        assert m["active_connections"] == 3, m
        # One closes; a new one gets through.
        held.pop().close()
        wait_until(lambda: srv.mapping(port)["active_connections"] == 2, timeout=5,
                   desc="closed connection to be released")
        s = connect(port)
        held.append(s)
        s.sendall(b"ok")
        assert s.recv(2) == b"ok"
    finally:
        for s in held:
            s.close()


def test_fin_after_buffered_bytes_client_to_target(server, stream_backend_factory):
    """The client sends 16 MiB and its FIN while the target is not reading: every byte
    still reaches the target before the FIN is passed on."""
    total = 16 * MiB
    backend = stream_backend_factory(paused=True)
    port = make_mapping(server, backend.port)
    with connect(port, timeout=30) as s:
        sent = [0]
        sender = Worker(send_stream, s, total, 256 * 1024, lambda n: sent.__setitem__(0, n))
        sender.start()
        wait_until(lambda: sent[0] > 0, timeout=10, desc="sender to start")
        # Let the pipeline fill up (some of it sits in the server), then drain it.
        before = -1
        while before != sent[0] and sender.is_alive():
            before = sent[0]
            sender.join(0.3)
        backend.paused.clear()
        sent_sha = sender.join_result(30)
        wait_until(lambda: backend.results, timeout=30, desc="target to see EOF")
    [res] = backend.results
    assert res["recv_count"] == total and res["recv_sha"] == sent_sha, res


def test_target_close_after_burst_delivers_everything(server):
    """The target writes 8 MiB and closes at once while the client is not reading yet:
    the client still gets all 8 MiB, then EOF."""
    total = 8 * MiB
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    lsock.settimeout(20)

    def serve():
        c, _ = lsock.accept()
        with c:
            c.settimeout(30)
            return send_stream(c, total, shut=False)  # then close(), no SHUT_WR first

    w = Worker(serve)
    w.start()
    try:
        port = make_mapping(server, lsock.getsockname()[1])
        with connect(port, timeout=30) as s:
            # Give the target time to finish while nobody reads (it may not fit).
            w.join(3)
            count, sha = recv_hash(s)
            sent_sha = w.join_result(30)
            assert count == total and sha == sent_sha
    finally:
        lsock.close()


def _cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_pauses_accept(server, echo_backend):
    """With no file descriptors left, accept() fails at once and for ever: the listener
    must pause and log rarely instead of spinning; once descriptors free up it serves."""
    port = make_mapping(server, echo_backend.port)
    # No descriptor left at all: every accept() fails with EMFILE.
    open_fds = len(os.listdir(f"/proc/{server.pid}/fd"))
    soft = next(l.split()[3] for l in open(f"/proc/{server.pid}/limits")
                if l.startswith("Max open files"))
    subprocess.run(["prlimit", f"--nofile={open_fds}:", f"--pid={server.pid}"], check=True)
    held = []
    try:
        for _ in range(60):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        cpu0 = _cpu_seconds(server.pid)
        time.sleep(2.0)
        cpu = _cpu_seconds(server.pid) - cpu0
        assert cpu < 0.5, f"server burnt {cpu:.2f} s of CPU in 2 s while out of descriptors"
        lines = [l for l in server.log_text().splitlines() if "accept failed" in l]
        assert len(lines) <= 6, f"{len(lines)} 'accept failed' lines in 2 s"
    finally:
        for s in held:
            s.close()
    subprocess.run(["prlimit", f"--nofile={soft}:", f"--pid={server.pid}"], check=True)
    def echo_ok():
        try:
            with connect(port, timeout=3) as s:
                s.sendall(b"again")
                return s.recv(5) == b"again"
        except OSError:
            return False
    wait_until(echo_ok, timeout=10, desc="mapping serves again once descriptors are free")


def _listener(backlog):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    return s


def test_connect_timeout_to_unanswering_target(server_factory):
    """A target whose accept queue is full drops the SYN: the dial must give up after
    tunnel.connect_timeout, close the public side and count the failure."""
    srv = server_factory(config={"tunnel": {"enabled": False, "connect_timeout": 1}})
    target = _listener(0)
    fillers = []
    try:
        # Backlog 0 holds one pending connection; further SYNs are dropped.
        for _ in range(2):
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.setblocking(False)
            f.connect_ex(target.getsockname())
            fillers.append(f)
        time.sleep(0.2)
        port = make_mapping(srv, target.getsockname()[1])
        with connect(port, timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"hello?")
            t0 = time.monotonic()
            try:
                data = s.recv(1)
            except ConnectionResetError:
                data = b""
            waited = time.monotonic() - t0
        assert data == b"", data
        assert 0.5 < waited < 8, f"public side closed after {waited:.1f}s, timeout is 1s"
        m = wait_until(lambda: (lambda x: x if x["active_connections"] == 0 else None)(
            srv.mapping(port)), timeout=5, desc="the connection to end")
        assert m["failed_connections"] == 1, m
    finally:
        for f in fillers:
            f.close()
        target.close()


def test_silent_target_outlives_connect_timeout(server_factory):
    """A target that accepts but says nothing, behind a client that says nothing, is a
    live connection: past tunnel.connect_timeout it stays open and still relays."""
    srv = server_factory(config={"tunnel": {"enabled": False, "connect_timeout": 1}})
    target = _listener(8)
    try:
        port = make_mapping(srv, target.getsockname()[1])
        with connect(port, timeout=10) as s:
            s.settimeout(2.5)
            try:
                early = s.recv(1)
            except socket.timeout:
                early = None
            assert early is None, f"public side got {early!r} from a silent target"
            assert srv.mapping(port)["failed_connections"] == 0
            s.sendall(b"late words")
            target.settimeout(5)
            t, _ = target.accept()
            with t:
                t.settimeout(5)
                assert recv_exact(t, 10) == b"late words"
                t.sendall(b"reply")
                s.settimeout(5)
                assert recv_exact(s, 5) == b"reply"
        m = wait_until(lambda: (lambda x: x if x["active_connections"] == 0 else None)(
            srv.mapping(port)), timeout=5, desc="the connection to end")
        assert m["failed_connections"] == 0 and m["total_connections"] == 1, m
    finally:
        target.close()
