"""The replica <-> shard TCP channel on loopback: results, errors, stalls and dead peers."""

from __future__ import annotations

import socket
import struct
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from mixserve.expert_shards.channel import HEADER, MAGIC, REPLY, REQUEST, ShardServer, TcpTransport
from mixserve.expert_shards.dispatch import ShardRequest, ShardUnavailableError


def request(rows: int, dim: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> ShardRequest:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 4, (rows, 2), generator=gen)
    return ShardRequest(torch.randn(rows, dim, generator=gen).to(dtype), ids, torch.rand(rows, 2, generator=gen).to(dtype))


def scaled(layer, x, expert_ids, weights):
    """A stand-in for the experts whose answer depends on every input frame."""
    return x * (layer + 1) + (expert_ids.sum(dim=1, keepdim=True) + weights.sum(dim=1, keepdim=True)).to(x.dtype)


def answer(transport: TcpTransport, req: ShardRequest, layer: int = 0) -> torch.Tensor:
    """Shard 0's output for one request."""
    return transport.collect(transport.submit(layer, {0: req}))[0].output


@contextmanager
def channel_to(compute, **options):
    """A transport to one in-process shard server running `compute`."""
    srv = ShardServer(compute)
    transport = TcpTransport({0: srv.address}, **options)
    try:
        yield transport
    finally:
        transport.close()
        srv.close()


@pytest.fixture
def server():
    srv = ShardServer(scaled)
    yield srv
    srv.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_shard_answers_with_its_own_result(server, dtype):
    other = ShardServer(lambda layer, x, ids, w: -x)
    transport = TcpTransport({0: server.address, 1: other.address})
    try:
        reqs = {0: request(5, dtype=dtype, seed=1), 1: request(3, dtype=dtype, seed=2)}
        replies = transport.collect(transport.submit(2, reqs))
        assert torch.equal(replies[0].output, scaled(2, reqs[0].x, reqs[0].expert_ids, reqs[0].weights))
        assert torch.equal(replies[1].output, -reqs[1].x)
        assert replies[0].output.dtype == dtype and replies[0].compute_s >= 0
    finally:
        transport.close()
        other.close()


def test_an_answer_is_read_straight_into_the_buffer_the_request_names(server):
    """The replica has every shard answer into its rows of one buffer (then one scatter-add);
    a buffer of the wrong shape or dtype is left alone and the answer comes in a new tensor."""
    transport = TcpTransport({0: server.address})
    try:
        req = request(5, seed=11)
        into = torch.full((5, 8), float("nan"))
        req.reply_into = into
        reply = transport.collect(transport.submit(3, {0: req}))[0]
        expected = scaled(3, req.x, req.expert_ids, req.weights)
        assert reply.output is into and torch.equal(into, expected)

        wrong = torch.full((5, 8), float("nan"), dtype=torch.bfloat16)
        req.reply_into = wrong
        reply = transport.collect(transport.submit(3, {0: req}))[0]
        assert reply.output is not wrong and torch.equal(reply.output, expected) and wrong.isnan().all()
    finally:
        transport.close()


def slowed(seconds: float, answer):
    """(an event, a compute giving answer(x) that first sleeps `seconds` while the event is set)."""
    slow = threading.Event()

    def compute(layer, x, ids, w):
        if slow.is_set():
            time.sleep(seconds)
        return answer(x)

    return slow, compute


def test_each_answer_is_handed_over_as_it_arrives_before_a_slower_shard_answers(server):
    """The replica adds a shard's rows while the others still compute."""
    slow = ShardServer(lambda layer, x, ids, w: (time.sleep(0.5), -x)[1])
    transport = TcpTransport({0: server.address, 1: slow.address})
    try:
        reqs = {1: request(4, seed=3), 0: request(5, seed=4)}  # the slow shard is sent first
        arrivals = []
        replies = transport.collect(transport.submit(1, reqs), lambda shard, reply: arrivals.append((shard, reply, time.monotonic())))
        returned = time.monotonic()
        assert [shard for shard, _, _ in arrivals] == [0, 1]
        assert returned - arrivals[0][2] > 0.3  # shard 0's answer was handed over long before shard 1's came
        assert all(replies[shard] is reply for shard, reply, _ in arrivals)
    finally:
        transport.close()
        slow.close()


