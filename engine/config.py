"""Configuration dataclasses and presets.

Every setting that changes a result lives here, in a dataclass, so that caches can be
keyed by ``dataclasses.asdict`` of the settings that produced them (docs/architecture.md §6, §10).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the DDPM U-Net (Ho et al. 2020)."""

    image_size: int = 8
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 1)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0
    num_groups: int = 8


@dataclass(frozen=True)
class DiffusionConfig:
    """Linear beta schedule of Ho et al. (2020); docs/architecture.md §3."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass(frozen=True)
class DataConfig:
    """Which training set; ``levels`` is the number of intensity levels (ELBO bin width)."""

    name: str = "digits"  # digits | mnist | cifar10 | cifar2 | folder
    root: str | None = None
    image_size: int | None = 8  # folder: None keeps the files' size (all must match)
    channels: int = 1
    levels: int = 17
    flip: bool = False
    seed: int = 0  # for subset selection (CIFAR-2, MNIST)
    per_class: int = 2500  # CIFAR-2 images per class (paper: 2,500 cars + 2,500 horses); MNIST: at most this many


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe (docs/architecture.md §3: AdamW, warm-up then cosine, clipping, EMA)."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    # also save the resumable state once this many seconds have passed since the last save (0: off), so
    # that a kill loses at most about this much work even when checkpoint_every is far away (a run shorter
    # than checkpoint_every saved nothing and restarted from step 0); the weights do not depend on it
    checkpoint_seconds: float = 120.0


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of the attribution engine (docs/architecture.md §4-6)."""

    mc_samples: int = 64  # M draws of (t, eps) per example
    seed: int = 0
    kfac_damping: float = 1e-8
    # None: the authors' best values on TRAK's unnormalised scale divided by the training-set
    # size N (docs/architecture.md §4), resolved by ``trak_default_damping`` once N is known
    trak_damping: float | None = None
    dtrak_damping: float | None = None
    fisher_type: str = "mc"  # validation.FISHER_TYPES: mc | empirical
    kfac_approx: str = "expand"  # validation.KFAC_APPROX: expand | reduce
    ekfac: bool = False
    # K-FAC blocks: "separate" (weight B (x) A and bias B, the default) or "joint" ([W | b] in one
    # B (x) A block, curvlinops separate_weight_and_bias=False; an ablation)
    kfac_blocks: str = "separate"
    # training-gradient and curvature draws: "per-example" (independent per example, seeded by its
    # index; paper G.3; the default since the K=32 digits LDS found it no worse: +0.013 [-0.028, +0.054]
    # against shared) or "shared" (the same M draws for every example). engine.attribution.train_draws
    draws: str = "per-example"
    # K-FAC factors from the first k of the M draws of every example (None: all M): the factor pass is
    # most of a cold build, and its averages are over N*k*(positions) rows (KFACInfluence.factor_draws);
    # the digits preset uses 8 of 64 (LDS paired against all 64: -0.003 [-0.006, +0.001] at K=32, R=1, Q=32 when
    # it was chosen; -0.000 [-0.002, +0.001] at R=2, Q=128, lds_digits_ablation_factor_draws.json; factor pass 7x shorter)
    kfac_factor_draws: int | None = None
    # where the factors' draws come from: "same" (the bank's draws, above) or "per-example" (independent
    # draws per example, paper G.3, even when the bank's are shared: the factors then see every timestep
    # and k < M draws per example are allowed; KFACInfluence.factor_train_draws)
    kfac_factor_draws_mode: str = "same"
    # the dtype the K-FAC factor pass runs and sums in (validation.FACTOR_DTYPES): "float32" (the model's; every
    # shipped cache) or "float64" (slower: the pass is most of a cold build).  In float32 a factor's eigenvalues are
    # known to about 1e-7 of its largest, so dampings below about 1e-9 score rounding on a small data set (QA 31a:
    # a 128-image model 10% off eq. 6 at 1e-10; digits 1.3e-4 at 1e-10, 1.7% at 1e-12); float64 removes that, and
    # with the MC-Fisher draws other labels (curvlinops samples them in the model's dtype): another sample of G
    kfac_factor_dtype: str = "float32"
    # the query gradient's draws: "own" (M draws of its own, independent of the training gradients', seed + 1;
    # paper G.3) or "bank" (the training gradients' shared draws: common random numbers between the query and
    # every training example; needs draws="shared"; AttributionSession.query_draws)
    query_draws: str = "own"
    # K-FAC training-gradient bank: "stored" (int8 on disk, a query is one pass over it),
    # "streamed" (recomputed per query batch: for models whose bank does not fit, docs/architecture.md §8)
    # "compressed" (per-layer projected gradients, the candidates re-ranked exactly: engine.attribution.compressed_bank)
    # or "auto" (stored when N x P int8 bytes <= kfac_bank_max_gb GiB, compressed otherwise; streamed only when asked),
    # or a kind a file in engine/attribution/methods/ registers (engine.attribution.bank_kinds)
    kfac_bank: str = "auto"
    kfac_bank_max_gb: float = 8.0
    # the stored int8 bank's grid: rows divided by sqrt(e + f * max e) per block before rounding, with f this
    # relative eigenvalue floor (engine.attribution.bank.whitening; removes the plain grid's shrink of every
    # score: a median 0.4-0.6% at the default damping, 1.2-1.8% at 1e-12, scripts/bank_rounding.py), or None for the plain grid (the stored banks before 2026-12-05)
    kfac_bank_whiten: float | None = 1e-10
    kfac_projection: str = "gaussian"  # compressed bank: validation.KFAC_PROJECTIONS (engine.attribution.layer_projection)
    kfac_compression: float = 32.0  # compressed bank: full int8 bank bytes / compressed bank bytes
    # compressed bank: 2 x kfac_rerank candidates re-ranked exactly, shared between the ends (kfac_rerank_split; 0: none)
    kfac_rerank: int = 256
    # compressed bank: how the 2 x kfac_rerank candidates are shared between the ends: "adaptive" (by how
    # crowded each end is, engine.attribution.rerank.CandidateSplit) or "even" (kfac_rerank each)
    kfac_rerank_split: str = "adaptive"
    trak_dim: int = 2048
    trak_projection: str = "srht"  # validation.TRAK_PROJECTIONS (engine.attribution.projection)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"


