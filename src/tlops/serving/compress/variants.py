"""Build, check and measure the compressed variants of a candidate model.

- ``onnx``: the classifier exported to ONNX (float32, the input being the spec's normalised CHW tensor, a
  dynamic batch axis) and run by ONNX Runtime;
- ``int8``: that graph quantised by ONNX Runtime's static quantisation (QDQ, int8 weights per output channel,
  uint8 activations, padding left in float) calibrated on training images through the same preprocessing;
- ``pruned``: structured channel pruning with torch-pruning (dependency graph, L2 magnitude of each group) to a
  target size, BatchNorm statistics re-estimated, a short recovery fine-tune of every layer (distillation from
  the uncompressed candidate plus the training labels), then exported as ``onnx``.

Each variant is a directory like a tlops model (``model.onnx``, ``preprocess.json``, ``model.json``,
``variant.json``) served by :mod:`tlops.compress.runtime` without torch. :func:`measure` scores it on the test
split with the evaluation's paired test against the uncompressed candidate, its latency and its size;
:func:`decide` applies the gate's policy.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlops.errors import TlopsError
from tlops.fileio import atomic_write, read_json, write_json
from tlops.serving.compress import VARIANTS
from tlops.serving.compress.runtime import (
    EMBEDDING,
    GRAPH,
    META,
    SPEC,
    VARIANT,
    OnnxPredictor,
    SpecView,
    preprocess,
)

log = logging.getLogger("tlops.compress")

OPSET = 17
INPUT, OUTPUT = "input", "logits"
REFERENCE, REFERENCE_FORMAT = "golden_reference.json", "tlops-golden-reference/1"
# Parity of a variant with the model it came from, on the golden images: the preprocessing tensor (PIL+numpy
# against torchvision), and the class probabilities of the graph against the PyTorch model. A float graph
# matches to rounding; an int8 graph moves probabilities by its quantisation error, hence its own tolerance
# (up to 0.10 measured on the synthetic edge-case images through a 32 px probe; its accuracy is the paired test's).
# A float graph of a network whose every layer was trained (the pruned variant after recovery, a fine-tuned
# candidate) moves probabilities by float rounding alone up to 1.5e-4 (measured: ONNX Runtime folds BatchNorm and
# orders the sums its own way); 1e-3 allows that and is far below what a changed preprocessing moves (> 0.1).
TENSOR_ATOL = 1e-4
PROB_ATOL = {"onnx": 1e-3, "pruned": 1e-3, "int8": 0.25}


class CompressError(TlopsError):
    """A variant that cannot be built: the message names it and what to change."""


def check_names(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise CompressError(f"deploy.variants: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------- building


def _write_dir(out: Path, graph: bytes, spec_record: dict[str, Any], meta: dict[str, Any],
               variant: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(graph)

    atomic_write(out / GRAPH, write)
    write_json(out / SPEC, spec_record)
    write_json(out / META, {**meta, "format": "tlops-onnx-classifier/1"})
    write_json(out / VARIANT, variant)
    return out


def _stamp(graph: bytes, fingerprint: str, name: str) -> bytes:
    """The spec fingerprint and the variant's name in the graph's own metadata."""
    import onnx

    proto = onnx.load_from_string(graph)
    for key, value in (("tlops.preprocess.fingerprint", fingerprint), ("tlops.variant", name)):
        entry = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def static_padding(model: Any, crop_size: int) -> Any:
    """``model``, or a copy whose TF-"same" convolutions (timm's ``Conv2dSame``, e.g. in EfficientNet-Lite: they
    work their padding out from each input's size, a Shape-Gather-Pad chain per layer in an exported graph) pad by
    constants, fixed for the spec's input size by timm's own ``Conv2dSameExport`` after one forward pass. The
    arithmetic is the same; the graph loses the shape chains (the float graph at 96 px ran about 1.3× faster at
    batch size 1, median of 5 rounds)."""
    import copy

    import torch

    try:
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    except ImportError:  # pragma: no cover - timm is a dependency
        return model
    if not any(type(m) is Conv2dSame for m in model.modules()):
        return model
    fixed = copy.deepcopy(model).eval()
    for module in fixed.modules():
        if type(module) is Conv2dSame:
            m: Any = module
            m.__class__ = Conv2dSameExport
            m.pad, m.pad_input_size = None, (0, 0)
    with torch.no_grad():
        fixed(torch.zeros(1, 3, crop_size, crop_size))
    return fixed


def _with_embedding(model: Any) -> Any:
    """A module answering (logits, the backbone's features the head sees) for a classifier with ``backbone`` and
    ``head``: the served graph's second output, which the prediction log records as the image's embedding."""
    import torch

    class WithEmbedding(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            features = self.inner.backbone(x)
            return self.inner.head(features), features

    return WithEmbedding(model).eval()


def export_graph(model: Any, crop_size: int, backbone: str, embedding: bool = True) -> bytes:
    """The classifier as ONNX bytes (legacy TorchScript exporter: one self-contained file, seconds not minutes),
    its padding made static for the spec's input size (:func:`static_padding`). With ``embedding`` (and a model
    with ``backbone`` and ``head``) the graph has a second output, ``embedding``: the features the head sees."""
    import io

    import torch

    model = static_padding(model, crop_size)
    names = [OUTPUT]
    if embedding and hasattr(model, "backbone") and hasattr(model, "head"):
        model, names = _with_embedding(model), [OUTPUT, EMBEDDING]
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, crop_size, crop_size)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            target: Any = buffer  # the exporter writes to a file object as well as to a path
            torch.onnx.export(model.eval(), (example,), target, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=names,
                              dynamic_axes={INPUT: {0: "batch"}, **{n: {0: "batch"} for n in names}})
        graph = buffer.getvalue()
        from tlops.serving.compress.runtime import session

        session(graph)  # ONNX Runtime must be able to load what was written
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CompressError(f"backbone {backbone}: the ONNX exporter cannot handle it ({type(exc).__name__}: "
                            f"{first[:200]}); leave onnx, int8 and pruned out of deploy.variants for it") from None
    return graph


def build_onnx(model: Any, spec: Any, meta: dict[str, Any], out: Path, name: str = "onnx",
               extra: dict[str, Any] | None = None, embedding: bool = True) -> Path:
    graph = _stamp(export_graph(model, spec.crop_size, meta.get("backbone", "?"), embedding), spec.fingerprint, name)
    return _write_dir(out, graph, spec.to_record(), meta,
                      {"name": name, "opset": OPSET, "precision": "float32", "source": "torch.onnx.export",
                       **(extra or {})})


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over training images, preprocessed as served."""

    def __init__(self, images: list[bytes], spec: SpecView, batch: int = 16) -> None:
        self.batches = iter([np.stack([preprocess(b, spec, i) for i, b in enumerate(images[s : s + batch], s)])
                             for s in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.batches, None)
        return None if x is None else {INPUT: x}

    def rewind(self) -> None:  # pragma: no cover - only called by some calibrators
        pass


# The operators int8 quantisation covers: the arithmetic (convolutions, the classifier, ReLU6 as Clip, the
# residual adds, the pooling). ``Pad`` stays in float: timm's TF-"same" convolutions pad explicitly (a Pad before
# the stem and each stride-2 depthwise convolution), and with the
# Pad quantised and uint8 activations (zero point about 128 for the normalised input) the padded borders came out
# wrong: the demo model fell from 0.9526 to 0.62 accuracy (symmetric int8 activations, zero point 0, were spared
# that but lost 2 images of 359 and agreed with the float graph on only 97%). With Pad in float, uint8
# activations (asymmetric, per tensor, MinMax) and int8 weights per output channel: 0.9526, the same as the float
# graph, 98.6% the same predictions (359 test images), and faster than the float graph on a VNNI CPU.
INT8_OPS = ("Conv", "Gemm", "MatMul", "Clip", "Relu", "Add", "Mul", "GlobalAveragePool", "Flatten")


def build_int8(float_dir: Path, calibration: list[bytes], out: Path, per_channel: bool = True) -> Path:
    """Static int8 quantisation of a float variant (QDQ format: int8 weights per output channel, uint8
    activations calibrated by MinMax on ``calibration`` images, preprocessed as served; ``Pad`` left in float)."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise CompressError("int8: no training images to calibrate on")
    spec = SpecView.from_record(read_json(float_dir / SPEC))
    with tempfile.TemporaryDirectory(prefix="tlops-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(float_dir / GRAPH), str(pre), skip_symbolic_shape=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(q), _Calibration(calibration, spec), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(INT8_OPS))
        graph = _stamp(q.read_bytes(), spec.fingerprint, "int8")
    meta = read_json(float_dir / META)
    source = read_json(float_dir / VARIANT)
    return _write_dir(out, graph, read_json(float_dir / SPEC), meta,
                      {"name": "int8", "opset": OPSET,
                       "precision": "int8 weights per output channel, uint8 activations (QDQ); Pad in float",
                       "source": f"onnxruntime quantize_static of {source.get('name', 'onnx')}",
                       "per_channel": per_channel, "calibration_images": len(calibration),
                       "calibration_method": "MinMax", "quantized_ops": list(INT8_OPS)})


def _weights_bytes(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def prune(model: Any, crop_size: int, target_bytes: int, max_ratio: float = 0.9, step: float = 0.1,
          dry_run: bool = False) -> Any:
    """Channel pruning with torch-pruning to at most ``target_bytes`` of weights: the smallest pruning ratio (in
    steps of ``step``, up to ``max_ratio``) that reaches it, the head's outputs untouched. Returns the pruned
    copy; a target that even ``max_ratio`` misses is refused at once."""

    def pruned_at(ratio: float) -> Any:
        import copy

        import torch
        import torch_pruning as tp

        pruned = copy.deepcopy(model).eval()
        example = torch.zeros(1, 3, crop_size, crop_size)
        tp.pruner.MetaPruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=ratio, ignored_layers=[pruned.head], round_to=8).step()
        return pruned

    smallest = _weights_bytes(pruned_at(max_ratio))
    if smallest > target_bytes:
        raise CompressError(f"deploy.prune_target_mb {target_bytes / 1e6:g}: cannot be reached by channel pruning "
                            f"(at a ratio of {max_ratio:g} the weights are still {smallest / 1e6:.2f} MB); raise "
                            "the target")
    if dry_run:
        return None
    ratio = step
    while ratio < max_ratio - 1e-9:
        pruned = pruned_at(ratio)
        if _weights_bytes(pruned) <= target_bytes:
            break
        ratio = round(ratio + step, 6)
    else:
        ratio, pruned = max_ratio, pruned_at(max_ratio)
    log.info("pruned: ratio %.2f gives %d bytes of weights (target %d)", ratio, _weights_bytes(pruned), target_bytes)
    return pruned


def recalibrate_bn(model: Any, tensors: Any, batch: int = 64) -> None:
    """Re-estimate every BatchNorm's running mean and variance on ``tensors`` (a cumulative average over the
    batches, no gradient): after channels are removed, the statistics the layers were trained with no longer
    describe what reaches them."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for s in range(0, len(tensors), batch):
            model(tensors[s : s + batch])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def refit_head(model: Any, tensors: Any, labels: Any, l2: float = 1e-3, batch: int = 64) -> float:
    """Fit the classifier (``model.head``, a linear layer on ``model.backbone``'s pooled features) again on the
    pruned backbone's features of the training images: L-BFGS on cross-entropy with an L2 penalty, as a linear
    probe is fitted. Pruning moved the features the head was fitted to; this is the cheap part of recovering.
    Returns the final training loss."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        features = torch.cat([model.backbone(tensors[s : s + batch]) for s in range(0, len(tensors), batch)])
    head = model.head
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(head(features), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    return float(loss.detach()) if loss is not None else float("nan")


def recover(student: Any, teacher: Any, tensors: Any, labels: Any, epochs: int, lr: float = 1e-3,
            batch: int = 32, seed: int = 0, temperature: float = 2.0, alpha: float = 0.5) -> list[float]:
    """A short recovery fine-tune of the pruned model from its inherited weights: every layer, AdamW with a
    cosine decay of ``lr`` over the steps, the loss ``alpha`` × the distillation from the uncompressed
    candidate's logits (temperature ``temperature``) + (1 − ``alpha``) × cross-entropy on the training labels;
    channels_last, the faster layout for these convolutions on CPU. The BatchNorm statistics are re-estimated on
    the training images before and after. Returns the mean loss per epoch."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        targets = torch.cat([teacher.eval()(tensors[s : s + 64]) for s in range(0, len(tensors), 64)])
    student.to(memory_format=torch.channels_last)
    tensors = tensors.contiguous(memory_format=torch.channels_last)
    recalibrate_bn(student, tensors)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * math.ceil(len(tensors) / batch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for epoch in range(epochs):
        student.train()
        order = torch.randperm(len(tensors), generator=gen)
        total = 0.0
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            out = student(tensors[idx])
            distil = F.kl_div(F.log_softmax(out / temperature, dim=1), F.softmax(targets[idx] / temperature, dim=1),
                              reduction="batchmean") * temperature**2
            loss = alpha * distil + (1.0 - alpha) * F.cross_entropy(out, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
        log.info("pruned: recovery epoch %d/%d, loss %.4f", epoch + 1, epochs, losses[-1])
    recalibrate_bn(student, tensors)
    student.to(memory_format=torch.contiguous_format)
    return losses


def build_pruned(model: Any, spec: Any, meta: dict[str, Any], tensors: Any, labels: Any, goal: int, epochs: int,
                 lr: float, out: Path, seed: int = 0) -> Any:
    """The ``pruned`` variant: :func:`prune` to ``goal`` bytes of weights, BatchNorm re-estimated
    (:func:`recalibrate_bn`), the classifier fitted again (:func:`refit_head`), ``epochs`` of :func:`recover`,
    exported as ONNX under ``out``. Returns the pruned PyTorch model (parity compares the graph with it)."""
    pruned = prune(model, spec.crop_size, goal)
    recalibrate_bn(pruned, tensors)
    refit_head(pruned, tensors, labels)
    losses = recover(pruned, model, tensors, labels, epochs, lr=lr, seed=seed) if epochs else []
    # No embedding output: the pruned and fine-tuned backbone's features are not those of the candidate the
    # monitoring reference was recorded with, so a monitor comparing them would see drift that is only the pruning.
    build_onnx(pruned, spec, meta, out, name="pruned", embedding=False,
               extra={"pruning": "torch-pruning MetaPruner, GroupMagnitudeImportance(p=2)",
                      "weights_bytes": _weights_bytes(pruned), "target_bytes": goal,
                      "recovery": "BatchNorm re-estimated, head re-fitted, every layer fine-tuned "
                                  "(distillation + labels, AdamW, cosine)",
                      "recovery_epochs": epochs, "recovery_lr": lr, "recovery_losses": losses})
    return pruned


# --------------------------------------------------------------------------------------------- checking


def golden_reference(model: Any, spec: Any, golden: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The class probabilities of ``model`` on the golden images, by the files' sha256. Written beside a pruned
    variant when it is built: the pruned PyTorch network is not kept (its graph is the only copy of its weights),
    so a later ``tlops parity`` checks the graph against these recorded outputs instead."""
    import torch

    from tlops.vision.preprocessing import build_transform

    transform = build_transform(spec)
    probabilities: dict[str, list[float]] = {}
    with torch.no_grad():
        for _image, data in golden:
            out = torch.softmax(model.eval()(transform(data)[None]), dim=1)[0]
            probabilities[hashlib.sha256(data).hexdigest()] = [float(x) for x in out]
    return {"format": REFERENCE_FORMAT, "fingerprint": spec.fingerprint, "probabilities": probabilities}


def parity(variant_dir: Path, source: Any, spec: Any, golden: list[tuple[str, bytes]],
           name: str) -> dict[str, Any]:
    """The variant against the PyTorch model it came from, on the golden images: same spec and fingerprint (file
    and graph metadata), the served preprocessing tensor, and the class probabilities within the stated
    tolerance (``PROB_ATOL``). ``source`` is that model, or its :func:`golden_reference` record (a pruned
    variant, checked after its build): then the golden images the record holds are compared with it."""
    import onnx
    import torch

    from tlops.vision.preprocessing import build_transform

    predictor = OnnxPredictor(variant_dir)
    errors: list[str] = []
    if isinstance(source, dict):
        recorded = source.get("probabilities", {})
        golden = [(image, data) for image, data in golden if hashlib.sha256(data).hexdigest() in recorded]
        if not golden:
            errors.append(f"{name}: none of the golden images is in its recorded reference ({REFERENCE}); "
                          "rebuild the variant")

    def expected_proba(data: bytes, x: Any) -> Any:
        if isinstance(source, dict):
            return np.asarray(source["probabilities"][hashlib.sha256(data).hexdigest()], dtype=np.float32)
        with torch.no_grad():
            return torch.softmax(source.eval()(x[None]), dim=1).numpy()[0]

    if predictor.spec.fingerprint != spec.fingerprint:
        errors.append(f"{name}: its preprocess.json fingerprint {predictor.spec.fingerprint[:12]} is not the "
                      f"candidate's {spec.fingerprint[:12]}")
    props = {p.key: p.value for p in onnx.load(str(variant_dir / GRAPH), load_external_data=False).metadata_props}
    if props.get("tlops.preprocess.fingerprint") != spec.fingerprint:
        errors.append(f"{name}: the graph's fingerprint {props.get('tlops.preprocess.fingerprint', 'none')[:12]} "
                      f"is not the candidate's {spec.fingerprint[:12]}")
    transform = build_transform(spec)
    tolerance = PROB_ATOL[name]
    rows: list[dict[str, Any]] = []
    for image, data in golden:
        ref_x = transform(data)
        ours = preprocess(data, predictor.spec)
        tensor_diff = float(np.abs(ref_x.numpy() - ours).max()) if ref_x.shape == ours.shape else float("inf")
        expected = expected_proba(data, ref_x)
        got = predictor.predict_proba([data])[0]
        prob_diff = float(np.abs(expected - got).max())
        ok = tensor_diff <= TENSOR_ATOL and prob_diff <= tolerance
        rows.append({"image": image, "max_abs_tensor_diff": tensor_diff, "max_abs_prob_diff": prob_diff,
                     "same_argmax": int(expected.argmax()) == int(got.argmax()), "ok": bool(ok)})
    bad = [r for r in rows if not r["ok"]]
    if bad:
        worst = max(bad, key=lambda r: float(r["max_abs_prob_diff"]))
        errors.append(f"{name}: {len(bad)} of {len(rows)} golden images differ from the PyTorch model (worst "
                      f"{Path(str(worst['image'])).name}: probabilities by {worst['max_abs_prob_diff']:.2e}, "
                      f"{tolerance:g} allowed; input tensor by {worst['max_abs_tensor_diff']:.2e}, "
                      f"{TENSOR_ATOL:g} allowed)")
    return {"status": "fail" if errors else "pass", "tolerance": {"tensor": TENSOR_ATOL, "probability": tolerance},
            "fingerprint": predictor.spec.fingerprint, "errors": errors, "images": rows}


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Timing:
    p50_ms: float
    p95_ms: float
    n: int
    images_per_s: float
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "n": self.n, "threads": 1,
                "throughput_batch": self.batch, "images_per_s": self.images_per_s}


def timing(predict: Any, images: list[bytes], count: int = 30, warmup: int = 3, batch: int = 32,
           batches: int = 3) -> Timing:
    """Batch size 1 (decode, preprocessing, forward; one call per image) p50/p95 in ms, and images/s at ``batch``
    per call. The caller fixes the threads (one, as the evaluation measures)."""
    sample = [images[i % len(images)] for i in range(max(count, 1))]
    for b in sample[:warmup]:
        predict([b])
    times = []
    for b in sample:
        t0 = time.perf_counter()
        predict([b])
        times.append((time.perf_counter() - t0) * 1000.0)
    chunk = [images[i % len(images)] for i in range(batch)]
    predict(chunk)  # warm-up at the batch shape
    t0 = time.perf_counter()
    for _ in range(batches):
        predict(chunk)
    rate = batch * batches / (time.perf_counter() - t0)
    return Timing(float(np.percentile(times, 50)), float(np.percentile(times, 95)), len(times), float(rate), batch)


def torch_timing(predictor: Any, images: list[bytes], **kwargs: Any) -> Timing:
    """:func:`timing` of the PyTorch predictor (``tlops.serving.Predictor``) on one torch thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timing(predictor.predict_proba, images, **kwargs)
    finally:
        torch.set_num_threads(before)


def measure(variant_dir: Path, images: list[bytes], y_true: list[str], candidate_correct: list[bool],
            confidence: float = 0.95, resamples: int = 2000, seed: int = 0, latency_images: int = 30) -> dict[str, Any]:
    """The variant on the test split: accuracy, macro-F1, the paired test against the uncompressed candidate
    (McNemar's exact p, paired bootstrap interval of the difference), latency, throughput and size."""
    from tlops.evaluation.evaluate import classification_metrics, mcnemar_p, paired_bootstrap

    predictor = OnnxPredictor(variant_dir, threads=1)
    proba = predictor.predict_proba(images)
    labels = [predictor.classes[i] for i in proba.argmax(axis=1)]
    scores = classification_metrics(y_true, labels)
    correct = [p == t for p, t in zip(labels, y_true, strict=True)]
    boot = paired_bootstrap(correct, candidate_correct, resamples, confidence, seed)
    a, b = np.asarray(correct), np.asarray(candidate_correct)
    comparison = {**boot, "mcnemar_p": mcnemar_p(correct, candidate_correct),
                  "only_variant_correct": int((a & ~b).sum()), "only_candidate_correct": int((~a & b).sum())}
    speed = timing(predictor.predict_proba, images, count=latency_images)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "n": scores["n"],
            "comparison": comparison, "latency": speed.to_dict(),
            "size_bytes": (variant_dir / GRAPH).stat().st_size, "labels": labels}


# --------------------------------------------------------------------------------------------- the gate


def decide(name: str, record: dict[str, Any], candidate: dict[str, Any], gate: Any) -> tuple[bool, list[str]]:
    """The gate's policy for one variant: built, parity passed, accuracy within ``gate.max_compression_drop`` of
    the uncompressed candidate and not significantly worse by the paired test, within the latency and size
    budgets. Returns (accepted, reasons), each reason one line."""
    if record.get("error"):
        return False, [f"{name}: not built: {record['error']}"]
    reasons: list[str] = []
    ok = True
    par = record.get("parity", {})
    if par.get("status") != "pass":
        ok = False
        reasons.append(f"{name}: parity failed: {'; '.join(par.get('errors') or ['not checked'])}")
    else:
        reasons.append(f"{name}: parity passed (spec fingerprint {par.get('fingerprint', '')[:12]}, "
                       f"probabilities within {par['tolerance']['probability']:g})")
    drop = candidate["accuracy"] - record["accuracy"]
    comp = record["comparison"]
    alpha = 1.0 - comp["confidence"]
    line = (f"accuracy {record['accuracy']:.4f} against the uncompressed {candidate['accuracy']:.4f} "
            f"(difference {comp['difference']:+.4f}, {comp['confidence']:.0%} paired bootstrap CI "
            f"[{comp['ci_low']:+.4f}, {comp['ci_high']:+.4f}], McNemar p={comp['mcnemar_p']:.3f})")
    if drop > gate.max_compression_drop + 1e-12:
        ok = False
        reasons.append(f"{name}: {line}: drops {drop:.4f}, over gate.max_compression_drop "
                       f"{gate.max_compression_drop:g}")
    elif comp["difference"] < 0 and comp["mcnemar_p"] < alpha:
        ok = False
        reasons.append(f"{name}: {line}: significantly worse (p < {alpha:g})")
    else:
        reasons.append(f"{name}: {line}: within gate.max_compression_drop {gate.max_compression_drop:g}")
    p95, size = record["latency"]["p95_ms"], record["size_bytes"]
    if gate.variant_max_latency_p95_ms is not None and p95 > gate.variant_max_latency_p95_ms:
        ok = False
        reasons.append(f"{name}: latency p95 {p95:.2f} ms > gate.variant_max_latency_p95_ms "
                       f"{gate.variant_max_latency_p95_ms:g}")
    if gate.variant_max_size_mb is not None and size > gate.variant_max_size_mb * 1e6:
        ok = False
        reasons.append(f"{name}: {size / 1e6:.2f} MB > gate.variant_max_size_mb {gate.variant_max_size_mb:g}")
    return ok, reasons


def choose(records: dict[str, dict[str, Any]]) -> str | None:
    """The serving variant: the accepted one with the lowest p50 latency at batch size 1, then the smallest."""
    accepted = [n for n, r in records.items() if r.get("accepted")]
    if not accepted:
        return None
    return min(accepted, key=lambda n: (records[n]["latency"]["p50_ms"], records[n]["size_bytes"], n))


def target_bytes(candidate_bytes: int, target_mb: float | None, target_fraction: float) -> int:
    return int(target_mb * 1e6) if target_mb is not None else int(math.floor(candidate_bytes * target_fraction))