def test_a_failure_while_handling_an_answer_fails_the_layer_and_leaves_the_channel_usable(server):
    slow = ShardServer(lambda layer, x, ids, w: (time.sleep(0.3), -x)[1])
    transport = TcpTransport({0: server.address, 1: slow.address})

    def refuse(shard, reply):
        raise RuntimeError("could not add it")

    try:
        with pytest.raises(RuntimeError, match="could not add it"):
            transport.collect(transport.submit(0, {0: request(2, seed=5), 1: request(2, seed=6)}), refuse)
        fresh = {0: request(3, seed=7), 1: request(3, seed=8)}  # shard 1's late answer is dropped, not taken for these
        replies = transport.collect(transport.submit(0, fresh))
        assert torch.equal(replies[1].output, -fresh[1].x)
        assert torch.equal(replies[0].output, scaled(0, fresh[0].x, fresh[0].expert_ids, fresh[0].weights))
        assert not transport._stash and not transport._asked  # nothing of the failed layer is kept
    finally:
        transport.close()
        slow.close()


def test_a_late_answer_to_an_abandoned_request_never_lands_in_its_buffer():
    slow, compute = slowed(0.6, lambda x: x + 1)
    with channel_to(compute, timeout_s=0.2) as transport:
        slow.set()
        late = request(2, seed=12)
        late.reply_into = torch.full((2, 8), float("nan"))
        with pytest.raises(ShardUnavailableError, match="did not answer within"):
            transport.collect(transport.submit(0, {0: late}))
        slow.clear()
        transport.timeout_s = 5
        fresh = request(2, seed=13)
        assert torch.equal(answer(transport, fresh), fresh.x + 1)  # read past the late answer
        assert late.reply_into.isnan().all()


def test_two_big_layers_in_flight_do_not_deadlock(server):
    """Ping-pong sends a second micro-batch before reading the first answer: with 16 MB each way
    neither side's socket buffers can hold that, so the shard must keep reading while its reply
    waits for the replica."""
    transport = TcpTransport({0: server.address}, timeout_s=20)
    try:
        first, second = request(4096, dim=1024, seed=3), request(4096, dim=1024, seed=4)
        pending = [transport.submit(0, {0: first}), transport.submit(1, {0: second})]
        assert torch.equal(transport.collect(pending[0])[0].output, scaled(0, first.x, first.expert_ids, first.weights))
        assert torch.equal(transport.collect(pending[1])[0].output, scaled(1, second.x, second.expert_ids, second.weights))
    finally:
        transport.close()


def with_buffer(req: ShardRequest, into: bool) -> ShardRequest:
    """req, naming a buffer for its answer if `into` (then the transport reads the answer's first
    bytes together with its header, whatever the message turns out to be)."""
    if into:
        req.reply_into = torch.full_like(req.x, float("nan"))
    return req


@pytest.mark.parametrize("into", [False, True], ids=["no-buffer", "into-a-buffer"])
def test_a_failing_compute_is_a_clear_error_and_the_channel_stays_usable(into):
    def picky(layer, x, ids, w):
        if layer == 7:
            raise ValueError("no layer 7")
        return x

    with channel_to(picky) as transport:
        with pytest.raises(ShardUnavailableError, match="expert shard 0 failed: ValueError: no layer 7$"):
            transport.collect(transport.submit(7, {0: with_buffer(request(2), into)}))
        req = with_buffer(request(2, seed=5), into)
        assert torch.equal(answer(transport, req), req.x)
        assert not into or torch.equal(req.reply_into, req.x)


@pytest.mark.parametrize("into", [False, True], ids=["no-buffer", "into-a-buffer"])
def test_a_long_error_message_arrives_cut_to_a_bound(into):
    def wordy(layer, x, ids, w):
        raise ValueError("é" * 20000)

    with channel_to(wordy) as transport:
        with pytest.raises(ShardUnavailableError, match="expert shard 0 failed: ValueError: é+$") as failure:
            transport.collect(transport.submit(0, {0: with_buffer(request(2), into)}))
        assert len(str(failure.value)) < 4200


def answer_longer(conn) -> None:
    """Reads one request and answers it with one row more than asked, then more bytes."""
    header = HEADER.unpack(conn.recv(HEADER.size, socket.MSG_WAITALL))
    _, _, dtype_code, k, rows, dim, layer, req_id, *_ = header
    conn.recv(rows * dim * 4 + rows * k * 8 + rows * k * 4, socket.MSG_WAITALL)  # float32 frames
    reply = HEADER.pack(MAGIC, REPLY, dtype_code, 0, rows + 1, dim, layer, req_id, 0.0, 0.0, 0.0)
    conn.sendall(reply + torch.arange(float((rows + 1) * dim)).numpy().tobytes() + b"more")
    time.sleep(5)  # stays connected: only what it said can fail the layer
    conn.close()


