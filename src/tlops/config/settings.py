"""Typed, validated run configuration: YAML file < ``--set`` overrides, saved with every run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tlops.config.base import Section
from tlops.config.kubernetes import ClusterConfig
from tlops.errors import TlopsError
from tlops.fileio import read_utf8_text


class DataConfig(Section):
    uri: str = ".tlops/data/digits"
    # Used only when the data has no split of its own: fractions of a hash of each file's content.
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_salt: str = "tlops"
    # How files without a split of their own are split: "stratified" in each class's hash order (every
    # class gets its share; one added image moves at most two others), or "hash" on each file's content
    # hash alone (no file ever moves; a small class may get few test or val images by chance).
    split: Literal["stratified", "hash"] = "stratified"
    # Threads that read, hash and decode files for the manifest; 0 means one per core.
    manifest_workers: int = Field(0, ge=0)
    # Re-use what an earlier manifest build saw in files whose path, size and mtime are unchanged.
    manifest_cache: bool = True
    # Domain adaptation (train.strategy adabn, self-training, mcc): unlabelled images of the new domain (a folder
    # or s3:// prefix as uri: class folders, split folders, a CSV manifest or a flat folder; labels are ignored),
    # and an optional small labelled target set, split like the source (val_fraction, test_fraction). Its test
    # split is what the gate compares on; no adaptation ever reads it.
    target_uri: str | None = None
    target_labelled_uri: str | None = None
    # Instead of target_labelled_uri: this share of each class of target_uri (class folders) keeps its labels as the
    # labelled target set (split by val_fraction and test_fraction); the rest is the unlabelled target.
    target_labelled_fraction: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave images for training (sum < 1)")
        if self.target_labelled_fraction and self.target_labelled_uri:
            raise ValueError("set target_labelled_uri or target_labelled_fraction, not both")
        if self.target_labelled_fraction and not self.target_uri:
            raise ValueError("target_labelled_fraction holds out a share of target_uri, which is not set")
        return self


Severity = Literal["error", "warning"]
# Every check of the validation suite and its default severity. An error fails the step (exit 1);
# a warning is reported and logged, and the run goes on.
CHECK_SEVERITIES: dict[str, Severity] = {
    "decodable": "error",
    "labels_not_null": "error",
    "labels_in_class_list": "error",
    "min_size": "error",
    "allowed_modes": "error",
    "exact_duplicates_across_splits": "error",
    "same_content_two_labels": "error",
    "near_duplicates_across_splits": "warning",
    "min_images_per_class": "error",
    "single_class_split": "error",
    "class_imbalance": "warning",
    "class_drift": "warning",
    "size_drift": "warning",
}


class ValidationConfig(Section):
    # Floors per class and split: train needs min_images_per_class; val and test scale with the data,
    # min(min_images_per_class, max(min_held_out_per_class, half the class's expected share of the split)).
    min_images_per_class: int = Field(5, ge=1)
    min_held_out_per_class: int = Field(2, ge=1)
    # When set, every label must be one of these, and each of them must have min_images_per_class.
    classes: list[str] | None = None
    # Largest class / smallest class, in every split.
    max_imbalance_ratio: float = Field(10.0, ge=1.0)
    min_width: int = Field(8, ge=1)
    min_height: int = Field(8, ge=1)
    # Modes the preprocessing converts to RGB faithfully. 16-bit and float modes ("I;16", "I", "F") are
    # left out: PIL's conversion clips them to 8 bits.
    allowed_modes: list[str] = Field(
        default_factory=lambda: ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"], min_length=1)
    # A header declaring more pixels than this is refused without decoding (decompression bomb).
    max_pixels: int = Field(89_478_485, ge=1)
    # Near duplicates: Hamming distance of the 64-bit dHash, out of 64. Images with a side below
    # near_duplicate_min_side are not compared: on them the hash cannot tell a copy from a lookalike.
    near_duplicate_max_distance: int = Field(4, ge=0, le=32)
    near_duplicate_min_side: int = Field(32, ge=1)
    # A previously accepted manifest (CSV) to measure drift against: a path, or "champion" for the
    # manifest logged with the current champion model's run. Unset: no drift checks.
    reference_manifest: str | None = None
    # Total-variation distance between the class shares (0: identical, 1: disjoint).
    max_class_drift: float = Field(0.1, ge=0.0, le=1.0)
    # Two-sample Kolmogorov-Smirnov statistic, of the widths and of the heights.
    max_size_drift: float = Field(0.25, ge=0.0, le=1.0)
    # Severity per check, over the defaults in CHECK_SEVERITIES.
    severity: dict[str, Severity] = Field(default_factory=dict)
    # True: files failing an error-level per-file check are quarantined and left out of training
    # instead of failing the step. The input data is never modified either way.
    exclude_quarantined: bool = False

    @model_validator(mode="after")
    def _known_checks(self) -> ValidationConfig:
        unknown = sorted(set(self.severity) - set(CHECK_SEVERITIES))
        if unknown:
            raise ValueError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECK_SEVERITIES)}")
        return self

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, CHECK_SEVERITIES[check])


class PreprocessConfig(Section):
    """Deviations from the backbone's reference preprocessing. Empty means: exactly the reference."""

    image_size: int | None = Field(None, ge=8, le=1024)
    # A resolution different from the reference must be declared; it is then recorded, not refused.
    allow_resolution_change: bool = False
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    channel_order: Literal["RGB", "BGR"] | None = None
    scale: float | None = None
    resize_rule: Literal["shorter-side-then-crop", "direct"] | None = None
    exif_transpose: bool | None = None


