"""Run configuration: typed sections, YAML recipes and `key=value` overrides.

A run is described by one `RunConfig`: the model (a registered name plus constructor arguments), the task,
the data and the training hyper-parameters. Recipes are YAML files with the same sections; overrides such as
`train.lr=3e-4` or `model.depth=6` are parsed as YAML scalars and converted to the annotated type of the
field (model arguments take their types from the model constructor's annotations). Unknown keys are errors
that name the nearest valid key.

Every value is also checked against its meaning when a config is built or a run starts (`RunConfig.validate`):
each field carries a `Rule` beside its declaration (bounds, finiteness, a pattern, and whether a resumed run may
change it), each section's `validate` adds the rules that tie its fields together, and `MODEL_ARG_RULES` covers
model constructor arguments by name. So a bad value is one sentence before anything is written.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import UserError, nearest
from ..registry import get_entry, resolve_model_args

RECIPE_DIRS = (
    Path(__file__).resolve().parent.parent / "configs",  # installed wheel
    Path(__file__).resolve().parents[3] / "configs",  # source checkout / editable install
)


RUN_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*"
"""A run name is one directory name: no separators and no leading dot, so it cannot escape out_dir."""


@dataclass(frozen=True)
class Rule:
    """The values a config field (or model argument) may take, checked when a config is resolved.

    Bounds apply to numbers and to every item of a tuple; every number must also be finite (NaN and ±inf
    are never a meaningful setting); `pattern` is a regular expression a whole string must match. None
    passes for an optional field.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None
    meaning: str | None = None
    """What the allowed values are, in words, for the error (default: the bounds or the pattern)."""
    fixed: bool = False
    """The field shapes the trajectory of training, so a resumed run may not change it (unless forced)."""

    def check(self, key: str, value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (tuple, list)):
            for item in value:
                self.check(key, item)
            return
        if isinstance(value, str):
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise UserError(f"{key} must be {self.meaning or 'text matching ' + self.pattern}, got {value!r}.")
            return
        if not isinstance(value, (int, float)):
            return
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}.")
        bounds = [(b, word, ok) for b, word, ok in (
            (self.gt, "greater than", lambda b: value > b), (self.ge, "at least", lambda b: value >= b),
            (self.lt, "less than", lambda b: value < b), (self.le, "at most", lambda b: value <= b)) if b is not None]
        if not all(ok(b) for b, _, ok in bounds):
            wanted = " and ".join(f"{word} {b:g}" for b, word, _ in bounds)
            raise UserError(f"{key} must be {self.meaning or wanted}, got {value}.")


PROBABILITY = {"ge": 0, "le": 1, "meaning": "a probability, from 0 to 1"}


def checked(default: Any, **rule) -> Any:
    """A dataclass field with `default` and the `Rule` its values must follow (see `Rule`)."""
    return field(default=default, metadata={"rule": Rule(**rule)})


