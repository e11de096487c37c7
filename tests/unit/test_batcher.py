"""The serving batcher's queue: every queued request is answered, whatever else waits beside it."""

from __future__ import annotations

import threading
import time

import torch

from tlops.serving.server import Batcher, ServedModel


class _Rows:
    """A predictor whose probabilities are its inputs' own rows: an answer shows which request it belongs to."""

    batch_size = 1

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate, self.calls = gate, 0

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def proba(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        return x.clone()


def test_requests_of_two_models_and_an_oversized_one_each_get_their_own_rows() -> None:
    gate = threading.Event()
    first, second = ServedModel(None, predictor=_Rows(gate)), ServedModel(None, predictor=_Rows())
    batcher = Batcher(max_batch=4, window_s=0.0)
    # The first request holds the thread, so the rest queue up together: tensors of several rows, two models,
    # one request too large to join a batch. Picking from such a queue once compared tensors and lost requests.
    blocker = batcher.submit(first, torch.full((1, 3), -1.0))
    inputs = [(first if i % 2 else second, torch.full((1 + i % 3, 3), float(i))) for i in range(12)]
    inputs.append((first, torch.full((6, 3), 99.0)))
    futures = [(x, batcher.submit(model, x)) for model, x in inputs]
    gate.set()
    assert torch.equal(blocker.result(timeout=10), torch.full((1, 3), -1.0))
    for x, future in futures:
        assert torch.equal(future.result(timeout=10), x)
    assert batcher.requests == len(inputs) + 1
    assert batcher.batches < len(inputs) + 1  # some requests did share a forward pass


class _Both:
    """A predictor whose forward pass waits until two passes are under way at once (or gives up)."""

    batch_size = 1

    def __init__(self) -> None:
        self.inside = threading.Barrier(2, timeout=5)

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def proba(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self.inside.wait()  # BrokenBarrierError when the other pass never comes
        return x.clone()


def test_two_workers_run_two_forward_passes_at_once_and_each_request_gets_its_rows() -> None:
    model = ServedModel(None, predictor=_Both())
    batcher = Batcher(max_batch=1, window_s=0.0, workers=2)
    futures = [(x, batcher.submit(model, x)) for x in (torch.full((1, 2), 1.0), torch.full((1, 2), 2.0))]
    for x, future in futures:
        assert torch.equal(future.result(timeout=10), x)
    assert (batcher.batches, batcher.requests) == (2, 2)


class _Threads:
    """A predictor that notes which thread ran each forward pass and how many requests' rows it took."""

    batch_size = 1

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.sizes: list[int] = []

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def proba(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        self.sizes.append(len(x))
        return x.clone()


def test_a_lone_clients_requests_all_run_on_the_first_worker() -> None:
    predictor = _Threads()
    model, batcher = ServedModel(None, predictor=predictor), Batcher(max_batch=8, window_s=0.0, workers=2)
    for i in range(6):  # one at a time: each answered before the next is sent
        x = torch.full((1, 2), float(i))
        assert torch.equal(batcher.submit(model, x).result(timeout=10), x)
    assert predictor.threads == ["tlops-batcher-0"] * 6  # taken in turns by two threads, they ran ~7% slower


def test_requests_within_the_window_join_the_batch_being_filled_not_a_second_worker() -> None:
    predictor = _Threads()
    model, batcher = ServedModel(None, predictor=predictor), Batcher(max_batch=8, window_s=5.0, workers=2)
    for _ in range(3):
        batcher.expect()  # three requests on their way: the first worker waits for them
    futures = []
    for i in range(3):
        futures.append(batcher.submit(model, torch.full((1, 2), float(i))))
        time.sleep(0.05)  # each arrives while the first worker fills its batch and the second is idle
    for i, future in enumerate(futures):
        assert torch.equal(future.result(timeout=10), torch.full((1, 2), float(i)))
    assert predictor.sizes == [3], predictor.sizes


def test_served_connections_send_each_write_at_once() -> None:
    """TCP_NODELAY on an accepted connection of the server's own socket (protocol number 0, which asyncio skips):
    without it a response's body waited for the client's delayed ACK of its head, 40 ms a request."""
    import socket

    from tests.conftest import free_port
    from tlops.serving.server import _no_delay, bind

    listener = bind("127.0.0.1", free_port())
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()

    class _Transport:
        def get_extra_info(self, name: str) -> socket.socket | None:
            return conn if name == "socket" else None

    try:
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        _no_delay(_Transport())
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (conn, client, listener):
            s.close()
