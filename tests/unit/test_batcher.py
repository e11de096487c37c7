"""The serving batcher's queue: every queued request is answered, whatever else waits beside it."""

from __future__ import annotations

import threading

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


class _Conv:
    """A predictor over a small convolutional model, as the served Predictor runs it."""

    batch_size = 8

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                         torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 3, groups=8, padding=1),
                                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                         torch.nn.Linear(8, 4)).eval()

    def concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def proba(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=1)


def test_the_batcher_runs_the_model_in_channels_last_with_the_same_answers() -> None:
    predictor = _Conv()
    x = torch.rand(5, 3, 24, 24)
    expected = predictor.proba(x, 8)
    got = Batcher(max_batch=8, window_s=0.0).submit(ServedModel(None, predictor=predictor), x).result(timeout=10)
    assert predictor.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


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