def check_fields(obj: Any, section: str) -> None:
    """Checks every field of a config section against its `Rule`."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        if rule is not None:
            rule.check(f"{section}.{f.name}", getattr(obj, f.name))


def fixed_on_resume(obj: Any) -> list[str]:
    """Names of the fields of a section that a resumed run may not change (their `Rule` is `fixed`)."""
    return [f.name for f in dataclasses.fields(obj) if getattr(f.metadata.get("rule"), "fixed", False)]


@dataclass
class DataConfig:
    """Where the examples come from and how they are batched and augmented."""

    source: str = checked("digits", pattern=r".+", meaning="a dataset name or a path")
    """Images: 'digits' (embedded, no download), an image-folder directory, or a .tar/.tar.gz archive of one.
    Text: 'shakespeare' (embedded, no download), a UTF-8 text file, a directory of .txt files, or a token file
    (.bin with its .json sidecar, see polyattn.data.text)."""
    image_size: int | None = checked(None, ge=1)
    """Resize images to this size (shorter side, then centre crop); None keeps the stored size."""
    test_fraction: float = checked(0.2, gt=0, lt=1)
    """Share of each class held out as the test split when the source has no train/test folders."""
    val_fraction: float = checked(0.0, ge=0, lt=1)
    """Images: share of the training split held out for validation during training; 0 evaluates on the test
    split. Text: the last share of the token stream, held out for validation (and test); text recipes use 0.1."""
    crop: Literal["pad", "resized", "none"] = "pad"
    """Training crop: random crop after zero padding, random-resized crop, or none."""
    crop_padding: int = checked(4, ge=0)
    """Zero padding in pixels for crop='pad'."""
    crop_scale: tuple[float, float] = checked((0.35, 1.0), gt=0, le=1)
    """Area range for crop='resized'."""
    hflip: bool = True
    """Random horizontal flips (turn off for data that is not mirror-symmetric, such as digits)."""
    randaugment_ops: int = checked(0, ge=0, le=13)
    """RandAugment: operations applied to each training image (0 = off; DeiT: 2). Needs kornia."""
    randaugment_magnitude: float = checked(9.0, gt=0, lt=10)
    """RandAugment magnitude on the 0-10 scale of timm and DeiT ('rand-m9'), strictly between 0 and 10."""
    random_erase: float = checked(0.0, **PROBABILITY)
    """Probability of erasing one random rectangle of a training image (0 = off; DeiT: 0.25). Needs kornia."""
    mixup_alpha: float = checked(0.0, ge=0)
    """Mixup: λ ~ Beta(α, α) per batch; 0 = off (DeiT: 0.8). Targets become soft; see polyattn.data.transforms."""
    cutmix_alpha: float = checked(0.0, ge=0)
    """CutMix: λ ~ Beta(α, α) per batch; 0 = off (DeiT: 1.0)."""
    mix_prob: float = checked(1.0, **PROBABILITY)
    """Probability that a training batch is mixed, when mixup_alpha or cutmix_alpha is > 0."""
    mix_switch_prob: float = checked(0.5, **PROBABILITY)
    """With both alphas > 0: probability that a mixed batch uses cutmix rather than mixup."""
    eval_batch_size: int = checked(512, ge=1)
    """Images per evaluation batch; for text, windows of seq_len tokens per evaluation batch."""
    tokenizer: Literal["byte", "bpe"] = "byte"
    """Text: 'byte' (UTF-8 bytes, 256 ids) or 'bpe' (byte-level BPE trained on the training text and saved in the
    run directory as tokenizer.json)."""
    vocab_size: int = checked(4096, ge=257)
    """Text with tokenizer=bpe: vocabulary size to train (the 256 bytes and <|endoftext|> included)."""
    seq_len: int = checked(256, ge=1)
    """Text: tokens per training window (each token is predicted from up to seq_len tokens before it)."""
    eval_tokens: int | None = checked(None, ge=1)
    """Text: score at most this many tokens of the evaluated split; None scores all of it."""
    eval_stride: int | None = checked(None, ge=1)
    """Causal LM evaluation: windows of seq_len advance by this many tokens and score their last eval_stride
    targets, so every scored target has at least seq_len − eval_stride tokens of context (the first ones of the
    split are not scored); None = seq_len, consecutive windows. Perceiver models need it ≤ their latents."""
    mean: tuple[float, ...] | None = checked(None, ge=0, le=1)
    """Per-channel normalisation mean (0..1 scale); None computes it from the training split."""
    std: tuple[float, ...] | None = checked(None, gt=0)
    """Per-channel normalisation std; None computes it from the training split."""

    def validate(self) -> None:
        """The field rules, then the rules that tie fields of this section together."""
        check_fields(self, "data")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise UserError(f"data.crop_scale must be (min, max) with min ≤ max, got {list(self.crop_scale)}.")
        if self.eval_stride is not None and self.eval_stride > self.seq_len:
            raise UserError(f"data.eval_stride ({self.eval_stride}) must be at most data.seq_len ({self.seq_len}); "
                            f"windows cannot advance by more than their length.")
        if (self.mean is None) != (self.std is None):
            raise UserError("data.mean and data.std go together: set both (one value per channel) or neither "
                            "(then both are computed from the training split).")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise UserError(f"data.mean has {len(self.mean)} values but data.std {len(self.std)}; give one per "
                            f"channel in both.")


@dataclass
class TaskConfig:
    """What is learned and measured (see polyattn.tasks)."""

    label_smoothing: float = checked(0.1, ge=0, lt=1)
    """Classification: label smoothing of the cross-entropy (0 = off; DeiT: 0.1)."""
    ece_bins: int = checked(15, ge=1)
    """Classification: confidence bins of the expected calibration error and the reliability diagram."""
    label_dropout: float = checked(0.1, ge=0, lt=1)
    """Diffusion: probability of training on the null label instead of the class (classifier-free guidance)."""
    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    """Diffusion: distribution of the flow time t in training: sigmoid of a standard normal, or uniform."""
    eval_images: int | None = checked(None, ge=1)
    """Diffusion: evaluate the loss on at most this many images of the split (a fixed subset); null = all."""
    mask_prob: float = checked(0.15, gt=0, le=1)
    """Masked LM: share of the real tokens of each window selected for prediction (BERT: 0.15)."""
    mask_replace: float = checked(0.8, **PROBABILITY)
    """Masked LM: share of the selected tokens replaced by [MASK] (BERT: 0.8)."""
    mask_random: float = checked(0.1, **PROBABILITY)
    """Masked LM: share of the selected tokens replaced by a random token (BERT: 0.1); the rest stay unchanged."""

    def validate(self) -> None:
        check_fields(self, "task")
        if self.mask_replace + self.mask_random > 1:
            raise UserError(f"task.mask_replace + task.mask_random must be at most 1 (shares of the selected "
                            f"tokens), got {self.mask_replace} + {self.mask_random}.")


@dataclass
class TrainConfig:
    """The optimisation loop; it knows nothing about particular models."""

    epochs: int = checked(10, ge=1, fixed=True)
    """Length of training in passes over the training split (see also steps, max_steps, time_budget_s)."""
    steps: int | None = checked(None, ge=1, fixed=True)
    """Length of training in optimizer steps, when it should not be a whole number of epochs; None = epochs ×
    steps per epoch. Warmup keeps its share warmup_epochs / epochs of it."""
    batch_size: int = checked(128, ge=1, fixed=True)
    """Samples per optimizer step (split into `accumulation_steps` micro-batches)."""
    accumulation_steps: int = checked(1, ge=1, fixed=True)
    """Micro-batches per optimizer step (gradients are summed; batch_size must be a multiple of it)."""
    lr: float = checked(1e-3, gt=0, fixed=True)
    """Peak learning rate of AdamW, reached after the warmup."""
    min_lr: float = checked(1e-5, ge=0, fixed=True)
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = checked(1.0, ge=0, fixed=True)
    """Linear warmup from 0 to lr, in epochs (fractions allowed)."""
    weight_decay: float = checked(0.05, ge=0, fixed=True)
    """AdamW weight decay (not applied to norms, biases, embeddings and position tables)."""
    betas: tuple[float, float] = checked((0.9, 0.999), ge=0, lt=1, fixed=True)
    """AdamW's moment decay rates (β1, β2)."""
    grad_clip: float | None = checked(1.0, gt=0, fixed=True)
    """Clip the global gradient norm to this value; null disables clipping."""
    max_bad_steps: int = checked(3, ge=1)
    """A step whose loss or gradient norm is not finite is skipped (no update); after this many in a row,
    training stops, keeping the last checkpoint whose weights gave a finite loss."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bfloat16 autocast where the device computes bfloat16 products natively (CPUs with AVX-512 BF16 or
    AMX, CUDA GPUs that support it), float32 elsewhere (polyattn.hardware says why); bf16: bfloat16 autocast with
    float32 master weights (about 100x slower than fp32 on AVX2-only CPUs; warned); fp16: float16 autocast with a
    gradient scaler, for CUDA GPUs without bfloat16; fp32: no autocast. A resumed run keeps the precision it
    started with, so it stays exact."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    threads: int | None = checked(None, ge=1)
    """CPU threads for torch; None leaves torch's default."""
    seed: int = checked(0, ge=0, lt=2**32, fixed=True)
    """Seed of the initialisation, the data order and the augmentation (runs on a CPU repeat exactly)."""
    eval_every: int = checked(1, ge=1)
    """Evaluate every this many epochs (and always at the end)."""
    checkpoint_every: int | None = checked(None, ge=1)
    """Also checkpoint every this many optimizer steps; checkpoints are always written at each epoch end and
    when training stops (at its end, on SIGTERM or Ctrl-C)."""
    checkpoint_every_s: float | None = checked(300.0, gt=0)
    """Also checkpoint once this many seconds (wall clock) have passed since the last checkpoint; null = off."""
    max_steps: int | None = checked(None, ge=1)
    """Stop after this many optimizer steps (for smoke tests); the schedule still spans all epochs."""
    time_budget_s: float | None = checked(None, gt=0, fixed=True)
    """Stop once this many seconds of training (evaluation excluded) have passed, or after `epochs`, whichever
    comes first. The learning-rate and soft-mask schedules then run on the larger of the two fractions (steps
    done / epochs' steps, time used / budget), so they keep their shape and end on time; set `epochs` to the
    length the budget stands for (warmup keeps its share warmup_epochs / epochs). Stopping on time makes runs
    unrepeatable step for step."""
    ema_decay: float | None = checked(None, gt=0, lt=1, fixed=True)
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up over the first
    updates); evaluation, `polyattn eval` and sampling then use the averaged weights (saved as ema.safetensors)."""
    soft_mask: Literal["none", "constant", "linear"] = checked("none", fixed=True)
    """iLLaMA soft-mask schedule passed to the model as `soft_mask_a` (see polyattn.train.schedules)."""
    soft_mask_cutoff: float = checked(0.0, ge=0, le=1, fixed=True)
    """Fraction of training over which the soft mask is on (the paper: 50/300 epochs ≈ 0.17)."""
    soft_mask_a0: float = checked(1.0, **PROBABILITY, fixed=True)
    """Initial soft-mask value (1 = bidirectional)."""
    log_every: int = checked(10, ge=1)
    """Log training loss and learning rate every this many optimizer steps."""
    out_dir: str = checked("runs", pattern=r".+", meaning="a directory path")
    """Folder the run directory is created in."""
    run_name: str | None = checked(None, pattern=RUN_NAME, meaning="one directory name inside train.out_dir "
                                   "(letters, digits and _ . + = -, not starting with a dot)")
    """Directory name under out_dir; None builds one from the recipe, model and time."""
    progress: bool = True
    """Show progress bars (training, evaluation, decoding) on the terminal."""

    def validate(self) -> None:
        check_fields(self, "train")
        if self.batch_size % self.accumulation_steps:
            raise UserError(f"train.batch_size {self.batch_size} is not divisible by train.accumulation_steps "
                            f"{self.accumulation_steps}; make it a multiple.")
        if self.min_lr > self.lr:
            raise UserError(f"train.min_lr ({self.min_lr:g}) must be at most train.lr ({self.lr:g}), where the "
                            f"cosine schedule ends and starts.")


@dataclass
class ModelConfig:
    """A registered model name and the constructor arguments that override the variant's defaults."""

    name: str = "vit_nano"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    recipe: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    environment: dict[str, Any] | None = None
    """What the run resolved when it started: device and its name, CPU and ISA level, threads, torch, and the
    precision `auto` chose with the reason (polyattn.hardware.environment). Written by the training loop; a
    record, not an input."""
    deploy: list[dict[str, Any]] | None = None
    """The transforms applied to the trained weights, in order (quantization: method, source run, the modules it
    replaced); `load_run` rebuilds them before loading the weights (polyattn.deploy.record). Written by `polyattn
    quantize`; a record, not an input."""

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "task", "data", "train")

    def validate(self) -> None:
        """Checks every value against its meaning (see `Rule` and each section's `validate`), so a bad setting
        is one sentence before anything is written."""
        for section in ("data", "task", "train"):
            getattr(self, section).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready form: the model section is flattened to `name` plus its arguments."""
        out = {"recipe": self.recipe, "model": {"name": self.model.name, **_plain(self.model.args)}}
        for section in ("task", "data", "train"):
            out[section] = _plain(dataclasses.asdict(getattr(self, section)))
        if self.environment is not None:
            out["environment"] = _plain(self.environment)
        if self.deploy is not None:
            out["deploy"] = _plain(self.deploy)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, origin: str) -> RunConfig:
        """Builds and type-checks a config from a recipe or a run directory's config.yaml."""
        if not isinstance(raw, dict):
            raise UserError(f"{origin} must be a YAML mapping with sections {', '.join(cls.SECTIONS)}.")
        config = cls()
        for key, value in raw.items():
            if key == "recipe":
                config.recipe = str(value)
                continue
            if key == "environment":
                config.environment = dict(value) if isinstance(value, dict) else None
                continue
            if key == "deploy":
                if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                    raise UserError(f"'deploy' in {origin} must be a list of transform records; it is written by "
                                    f"`polyattn quantize`, restore the file that command wrote.")
                config.deploy = [dict(v) for v in value]
                continue
            if key not in cls.SECTIONS:
                raise UserError(f"Unknown section '{key}' in {origin}.{nearest(key, cls.SECTIONS)}")
            if not isinstance(value, dict):
                raise UserError(f"Section '{key}' in {origin} must be a mapping of keys to values.")
            for sub, sub_value in value.items():
                config.set(f"{key}.{sub}", sub_value, origin=origin)
        return config

    def set(self, key: str, value: Any, *, origin: str = "the command line") -> None:
        """Sets one dotted key (`train.lr`, `model.depth`, or `model` for the model name), type-checked."""
        section, _, name = key.partition(".")
        if section not in self.SECTIONS:
            valid = [f"{s}.{f}" for s in ("task", "data", "train") for f in _fields(getattr(self, s))]
            raise UserError(f"Unknown key '{key}' in {origin}.{nearest(key, [*valid, 'model', 'model.name'])}")
        if section == "model":
            if name in ("", "name"):
                get_entry(str(value))  # fails early, naming the nearest model
                self.model = ModelConfig(name=str(value), args=self.model.args)
                return
            self.model.args[name] = value  # checked against the constructor in resolve()
            return
        target = getattr(self, section)
        fields = _fields(target)
        if name not in fields:
            valid = [f"{section}.{f}" for f in fields]
            raise UserError(f"Unknown key '{key}' in {origin}.{nearest(key, valid)}")
        hints = typing.get_type_hints(type(target))
        setattr(target, name, coerce(value, hints[name], key))

    def resolved_model_args(self, **inferred) -> dict[str, Any]:
        """Full constructor arguments: the variant's defaults, then values inferred from the data (only
        where the user did not set them), then the user's arguments, each converted to its annotated type."""
        entry = get_entry(self.model.name)
        params = entry.parameters()
        hints = typing.get_type_hints(entry.cls.__init__)
        args = {}
        for key, value in {**{k: v for k, v in inferred.items() if k in params}, **self.model.args}.items():
            if key not in params:
                raise UserError(f"Model '{self.model.name}' has no argument '{key}'.{nearest(key, params)}")
            args[key] = coerce(value, hints.get(key, Any), f"model.{key}")
        args = resolve_model_args(self.model.name, **args)
        for key, value in args.items():
            rule = MODEL_ARG_RULES.get(key)
            if rule is not None:
                rule.check(f"model.{key}", value)
        return args