Strategy = Literal["linear-probe", "partial", "full", "gradual", "scratch", "adabn", "self-training", "mcc"]
# What a config may say: a strategy, or auto (one Literal, so a wrong value gets one plain message).
StrategyChoice = Literal["linear-probe", "partial", "full", "gradual", "scratch", "adabn", "self-training", "mcc",
                         "auto"]
# Domain adaptation strategies (tlops.training.adaptation): a source model (train.adaptation.base) adapted to the
# target images of data.target_uri. They need target data.
ADAPTATION_STRATEGIES: tuple[str, ...] = ("adabn", "self-training", "mcc")
# Strategies trained by gradient descent through the backbone (everything but the linear probe).
GRADIENT_STRATEGIES: tuple[str, ...] = ("partial", "full", "gradual", "scratch")
# train.epochs when unset: the probe's L-BFGS iterations (each a full pass over the cached features),
# or epochs for the gradient strategies.
DEFAULT_EPOCHS = {"linear-probe": 200, "gradient": 10}


class AugmentConfig(Section):
    """Training-only augmentation. The evaluation preprocessing (the spec proven by parity) never changes."""

    # A random part of the decoded image (area share in crop_scale, aspect ratio in crop_ratio) resized to
    # the spec's input size, instead of the spec's resize and centre crop.
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Off by default: a mirrored digit or letter is another symbol, or none.
    hflip: bool = False

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("crop_scale must be (min, max) with 0 < min <= max <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must be (min, max) with 0 < min <= max")
        return self

    @property
    def active(self) -> bool:
        return self.random_resized_crop or self.hflip


class AdaptationConfig(Section):
    """The adaptation phase of train.strategy adabn, self-training and mcc (tlops.training.adaptation).

    The source model is trained first with ``base`` (every other train field applies to it, resumable as that
    strategy is); then it is adapted to the target images: adabn re-estimates the BatchNorm statistics, self-training
    learns ``rounds`` rounds of confident class-balanced pseudo-labels (weak/strong views), mcc fine-tunes
    ``epochs`` more epochs on the source with the Minimum Class Confusion loss on the target."""

    base: Literal["linear-probe", "partial", "full", "gradual"] = "full"
    # self-training: epochs per round; mcc: epochs. Learning rates, weight decay, label smoothing, batch size and
    # seed are train's.
    epochs: int = Field(3, ge=1)
    rounds: int = Field(3, ge=1)
    threshold: float = Field(0.8, gt=0.0, lt=1.0)
    unlabelled_weight: float = Field(1.0, ge=0.0)
    mcc_weight: float = Field(1.0, ge=0.0)
    mcc_temperature: float = Field(2.5, gt=0.0)