@dataclass(frozen=True)
class CopyCheckConfig:
    """The copy check's near-copy rule (engine.attribution.copycheck): a sample is flagged when its nearest
    training image is less than ``near_copy_ratio`` times as far as its next ``neighbours`` nearest are on
    average (r = d_1 / mean(d_2..d_{K+1}), in the spirit of Carlini et al. 2023).  Deliberately simple, and a
    setting rather than a constant so that a study can move it (``copy-check --near-copy-ratio/--neighbours``)
    and its record says which rule flagged what."""

    neighbours: int = 50
    near_copy_ratio: float = 0.5

    def __post_init__(self) -> None:
        if int(self.neighbours) < 1:
            raise ValueError(f"the copy check's neighbours must be at least 1, got {self.neighbours}")
        problem = self.ratio_problem(self.near_copy_ratio)
        if problem is not None:
            raise ValueError(f"the copy check's near-copy ratio {problem}")

    @staticmethod
    def ratio_problem(value: float) -> str | None:
        """What is wrong with ``value`` as a near-copy ratio (None: nothing), in words the CLI's flag and this
        class's own check both say.  r <= 1 always (the nearest is no farther than the mean of the next), so at 1
        every sample and training image is flagged (QA 32)."""
        return None if 0.0 < float(value) < 1.0 else f"must lie in (0, 1), got {float(value)}"


COPY_CHECK = CopyCheckConfig()