_POSITIVE, _RATE = Rule(ge=1), Rule(ge=0, lt=1)
MODEL_ARG_RULES: dict[str, Rule] = {
    **dict.fromkeys(("depth", "dim", "embed_dim", "num_heads", "num_kv_heads", "num_classes", "num_latents",
                     "num_segments", "segment_len", "compressed_len", "patch_size", "img_size", "in_chans",
                     "out_chans", "max_seq_len", "chunk_size", "vocab_size", "ffn_multiple_of", "mlp_hidden_dim",
                     "s2_group_size", "directions"), _POSITIVE),
    **dict.fromkeys(("drop_path_rate", "drop_rate", "dropout", "cross_attn_dropout"), _RATE),
    **dict.fromkeys(("mlp_ratio", "norm_eps", "rope_base", "scale"), Rule(gt=0)),
}
"""Rules for model constructor arguments by name, shared by every model that uses the name: sizes and counts
are positive, dropout-like rates lie in [0, 1), scales are positive."""


def _fields(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _plain(value):
    """Converts tuples and enums to YAML-friendly lists and strings, recursively."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it ('3' → 3, 'true' → True, '[1, 2]' → list, 'null' → None)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts `value` to `annotation` (int, float, bool, str, Literal, enums, Optional/unions, tuples, lists),
    or raises a UserError that names the key, the expected type and the value."""
    try:
        return _coerce(value, annotation)
    except (TypeError, ValueError) as err:
        raise UserError(f"{key} expects {_describe(annotation)}, got {value!r}.") from err


def _coerce(value: Any, ann: Any) -> Any:
    if ann is Any or ann is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = parse_scalar(value)
        if isinstance(value, (int, float)) and origin is tuple and args and args[-1] is not Ellipsis:
            value = [value] * len(args)  # `patch_size=4` for a (h, w) pair
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(value)
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return ann(value.value if isinstance(value, enum.Enum) else value)
    if ann is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if ann is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if not isinstance(value, str) else int(value, 10)
    if ann is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)  # also accepts '1e-3', which YAML 1.1 reads as a string
    if ann is str:
        if isinstance(value, (dict, list)):
            raise TypeError(value)
        return str(value)
    if isinstance(ann, type):
        if isinstance(value, ann):
            return value
        raise TypeError(value)
    return value