class AcceleratorConfig(Section):
    """What the fine-tune step asks the cluster for (kfp set_accelerator_type / set_accelerator_limit)."""

    type: str | None = None  # e.g. "nvidia.com/gpu"; unset: no accelerator requested
    limit: int = Field(1, ge=1)


# Marks a train field that says how a run executes, not what it computes (device, threads, workers, precision
# settings, DDP, checkpoint placement): it stays out of the checkpoint key, so a run resumes on another device,
# with other workers or as DDP. Every other field is in the key: a new field changes the key unless it is
# marked, where it is declared.
RUNTIME: dict[str, Any] = {"runtime": True}


class TrainConfig(Section):
    # auto: the strategy recommended by the task-similarity check (tlops.selection.similarity), chosen and recorded by
    # the validate step.
    strategy: StrategyChoice = "linear-probe"
    # linear-probe: L-BFGS iterations per fit (each a full-batch pass over the cached features);
    # other strategies: epochs. Unset: 200 for linear-probe, 10 for the others.
    epochs: int = Field(200, ge=1)
    # Linear probe: the L2 strengths swept on the validation split.
    l2_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1], min_length=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 means all cores", json_schema_extra=RUNTIME)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=RUNTIME)
    # Linear probe: keep backbone features on disk under <workdir>/cache/features, keyed by the backbone
    # weights, the preprocessing fingerprint and the images' content.
    feature_cache: bool = Field(True, json_schema_extra=RUNTIME)

    # Gradient strategies (partial, full, gradual, scratch).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, description="head learning rate (every layer for scratch)")
    backbone_lr_factor: float = Field(0.1, gt=0.0, le=1.0, description="backbone lr = lr x this")
    # Layer-wise decay: stage i of n (input side first) trains at backbone lr x layer_decay^(n-1-i).
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, description="not applied to biases and norm layers")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD (Nesterov) momentum")
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear warm-up, then cosine decay to zero")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    class_weighted_loss: bool = False
    grad_clip_norm: float | None = Field(1.0, gt=0.0, description="unset: no clipping")
    # Early stopping: stop after this many epochs without a better validation accuracy; unset: never.
    patience: int | None = Field(3, ge=1)
    # partial: how many backbone stages, from the input side, stay frozen (EfficientNet: stem, 7 blocks,
    # head conv; ResNet: stem, layer1..layer4).
    frozen_stages: int = Field(2, ge=1)
    # gradual: head alone for gradual_head_epochs, then one more stage from the top every
    # gradual_unfreeze_every epochs.
    gradual_head_epochs: int = Field(1, ge=1)
    gradual_unfreeze_every: int = Field(1, ge=1)
    # BatchNorm layers keep their running statistics (eval mode) while their scale and shift train:
    # for small batches, and for DDP on CPU where SyncBatchNorm does not exist. Unset: on with head_init probe
    # (the head was fitted on features under those statistics), off otherwise.
    freeze_bn_stats: bool | None = None
    # The head a pre-trained gradient strategy (partial, full, gradual) starts from. probe: the linear probe's
    # head, fitted first on the cached features (LP-FT, Kumar et al. 2022: fine-tuning from a random head
    # distorts the pre-trained features before the head has learnt anything); random: a fresh head.
    head_init: Literal["probe", "random"] = "probe"
    # With head_init probe: when the fine-tuned model's best validation accuracy is below the probe's, the
    # probe's model is the result (said in the log and the run's tags), so fine-tuning never loses to it.
    keep_better_probe: bool = True
    augment: AugmentConfig = AugmentConfig()
    # Domain adaptation strategies only (a part of their checkpoint key; left out of every other strategy's key).
    adaptation: AdaptationConfig = AdaptationConfig()
    # Decoded evaluation tensors kept in memory across epochs when augmentation is off and workers are 0.
    input_cache_mb: int = Field(2048, ge=0, json_schema_extra=RUNTIME)

    # Hardware. Unset: chosen by device (CUDA: bf16 autocast where supported, else fp16; pinned memory;
    # workers = min(8, cores). CPU: no autocast (amp: true there means bf16), 0 workers). channels_last: on
    # unless set false (faster training on GPUs and, with oneDNN, on CPUs).
    num_workers: int | None = Field(None, ge=0, json_schema_extra=RUNTIME)
    amp: bool | None = Field(None, json_schema_extra=RUNTIME)
    channels_last: bool | None = Field(None, json_schema_extra=RUNTIME)
    compile: bool = Field(False, json_schema_extra=RUNTIME)
    deterministic: bool = Field(False, json_schema_extra=RUNTIME)
    # DDP processes on this machine (gloo on CPU, NCCL on CUDA); torchrun's environment overrides it.
    processes: int = Field(1, ge=1, json_schema_extra=RUNTIME)
    accelerator: AcceleratorConfig = Field(AcceleratorConfig(), json_schema_extra=RUNTIME)

    # Checkpoints: every N optimizer steps (0: only at each epoch end), and always at each epoch end.
    # Unset dir: <workdir>/checkpoints/<key of data, preprocessing and training config>; or s3://...
    checkpoint_dir: str | None = Field(None, json_schema_extra=RUNTIME)
    checkpoint_every_steps: int = Field(0, ge=0, json_schema_extra=RUNTIME)
    resume: bool = Field(True, json_schema_extra=RUNTIME)
    # Tests and drills only: the training process kills itself (SIGKILL, as a crash would) after this
    # many optimizer steps.
    stop_after_steps: int | None = Field(None, ge=1, json_schema_extra=RUNTIME)
    # Set by the loader, not by hand: train.epochs was left unset under strategy auto.
    epochs_unset: bool = False

    @classmethod
    def runtime_fields(cls) -> frozenset[str]:
        """The fields marked :data:`RUNTIME`."""
        return frozenset(name for name, f in cls.model_fields.items()
                         if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("runtime"))

    def result_fields(self) -> dict[str, Any]:
        """The fields that change what training computes (JSON values): the training part of the checkpoint key.
        ``adaptation`` only for an adaptation strategy (the key of every other run is as it was before it existed)."""
        exclude = set(self.runtime_fields())
        if self.strategy not in ADAPTATION_STRATEGIES:
            exclude.add("adaptation")
        return self.model_dump(mode="json", exclude=exclude)

    @model_validator(mode="before")
    @classmethod
    def _epochs_by_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is None and data.get("strategy") == "auto":
            # The strategy auto picks takes its own default then (tlops.selection.planner.resolve_strategy).
            return {**data, "epochs": DEFAULT_EPOCHS["linear-probe"], "epochs_unset": True}
        if isinstance(data, dict) and data.get("epochs") is None:
            strategy = data.get("strategy", "linear-probe")
            data = {**data, "epochs": DEFAULT_EPOCHS["linear-probe" if strategy == "linear-probe" else "gradient"]}
        return data

    @property
    def is_adaptation(self) -> bool:
        return self.strategy in ADAPTATION_STRATEGIES

    @property
    def is_gradient(self) -> bool:
        return self.strategy in GRADIENT_STRATEGIES

    @property
    def starts_from_probe(self) -> bool:
        """A pre-trained gradient strategy whose head starts as the linear probe's (LP-FT)."""
        return self.is_gradient and self.strategy != "scratch" and self.head_init == "probe"

    @property
    def bn_stats_frozen(self) -> bool:
        return self.starts_from_probe if self.freeze_bn_stats is None else self.freeze_bn_stats


