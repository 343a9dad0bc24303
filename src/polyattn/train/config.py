"""Run configuration: typed sections, YAML recipes and `key=value` overrides.

A run is described by one `RunConfig`: the model (a registered name plus constructor arguments), the task, the
data, the training hyper-parameters and the schedules of model inputs. The `task` and `data` sections are those
the model's task declares (`polyattn.tasks.TASKS`: e.g. classification's label smoothing and the image settings,
or a masked LM's masking and the text settings), `train` is the loop's own (`TrainConfig`) and `schedules` maps
model inputs to their `InputSchedule`. Recipes are YAML files with the same sections; overrides such as
`train.lr=3e-4` or `model.depth=6` are parsed as YAML scalars and converted to the annotated type of the field by
`polyattn.settings.coerce` (model arguments take their types from the model constructor's annotations). Unknown
keys are errors that name the nearest valid key; a key of another task's section is an error naming the task.

Every value is also checked against its meaning when a config is built or a run starts (`RunConfig.validate`):
each field carries a `Rule` beside its declaration (bounds, finiteness, a pattern, and whether a resumed run may
change it), each section's `validate` adds the rules that tie its fields together, and `MODEL_ARG_RULES` covers
model constructor arguments by name. So a bad value is one sentence before anything is written.

Spellings that moved: `train.soft_mask`, `train.soft_mask_cutoff` and `train.soft_mask_a0` are read as
`schedules.soft_mask_a.shape`, `.until` and `.start` with a one-line deprecation note (`LEGACY_KEYS`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.config import DataConfig
from ..errors import UserError, nearest
from ..registry import get_entry, model_task, resolve_model_args
from ..settings import (
    Rule,
    Section,
    checked,
    coerce,
    parse_scalar,
    plain,
)
from ..tasks import TASKS, TaskSpec, task_spec
from .schedules import InputSchedule

RECIPE_DIRS = (
    Path(__file__).resolve().parent.parent / "configs",  # installed wheel
    Path(__file__).resolve().parents[3] / "configs",  # source checkout / editable install
)


RUN_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*"
"""A run name is one directory name: no separators and no leading dot, so it cannot escape out_dir."""


@dataclass
class TrainConfig(Section):
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
    """auto: bfloat16 autocast where the device computes bfloat16 products natively and at least as fast as
    float32 ones (CPUs with AMX, or AVX-512 BF16 where it measures so; CUDA GPUs that support it), float32
    elsewhere (polyattn.hardware says why); bf16: bfloat16 autocast with float32 master weights (about 100x slower
    than fp32 on AVX2-only CPUs; warned); fp16: float16 autocast with a
    gradient scaler, for CUDA GPUs without bfloat16; fp32: no autocast. A resumed run keeps the precision it
    started with, so it stays exact."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each repeated block's activations in the backward pass instead of keeping them (less memory, about
    a third more compute; results unchanged)."""
    fsdp: bool = False
    """Distributed runs: shard each repeated block's parameters, gradients and optimizer moments over the
    processes (FSDP2) instead of replicating them (DDP), so each process holds about 1/N of them; for models
    whose weights and optimizer state do not fit one device. Results match DDP's up to rounding; a single process
    ignores it, with a note."""
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
    feature_redraw_every: int | None = checked(None, ge=1, fixed=True)
    """Draw new random features for Performer attention (`model.mixer=performer`) every this many optimizer steps
    (arXiv 2009.14794 §4.3; its common PyTorch port redraws every 1,000); null keeps the features drawn at
    initialisation. The draws are seeded by train.seed and the step, so runs and resumes repeat exactly."""
    init_weights: str | None = checked(None, pattern=r".+", meaning="a weights file path", fixed=True)
    """Start from these weights (a safetensors file of this model, e.g. a run's model.safetensors) instead of the
    initialisation: a fine-tune (the prune command's --finetune-steps sets it to the pruned run's weights)."""
    ema_decay: float | None = checked(None, gt=0, lt=1, fixed=True)
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up over the first
    updates); evaluation, `polyattn eval` and sampling then use the averaged weights (saved as ema.safetensors)."""
    collective_timeout_s: float = checked(60.0, gt=0)
    """Distributed runs: seconds a process waits in a collective for the others before it stops with one sentence
    (a process died or stalled); must exceed the longest gap between two steps (an evaluation, a checkpoint)."""
    log_every: int = checked(10, ge=1)
    """Log training loss and learning rate every this many optimizer steps."""
    out_dir: str = checked("runs", pattern=r".+", meaning="a directory path")
    """Folder the run directory is created in."""
    run_name: str | None = checked(None, pattern=RUN_NAME, meaning="one directory name inside train.out_dir "
                                   "(letters, digits and _ . + = -, not starting with a dot)")
    """Directory name under out_dir; None builds one from the recipe, model and time."""
    progress: bool = True
    """Show progress bars (training, evaluation, decoding) on the terminal."""

    def validate(self, section: str = "train") -> None:
        super().validate(section)
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


LEGACY_KEYS: dict[str, tuple[str, Any]] = {
    "train.soft_mask": ("schedules.soft_mask_a.shape", "none"),
    "train.soft_mask_cutoff": ("schedules.soft_mask_a.until", 0.0),
    "train.soft_mask_a0": ("schedules.soft_mask_a.start", 1.0),
}
"""Old spelling → (new spelling, the old default). The old default is what every run directory of the old
spelling recorded when the feature was off, so it is read as nothing set; `train.soft_mask=none` removes the
schedule."""


@dataclass
class RunConfig:
    recipe: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Section = field(default_factory=lambda: TASKS["classification"].section())
    """The `task` section of the model's task (see `polyattn.tasks.TASKS`)."""
    data: DataConfig = field(default_factory=lambda: TASKS["classification"].data())
    """The `data` section the model's task reads: `ImageDataConfig` or `TextDataConfig`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    schedules: dict[str, InputSchedule] = field(default_factory=dict)
    """Model inputs that change during training, by the name of the forward's keyword (`InputSchedule`)."""
    environment: dict[str, Any] | None = None
    """What the run resolved when it started: device and its name, CPU and ISA level, threads, torch, and the
    precision `auto` chose with the reason (polyattn.hardware.environment). Written by the training loop; a
    record, not an input."""
    given: dict[str, dict[str, Any]] = field(default_factory=lambda: {"task": {}, "data": {}}, repr=False,
                                             compare=False)
    """The task and data values set explicitly (recipe, command line), kept so a change of model re-reads them
    into its task's sections, and a value no section of the model takes is an error at `validate`."""
    deploy: list[dict[str, Any]] | None = None
    """The transforms applied to the trained weights, in order (quantization: method, source run, the modules it
    replaced); `load_run` rebuilds them before loading the weights (polyattn.deploy.record). Written by `polyattn
    quantize`; a record, not an input."""

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "task", "data", "train", "schedules")

    @property
    def task_spec(self) -> TaskSpec:
        """The model's task: its sections and its job."""
        return task_spec(model_task(self.model.name))

    def validate(self) -> None:
        """Checks every value against its meaning (see `Rule` and each section's `validate`), so a bad setting
        is one sentence before anything is written."""
        spec = self.task_spec
        for section in ("task", "data"):
            fields = _fields(getattr(self, section))
            for name in self.given[section]:
                if name not in fields:
                    raise UserError(_foreign_key(section, name, self.model.name, spec))
        for section in ("data", "task", "train"):
            getattr(self, section).validate(section)
        inputs = get_entry(self.model.name).inputs()
        for name, schedule in self.schedules.items():
            if name not in inputs:
                raise UserError(f"schedules.{name} feeds the model input {name}, but '{self.model.name}' takes no "
                                f"such input (it takes {', '.join(inputs) or 'none'}); remove the schedule or "
                                f"choose a model whose forward takes {name} (such as illama_nano for soft_mask_a).")
            schedule.validate(f"schedules.{name}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready form: the model section is flattened to `name` plus its arguments."""
        out = {"recipe": self.recipe, "model": {"name": self.model.name, **plain(self.model.args)}}
        for section in ("task", "data", "train", "schedules"):
            out[section] = plain(getattr(self, section))
        if self.environment is not None:
            out["environment"] = plain(self.environment)
        if self.deploy is not None:
            out["deploy"] = plain(self.deploy)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, origin: str) -> RunConfig:
        """Builds and type-checks a config from a recipe or a run directory's config.yaml.

        The model is read first, since it decides the task and data sections. A key of another task's section at
        its default value is skipped: run directories of versions whose sections held every task's keys wrote
        them all.
        """
        if not isinstance(raw, dict):
            raise UserError(f"{origin} must be a YAML mapping with sections {', '.join(cls.SECTIONS)}.")
        config = cls()
        for key, value in sorted(raw.items(), key=lambda kv: kv[0] != "model"):
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
            if key == "model" and "name" in value:  # the name first: it decides which arguments exist
                value = {"name": value["name"], **value}
            for sub, sub_value in value.items():
                dotted = f"{key}.{sub}"
                if dotted in LEGACY_KEYS and sub_value == LEGACY_KEYS[dotted][1]:
                    continue  # the old spelling's "off", recorded by every run of the old version
                if key in ("task", "data") and sub not in _fields(getattr(config, key)):
                    default = _foreign_default(key, sub)
                    if default is not _MISSING and plain(default) == plain(sub_value):
                        continue
                config.set(dotted, sub_value, origin=origin)
        return config

    def set(self, key: str, value: Any, *, origin: str = "the command line") -> None:
        """Sets one dotted key (`train.lr`, `model.depth`, `schedules.soft_mask_a.until`, or `model` for the
        model name), type-checked."""
        if key in LEGACY_KEYS:
            new = LEGACY_KEYS[key][0]
            if key == "train.soft_mask" and value in ("none", None):
                print(f"note: {key} is deprecated; drop it (or the schedules.soft_mask_a section) to train "
                      f"without the soft mask.", file=sys.stderr)
                self.schedules.pop("soft_mask_a", None)
                return
            print(f"note: {key} is deprecated; write {new}={value} instead.", file=sys.stderr)
            key = new
        section, _, name = key.partition(".")
        if section not in self.SECTIONS:
            raise UserError(f"Unknown key '{key}' in {origin}.{nearest(key, self._valid_keys())}")
        if section == "model":
            if name in ("", "name"):
                get_entry(str(value))  # fails early, naming the nearest model
                self.model = ModelConfig(name=str(value), args=self.model.args)
                self._retype()
                return
            self.model.args[name] = value  # checked against the constructor in resolve()
            return
        if section == "schedules":
            self._set_schedule(key, name, value, origin)
            return
        target = getattr(self, section)
        fields = _fields(target)
        if name in fields:
            value = coerce(value, typing.get_type_hints(type(target))[name], key)
            setattr(target, name, value)
        else:
            owner = next((c for c in _section_classes(section) if name in _fields(c)), None)
            if section == "train" or owner is None:
                valid = [k for k in self._valid_keys() if k.startswith(f"{section}.")]
                raise UserError(f"Unknown key '{key}' in {origin}.{nearest(key, valid)}")
            value = coerce(value, typing.get_type_hints(owner)[name], key)  # another task's: see validate
        if section in self.given:
            self.given[section][name] = value

    def _set_schedule(self, key: str, name: str, value: Any, origin: str) -> None:
        input_name, _, sub = name.partition(".")
        if not input_name.isidentifier():
            raise UserError(f"Key '{key}' in {origin} must name a model input, as in schedules.soft_mask_a.until.")
        if not sub:  # the whole schedule: a mapping of its fields, or null to remove it
            if value is None:
                self.schedules.pop(input_name, None)
                return
            if not isinstance(value, dict):
                raise UserError(f"{key} must be a mapping such as {{shape: linear, until: 0.17}}, got {value!r}.")
            self.schedules[input_name] = InputSchedule()
            for k, v in value.items():
                self._set_schedule(f"{key}.{k}", f"{input_name}.{k}", v, origin)
            return
        schedule = self.schedules.setdefault(input_name, InputSchedule())
        fields = _fields(schedule)
        if sub not in fields:
            raise UserError(f"Unknown key '{key}' in {origin}."
                            f"{nearest(key, [f'schedules.{input_name}.{f}' for f in fields])}")
        setattr(schedule, sub, coerce(value, typing.get_type_hints(InputSchedule)[sub], key))

    def _retype(self) -> None:
        """After a change of model: the task and data sections of its task, holding the values set explicitly."""
        spec = self.task_spec
        for section, cls in (("task", spec.section), ("data", spec.data)):
            if type(getattr(self, section)) is cls:
                continue
            fresh = cls()
            names = _fields(fresh)
            for name, value in self.given[section].items():
                if name in names:
                    setattr(fresh, name, value)
            setattr(self, section, fresh)

    def _valid_keys(self) -> list[str]:
        keys = [f"{s}.{f}" for s in ("task", "data", "train") for f in _fields(getattr(self, s))]
        return [*keys, "model", "model.name", *(f"schedules.NAME.{f}" for f in _fields(InputSchedule))]

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


