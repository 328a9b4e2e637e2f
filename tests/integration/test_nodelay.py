"""Every relayed socket runs without Nagle (TCP_NODELAY), whoever set it: the accepted
public sockets inherit it from the mapping's listener (no setsockopt per connection,
issue 19), the sockets portmux dials set it themselves. Without it, a small write that
follows another waits for an ACK: interactive protocols (ssh keystrokes, Redis
pipelines) would stall up to the peer's delayed-ACK timer.

The option is read off the live sockets of the real processes: each socket is found by
its ports in /proc/net/tcp{,6}, duplicated out of the process with pidfd_getfd(2) (the
test is the processes' parent, which ptrace access allows) and asked with getsockopt.
Only 127.0.0.1, free ports, every wait bounded by a deadline."""
import ctypes
import errno
import os
import socket

import pytest

from conftest import CLIENT_BIN, connect, free_port, socket_owner, tcp_socket_inodes, wait_until
from tunnel_helpers import start_client, tunnel_server

TOKEN = "tok-" + os.urandom(8).hex()
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
_libc = ctypes.CDLL(None, use_errno=True)


def nodelay_of(pid, lport, rport):
    """TCP_NODELAY of process pid's socket with local port lport and remote port rport."""
    holder = {}

    def find():
        inode = tcp_socket_inodes().get((lport, rport))
        holder["at"] = socket_owner(pid, inode) if inode else None
        return holder["at"] is not None

    wait_until(find, timeout=5, desc=f"pid {pid} holds a socket {lport} -> {rport}")
    owner, fd = holder["at"]
    pidfd = os.pidfd_open(owner)
    try:
        dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                pytest.skip("this kernel has no pidfd_getfd (Linux < 5.6)")
            raise OSError(err, f"pidfd_getfd({owner}, {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    s = socket.socket(fileno=dup)
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        s.close()  # our duplicate only; the process's own descriptor stays open


def echo_once(sock, payload=b"ping"):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(64)
        assert chunk, "the relay closed the connection"
        got += chunk
    assert got == payload


def test_direct_relay_sockets_have_nodelay(server_factory, echo_backend):
    srv = server_factory()
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    with connect(port) as c:
        echo_once(c)
        assert nodelay_of(srv.pid, port, c.getsockname()[1]) == 1, "the accepted public socket"
        # Only the server talks to the backend: its one connection there is the dialed one
        # (a socket of an earlier test's backend on that port, closed, has no owner).
        dialed = dialed_to(srv.pid, echo_backend.port)
        assert len(dialed) == 1, dialed
        assert nodelay_of(srv.pid, *dialed[0]) == 1, "the server's dialed socket"


def dialed_to(pid, port):
    """(local port, remote port) of the sockets pid (or a descendant) holds to port."""
    return [k for k, inode in tcp_socket_inodes().items()
            if k[1] == port and inode and socket_owner(pid, inode)]


@pytest.mark.skipif(not CLIENT_BIN.exists(), reason=f"portmux-client not built at {CLIENT_BIN}")
def test_tunnel_relay_sockets_have_nodelay(server_factory, echo_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}])
    client = start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port, use_tunnel=True)
    with connect(port) as c:
        echo_once(c)
        assert nodelay_of(srv.pid, port, c.getsockname()[1]) == 1, \
            "the server's accepted public socket"
        # The client's dial to the backend (only the client talks to it).
        dialed = dialed_to(client.pid, echo_backend.port)
        assert len(dialed) == 1, dialed
        assert nodelay_of(client.pid, *dialed[0]) == 1, "the client's dialed socket"