@dataclass(frozen=True)
class ComputeConfig:
    """How fast and in how much memory; never what the answer is.

    The engine's batch sizes and memory budgets, one field each.  Every value gives the same scores (to float
    rounding, and the tests check that the knobs reach the code without changing the answers), so this section
    is no part of any cache key or of a checkpoint's config (``Preset.to_dict`` leaves it out): a preset file's
    optional ``"compute"`` object sets it for the machine at hand.  Checked on construction
    (``validation.check_compute_config``: whole numbers, at least 1; ``pack_max_bytes`` at least 0)."""

    # query gradients per ``per_example_grads`` call when a query set's gradients are computed in batches
    # (``pool.query_gradients``): the activations of this many images x M draws are held at once
    query_grad_batch: int = 16
    # bytes of int8 rows converted to float at a time by the torch path of a stored bank's single-damping scan
    # (``RotatedBank.inner`` without numba) on a CPU: 4 MiB stays in L2/L3 while it is multiplied (digits bank,
    # one thread: 199 ms per pass against 263 ms with 1 MiB chunks, ``scripts/bank_scan_kernels.py``)
    scan_chunk_bytes_cpu: int = 4 << 20
    # the same on a GPU: 256 MiB, where cache-sized chunks would mean thousands of tiny kernel launches
    scan_chunk_bytes_gpu: int = 256 << 20
    # a quantised CPU bank up to this size (and a quarter of the memory available then) is packed into one
    # (N, P) int8 array on load, for the fused scan's one parallel loop over rows (``RotatedBank._pack``); a
    # bigger one keeps its memory maps, which the OS may page out.  0: never pack
    pack_max_bytes: int = 2 << 30
    # bytes of G x P' float32 damped queries one grid pass over rows held in memory may take (stored and
    # compressed banks, TRAK's rows): above it the coarse grid, then one pass per damping (``scoring.choose_grid``)
    grid_max_bytes: int = 256 << 20
    # (example, draw) rows per batch of the compressed bank's hooks pass (``build_compressed_bank``'s
    # ``grad_batch`` is this over M): bounds its activation memory at CIFAR scale
    hook_rows: int = 128
    # images per chunk of pixel similarity's float64 centring and dot products (``pixel_cosine``): each
    # float64 temporary is 100 MB at CIFAR's 3,072 values per image, and a few are alive at once
    pixel_chunk_rows: int = 4096
    # fewer (t, eps) rows per worker thread are not worth a thread when one query's loss and square-norm
    # gradients share a forward pass (``gradients.shared_forward_grads``)
    min_rows_per_worker: int = 16
    # the streamed bank (``StreamedBank``, no bank on disk): training images per gradient batch of a query's pass,
    # and the bytes of damped queries one pass may score at once (every uncached damping costs a full gradient
    # pass there, so its budget is 16x the in-memory rows')
    streamed_grad_batch: int = 16
    streamed_grid_max_bytes: int = 4 << 30
    # bytes of float32 per-example gradients (batch x P x 4) one gradient batch of a build may hold: TRAK's and
    # D-TRAK's builds and feature sinks (at most ``TRAK.batch_size`` = 32 images) and the stored K-FAC bank's pass
    # (at most 16), ``gradients.budget_batch``.  Why (QA 54 F1/F2): at CIFAR size (P = 35.7M, 143 MB a row) a
    # batch of 32 is 4.6 GB and its copies made those builds peak at 20 GiB; 1 GiB gives 7 rows there, while the
    # digits and mnist models (P under 8.4M) keep their full batches.  Peak of a build ~ a few times this, plus
    # the model
    gradient_batch_bytes: int = 1 << 30
    # bytes the (example, draw) rows of one batch of the K-FAC factor pass (at most ``KFACInfluence.factor_batch`` =
    # 256) and of the compressed bank's hooks pass (at most ``hook_rows``) may hold, each row costing
    # ``curvature.pass_row_bytes`` (its saved activations twice, plus its widest unfolded input twice, measured by one
    # forward of one row).  Why (QA 62 F1/F2): at CIFAR size (~122 MB a row by that bound) 256 rows passed 13 GB and
    # the hooks pass's 64 rows 10.3 GB; 2 GiB gives 17 rows there, while digits (1.0 MB a row) and mnist (6.3 MB)
    # keep their 256-row batches, so their factors are the same bytes
    factor_batch_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        from .validation import check_compute_config

        check_compute_config(self)


COMPUTE = ComputeConfig()  # the defaults: what code that is given no ComputeConfig uses


# AttributionConfig's damping fields, one per method that takes a configured damping: what an export names
# ``<field>_default`` (engine.attribution.provenance) and what a result file's settings compare apart from the rest
# (engine.evaluation.report)
DAMPING_FIELDS = tuple(f.name for f in dataclasses.fields(AttributionConfig) if f.name.endswith("_damping"))


# AttributionConfig fields that choose which caches a command builds and reads, and the flag that sets
# each on every attribution command (the option's dest is the field's name): the CLI reads these flags
# into the config, and the session writes them back into the build commands it prints
SETTING_FLAGS = {
    "mc_samples": "--mc-samples", "trak_dim": "--trak-dim", "kfac_bank": "--kfac-bank", "draws": "--draws",
    "query_draws": "--query-draws", "kfac_blocks": "--kfac-blocks", "kfac_factor_draws": "--kfac-factor-draws",
    "kfac_factor_draws_mode": "--kfac-factor-draws-mode", "kfac_factor_dtype": "--kfac-factor-dtype",
    "kfac_projection": "--kfac-projection",
    "kfac_compression": "--kfac-compression", "kfac_rerank": "--kfac-rerank",
    "kfac_rerank_split": "--kfac-rerank-split", "seed": "--attribution-seed",
}


