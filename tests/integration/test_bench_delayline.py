"""bench/delayline.c, the latency bench's WAN: every byte held for the one-way delay, and with
-r a link of that many Mbit/s per direction. The bench's claim that one tunnel stream reaches
bandwidth × delay across such a link (bench/RESULTS.md) is only as good as the link: these
check that it delivers every byte, in order, and never sooner than the delay plus the time
the bytes need on the link. Lower bounds only: how much later is the machine's business."""
import hashlib
import os
import shlex
import socket
import threading
import time

import pytest

from conftest import SOURCE_DIR, Proc, _tcp_rows, connect, free_port, run_once, wait_until

SOURCE = SOURCE_DIR / "bench/delayline.c"


@pytest.fixture(scope="module")
def delayline(tmp_path_factory):
    """Built as bench/latency.sh builds it (its warning flags, -Werror)."""
    out = tmp_path_factory.mktemp("delayline") / "delayline"
    flags = run_once(["pkg-config", "--cflags", "--libs", "libevent"], timeout=30)
    assert flags.returncode == 0, flags
    r = run_once(["gcc", "-std=c11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-Wshadow",
                  "-Wno-unused-parameter", "-D_GNU_SOURCE", "-o", out, SOURCE,
                  *shlex.split(flags.stdout.decode())], timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return out


class Sink:
    """Accepts one connection, reads it to EOF: the SHA-256 of what came and when the last
    byte and the EOF arrived."""

    def __init__(self):
        self.port = free_port()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", self.port))
        self.lsock.listen(4)
        self.lsock.settimeout(30)
        self.digest = None
        self.total = 0
        self.first_at = self.last_at = self.eof_at = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        c, _ = self.lsock.accept()
        c.settimeout(30)
        h = hashlib.sha256()
        with c:
            while True:
                d = c.recv(1 << 20)
                now = time.monotonic()
                if not d:
                    self.eof_at = now
                    break
                if self.first_at is None:
                    self.first_at = now
                self.last_at = now
                self.total += len(d)
                h.update(d)
        self.digest = h.hexdigest()

    def close(self):
        self.lsock.close()


def _start(delayline, tmp_path, target, *extra):
    port = free_port()
    p = Proc([delayline, "-l", f"127.0.0.1:{port}", "-t", f"127.0.0.1:{target}", *extra],
             tmp_path / "delayline.log", name="delayline")
    p.start()
    return p, port


def _send_through(delayline, tmp_path, size, *extra):
    sink = Sink()
    try:
        p, port = _start(delayline, tmp_path, sink.port, *extra)
        try:
            wait_until(lambda: _port_bound(port), timeout=10, desc="delay line listening")
            blob = os.urandom(size)
            s = connect(port)
            t0 = time.monotonic()
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
            sink.thread.join(60)
            assert not sink.thread.is_alive(), "the sink never saw the end of the stream"
            s.close()
            assert sink.total == size and sink.digest == hashlib.sha256(blob).hexdigest(), \
                f"{sink.total} of {size} bytes, digest {'same' if sink.digest else 'none'}"
            return t0, sink
        finally:
            p.kill()
    finally:
        sink.close()


def _port_bound(port):
    """Whether something listens on port, without connecting (a connection would make the
    delay line dial the one-shot sink)."""
    return any(lport == port and state == "0A" for lport, _, state, _ in _tcp_rows())


def test_delay_line_holds_every_byte_for_the_delay(delayline, tmp_path):
    t0, sink = _send_through(delayline, tmp_path, 2 << 20, "-d", "40")
    assert sink.first_at - t0 >= 0.040, f"first byte after {sink.first_at - t0:.3f} s"
    assert sink.eof_at - t0 >= 0.040


def test_a_capped_link_moves_no_faster_than_its_rate(delayline, tmp_path):
    """6 MiB over an 80 Mbit/s link: on the wire ≥ 6 × 2^20 × 8 / 80e6 = 0.63 s, plus the
    10 ms delay; the last byte cannot arrive sooner than that after the first was sent."""
    size, rate = 6 << 20, 80
    t0, sink = _send_through(delayline, tmp_path, size, "-d", "10", "-r", str(rate))
    floor = size * 8 / (rate * 1e6) + 0.010
    took = sink.last_at - t0
    # 2 % for the microsecond rounding of each read's time on the link, and clocks
    assert took >= floor * 0.98, f"{size} bytes in {took:.3f} s, faster than {rate} Mbit/s"


def test_rate_is_checked(delayline):
    for bad in ("0", "-5", "1000001", "fast", ""):
        r = run_once([delayline, "-l", "1", "-t", "127.0.0.1:1", "-d", "1", "-r", bad], timeout=10)
        assert r.returncode != 0, (bad, r)
        assert b"usage" in r.stderr, (bad, r.stderr)