def _describe(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {len(args)} values" if origin is tuple and Ellipsis not in args else "a list"
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in ann)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann, str(ann))


def find_recipe(name: str) -> Path:
    """A recipe path: an existing file, or a name in configs/ (with or without .yaml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for directory in RECIPE_DIRS:
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = list_recipes()
    raise UserError(f"Unknown recipe '{name}'.{nearest(name, known)} Recipes: {', '.join(known) or 'none found'}.")


def list_recipes() -> list[str]:
    names: set[str] = set()
    for directory in RECIPE_DIRS:
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.yaml"))
    return sorted(names)


def load_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError as err:
        raise UserError(f"File {path} does not exist; check the path.") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}; fix the syntax and try again.") from err


def build_config(recipe: str | None, overrides: list[str]) -> RunConfig:
    """The config of a new run: the recipe (default 'default'), then `key=value` overrides in order."""
    name = recipe or "default"
    path = find_recipe(name)
    config = RunConfig.from_dict(load_yaml(path) or {}, origin=str(path))
    config.recipe = path.stem
    apply_overrides(config, overrides)
    config.validate()
    return config


def apply_overrides(config: RunConfig, overrides: list[str]) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"Override '{item}' is not of the form key=value (for example train.lr=3e-4).")
        config.set(key.strip(), parse_scalar(text), origin="the command line")


def save_yaml(data: Any, path: Path) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# ---- the keys, their types, defaults and help, read from this file ---------------------------------------------

@dataclass(frozen=True)
class ConfigKey:
    """One settable key of the task, data or train section."""

    key: str
    """Dotted name, e.g. `train.lr`."""
    type: str
    """The field's annotation as written in the code, e.g. `float | None`."""
    default: Any
    help: str
    """The attribute docstring under the field, joined into one paragraph."""

    @property
    def summary(self) -> str:
        """The help's first sentence (what `polyattn config` and the README table show)."""
        first = re.split(r"\.\s+(?=[A-Z])", self.help)[0].rstrip(".")
        return first + "." if first else ""


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """`{field: (annotation source, attribute docstring)}` of a dataclass, read from its source with `ast`: the
    docstrings under the fields are the one place each key is documented."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, tuple[str, str]] = {}
    for node, after in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                doc = " ".join(after.value.value.split())
            docs[node.target.id] = (ast.unparse(node.annotation), doc)
    return docs


def config_keys() -> list[ConfigKey]:
    """Every key of the task, data and train sections with its type, default and help, in the code's order."""
    keys = []
    defaults = RunConfig()
    for section in ("task", "data", "train"):
        obj = getattr(defaults, section)
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            annotation, doc = docs.get(f.name, ("", ""))
            keys.append(ConfigKey(f"{section}.{f.name}", annotation, _plain(getattr(obj, f.name)), doc))
    return keys