# Monte Carlo draws of a TRUE measurement (a retrained model's loss in the LDS, retrain-top, group-retrain):
# the figure the predictions are compared with, so many more draws than an attribution's M; every default
# of it (``MeasureSpec``, the evaluation functions, the CLI's --true-mc-samples) is this one number
TRUE_MC_SAMPLES = 1024

# The authors' best TRAK / D-TRAK dampings on TRAK's unnormalised scale (sum over examples);
# ours is on the scale of G for the mean loss, i.e. these divided by N (docs/architecture.md §4).
TRAK_UNNORMALISED_DAMPING = {"trak": 1e-1, "dtrak": 1.0}


def trak_default_damping(config: AttributionConfig, method: str, num_train: int) -> float:
    """The configured damping of ``method`` ("trak" | "dtrak"), or, when it is None, the
    authors' best value on TRAK's scale divided by the actual training-set size N."""
    value = config.trak_damping if method == "trak" else config.dtrak_damping
    if value is not None:
        return float(value)
    if num_train < 1:
        raise ValueError(f"training-set size must be positive, got {num_train}")
    return TRAK_UNNORMALISED_DAMPING[method] / int(num_train)


# Settings added after caches were first built, with the value those caches were built with:
# ``attribution_key`` leaves a field out while it has that value, so existing cache keys stay valid.
KEY_NEUTRAL = {"draws": "shared", "kfac_blocks": "separate", "query_draws": "own", "kfac_factor_dtype": "float32"}


def attribution_settings(config: AttributionConfig, num_train: int) -> dict[str, Any]:
    """``asdict(config)`` whole, dampings resolved for this training-set size: what an export records (QA
    round 21: exports used the cache key, which leaves out settings at their old defaults, so a record said
    nothing of the query draws or the block layout)."""
    d = dataclasses.asdict(config)
    d["trak_damping"] = trak_default_damping(config, "trak", num_train)
    d["dtrak_damping"] = trak_default_damping(config, "dtrak", num_train)
    return d


def attribution_key(config: AttributionConfig, num_train: int) -> dict[str, Any]:
    """``asdict(config)`` as a cache key: dampings resolved for this training-set size and the
    fields of ``KEY_NEUTRAL`` only when they differ from the value older caches were built with."""
    d = attribution_settings(config, num_train)
    for name, neutral in KEY_NEUTRAL.items():
        if d.get(name) == neutral:
            d.pop(name)
    return d


