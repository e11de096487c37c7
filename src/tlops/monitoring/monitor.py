"""``tlops monitor``: has the served traffic moved away from what the champion was trained and validated on, and
how much does it matter?

A window of the prediction log (the records of the champion's own version) against the champion's reference
record (:mod:`tlops.monitoring.reference`):

- feature drift: the MMD permutation test of :mod:`tlops.selection.drift` between the window's embeddings and the
  held-out split's (images the model did not train on, as served images are not);
- class-share drift of the predictions (chi-square test of the window's predicted classes against the held-out
  split's), confidence drop (one-sided Mann-Whitney U), input-property drift (image area and brightness by the
  two-sample Kolmogorov-Smirnov test, colour modes by chi-square, against the training sample);
- the out-of-distribution rate: the share of images whose embedding is farther from every training embedding
  than ``ood_quantile`` of the held-out images are (exact beta-binomial test, :func:`ood_test`);
- a label-free accuracy estimate, Average Thresholded Confidence (Garg et al., ICLR 2022): the threshold on
  the confidence above which the held-out split has as many images as it has right answers; the estimate is
  the window's share of images above it; the interval a bootstrap over both the held-out split and the window.

Every statistic is over the window's distinct images (by sha256). Each test is flagged at ``alpha`` divided by the
number of tests (Bonferroni); the verdict is "drift" when
any is, or when the estimate is below the gate's accuracy floor.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tlops.errors import TlopsError
from tlops.monitoring.reference import Reference, nn_distance

MIN_CONFIDENCE_DROP = 0.02  # a significant drop smaller than this is reported, not flagged


@dataclass
class Check:
    name: str
    statistic: float | None
    p_value: float | None
    flagged: bool
    detail: str
    measured: bool = True


def atc_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The confidence above which the share of held-out images equals their accuracy."""
    return float(np.quantile(confidence, 1.0 - float(np.mean(correct))))