class GateConfig(Section):
    """The promotion policy. Every threshold must hold to promote; the decision always says why.

    ``policy_file`` names a YAML mapping of these same fields kept apart from the run config (a team's
    policy): it is read once when the config loads, and fields written in the ``gate`` section (and
    ``--set gate.*``) override it. The resolved policy travels with the run; ``policy_source`` says where
    it came from.
    """

    # auto: a candidate that passes every check becomes the champion. manual: it becomes the
    # challenger (decision needs-approval) and a person runs `tlops promote NAME VERSION`.
    mode: Literal["auto", "manual"] = "auto"
    min_accuracy: float = Field(0.9, ge=0.0, le=1.0)
    # Lowest recall allowed for any single class of the test split (0: no per-class floor).
    min_class_recall: float = Field(0.0, ge=0.0, le=1.0)
    # Largest accuracy drop against the champion that still promotes (0: must not be worse).
    max_regression: float = Field(0.0, ge=0.0, le=1.0)
    # With a labelled target test set (data.target_labelled_uri) the candidate is compared on the target; it must
    # also not lose more than this accuracy on the source test split against the champion (or, with no champion,
    # against the source-only model the adaptation started from).
    max_source_regression: float = Field(0.02, ge=0.0, le=1.0)
    # When set, the candidate must beat the champion by at least this much accuracy, and the paired
    # bootstrap confidence interval of the difference (evaluation.confidence) must lie above zero.
    min_improvement: float | None = Field(None, ge=0.0, le=1.0)
    # Checks that must have passed in this run.
    require_validation: bool = True
    require_parity: bool = True
    # Serving limits: p95 latency per image at batch size 1 on CPU, and the bytes of the weights.
    max_latency_p95_ms: float | None = Field(None, gt=0.0)
    max_model_size_mb: float | None = Field(None, gt=0.0)
    # Compressed serving variants (deploy.variants): the largest accuracy drop against the uncompressed
    # candidate on the same test split, and the budgets of the variant that becomes the serving artifact.
    max_compression_drop: float = Field(0.005, ge=0.0, le=1.0)
    variant_max_latency_p95_ms: float | None = Field(None, gt=0.0)
    variant_max_size_mb: float | None = Field(None, gt=0.0)
    policy_file: str | None = None
    policy_source: str = "config"

    @model_validator(mode="before")
    @classmethod
    def _read_policy_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("policy_file"):
            return data
        path = Path(str(data["policy_file"])).expanduser()
        if not path.is_file():
            raise ValueError(f"policy file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"policy file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"policy file {path} must hold a mapping of gate fields")
        if "policy_file" in loaded or "policy_source" in loaded:
            raise ValueError(f"policy file {path}: policy_file and policy_source cannot be set inside it")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        # Consumed here: a step re-validating the resolved config never reads the file again.
        rest = {k: v for k, v in data.items() if k not in ("policy_file", "policy_source")}
        return {**loaded, **rest, "policy_source": f"{path.resolve()} (sha256 {digest})"}