@dataclass(frozen=True)
class Preset:
    """A full experiment: model, diffusion, data, training and attribution settings, and the speed and memory
    settings it is computed with (``compute``: never part of the answer, so never part of a key)."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict[str, Any]:
        """The experiment: every section but ``compute``.  What a checkpoint's config.json records (and its
        hash, every cache's key, covers) and what a run's recipe is made from: a preset that differs only in
        how fast or in how much memory it runs names the same checkpoint and the same caches.  ``to_json``
        (a preset file) keeps the compute section."""
        d = dataclasses.asdict(self)
        d.pop("compute")
        return d

    def _file_dict(self) -> dict[str, Any]:
        """``to_dict`` plus the compute section when it is not the defaults: a preset file's contents."""
        d = self.to_dict()
        if self.compute != ComputeConfig():
            d["compute"] = dataclasses.asdict(self.compute)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> Preset:
        """A preset from its JSON form; every value's type is checked against the dataclass field.

        ``strict``: unknown keys (a misspelt ``modle``, ``mc_sample``) are errors
        (``InvalidSettingError``); a checkpoint's own config is read with ``strict=False`` so that
        one written by a newer version with extra fields still loads.
        """
        import typing

        from .validation import InvalidSettingError, coerce_field

        if not isinstance(d, dict):
            raise InvalidSettingError(f"a preset must be a JSON object, got {type(d).__name__}")
        sections = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
                    "train": TrainConfig, "attribution": AttributionConfig, "compute": ComputeConfig}
        unknown = sorted(set(d) - set(sections) - {"name"})
        if strict and unknown:
            raise InvalidSettingError(
                f"unknown preset key(s) {', '.join(unknown)}; valid keys: name, {', '.join(sections)}"
            )

        def build(section, klass, values):
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise InvalidSettingError(f"preset section {section!r} must be a JSON object, got {values!r}")
            hints = typing.get_type_hints(klass)
            names = [f.name for f in dataclasses.fields(klass)]
            bad = sorted(set(values) - set(names))
            if strict and bad:
                raise InvalidSettingError(
                    f"unknown key(s) {', '.join(f'{section}.{k}' for k in bad)}; valid keys of {section}: {', '.join(names)}"
                )
            kwargs = {k: coerce_field(section, k, hints[k], v) for k, v in values.items() if k in names}
            return klass(**kwargs)

        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise InvalidSettingError(f"preset name must be a string, got {name!r}")
        # the name becomes folders (runs/<name>, the cache's <name>-n...): "../../x" would point outside them
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
            raise InvalidSettingError(f"preset name must be letters, digits, '_', '-' or '.' (a folder name, "
                                      f"no '..'), got {name!r}")
        return cls(
            name=name,
            **{section: build(section, klass, d.get(section)) for section, klass in sections.items()},
        )

    def replace(self, **sections: Any) -> Preset:
        """Return a copy with whole sections or fields of sections replaced.

        ``preset.replace(train={"steps": 10})`` changes one field of one section.
        """
        kwargs: dict[str, Any] = {}
        for key, value in sections.items():
            if isinstance(value, dict):
                kwargs[key] = dataclasses.replace(getattr(self, key), **value)
            else:
                kwargs[key] = value
        return dataclasses.replace(self, **kwargs)

    def to_json(self) -> str:
        """The preset as a file ``preset_file`` reads back: ``to_dict`` and a non-default compute section."""
        return json.dumps(self._file_dict(), indent=2, sort_keys=True)


def _cifar_model() -> ModelConfig:
    # Ho et al. (2020) CIFAR-10 U-Net: ch 128, mults (1, 2, 2, 2), 2 res blocks,
    # attention at 16x16, dropout 0.1, ~36-38M parameters.
    return ModelConfig(
        image_size=32,
        in_channels=3,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_groups=32,
    )


def _cifar_train(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=128,
        lr=1e-4,
        warmup_frac=0.1,
        grad_clip=1.0,
        ema_decay=0.999,
        log_every=100,
        checkpoint_every=2000,
    )


def _mnist_preset() -> Preset:
    """28x28 MNIST sized for 2 CPU cores (on the shared, loaded machine: 1.2 s per batch-32 step).

    - U-Net: base 12 channels, mults (1, 2, 4) -> resolutions 28, 14, 7 (28 = 4 x 7, so the
      stride-2 convolutions and the x2 up-sampling meet exactly; no padding), one residual
      block per level, self-attention only in the 7x7 middle; 358,933 parameters (base 16:
      636k parameters, 1.8x the step time).
    - T = 100 with the linear schedule rescaled by 1000/T (beta 1e-3 .. 0.2, the usual
      rescaling that keeps alpha_bar_T ~ e^-10): sampling and trajectories cost a tenth of
      T = 1000, which keeps sampling a new query in the app at a few seconds on a CPU.
    - Data: the shipped 10,000 real digits, 100 per class (N = 1,000, seed 0), because every
      attribution method needs per-example gradients of all N examples (N x M backward
      passes) and they must build within minutes on a CPU.
    """
    return Preset(
        name="mnist",
        model=ModelConfig(
            image_size=28,
            in_channels=1,
            base_channels=12,
            channel_mults=(1, 2, 4),
            num_res_blocks=1,
            attn_resolutions=(),
            num_groups=4,
        ),
        diffusion=DiffusionConfig(num_timesteps=100, beta_start=1e-3, beta_end=0.2),
        data=DataConfig(name="mnist", image_size=28, channels=1, levels=256, per_class=100),
        # 16,000 steps (512 epochs): against 8,000, K-FAC's top-10 label agreement over 512 fresh samples
        # 0.730 -> 0.810 and the sample-quality ratio 0.908 -> 0.976
        # (docs/mnist_investigations.md, "The gallery's 32 samples")
        train=TrainConfig(
            steps=16000,
            batch_size=32,
            lr=2e-3,
            warmup_frac=0.05,
            ema_decay=0.995,
            log_every=25,
            checkpoint_every=250,
        ),
        # shared draws, and the query gradient on the bank's draws (common random numbers): on the
        # mnist LDS subsets (K=16, Q=96) this raised every gradient method's LDS (K-FAC +0.177 -> +0.267,
        # paired difference +0.090 [+0.028, +0.157]) and K-FAC's gallery top-10 label agreement
        # 0.59 -> 0.73 (docs/mnist_investigations.md, "Common random numbers"); per-example draws
        # were measured no worse on digits only (README, "Evaluation on the digits default")
        attribution=AttributionConfig(mc_samples=16, draws="shared", query_draws="bank"),
    )


