"""Dynamic batching in `tlops serve`'s app, in process, on the real tiny model: concurrent requests share forward
passes, each gets the answer it gets alone (batching off: the same labels, the probabilities within float32
rounding) and the answer of the model as logged (its own eager forward pass, before the server folded its
BatchNorm layers: within 1e-4), a bad request among them gets its 4xx and spoils no other, and a lone request never
waits for the batch window."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_serve_hostile import _asgi_post

pytestmark = pytest.mark.integration


def _app(model_dir: Path, max_batch: int, window_s: float):  # noqa: ANN202
    from tlops.serving.pyfunc import Predictor, load_model_dir
    from tlops.serving.server import Batcher, ScoringApp, ServedModel, ServeLimits

    model, spec, classes = load_model_dir(model_dir)
    predictor = Predictor(model, spec, classes)
    served = ServedModel(None, {"name": "tiny", "version": "1"}, spec=spec, predictor=predictor)
    return ScoringApp(served, ServeLimits(), Batcher(max_batch, window_s))


def _body(files: list[bytes]) -> bytes:
    return json.dumps({"inputs": {"image": [base64.b64encode(f).decode() for f in files]}}).encode()


def test_batched_answers_equal_unbatched_ones_and_a_bad_request_spoils_no_other(tiny_models: dict,
                                                                               tiny_digits: Path) -> None:
    files = [p.read_bytes() for d in sorted(tiny_digits.iterdir()) for p in sorted(d.glob("*.png"))[:6]]
    # 18 requests of one to three images, and one whose second image is a text file.
    bodies = [_body(files[i : i + 1 + i % 3]) for i in range(len(files))]
    bad = _body([files[0], b"this is a text file, not a picture\n"])

    async def concurrently(app) -> list[tuple[int, dict]]:  # noqa: ANN001
        # Bounded: a lost answer fails the test instead of hanging the run.
        return await asyncio.wait_for(asyncio.gather(*[_asgi_post(app, b) for b in [*bodies[:9], bad, *bodies[9:]]]),
                                      timeout=120)

    off = _app(tiny_models["good"], max_batch=1, window_s=0)
    on = _app(tiny_models["good"], max_batch=32, window_s=0.2)
    alone = asyncio.run(concurrently(off))
    together = asyncio.run(concurrently(on))
    assert off.batcher.batches == off.batcher.requests == len(bodies)  # one forward pass per request
    assert on.batcher.requests == len(bodies) and on.batcher.batches < len(bodies) / 2, vars(on.batcher)
    assert on.batcher.images == off.batcher.images == sum(len(files[i : i + 1 + i % 3]) for i in range(len(files)))

    (status_off, refused_off), (status_on, refused_on) = alone.pop(9), together.pop(9)
    assert status_off == status_on == 422 and refused_on == refused_off
    assert "instance 1: not an image" in refused_on["message"]
    assert [s for s, _ in alone] == [s for s, _ in together] == [200] * len(bodies)
    labels = [[p["label"] for p in body["predictions"]] for _, body in together]
    assert labels == [[p["label"] for p in body["predictions"]] for _, body in alone]
    assert len({label for per in labels for label in per}) == 3  # the digits are told apart
    # Equal to float32 rounding: a batched convolution sums in another order (measured up to 2e-6; the serving
    # parity check allows 1e-4).
    for (_, a), (_, b) in zip(alone, together, strict=True):
        np.testing.assert_allclose([p["probabilities"] for p in b["predictions"]],
                                   [p["probabilities"] for p in a["predictions"]], rtol=0, atol=1e-5)
        assert [p["score"] for p in b["predictions"]] == [max(p["probabilities"]) for p in b["predictions"]]
    # The model as logged, unprepared (what `mlflow models serve` and the evaluation run): the same answers.
    from tlops.serving.pyfunc import Predictor, load_model_dir

    logged = Predictor(*load_model_dir(tiny_models["good"]))
    for i, (_, b) in enumerate(together):
        expected = logged.predict_proba(files[i : i + 1 + i % 3])
        np.testing.assert_allclose([p["probabilities"] for p in b["predictions"]], expected, rtol=0, atol=1e-4)
        assert [p["label"] for p in b["predictions"]] == [logged.classes[k] for k in expected.argmax(axis=1)]
    assert not hasattr(logged, "_tlops_served")  # compared with the eager model, not a folded one
    assert on.pending == on.budget.held == on.slots.held == 0


def test_a_lone_request_does_not_wait_for_the_window(tiny_models: dict, tiny_digits: Path) -> None:
    app = _app(tiny_models["good"], max_batch=32, window_s=5.0)
    body = _body([next(tiny_digits.glob("7/*.png")).read_bytes()])
    asyncio.run(asyncio.wait_for(_asgi_post(app, body), timeout=120))  # warm
    start = time.monotonic()
    status, answer = asyncio.run(asyncio.wait_for(_asgi_post(app, body), timeout=120))
    assert status == 200 and answer["predictions"][0]["label"] == "7"
    assert time.monotonic() - start < 2.5  # far below the 5 s window: nothing else was on its way