_MISSING = object()


def _section_classes(section: str) -> list[type]:
    """Every dataclass the `task` or `data` section can be, in `TASKS` order without repeats."""
    if section == "train":
        return [TrainConfig]
    seen: list[type] = []
    for spec in TASKS.values():
        cls = spec.section if section == "task" else spec.data
        if cls not in seen:
            seen.append(cls)
    return seen


def section_classes() -> dict[str, list[type]]:
    """`{"task": [...], "data": [...], "train": [TrainConfig], "schedules": [InputSchedule]}`: every config
    section dataclass there is."""
    return {"task": _section_classes("task"), "data": _section_classes("data"), "train": [TrainConfig],
            "schedules": [InputSchedule]}


def _foreign_default(section: str, name: str) -> Any:
    for cls in _section_classes(section):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return _MISSING


def _foreign_key(section: str, name: str, model: str, spec: TaskSpec) -> str:
    """The sentence for a key of another task's section."""
    if section == "task":
        owners = [t.name for t in TASKS.values() if name in _fields(t.section)]
        return (f"task.{name} is a setting of the {' and '.join(owners)} task, but model '{model}' trains "
                f"{spec.name}; remove it or choose a {owners[0]} model.")
    kinds = sorted({t.modality for t in TASKS.values() if name in _fields(t.data)})
    return (f"data.{name} is a setting of {' and '.join(kinds)} data, but model '{model}' trains {spec.name} on "
            f"{spec.modality}; remove it or choose a model for {kinds[0]}.")


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
    from ..files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# ---- the keys, their types, defaults and help, read from this file ---------------------------------------------