PRESETS: dict[str, Preset] = {
    # factors from 8 of the 64 per-example draws: measured on the K=32 digits LDS subsets (README)
    "digits": Preset(name="digits", attribution=AttributionConfig(kfac_factor_draws=8)),
    "mnist": _mnist_preset(),
    "cifar2": Preset(
        name="cifar2",
        model=_cifar_model(),
        data=DataConfig(name="cifar2", image_size=32, channels=3, levels=256, flip=True),
        train=_cifar_train(32_000),
        attribution=AttributionConfig(mc_samples=250),
    ),
    "cifar10": Preset(
        name="cifar10",
        model=_cifar_model(),
        data=DataConfig(name="cifar10", image_size=32, channels=3, levels=256, flip=True),
        train=_cifar_train(200_000),
        # 128x: the compressed bank of 50,000 CIFAR-size rows is 14 GB (32x, the other presets' ratio: 56 GB, QA 54
        # F4); on digits 128x lists the same re-ranked top-10 as 32x (README "Compressed K-FAC bank")
        attribution=AttributionConfig(mc_samples=250, kfac_compression=128.0),
    ),
}


def get_preset(name: str, data_root: str | None = None) -> Preset:
    """Look up a preset by name, or load one from a JSON file path; ``data_root`` (``--data-root``, the
    CLI's and the app's) replaces its data folder.  A relative data folder is made absolute here, against the
    current folder it was meant from: a run records its preset, and a later command started elsewhere (the app
    from the repository) read ``data/x`` against its own folder and found nothing (QA 26 #4)."""
    preset = _named_preset(name)
    if data_root:
        preset = preset.replace(data={"root": data_root})
    return with_absolute_data_root(preset, Path.cwd())


def with_absolute_data_root(preset: Preset, base: str | Path) -> Preset:
    """``preset`` with a relative data folder taken from ``base`` (the folder it was given in, or the folder a
    preset file travels with), so that what a run records is found from any folder; unchanged otherwise."""
    root = preset.data.root
    if not root or Path(root).expanduser().is_absolute():
        return preset
    return preset.replace(data={"root": str((Path(base) / root).resolve())})


def _on_base(raw: dict[str, Any]) -> dict[str, Any]:
    """A preset file's ``{"base": "digits", "attribution": {"seed": 1}}``: the shipped preset ``base``, with the
    file's values put over it section by section (QA round 21: a file naming only what it changes got the
    dataclasses' defaults for the rest, not the preset's: "digits with seed 1" was not digits).  The name is
    the base's unless the file gives one."""
    from .validation import InvalidSettingError

    raw = dict(raw)
    base = raw.pop("base")
    if base not in PRESETS:
        raise InvalidSettingError(f"base {base!r} is not a shipped preset; choose one of {sorted(PRESETS)}")
    merged = PRESETS[base]._file_dict()
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _named_preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith(".json"):
        return preset_file(name)
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or a .json path")


def preset_file(name: str | Path) -> Preset:
    """A preset JSON file: a whole preset, or ``{"base": NAME, ...}`` over a shipped one; checked, and refused
    with the file's name in one ``InvalidSettingError`` line."""
    from .validation import InvalidSettingError, check_preset

    name = str(name)
    try:
        with open(name) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise InvalidSettingError(f"preset file {name} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSettingError(f"preset file {name} is not readable JSON: {e}") from None
    try:
        if isinstance(raw, dict) and "base" in raw:
            raw = _on_base(raw)
        preset = Preset.from_dict(raw)
        check_preset(preset)
    except InvalidSettingError as e:
        raise InvalidSettingError(f"preset file {name}: {e}") from None
    return preset