@pytest.mark.parametrize("into", [False, True], ids=["no-buffer", "into-a-buffer"])
def test_an_answer_longer_than_asked_fails_the_layer(into):
    with transport_to_fake_shard(answer_longer) as transport:
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError, match="answered 3 rows for 2"):
            transport.collect(transport.submit(0, {0: with_buffer(request(2), into)}))
        assert time.monotonic() - started < 5


@contextmanager
def transport_to_fake_shard(behave):
    """A transport (30 s timeout) to a listener whose one connection `behave(conn)` handles."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        behave(conn)

    threading.Thread(target=serve, daemon=True).start()
    transport = TcpTransport({0: f"127.0.0.1:{listener.getsockname()[1]}"}, timeout_s=30)
    try:
        yield transport
    finally:
        transport.close()
        listener.close()


def assert_layer_fails_fast(transport: TcpTransport, match: str) -> None:
    """A layer sent to shard 0 fails with `match`, well before the transport's timeout."""
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError, match=match):
        transport.collect(transport.submit(0, {0: request(2)}))
    assert time.monotonic() - started < 5


def test_a_peer_speaking_another_protocol_fails_the_layer_with_a_clear_error():
    def http_server(conn):
        conn.recv(1 << 16)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(5)  # stays connected: only what it said can fail the layer
        conn.close()

    with transport_to_fake_shard(http_server) as transport:
        assert_layer_fails_fast(transport, "not a mixserve channel message")


def answer_as(conn, id_shift: int) -> None:
    """Reads one request and answers it with a well-formed reply under another request's id."""
    header = HEADER.unpack(conn.recv(HEADER.size, socket.MSG_WAITALL))
    _, _, dtype_code, k, rows, dim, layer, req_id, *_ = header
    conn.recv(rows * dim * 4 + rows * k * 8 + rows * k * 4, socket.MSG_WAITALL)  # float32 frames
    reply = HEADER.pack(MAGIC, REPLY, dtype_code, 0, rows, dim, layer, req_id + id_shift, 0.0, 0.0, 0.0)
    conn.sendall(reply + bytes(rows * dim * 4))
    time.sleep(5)  # stays connected: only what it said can fail the layer
    conn.close()


def test_an_answer_to_a_request_the_shard_was_not_sent_fails_the_layer():
    with transport_to_fake_shard(lambda conn: answer_as(conn, 1000)) as transport:
        assert_layer_fails_fast(transport, "which this replica did not send it")


def test_an_answer_under_another_shard_s_request_id_never_fills_that_shard_s_buffer():
    """Shard 1 answers under shard 0's request id (sent just before its own) while shard 0 still
    computes: the layer fails, and shard 0's buffer holds shard 0's own answer or nothing, never
    shard 1's zeros."""
    slow, compute = slowed(0.5, lambda x: x)
    slow.set()
    server = ShardServer(lambda layer, x, ids, w: (compute(layer, x, ids, w), scaled(layer, x, ids, w))[1])
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: answer_as(listener.accept()[0], -1), daemon=True).start()
    transport = TcpTransport({0: server.address, 1: f"127.0.0.1:{listener.getsockname()[1]}"}, timeout_s=30)
    try:
        first, second = request(3, seed=14), request(3, seed=15)
        first.reply_into = torch.full((3, 8), float("nan"))
        with pytest.raises(ShardUnavailableError, match="which went to shard 0"):
            transport.collect(transport.submit(0, {0: first, 1: second}))
        landed = first.reply_into
        assert landed.isnan().all() or torch.equal(landed, scaled(0, first.x, first.expert_ids, first.weights))
    finally:
        transport.close()
        listener.close()
        server.close()


def test_a_silent_shard_times_out_and_its_late_answer_is_never_taken_for_a_new_one():
    slow, compute = slowed(1.0, lambda x: x)
    with channel_to(compute, timeout_s=0.3) as transport:
        slow.set()
        with pytest.raises(ShardUnavailableError, match="did not answer within"):
            transport.collect(transport.submit(0, {0: request(2, seed=6)}))
        slow.clear()
        transport.timeout_s = 5
        fresh = request(2, seed=7)
        assert torch.equal(answer(transport, fresh), fresh.x)


