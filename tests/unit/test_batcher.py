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