@dataclass(frozen=True)
class ConfigKey:
    """One settable key of a task, data, train or schedules section."""

    key: str
    """Dotted name, e.g. `train.lr`."""
    type: str
    """The field's annotation as written in the code, e.g. `float | None`."""
    default: Any
    help: str
    """The attribute docstring under the field, joined into one paragraph."""
    scope: str = "every run"
    """The runs that have the key: 'every run', a task ('classification'), a kind of data ('images', 'text')."""

    @property
    def summary(self) -> str:
        """The help's first sentence (what `polyattn config` and the README table show)."""
        first = re.split(r"\.\s+(?=[A-Z])", self.help)[0].rstrip(".")
        return first + "." if first else ""


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """`{field: (annotation source, attribute docstring)}` of a dataclass and the dataclasses it extends, read
    from their source with `ast`: the docstrings under the fields are the one place each key is documented."""
    import ast
    import textwrap

    docs: dict[str, tuple[str, str]] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, [*body[1:], None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = ""
                if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    doc = " ".join(after.value.value.split())
                docs[node.target.id] = (ast.unparse(node.annotation), doc)
    return docs


def config_keys() -> list[ConfigKey]:
    """Every key of every section with its type, default, help and the runs that have it, in the code's order:
    each task's `task` section, the `data` fields every source has, then those of images and of text, `train`,
    and the fields of an input schedule (`schedules.NAME.FIELD`)."""
    keys, seen = [], set()
    for section, classes in section_classes().items():
        for cls in classes:
            docs = field_docs(cls)
            for f in dataclasses.fields(cls):
                key = f"schedules.NAME.{f.name}" if section == "schedules" else f"{section}.{f.name}"
                if key in seen:
                    continue
                seen.add(key)
                owner = next(k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
                annotation, doc = docs.get(f.name, ("", ""))
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                keys.append(ConfigKey(key, annotation, plain(default), doc,
                                      "every run" if owner is DataConfig else _scope(section, owner)))
    return keys


def _scope(section: str, owner: type) -> str:
    """The runs that have the keys declared by the section class `owner` (or by a base class that sections share)."""
    if section == "task":
        return " and ".join(t.name for t in TASKS.values() if issubclass(t.section, owner))
    if section == "data":
        return " and ".join(sorted({t.modality for t in TASKS.values() if issubclass(t.data, owner)}))
    return "every run" if section == "train" else "a scheduled model input"


def format_value(value: Any) -> str:
    """A value as it would be written on the command line or in a recipe (YAML flow style)."""
    text = yaml.safe_dump(plain(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


def keys_markdown() -> str:
    """The README's table of keys, generated from `config_keys` (`polyattn config --keys --markdown`)."""
    lines = ["| key | for | type | default | what it sets |", "|---|---|---|---|---|"]
    for k in config_keys():
        text = k.help.replace("|", "\\|")
        lines.append(f"| `{k.key}` | {k.scope} | `{k.type.replace('|', '∣')}` | `{format_value(k.default)}` | "
                     f"{text} |")
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
    by_key = {k.key: k for k in config_keys()}
    for section in ("task", "data", "train"):
        obj = getattr(config, section)
        base = type(obj)()
        lines.append(f"{section}:" if dataclasses.fields(obj) else f"{section}: {{}}")
        for f in dataclasses.fields(obj):
            k = by_key[f"{section}.{f.name}"]
            value = plain(getattr(obj, f.name))
            changed = value != plain(getattr(base, f.name))
            note = f", default {format_value(plain(getattr(base, f.name)))}" if changed else ""
            lines.append(f"  {f.name}: {format_value(value)}  # {k.type}{note}; {k.summary}")
    lines.append("schedules:" if config.schedules else "schedules: {}  # model inputs scheduled over training")
    for name, schedule in config.schedules.items():
        lines.append(f"  {name}: {format_value(plain(schedule))}  # the value of the model input {name} per step")
    return "\n".join(lines) + "\n"


def _type_text(ann: Any) -> str:
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")