class EvaluationConfig(Section):
    """How the evaluate step measures: the figures it computes and how much work it may spend."""

    batch_size: int = Field(64, ge=1)
    # Top-k accuracies to report; each k is capped by the number of classes.
    top_k: list[int] = Field(default_factory=lambda: [2, 5], min_length=1)
    # Expected calibration error: equal-width confidence bins.
    ece_bins: int = Field(10, ge=2, le=100)
    # Paired bootstrap of the accuracy difference against the champion (seeded, so reruns agree).
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    # Latency per image at batch size 1 on CPU, over at most this many test images (0: not measured),
    # after a few warm-up calls that are not counted.
    latency_images: int = Field(30, ge=0, le=1000)
    latency_warmup: int = Field(3, ge=0, le=100)
    # torch CPU threads while timing (0: leave as is). One thread is how a serving worker usually runs, and
    # on a shared machine it is the stable figure: with two threads a descheduled one stalls every call.
    latency_threads: int = Field(1, ge=0)
    # Image-size slices: upper edges (px) of the buckets of each image's longer side.
    size_buckets: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512, 1024], min_length=1)
    # Score the candidate and the champion from backbone features kept in the feature cache (keyed by each
    # backbone's weights, its preprocessing and the test images; computed once on a miss), then each one's head;
    # false: every test image through the pyfunc as bytes. Same predictions either way (tested).
    feature_cache: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> EvaluationConfig:
        if any(k < 1 for k in self.top_k):
            raise ValueError("top_k values must be at least 1")
        if self.size_buckets != sorted(set(self.size_buckets)) or self.size_buckets[0] < 1:
            raise ValueError("size_buckets must be increasing positive pixel sizes")
        return self