def format_value(value: Any) -> str:
    """A value as it would be written on the command line or in a recipe (YAML flow style)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


def keys_markdown() -> str:
    """The README's table of keys, generated from `config_keys` (`polyattn config --keys --markdown`)."""
    lines = ["| key | type | default | what it sets |", "|---|---|---|---|"]
    for k in config_keys():
        text = k.help.replace("|", "\\|")
        lines.append(f"| `{k.key}` | `{k.type.replace('|', '∣')}` | `{format_value(k.default)}` | {text} |")
    return "\n".join(lines) + "\n"


FROM_DATA = ("num_classes", "in_chans", "img_size", "vocab_size")
"""Model arguments that the task's job infers from the data (`inferred_model_args`) unless the user sets them."""


def describe_config(config: RunConfig, *, origin: str) -> str:
    """The resolved config as YAML that could be a recipe, each key commented with its type, its default when the
    recipe or an override changed it, and its one-line help (`polyattn config RECIPE`)."""
    entry = get_entry(config.model.name)
    hints = typing.get_type_hints(entry.cls.__init__)
    model_args = config.resolved_model_args()
    lines = [f"# {origin}", f"recipe: {config.recipe}", "model:",
             f"  name: {config.model.name}  # {entry.cls.__name__} ({entry.task}): {entry.description}"]
    defaults = resolve_model_args(config.model.name)
    for name, value in model_args.items():
        note = "" if name not in config.model.args else f", default {format_value(defaults.get(name))}"
        if name in FROM_DATA and name not in config.model.args:
            note = ", set from the data when training starts"
        lines.append(f"  {name}: {format_value(value)}  # {_type_text(hints.get(name, Any))}{note}")
    base = RunConfig()
    by_key = {k.key: k for k in config_keys()}
    for section in ("task", "data", "train"):
        lines.append(f"{section}:")
        for f in dataclasses.fields(getattr(config, section)):
            k = by_key[f"{section}.{f.name}"]
            value = _plain(getattr(getattr(config, section), f.name))
            changed = value != _plain(getattr(getattr(base, section), f.name))
            note = f", default {format_value(k.default)}" if changed else ""
            lines.append(f"  {f.name}: {format_value(value)}  # {k.type}{note}; {k.summary}")
    return "\n".join(lines) + "\n"


def _type_text(ann: Any) -> str:
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")