def test_a_shard_that_dies_mid_layer_fails_the_wait_at_once():
    """A peer that accepts and then closes (a killed shard's kernel closes its sockets) must
    fail collect well before the dispatch timeout."""
    def accept_then_die(conn):
        conn.recv(64)
        conn.close()

    with transport_to_fake_shard(accept_then_die) as transport:
        assert_layer_fails_fast(transport, "expert shard 0")


def test_a_shard_that_dies_while_a_layer_waits_on_others_does_not_fail_that_layer():
    """The transport polls every connection; a dead shard that the layer did not use is
    dropped (and reopened or refused at its next use), not taken for the layer's failure."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    slow = ShardServer(lambda layer, x, ids, w: (time.sleep(0.3), scaled(layer, x, ids, w))[1])
    transport = TcpTransport({0: slow.address, 1: f"127.0.0.1:{listener.getsockname()[1]}"})
    try:
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:  # the transport connected at start
            time.sleep(0.01)
        req = request(3)
        pending = transport.submit(0, {0: req})  # shard 1 gets nothing in this layer
        accepted[0].close()  # shard 1 dies while shard 0 computes
        assert torch.equal(transport.collect(pending)[0].output, scaled(0, req.x, req.expert_ids, req.weights))
        listener.close()
        with pytest.raises(ShardUnavailableError, match="expert shard 1"):
            transport.submit(1, {1: request(2)})
    finally:
        transport.close()
        slow.close()
        listener.close()


def shard_hangs_up_on(server: ShardServer, data: bytes, timeout_s: float = 5) -> bool:
    """Sends data to the shard on a connection of its own: whether the shard then hangs up
    (within timeout_s)."""
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as rogue:
        rogue.sendall(data)
        rogue.settimeout(timeout_s)
        try:
            return rogue.recv(16) == b""
        except ConnectionResetError:  # closed with our bytes unread
            return True


def test_nonsense_on_one_connection_does_not_disturb_the_others(server):
    transport = TcpTransport({0: server.address})
    try:
        assert shard_hangs_up_on(server, b"\xff\xff\xff\x7fGET / HTTP/1.1\r\n\r\n")
        req = request(3, seed=8)
        assert torch.equal(answer(transport, req, layer=1), scaled(1, req.x, req.expert_ids, req.weights))
    finally:
        transport.close()


def test_a_stranger_is_refused_at_its_first_byte_even_if_it_then_says_nothing(server):
    # "G" is not how any mixserve message begins; then silence. 3 s: well inside the 10 s a
    # message that has begun may take.
    assert shard_hangs_up_on(server, b"G", timeout_s=3)


def binary_header(kind=REQUEST, dtype_code=0, k=2, rows=1, dim=8, layer=0, magic=MAGIC) -> bytes:
    return HEADER.pack(magic, kind, dtype_code, k, rows, dim, layer, 1, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("header", [
    binary_header(rows=2**32 - 1, dim=2**32 - 1),
    binary_header(k=0),
    binary_header(dtype_code=9),
    binary_header(kind=REPLY),
    binary_header(magic=b"MXS\x01"),
    struct.pack("<I", 62) + b'{"id": 1, "layer": 0, "rows": 1, "dim": 8, "k": 2, "dtype": "float32"}'[:62],
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["huge-frames", "zero-k", "unknown-dtype", "a-reply-sent-to-a-shard", "another-version", "protocol-1-json", "http"])
def test_a_hostile_header_costs_only_its_own_connection(server, header):
    """Sizes no frame can back, a zero k, an unknown dtype, the wrong kind of message, another
    protocol: the shard hangs up on that peer at once, allocates nothing for it, and keeps
    serving everyone else."""
    assert shard_hangs_up_on(server, header)
    assert server.serving
    transport = TcpTransport({0: server.address})
    try:
        req = request(2, seed=10)
        assert torch.equal(answer(transport, req), scaled(0, req.x, req.expert_ids, req.weights))
    finally:
        transport.close()


def test_a_request_that_arrives_in_pieces_is_read_whole(server):
    """Frames read with one call when they are all there, and piece by piece when not: cuts
    inside the magic, the header and each frame, and across frame boundaries."""
    req = request(3, seed=14)
    frames = [req.x.numpy().tobytes(), req.expert_ids.numpy().tobytes(), req.weights.numpy().tobytes()]
    message = HEADER.pack(MAGIC, REQUEST, 0, 2, 3, 8, 1, 77, 0.0, 0.0, 0.0) + b"".join(frames)
    cuts = [2, 30, 60, 52 + 96, 52 + 96 + 5, 52 + 96 + 48, 52 + 96 + 48 + 7, len(message)]
    host, port = server.address.rsplit(":", 1)
    peer = socket.create_connection((host, int(port)))
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each piece leaves on its own
    try:
        start = 0
        for cut in cuts:
            peer.sendall(message[start:cut])
            start = cut
            time.sleep(0.02)
        peer.settimeout(5)
        reply = b""
        while len(reply) < HEADER.size + 3 * 8 * 4:
            chunk = peer.recv(4096)
            assert chunk, "the shard hung up"
            reply += chunk
        fields = HEADER.unpack(reply[:HEADER.size])
        assert fields[1] == REPLY and fields[4:8] == (3, 8, 1, 77)
        got = torch.frombuffer(bytearray(reply[HEADER.size:]), dtype=torch.float32).reshape(3, 8)
        assert torch.equal(got, scaled(1, req.x, req.expert_ids, req.weights))
    finally:
        peer.close()


def test_a_restarted_shard_is_reached_at_its_new_address():
    first, second = ShardServer(lambda l, x, i, w: x), ShardServer(lambda l, x, i, w: 2 * x)
    transport = TcpTransport({0: first.address})
    try:
        req = request(2, seed=9)
        assert torch.equal(answer(transport, req), req.x)
        first.close()
        transport.set_addresses({0: second.address})
        assert torch.equal(answer(transport, req), 2 * req.x)
    finally:
        transport.close()
        second.close()


def test_no_channel_to_an_unknown_shard(server):
    transport = TcpTransport({0: server.address})
    try:
        with pytest.raises(ShardUnavailableError, match="no channel to expert shard 3"):
            transport.submit(0, {3: request(1)})
    finally:
        transport.close()


def test_a_shard_address_that_never_answers_the_handshake_fails_within_the_connect_timeout():
    # A listener whose accept queue is full drops new SYNs, as a vanished node does: connect()
    # would wait for the kernel's retries (minutes) without a timeout of its own.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = "%s:%d" % listener.getsockname()
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (never accepted)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
        start = time.monotonic()
        transport = TcpTransport({0: address}, connect_timeout_s=0.5)
        try:
            with pytest.raises(ShardUnavailableError, match="not reachable"):
                transport.submit(0, {0: request(1)})
        finally:
            transport.close()
        assert time.monotonic() - start < 3.0  # the constructor's try and the submit's, 0.5 s each
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_failed_layer_lets_go_of_every_other_request_in_flight():
    """Ping-pong: micro-batch A's requests are out when micro-batch B's layer fails. The step is
    over and A's answers will never be collected: the channel must keep none of A's reply
    buffers (a prefill's are tens of MB), whether an answer came in before the failure (shard 0)
    or comes after it (shard 1), and it stays usable."""
    import gc
    import weakref

    def quick(layer, x, ids, w):
        if layer == 1:
            raise RuntimeError("expert weights gone")
        return x

    def slow(layer, x, ids, w):
        time.sleep(0.3)
        return x

    servers = [ShardServer(quick), ShardServer(slow)]
    transport = TcpTransport({0: servers[0].address, 1: servers[1].address})
    try:
        a = {shard: request(4, seed=shard) for shard in (0, 1)}
        buffers = []
        for req in a.values():
            req.reply_into = torch.empty(4, 8)
            buffers.append(weakref.ref(req.reply_into))
        transport.submit(0, a)  # never collected
        time.sleep(0.05)  # shard 0 has answered A; shard 1 is still computing it
        with pytest.raises(ShardUnavailableError, match="expert weights gone"):
            transport.collect(transport.submit(1, {0: request(3, seed=2)}))
        del a, req
        gc.collect()
        assert [b() for b in buffers] == [None, None]
        time.sleep(0.4)  # shard 1's late answer to A arrives and is dropped
        again = {shard: request(2, seed=3 + shard) for shard in (0, 1)}
        replies = transport.collect(transport.submit(0, again))
        assert all(torch.equal(replies[s].output, again[s].x) for s in (0, 1))
    finally:
        transport.close()
        for server in servers:
            server.close()
