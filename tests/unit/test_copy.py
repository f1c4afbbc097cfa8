"""splice(): half-close, reset propagation and live byte counting on real sockets."""

import asyncio
import socket

from agent.proxy.copy import ByteCounter, splice


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_half_close_propagates_and_bytes_are_counted():
    async def main():
        loop = asyncio.get_running_loop()
        app_end, app = pair()        # app_end is the application, app the agent's side
        peer, peer_end = pair()      # peer_end is the remote server
        counter, totals = ByteCounter(), ByteCounter()
        task = asyncio.ensure_future(splice(app, peer, counter, totals))
        await loop.sock_sendall(app_end, b"request")
        app_end.shutdown(socket.SHUT_WR)              # FIN from the app
        got = b""
        while True:
            chunk = await loop.sock_recv(peer_end, 100)
            if not chunk:
                break                                 # ... reaches the server as EOF
            got += chunk
        assert got == b"request"
        await loop.sock_sendall(peer_end, b"response!")   # the other way still open
        peer_end.shutdown(socket.SHUT_WR)
        back = b""
        while True:
            chunk = await loop.sock_recv(app_end, 100)
            if not chunk:
                break
            back += chunk
        assert back == b"response!"
        assert await task == "closed"
        assert (counter.sent, counter.received) == (7, 9)
        assert (totals.sent, totals.received) == (7, 9)
    asyncio.run(main())


def test_reset_on_one_side_resets_the_other():
    async def main():
        loop = asyncio.get_running_loop()
        app_end = socket.socket()
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        app_end.connect(lst.getsockname())
        app, _ = lst.accept()
        peer = socket.create_connection(srv.getsockname())
        peer_end, _ = srv.accept()
        for s in (app, peer):
            s.setblocking(False)
        task = asyncio.ensure_future(splice(app, peer, ByteCounter()))
        import struct
        peer_end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer_end.close()                              # RST from the server
        assert await asyncio.wait_for(task, 5) == "reset"
        app_end.settimeout(5)
        try:
            data = app_end.recv(10)
            assert False, f"expected a reset, got {data!r}"
        except ConnectionResetError:
            pass
        for s in (app_end, srv, lst):
            s.close()
    asyncio.run(main())
