"""The served model made ready once per loaded model (`tlops.serving.server.prepare_for_serving`): BatchNorm folded
into the convolution before it, weights in channels-last; the answers those of the model as logged (within 1e-4,
the serving parity check's tolerance; float32 rounding measured 2e-7)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tlops.serving.server import ServedModel
from tlops.vision.inference import fold_batch_norm


def _trained_bn(channels: int, seed: int) -> torch.nn.BatchNorm2d:
    """A BatchNorm with statistics and affine parameters far from the identity: folding it wrongly shows."""
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.eval()


def _convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), _trained_bn(8, 1),
                               torch.nn.ReLU6(), torch.nn.Conv2d(8, 8, 3, groups=8, padding=1), _trained_bn(8, 2),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()


class _Residual(torch.nn.Module):
    """A convolution whose output feeds its BatchNorm and, unnormalised, the sum after it: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), _trained_bn(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean(dim=(2, 3))


def test_each_batchnorm_after_a_convolution_is_folded_with_the_same_outputs() -> None:
    model, x = _convnet(), torch.randn(4, 3, 16, 16)
    folded, count = fold_batch_norm(model, x[:1])
    assert count == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-5)


def test_the_served_model_is_folded_and_channels_last_with_the_same_answers() -> None:
    model = _convnet()
    x = torch.randn(5, 3, 24, 24)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
    predictor = SimpleNamespace(model=model, spec=SimpleNamespace(crop_size=24))
    ServedModel(None, predictor=predictor)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    assert predictor.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(predictor.model(x), dim=1), expected, rtol=0, atol=1e-6)


def test_a_model_that_folding_would_change_is_served_as_it_is() -> None:
    model = _Residual().eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        _, count = fold_batch_norm(model, x)
        assert count == 1  # the fold cannot see the second use of the convolution's output...
    predictor = SimpleNamespace(model=model, spec=SimpleNamespace(crop_size=12))
    ServedModel(None, predictor=predictor)
    assert isinstance(predictor.model.bn, torch.nn.BatchNorm2d)  # ...the check against it does
    assert isinstance(model.bn, torch.nn.BatchNorm2d) and model.conv.weight.is_contiguous()  # model untouched
    with torch.no_grad():
        torch.testing.assert_close(predictor.model(x), expected, rtol=0, atol=1e-6)


def test_the_served_lite0_answers_as_the_logged_model_within_the_parity_tolerance(tiny_models: dict[str, Path],
                                                                                  tiny_digits: Path) -> None:
    from tlops.serving.pyfunc import Predictor, load_model_dir

    files = [p.read_bytes() for p in sorted(tiny_digits.rglob("*.png"))[::3]]
    model, spec, classes = load_model_dir(tiny_models["good"])
    logged = Predictor(model, spec, classes).predict_proba(files)  # the pyfunc's own forward pass, eager
    model, spec, classes = load_model_dir(tiny_models["good"])
    served = ServedModel(None, predictor=Predictor(model, spec, classes)).predictor
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in served.model.modules()) == 0  # Lite0's 49 folded
    got = served.predict_proba(files)
    np.testing.assert_allclose(got, logged, rtol=0, atol=1e-4)
    assert (got.argmax(axis=1) == logged.argmax(axis=1)).all()