def atc_estimate(val_confidence: np.ndarray, val_correct: np.ndarray, confidence: np.ndarray, resamples: int,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, interval low, interval high) of the accuracy on images of ``confidence``."""
    vc, vk, wc = (np.asarray(a, dtype=np.float64) for a in (val_confidence, val_correct, confidence))
    estimate = float(np.mean(wc >= atc_threshold(vc, vk)))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        iv = rng.integers(0, len(vc), len(vc))
        iw = rng.integers(0, len(wc), len(wc))
        draws[b] = np.mean(wc[iw] >= atc_threshold(vc[iv], vk[iv]))
    tail = (1.0 - level) / 2
    return estimate, float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def ood_test(held_out: np.ndarray, served: np.ndarray, quantile: float) -> tuple[float, int, float, float]:
    """(limit, served images past it, share expected past it, p-value) for "more served images lie past the
    held-out ``quantile`` of the distance than in-distribution images would".

    The limit is the held-out distance of rank r = ceil(quantile (m + 1)) among m. For an image exchangeable with
    the held-out ones, the chance to lie past it is Beta(m + 1 - r, r) distributed, so the count past it among n
    served images is beta-binomial: exact however small the held-out split (a binomial test at the nominal share
    would flag a quiet window whenever a small split puts the limit low)."""
    from scipy.stats import betabinom

    ranked = np.sort(np.asarray(held_out, dtype=np.float64))
    m, n = len(ranked), len(served)
    r = min(m, max(1, int(np.ceil(quantile * (m + 1)))))
    limit = float(ranked[r - 1])
    far = int((np.asarray(served) > limit).sum())
    a, b = m + 1 - r, r
    p = float(betabinom.sf(far - 1, n, a, b)) if far > 0 else 1.0
    return limit, far, a / (a + b), p


def _contingency(a: list[str] | np.ndarray, b: list[str] | np.ndarray) -> tuple[float, float, float]:
    """(chi-square statistic, p-value, total variation distance) of two samples of categories."""
    from scipy.stats import chi2_contingency

    cats = sorted(set(map(str, a)) | set(map(str, b)))
    ta = np.array([sum(1 for x in a if str(x) == c) for c in cats], dtype=float)
    tb = np.array([sum(1 for x in b if str(x) == c) for c in cats], dtype=float)
    tvd = float(0.5 * np.abs(ta / ta.sum() - tb / tb.sum()).sum())
    if len(cats) < 2:
        return 0.0, 1.0, tvd
    stat, p, _dof, _exp = chi2_contingency(np.stack([ta, tb]))
    return float(stat), float(p), tvd


def _window_embeddings(frame: Any) -> np.ndarray | None:
    col = [e for e in frame["embedding"] if e is not None and len(e)]
    return np.stack([np.asarray(e, dtype=np.float32) for e in col]) if len(col) >= 2 else None


def _sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def assess(reference: Reference, frame: Any, floor: float | None, alpha: float = 0.05, ood_quantile: float = 0.95,
           resamples: int = 1000, mmd_sample: int = 300, permutations: int = 200, seed: int = 0) -> dict[str, Any]:
    """The report on the window ``frame`` (prediction log records of one model version) against ``reference``."""
    from scipy.stats import ks_2samp, mannwhitneyu

    from tlops.selection.drift import mmd_test

    classes = [str(c) for c in reference.classes]
    n = len(frame)
    # One observation per distinct image: the same file served again says nothing new about the inputs, and
    # repeats would make every test see a difference that is only the repetition.
    frame = frame.drop_duplicates("image_sha256").reset_index(drop=True)
    checks: list[Check] = []
    arrays: dict[str, Any] = {}

    emb = _window_embeddings(frame)
    if emb is not None and emb.shape[1] == reference.val_embeddings.shape[1] and len(reference.val_embeddings) >= 2:
        mmd = mmd_test(_sample(emb, mmd_sample, seed), _sample(reference.val_embeddings, mmd_sample, seed),
                       permutations, seed)
        checks.append(Check("feature drift (MMD)", mmd.statistic, mmd.p_value, False,
                            f"MMD^2 {mmd.statistic:.5f} on {mmd.n_new} served vs {mmd.n_reference} held-out "
                            f"embeddings, {permutations} permutations"))
        distance = nn_distance(emb, reference.train_embeddings)
        limit, far, expected, p = ood_test(reference.val_nn_distance, distance, ood_quantile)
        checks.append(Check("out of distribution", far / len(distance), p, False,
                            f"{far} of {len(distance)} images farther from the training embeddings than "
                            f"{ood_quantile:.0%} of held-out images ({limit:.3f}); expected {expected:.1%}"))
        arrays.update(distance=distance, val_distance=reference.val_nn_distance, ood_limit=limit)
    else:
        why = ("the records hold no embeddings (a pruned serving variant logs none, as does an ONNX variant "
               "exported before its graph had an embedding output)") if emb is None else (
            "the records' embeddings do not match the reference's")
        checks += [Check("feature drift (MMD)", None, None, False, why, measured=False),
                   Check("out of distribution", None, None, False, why, measured=False)]

    val_pred = [classes[i] for i in reference.val_predicted]
    stat, p, tvd = _contingency(list(frame["predicted"]), val_pred)
    checks.append(Check("class shares of predictions", tvd, p, False,
                        f"total variation {tvd:.3f} from the held-out predictions (chi-square {stat:.1f})"))

    conf = frame["confidence"].to_numpy(dtype=np.float64)
    drop = float(np.mean(reference.val_confidence) - np.mean(conf))
    p = float(mannwhitneyu(conf, reference.val_confidence, alternative="less").pvalue)
    checks.append(Check("confidence drop", drop, p, False,
                        f"mean confidence {np.mean(conf):.3f} against {np.mean(reference.val_confidence):.3f} "
                        f"held out (flagged from a drop of {MIN_CONFIDENCE_DROP})"))

    area = frame["width"].to_numpy(dtype=np.float64) * frame["height"].to_numpy(dtype=np.float64)
    ref_area = reference.train_width.astype(np.float64) * reference.train_height.astype(np.float64)
    ks = ks_2samp(area, ref_area)
    checks.append(Check("image sizes", float(ks.statistic), float(ks.pvalue), False,
                        f"median {np.median(frame['width']):.0f}x{np.median(frame['height']):.0f} px against "
                        f"{np.median(reference.train_width):.0f}x{np.median(reference.train_height):.0f} in "
                        "training (KS on the area)"))
    stat, p, tvd = _contingency(list(frame["mode"]), list(reference.train_mode))
    modes = ", ".join(f"{m} {s:.0%}" for m, s in frame["mode"].value_counts(normalize=True).items())
    checks.append(Check("colour modes", tvd, p, False, f"served: {modes}"))
    bright = frame["brightness"].to_numpy(dtype=np.float64)
    bright = bright[np.isfinite(bright)]
    ks = ks_2samp(bright, reference.train_brightness)
    checks.append(Check("brightness", float(ks.statistic), float(ks.pvalue), False,
                        f"mean {np.mean(bright):.3f} against {np.mean(reference.train_brightness):.3f} in training"))

    measured = [c for c in checks if c.measured]
    level = alpha / max(1, len(measured))
    for c in measured:
        c.flagged = c.p_value is not None and c.p_value < level and (
            c.name != "confidence drop" or (c.statistic or 0.0) >= MIN_CONFIDENCE_DROP)

    estimate, low, high = atc_estimate(reference.val_confidence, reference.val_correct, conf, resamples, 0.95, seed)
    below = floor is not None and estimate < floor
    reasons = [c.name for c in checks if c.flagged] + ([f"estimated accuracy {estimate:.3f} below the gate's "
                                                         f"floor {floor:.3f}"] if below else [])
    arrays.update(confidence=conf, val_confidence=reference.val_confidence, brightness=bright,
                  train_brightness=reference.train_brightness, predicted=list(frame["predicted"]),
                  val_predicted=val_pred, classes=classes)
    return {
        "records": n,
        "distinct_images": len(frame),
        "checks": [asdict(c) for c in checks],
        "level": level,
        "estimate": {"method": "average thresholded confidence", "accuracy": estimate, "low": low, "high": high,
                     "interval": 0.95, "held_out_accuracy": float(np.mean(reference.val_correct)),
                     "held_out_split": str(reference.split), "floor": floor, "below_floor": below},
        "ood_rate": next((c.statistic for c in checks if c.name == "out of distribution" and c.measured), None),
        "verdict": "drift" if reasons else "quiet",
        "reasons": reasons,
        "_arrays": arrays,
    }


# ------------------------------------------------------------------------------------------ the command


@dataclass
class Champion:
    name: str
    version: str
    run_id: str
    floor: float | None


def resolve_model(spec: str) -> Champion:
    """``NAME@ALIAS``, ``NAME/VERSION`` or either as ``models:/…``: the version, its run and its gate floor."""
    import mlflow

    from tlops.registry.uri import parse_model_uri

    uri = spec if spec.startswith("models:/") else f"models:/{spec}"
    if "@" not in uri and uri.count("/") < 2:
        raise TlopsError(f"--model {spec}: name the version, as NAME@champion or NAME/VERSION")
    name, version = parse_model_uri(uri)
    mv = mlflow.MlflowClient().get_model_version(name, version)
    floor = None
    try:
        floor = float(mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/config/config.json")["gate"]["min_accuracy"])
    except Exception:  # a run without its config (registered by hand): no floor to hold the estimate to
        floor = None
    return Champion(name, str(version), str(mv.run_id), floor)


def fetch_reference(champion: Champion, dest_dir: str) -> Reference:
    import mlflow

    from tlops.monitoring.reference import ARTIFACT

    what = f"{champion.name} version {champion.version} (run {champion.run_id})"
    try:
        path = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path=ARTIFACT, dst_path=dest_dir)
    except Exception:
        raise TlopsError(f"{what} has no monitoring reference ({ARTIFACT}): it was evaluated before tlops recorded "
                         "one; run the pipeline again (its evaluate step records it) to monitor it") from None
    return Reference.load(path, f"the monitoring reference of {what}")


def window_records(log_uri: str, champion: Champion, since: dt.datetime | None, until: dt.datetime | None,
                   min_records: int) -> tuple[Any, dict[str, Any]]:
    """The log's records of the champion's version in [since, until), and what the window was."""
    from tlops.serving.predlog import read_log

    frame = read_log(log_uri, since, until)
    where = f"{since.isoformat() if since else 'the start'} to {until.isoformat() if until else 'now'}"
    mine = frame[(frame["model_name"] == champion.name) & (frame["model_version"] == champion.version)]
    if len(mine) < min_records:
        others = sorted({f"{a} v{b}" for a, b in zip(frame["model_name"], frame["model_version"], strict=True)})
        seen = f" (the window holds {len(frame)} records of {', '.join(others)})" if len(frame) else ""
        raise TlopsError(f"prediction log {log_uri}: {len(mine)} records of {champion.name} version "
                         f"{champion.version} from {where}{seen}; at least {min_records} are needed "
                         "(monitoring.min_records): widen --since/--until or raise monitoring.sample_rate")
    window = {"log_uri": log_uri, "since": since.isoformat() if since else None,
              "until": until.isoformat() if until else None, "first": str(mine["time"].min()),
              "last": str(mine["time"].max()), "records": len(mine), "other_records": len(frame) - len(mine)}
    return mine.reset_index(drop=True), window