class DeployConfig(Section):
    """Compressed serving variants built after evaluation (tlops.serving.compress): none by default."""

    variants: list[Literal["onnx", "int8", "pruned"]] = Field(default_factory=list)
    # int8: training images its static quantisation is calibrated on.
    calibration_images: int = Field(200, ge=1, le=10_000)
    # pruned: the weights' size to reach, in MB, or else this share of the candidate's; recovery epochs.
    prune_target_mb: float | None = Field(None, gt=0.0)
    prune_target_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    prune_epochs: int = Field(2, ge=0, le=100)
    # pruned: the recovery fine-tune's peak learning rate (AdamW, cosine decay to 0).
    prune_lr: float = Field(1e-3, gt=0.0, le=1.0)

    @field_validator("variants", mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        known = ("onnx", "int8", "pruned")
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            bad = [v for v in items if v not in known]
            if bad:
                raise ValueError(f"unknown variant {bad[0]!r}; choose from {', '.join(known)}")
        return items


class SelectionConfig(Section):
    """Choosing the backbone (``tlops select``, ``backbone: auto``) and feature drift (tlops.selection.ranking)."""

    # Catalogue names, checkpoint:DIR, or NAME:random / NAME:shuffled (controls: random init, weights
    # shuffled across layers). Candidates whose weights are not on this machine are reported, not fatal.
    candidates: list[str] = Field(default_factory=lambda: ["efficientnet_lite0", "resnet18", "resnet50"],
                                  min_length=1)
    # Images of the train split, stratified by class; a train split no larger than this is used whole,
    # and its features are then the very ones the linear probe reads from the feature cache.
    sample: int = Field(1000, ge=10)
    folds: int = Field(5, ge=2, le=20)
    rank_by: Literal["logme", "probe"] = "logme"
    # backbone: auto only picks candidates within these budgets: ms per image at batch size 1 on this
    # machine, and MB of backbone weights (float32). Unset: no limit.
    max_latency_ms: float | None = Field(None, gt=0.0)
    max_size_mb: float | None = Field(None, gt=0.0)
    # Feature drift of the new data against the champion's training data (MMD, permutation test).
    drift: bool = False
    drift_sample: int = Field(300, ge=10)
    drift_permutations: int = Field(200, ge=20, le=10_000)
    drift_alpha: float = Field(0.05, gt=0.0, lt=1.0)
    # never: always train. unchanged: skip when the manifest equals the champion's. no-drift: skip also when
    # the data changed but shows no feature drift (needs drift: true). no-served-drift: skip when the latest
    # `tlops monitor` verdict on the champion's served traffic is quiet. A skipped run trains nothing.
    skip_when: Literal["never", "unchanged", "no-drift", "no-served-drift"] = "never"
    seed: int = 0

    @model_validator(mode="after")
    def _skip_needs_drift(self) -> SelectionConfig:
        if self.skip_when == "no-drift" and not self.drift:
            raise ValueError("skip_when: no-drift needs drift: true")
        return self


class MonitoringConfig(Section):
    """The served champion's prediction log (``tlops serve``) and ``tlops monitor`` (tlops.monitoring)."""

    # Share of served images logged (0: no log). Each record holds the image's hash, size, mode, brightness, the
    # prediction, top-k probabilities and the backbone embedding; the image bytes only with log_images.
    sample_rate: float = Field(0.1, ge=0.0, le=1.0)
    # A directory or s3:// prefix; unset: <workdir>/prediction-log.
    log_uri: str | None = None
    log_images: bool = False
    # The reference the evaluate step records with each candidate: training images embedded (a stratified sample).
    reference_sample: int = Field(500, ge=10, le=20_000)
    # tlops monitor: the level of each test (Bonferroni over the tests of the verdict), the held-out quantile of
    # the nearest-training-embedding distance past which an image counts as out of distribution, the fewest
    # records a window needs, the bootstrap resamples of the accuracy estimate's interval.
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    ood_quantile: float = Field(0.95, gt=0.5, lt=1.0)
    min_records: int = Field(20, ge=2)
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)
    mmd_sample: int = Field(300, ge=10)


