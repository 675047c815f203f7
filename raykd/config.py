"""Typed run configuration (pydantic v2, unknown keys rejected).

A run config is the complete description of one training run::

    data:    {name, root, labels_per_class, val_per_class, seed, open_set}
    model:   {name, bn_momentum, <the model's own arguments>}
    method:  {name, <the method's knobs>}
    train:   {steps, batch_size, uratio, lr, weight_decay, ema, eval_every, seed, amp, channels_last, compile, ...}
    scaling: {num_workers, use_gpu, cpus_per_worker, gpus_per_worker, resources_per_worker}

Each method declares its knobs as a :class:`MethodConfig` subclass built with :func:`knob` (default,
search range, help).  YAML is read with ``yaml.safe_load``; ``--set dotted.key=value`` overrides are
parsed as YAML scalars and type-checked by the same models.  Every validation problem becomes a
:class:`~raykd.errors.ConfigError` naming the dotted field, the problem and the allowed values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from raykd.errors import ConfigError
from raykd.registry import DATASETS, METHODS, MODELS, REQUIRED

# --------------------------------------------------------------------------------------------
# knobs and search ranges

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


def knob(default: Any, *, search: dict[str, Any] | None = None, help: str = "", **kwargs: Any) -> Any:
    """A method knob: a pydantic ``Field`` carrying its default, its declared search range and help.

    Args:
        default: the default value (the paper's or our documented choice).
        search: the declared search range, one of ``{"uniform": [lo, hi]}``,
            ``{"loguniform": [lo, hi]}``, ``{"int": [lo, hi]}``, ``{"logint": [lo, hi]}``,
            ``{"choice": [v1, v2, ...]}``; None = not searchable.
        help: one line for ``raykd methods``.
        kwargs: further ``Field`` constraints (``ge``, ``le``, ...).
    """
    if search is not None:
        ((dist, _),) = search.items()
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {dist!r}")
    return Field(default, description=help, json_schema_extra={"search": search}, **kwargs)


def search_range(model: type[BaseModel], name: str) -> dict[str, Any] | None:
    """The declared search range of knob ``name`` of a config model, or None."""
    extra = model.model_fields[name].json_schema_extra
    return extra.get("search") if isinstance(extra, dict) else None


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: the largest seed (torch and numpy generators take 64-bit seeds)
MAX_SEED = 2**63 - 1


class MethodConfig(Strict):
    """Base class of each method's knobs, and the home of the method's **static facts**.

    A method subclasses it (as ``Method.Config``) and adds :func:`knob` fields.  The class attributes
    and classmethods below describe the method without building it, so configs, studies and the
    teacher cache read them without importing the training layer.
    """

    name: str
    #: the run config must name a teacher (``teacher.checkpoint`` or ``teacher.run``)
    needs_teacher: ClassVar[bool] = False
    #: batches carry ``train.uratio`` × B unlabeled images
    uses_unlabeled: ClassVar[bool] = True

    @classmethod
    def logs(cls, run: RunConfig) -> tuple[str, ...]:
        """The names ``train_step`` logs in ``run`` (reported as metrics; a study may optimise them)."""
        return ()

    @classmethod
    def eval_heads(cls, run: RunConfig) -> tuple[str, ...]:
        """Names of the extra logits ``predict`` returns besides the main ones (TSKD's exits and votes)."""
        return ()

    @classmethod
    def eval_metrics(cls, run: RunConfig) -> tuple[str, ...]:
        """The metric names the loop reports for :meth:`eval_heads` (``test_<head>_acc``, ``val_<head>_acc``)."""
        splits = ("test", "val") if run.data.val_per_class > 0 else ("test",)
        return tuple(f"{split}_{head}_acc" for split in splits for head in cls.eval_heads(run))

    @classmethod
    def check_run(cls, run: RunConfig) -> None:
        """Rules the method puts on the rest of a run config (e.g. a validation split it needs); raise
        :class:`~raykd.errors.ConfigError` naming the field.  Called whenever a run config is parsed."""


# --------------------------------------------------------------------------------------------
# sections


class ExtraUnlabeledConfig(Strict):
    """Another image collection as open-set unlabeled data (``data.open_set.extra_unlabeled``)."""

    name: str = Field(description="imagefolder (root/<class>/<images>) or a dataset name whose training images "
                      "become unlabeled data")  # fmt: skip
    root: str | None = Field(None, description="its folder (imagefolder: required; a dataset: as data.root)")

    @field_validator("name")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v != "imagefolder" and v not in DATASETS:
            raise ValueError(f"unknown source {v!r}; choose imagefolder or one of: {', '.join(DATASETS.names())}")
        return v

    @model_validator(mode="after")
    def _folder_needs_root(self) -> ExtraUnlabeledConfig:
        if self.name == "imagefolder" and not (self.root or "").strip():
            raise ValueError("imagefolder needs root: a folder laid out as root/<class>/<images>")
        return self


class OpenSetConfig(Strict):
    """Open-set unlabeled data (DESIGN §6): classes held out of the labeled and test data, and/or
    another image collection, in the unlabeled pool.  See :mod:`raykd.data.split`."""

    unseen_classes: list[int] = Field(
        default_factory=list,
        description="classes removed from labeled, validation and test data and kept (unlabeled) in the pool; "
        "the other classes are renumbered 0..C'-1 and the model gets C' outputs",
    )
    extra_unlabeled: ExtraUnlabeledConfig | None = Field(None, description="another collection as unlabeled data")
    unseen_fraction: float | None = Field(
        None, ge=0.0, le=1.0,
        description="subsample the pool so that open-set samples are this fraction of it (0 = none, closed-set "
        "control; 1 = only open-set samples; None = keep everything)",
    )  # fmt: skip

    @field_validator("unseen_classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        if any(c < 0 for c in v) or len(set(v)) != len(v):
            raise ValueError(f"expected distinct class indices >= 0, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _something_open(self) -> OpenSetConfig:
        if not self.unseen_classes and self.extra_unlabeled is None:
            raise ValueError("set unseen_classes (a list of classes) and/or extra_unlabeled ({name, root})")
        return self


class DataConfig(Strict):
    """Dataset and semi-supervised split."""

    name: str = Field("digits", description="dataset family: digits, fashion_mnist, cifar10, cifar100, svhn, stl10")
    root: str | None = Field(None, description="folder in torchvision's on-disk layout (None = family default)")
    labels_per_class: int | None = Field(4, ge=1, description="labeled samples per class (None = all)")
    val_per_class: int = Field(0, ge=0, description="held-out labeled validation samples per class (0 = none)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the labeled/validation split")
    open_set: OpenSetConfig | None = Field(None, description="open-set unlabeled data (unseen classes, extra pool)")

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            DATASETS.get(v)  # the unknown-name error
        return v

    @model_validator(mode="after")
    def _root_is_read(self) -> DataConfig:
        if self.root is not None and not DATASETS.facts(self.name).get("reads_root", True):
            raise ConfigError("data.root", f"{self.name} is built into raykd's dependencies and reads no folder; "
                              "remove data.root")  # fmt: skip
        return self

    @model_serializer(mode="wrap")
    def _omit_closed_set(self, handler: Any) -> Any:
        out = handler(self)  # without open_set, dumps (and teacher hashes) stay as they were before it existed
        if self.open_set is None and isinstance(out, dict):
            out.pop("open_set", None)
        return out


_MODEL_FIXED = ("num_classes", "in_channels", "image_size", "bn_momentum")
_ANNOTATIONS = {"int": int, "float": float, "bool": bool, "str": str}


def _annotation(text: str | None) -> Any:
    """A model argument's type from its annotation's source text (plain scalars; anything else: Any)."""
    if text is None:
        return Any
    kinds = [k.strip() for k in text.split("|")]
    if all(k in _ANNOTATIONS or k == "None" for k in kinds):
        types = [type(None) if k == "None" else _ANNOTATIONS[k] for k in kinds]
        return types[0] if len(types) == 1 else Union[tuple(types)]  # noqa: UP007
    return Any


class ModelConfig(BaseModel):
    """Model name, BN momentum and the model's own arguments (checked against its builder)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field("small_cnn", description="small_cnn, wrn_28_2, wrn_28_8, resnet18")
    bn_momentum: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | Literal["auto"] = Field(
        "auto", description="BatchNorm momentum in (0, 1]; auto = max(0.001, min(0.1, 20 / train.steps))"
    )

    @model_validator(mode="after")
    def _check_args(self) -> ModelConfig:
        extra = dict(self.model_extra or {})
        if self.name not in MODELS:
            MODELS.get(self.name)  # the unknown-name error
        if not extra:
            return self
        # the builder's signature, read from its source (validating a config never imports torch)
        params = {
            p.name: (_annotation(p.annotation), ... if p.default is REQUIRED else p.default)
            for p in MODELS.parameters(self.name)
            if p.name not in _MODEL_FIXED and not p.variadic
        }
        for key in extra:
            if key not in params:
                allowed = ", ".join(["name", "bn_momentum", *params]) or "none"
                raise ConfigError(f"model.{key}", f"unknown argument of model {self.name!r}; allowed: {allowed}")
        args_model = create_model(f"{self.name}_args", __config__=ConfigDict(extra="forbid"), **params)
        try:
            checked = args_model.model_validate(extra)
        except ValidationError as e:
            raise _config_error(e, prefix="model", root=args_model) from None
        for key in extra:  # store the type-checked values (setattr would re-run this validator)
            self.__pydantic_extra__[key] = getattr(checked, key)
        return self

    def args(self) -> dict[str, Any]:
        """The model's own arguments (everything but ``name`` and ``bn_momentum``)."""
        return dict(self.model_extra or {})

    def resolved_bn_momentum(self, steps: int) -> float:
        if self.bn_momentum == "auto":
            return max(0.001, min(0.1, 20.0 / steps))
        return float(self.bn_momentum)


class TrainConfig(Strict):
    """Optimisation, schedule, evaluation and checkpointing."""

    steps: int = Field(500, ge=1, le=2**40, description="optimiser steps")
    batch_size: int = Field(64, ge=1, le=2**20, description="GLOBAL labeled batch B (split across workers)")
    uratio: int = knob(
        7, search={"choice": [1, 2, 3, 5, 7]}, ge=0, le=1024, help="unlabeled batch = uratio * batch_size (mu)"
    )
    lr: float = knob(0.03, search={"loguniform": [0.005, 0.1]}, gt=0, help="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = knob(
        5e-4, search={"loguniform": [1e-4, 2e-3]}, ge=0, help="not applied to 1-D parameters (BN, biases)"
    )
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: lr * cos(7 pi k / (16 K)) as in FixMatch"
    )
    ema: float = knob(
        0.999, search={"choice": [0.99, 0.999, 0.9999]}, ge=0, lt=1, help="EMA decay of the evaluated model (0 = raw)"
    )
    eval_every: int = Field(100, ge=1, description="evaluate, report and checkpoint every N steps")
    eval_batch_size: int = Field(512, ge=1, le=2**20)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of initialisation, sampling and augmentation")
    amp: bool = Field(False, description="bfloat16 autocast on GPU (ignored on CPU)")
    channels_last: bool = Field(False, description="channels_last memory format on GPU")
    compile: bool = Field(
        False, description="the student's training forward through torch.compile, once per worker (the first "
        "step pays the compile; checkpoints hold the plain module's weights); needs a C++ compiler on CPU, "
        "Triton on GPU",
    )  # fmt: skip
    ra_num_ops: int = Field(2, ge=1, le=4, description="RandAugment ops per image (strong augmentation)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (latest)")
    max_failures: int = Field(
        3, ge=0, description="worker-group restarts from the last checkpoint (a lost or preempted node, a crash)"
    )
    divergence_loss: float | None = Field(
        1e6, gt=0, description="stop the run as diverged when the loss is not finite or above this at an "
        "evaluation (null: only non-finite losses)",
    )  # fmt: skip
    tensorboard: bool = Field(True, description="rank 0 writes TensorBoard event files keyed by the training step "
                              "into <run folder>/tb/ at every evaluation")  # fmt: skip


class ScalingConfig(Strict):
    """How many DDP workers and what each one gets."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0, description="fractional allowed, used when use_gpu")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources each worker asks for besides CPU/GPU, e.g. {gpu_8x: 1} to pin trials to "
        "a node type of cluster.yaml (docs/cluster.md)",
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError("above 1 it must be a whole number (Ray shares out single GPUs only, e.g. 0.25 or 2)")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if key.upper() in ("CPU", "GPU"):
                raise ValueError(f"{key!r} is set by cpus_per_worker / gpus_per_worker, not here")
            if not amount > 0:
                raise ValueError(f"{key!r}: amounts must be > 0")
        return v


class TeacherConfig(Strict):
    """The frozen teacher of a distillation method: exactly one of ``checkpoint`` or ``run``.

    ``checkpoint``: a raykd run folder (``config.yaml`` + checkpoints), one of its checkpoint folders,
    or a ``state.pt`` inside one; the architecture comes from that run's config.yaml.
    ``run``: a run config (supervised or FixMatch, any model) that trains the teacher.  It is trained
    once, before the student, into ``teachers/teacher-<hash of its resolved config>/`` beside the run
    (or inside the study folder) and reused by every run and trial with the same teacher.
    """

    checkpoint: str | None = None
    run: RunConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.run is None):
            raise ConfigError("teacher", "set exactly one of teacher.checkpoint (a raykd run folder) or teacher.run "
                              "(a run config that trains the teacher)")  # fmt: skip
        if self.run is not None and self.run.teacher is not None:
            raise ConfigError("teacher.run.teacher", "a teacher's run cannot have a teacher of its own")
        return self


def class_mismatch(student: DataConfig, teacher: DataConfig) -> tuple[str, str] | None:
    """Why a teacher trained on ``teacher`` data cannot teach a student on ``student`` data (they must
    share one set of classes: the same dataset and the same unseen classes), as (data field, message);
    None when they match."""
    if teacher.name != student.name:
        return "name", f"the teacher was trained on {teacher.name!r}; it must be trained on {student.name!r} too"
    unseen = student.open_set.unseen_classes if student.open_set else []
    t_unseen = teacher.open_set.unseen_classes if teacher.open_set else []
    if t_unseen != unseen:
        why = f"the teacher's unseen classes are {t_unseen}; they must be {unseen} as for the student"
        return "open_set.unseen_classes", why + " (teacher and student share one set of classes)"
    return None


class RunConfig(Strict):
    """The complete description of one training run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    teacher: TeacherConfig | None = Field(None, description="frozen teacher (distillation methods)")
    provenance: dict[str, Any] | None = Field(
        None, description="where an exported config came from (study, trial, metrics); not used for training"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _method_knobs(cls, v: Any) -> Any:
        if isinstance(v, MethodConfig):
            return v
        if not isinstance(v, dict) or "name" not in v:
            raise ConfigError("method.name", f"missing; choose one of: {', '.join(METHODS.names())}")
        method = METHODS.get(v["name"])
        try:
            return method.Config.model_validate(v)
        except ValidationError as e:
            raise _config_error(e, prefix="method", root=method.Config) from None

    @model_validator(mode="after")
    def _check_teacher(self) -> RunConfig:
        needs = self.method.needs_teacher
        if needs and self.teacher is None:
            raise ConfigError("teacher", f"{self.method.name} needs a teacher: set teacher.checkpoint (a raykd run "
                              "folder) or teacher.run (a run config that trains it)")  # fmt: skip
        if not needs and self.teacher is not None:
            raise ConfigError("teacher", f"{self.method.name} uses no teacher; remove the teacher section")
        if self.teacher is not None and self.teacher.run is not None:
            mismatch = class_mismatch(self.data, self.teacher.run.data)
            if mismatch:
                raise ConfigError(f"teacher.run.data.{mismatch[0]}", mismatch[1])
        return self

    @model_validator(mode="after")
    def _check_method_rules(self) -> RunConfig:
        if self.method.uses_unlabeled and self.train.uratio == 0:
            raise ConfigError("train.uratio", f"0 gives {self.method.name} no unlabeled images, which it trains on; "
                              "set it to 1 or more (the unlabeled batch is uratio x batch_size)")  # fmt: skip
        type(self.method).check_run(self)  # rules a method puts on the rest of the run
        return self

    @model_validator(mode="after")
    def _check_batch_split(self) -> RunConfig:
        w = self.scaling.num_workers
        if self.train.batch_size % w:
            raise ConfigError(
                "train.batch_size",
                f"{self.train.batch_size} is not divisible by scaling.num_workers={w}; "
                f"use a multiple of {w} (the global batch is split evenly across workers)",
            )
        return self


TeacherConfig.model_rebuild()  # its ``run`` field is a RunConfig, defined after it


# --------------------------------------------------------------------------------------------
# loading, overrides and errors


def _allowed_keys(root: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the model found at ``loc`` (for 'unknown key' messages)."""
    model = root
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


#: parts of pydantic's error location that name a branch of a union type, not a field
_UNION_TAG = re.compile(
    r"^(constrained-\w+|literal\[.*|function-\w+\[.*|(int|float|str|bool|none)|(list|dict|tuple)\[.*)$"
)


def _config_error(err: ValidationError, prefix: str = "", root: type[BaseModel] | None = RunConfig) -> ConfigError:
    """Turn pydantic's first error into one ConfigError line naming the dotted field."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
    field = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or prefix or "config"
    ctx_err = first.get("ctx", {}).get("error")
    if isinstance(ctx_err, ConfigError):
        # validators raise fields relative to the run config; prefix where that run config sits (e.g. base.)
        head = ctx_err.field.split(".")[0]
        at = max((i for i, p in enumerate(loc) if p == head), default=len(loc))
        outer = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc[:at])
        if not outer or ctx_err.field.startswith(outer + "."):
            return ctx_err
        return ConfigError(f"{outer}.{ctx_err.field}", ctx_err.message)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return ConfigError(field, f"unknown key{hint}")
    if first["type"] == "missing":
        return ConfigError(field, "required but missing")
    if first["type"] == "too_short":
        n = first.get("ctx", {}).get("min_length", 1)
        return ConfigError(field, f"is empty; give at least {n} entr{'y' if n == 1 else 'ies'}")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return ConfigError(field, f"{msg} (got {first.get('input')!r})")


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig`; raises :class:`ConfigError`."""
    return parse_config(raw, RunConfig)


def parse_config(raw: dict[str, Any], model: type[BaseModel]) -> Any:
    """Validate a raw dict into ``model`` (a run, study or ablation config); raises :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError("config", f"expected a YAML mapping with the keys {', '.join(model.model_fields)}")
    try:
        return model.model_validate(raw)
    except ConfigError:
        raise
    except ValidationError as e:
        raise _config_error(e, root=model) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a mapping that repeats a key (YAML keeps the last one
    silently: ``train: {steps: 40, steps: 4000000}``)."""


class DuplicateKeyError(yaml.MarkedYAMLError):
    pass


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise DuplicateKeyError(problem=f"the key {key!r} appears twice in one mapping; keep one",
                                    problem_mark=key_node.start_mark)  # fmt: skip
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (safe loading: plain data only; a repeated key is an error); a missing,
    unreadable or malformed file is a ConfigError naming it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(str(path), "is a folder; pass the path of a config YAML file")
    if not p.is_file():
        raise ConfigError(str(path), "no such file; pass the path of a run config YAML (see studies/)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot be read ({e.strerror}); check its permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "expected a YAML mapping at the top level")
    return data


def set_dotted(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the raw config dict with ``{"dotted.key": value}`` set (sections created as needed).

    Unknown keys are not caught here but by validation, which names them.
    """
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
            node = nxt
        node[parts[-1]] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides (values parsed as YAML scalars) to a raw config dict."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError("--set", f"expected dotted.key=value, got {item!r}")
        try:
            values[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            values[key] = value
    return set_dotted(raw, values)


def file_kind(raw: dict[str, Any]) -> str:
    """What a config file's top-level keys say it is: ``run``, ``study``, ``ablation`` or ``unknown``."""
    if "base" in raw and "grid" in raw:
        return "ablation"
    if "base" in raw:
        return "study"
    if "method" in raw or "data" in raw or "train" in raw:
        return "run"
    return "unknown"


#: the command that takes each kind of file
COMMAND_OF = {"run": "raykd train", "study": "raykd study run", "ablation": "raykd ablate"}


def expect_kind(raw: dict[str, Any], path: str | Path, kind: str) -> None:
    """A study file given to ``raykd train`` (and the like) is named as such, with the right command."""
    found = file_kind(raw)
    if found not in (kind, "unknown"):
        def a(word: str) -> str:
            return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"

        raise ConfigError(str(path), f"is {a(found)} config, not {a(kind)} config; use `{COMMAND_OF[found]} {path}`")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config file."""
    raw = read_yaml(path)
    expect_kind(raw, path, "run")
    return parse_run_config(apply_overrides(raw, overrides or []))


def dump_run_config(cfg: RunConfig) -> str:
    """The resolved config (defaults merged) as YAML, re-loadable by :func:`load_run_config`."""
    exclude = {k for k in ("provenance", "teacher") if getattr(cfg, k) is None}
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)