class RegistryConfig(Section):
    model_name: str = Field("tlops-digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TrackingConfig(Section):
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under the work dir
    experiment: str = "tlops"
    # A tracking server that stops answering: each request is retried with exponential back-off
    # (backoff_factor x 2^n seconds) and a timeout, then the step fails with one line. The MLFLOW_HTTP_REQUEST_*
    # environment variables, when set, win over these.
    retries: int = Field(5, ge=0, le=10)
    backoff_factor: int = Field(1, ge=0, le=60)  # whole seconds, as MLflow reads it
    timeout_s: int = Field(60, ge=1)


class Config(Section):
    # This process's own scratch space (manifest cache, fetched images, feature cache, checkpoints). In a
    # cluster it lives and dies with the step's pod.
    workdir: str = ".tlops"
    # Where state that must outlive a step lives, so a retried or re-run step resumes: checkpoints under
    # <state_uri>/checkpoints/<key>, the linear probe's feature cache under <state_uri>/features. An s3://
    # prefix (or a directory every step sees); unset: inside the workdir only.
    state_uri: str | None = None
    backbone: str = "efficientnet_lite0"
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    selection: SelectionConfig = SelectionConfig()
    deploy: DeployConfig = DeployConfig()
    monitoring: MonitoringConfig = MonitoringConfig()

    @model_validator(mode="after")
    def _adaptation_needs_target(self) -> Config:
        if self.train.strategy in ADAPTATION_STRATEGIES and not self.data.target_uri:
            raise ValueError(f"train.strategy {self.train.strategy} adapts to target images, but data.target_uri is "
                             "not set: set it to a folder or s3:// prefix of unlabelled images of the new domain")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.model_validate_json(text)


# The pipeline's typed parameters (a KFP run form's fields) and the config field each one sets. A parameter at its
# unset value ("" for text, 0 for epochs, a negative floor) leaves the field as the config says.
PIPELINE_PARAMETERS = {"backbone": "backbone", "strategy": "train.strategy", "epochs": "train.epochs",
                       "model_name": "registry.model_name", "min_accuracy": "gate.min_accuracy"}


def with_parameters(config_json: str, backbone: str = "", strategy: str = "", epochs: int = 0, model_name: str = "",
                    min_accuracy: float = -1.0) -> Config:
    """The run's config: ``config_json`` (the full config; empty: the defaults) with the pipeline's typed
    parameters over it. Precedence: a parameter that is set > the config's field > the default.

    A ``strategy`` parameter without ``epochs`` takes the new strategy's default epochs when the config's epochs
    were its own strategy's default (200 L-BFGS iterations are no count of full fine-tuning epochs)."""
    cfg = Config.from_json(config_json) if config_json.strip() else Config()
    data = cfg.model_dump(mode="json")
    given = {"backbone": backbone, "strategy": strategy, "epochs": epochs, "model_name": model_name,
             "min_accuracy": min_accuracy}
    unset = {"backbone": "", "strategy": "", "epochs": 0, "model_name": ""}
    for key, value in given.items():
        if (value >= 0) if key == "min_accuracy" else value != unset[key]:  # type: ignore[operator]
            *sections, leaf = PIPELINE_PARAMETERS[key].split(".")
            node = data
            for section in sections:
                node = node[section]
            node[leaf] = value  # as typed: a model name "1e3" stays text
    if strategy and strategy != cfg.train.strategy and not epochs:
        family = "linear-probe" if cfg.train.strategy == "linear-probe" else "gradient"
        if cfg.train.epochs == DEFAULT_EPOCHS[family] or cfg.train.epochs_unset:
            data["train"]["epochs"] = None  # the strategy's own default (TrainConfig._epochs_by_strategy)
            data["train"].pop("epochs_unset", None)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        if not err["loc"]:
            raise TlopsError(f"pipeline parameters: {str(err['msg']).removeprefix('Value error, ')[:300]}") from None
        name = next((k for k, v in PIPELINE_PARAMETERS.items() if v == where), where)
        raise TlopsError(f"pipeline parameter {name}: {' '.join(str(err['msg']).split())[:300]}") from None


def _yaml_problem(exc: Exception) -> str:
    """The one line of a YAML (or integer) error that says what is wrong."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        return exc.problem
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: an integer over Python's digit limit; RecursionError: brackets nested thousands deep.
        raise ValueError(_yaml_problem(exc)) from None


def _parse_value(raw: str) -> Any:
    """``--set`` values: YAML scalars, and comma lists for tuples (``0.485,0.456,0.406``).

    A value YAML cannot read raises ValueError with YAML's reason (``@`` or ``%`` at the start, an unclosed
    ``[``, an alias ``*name``, a ``!!python`` tag, an integer of thousands of digits)."""
    if "," in raw and not raw.strip().startswith("["):
        return [_yaml_value(part) for part in raw.split(",")]
    return _yaml_value(raw)


def _shown(raw: str, limit: int = 60) -> str:
    text = raw.encode("utf-8", "backslashreplace").decode("utf-8")
    return repr(text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TlopsError(f"--set {_shown(item)}: expected KEY=VALUE, for example train.epochs=10")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TlopsError(f"--set {_shown(item)}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = _parse_value(raw)
        except ValueError as exc:
            raise TlopsError(f"--set {key.strip()}: the value {_shown(raw)} is not a YAML value ({exc}); to pass "
                             f"it as text, quote it: --set '{key.strip()}=\"...\"'") from None
    return data


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section at ``loc`` (a dict's key steps into its values), or none."""
    import typing

    model: Any = Config
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) \
            else None
        if field is None:
            return []
        model = field.annotation
        if typing.get_origin(model) is dict:  # e.g. cluster.steps.<name>: the next part is the key
            model = typing.get_args(model)[1]
            if parts:
                parts.pop(0)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def did_you_mean(loc: tuple[Any, ...]) -> str:
    """``; did you mean 'train.epochs'?`` for a mistyped field at ``loc`` (difflib's closest names), or ``''``;
    with no close name, the section's fields."""
    import difflib

    prefix = "".join(f"{p}." for p in loc[:-1])
    known = _section_fields(tuple(loc[:-1]))
    if not known:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    return f"; fields of {prefix.rstrip('.') or 'the config'}: " + ", ".join(known)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise TlopsError(f"config file {p} does not exist: pass an existing YAML file to --config")
        if not p.is_file():
            raise TlopsError(f"config file {p} is not a regular file: pass a YAML file to --config")
        text = read_utf8_text(p, f"config file {p}")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TlopsError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        except (ValueError, RecursionError) as exc:
            raise TlopsError(f"config file {p} is not valid YAML: {_yaml_problem(exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TlopsError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        src = f"config file {path}" if path else "config"
        msg = " ".join(str(err["msg"]).split())  # one line, whatever the validator said
        if err["type"] == "extra_forbidden":
            msg = "no such field" + did_you_mean(err["loc"])
        if not err["loc"]:  # a check across sections (an adaptation strategy without data.target_uri): it names them
            raise TlopsError(f"{src}: {msg.removeprefix('Value error, ')[:300]}") from None
        raise TlopsError(f"{src}: field {_shown(where, 120)[1:-1]}: {msg[:300]}") from None
