"""Configuration: one tree of dataclasses, saved as JSON beside every checkpoint.

``TrainConfig.to_json`` / ``TrainConfig.from_json`` round-trip exactly. Loading is strict:
an unknown key or a value of the wrong type raises :class:`ConfigError` naming the key
path (e.g. ``data.patch_size``), and no value is ever evaluated as code.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from ..data.annotation import UNPAINTED_CHOICES
from ..data.tiles import WSIConfig
from ..errors import ConfigError, check_choice as _check_choice, check_positive as _check_positive
from ..methods.agcl import AGCLConfig
from ..methods.arco import ARCOConfig
from ..methods.aua import AUAConfig
from ..methods.mean_teacher import MeanTeacherConfig
from ..methods.plgcl import PLGCLConfig
from .prior import PriorConfig

NORMALISE_CHOICES = ("percentile", "zscore", "none")
BUDGET_CHOICES = ("iterations", "minutes")



SPATIAL_DIMS_CHOICES = (2, 3)

#: the 3D network's training patch (D, H, W) and batch (labelled, unlabelled) where the user
#: sets none (``data.patch_size``, ``data.patch_depth`` and the batch sizes at their 2D
#: defaults): chosen by measuring short runs on a left-atrium volume on a 2-core, 24 GB
#: machine (docs/reliability.md, "Memory"); :func:`apply_network_defaults` applies them
DEFAULT_3D_PATCH = (64, 64, 64)
DEFAULT_3D_BATCH = (2, 2)
#: the settings the memory check (:mod:`~napari_semicl.engine.memory`) may shrink when the
#: user left them at their defaults, and refuses when forced ones do not fit
MEMORY_SETTINGS = ("data.patch_size", "data.patch_depth", "data.batch_labelled", "data.batch_unlabelled")


@dataclass
class ModelConfig:
    """The segmentation network: a 2D U-Net on slices, or a 3D U-Net on volume patches.

    ``in_channels`` is set from the data (1 for grey, 3 for RGB); ``n_classes`` from the
    class table. ``spatial_dims``: 2 trains on slices (2.5D with ``data.context_slices``),
    3 on (patch_depth, patch_size, patch_size) patches of volumes with MONAI's BasicUNet
    (``depth`` must then be 4, its number of stages). ``precision``: {'auto', 'fp32', 'bf16'},
    the arithmetic of training and inference (:mod:`~napari_semicl.engine.precision`; 'auto':
    bf16 autocast on a CPU with bf16 instructions, AMP on CUDA, else fp32).
    """

    in_channels: int = 1
    n_classes: int = 2
    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.1
    spatial_dims: int = 2
    precision: str = "auto"

    def validate(self, path: str = "model") -> None:
        _check_choice(f"{path}.precision", self.precision, ("auto", "fp32", "bf16"))
        _check_positive(f"{path}.in_channels", self.in_channels)
        if self.n_classes < 2:
            raise ConfigError(f"{path}.n_classes must be >= 2, got {self.n_classes}")
        _check_positive(f"{path}.base_channels", self.base_channels)
        if not 1 <= self.depth <= 6:
            raise ConfigError(f"{path}.depth must be in 1..6, got {self.depth}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{path}.dropout must be in [0, 1), got {self.dropout}")
        _check_choice(f"{path}.spatial_dims", self.spatial_dims, SPATIAL_DIMS_CHOICES)
        if self.spatial_dims == 3 and self.depth != 4:
            raise ConfigError(
                f"{path}.depth must be 4 with {path}.spatial_dims = 3 (the 3D network, MONAI's BasicUNet, "
                f"has 4 down-sampling stages), got {self.depth}"
            )


@dataclass
class DataConfig:
    """How annotations and images become training items.

    ``unpainted``: {'ignore', 'background'}. With 'ignore' (the default) unpainted pixels of
    a labelled slice are never used (scribbles); with 'background' they are class 0 (fully
    painted slices). ``class_values`` is the class table: label values in network-class
    order (filled from the annotations when empty). ``validation_slices`` maps a pair index
    (as a string, JSON keys are strings) to slice indices held out for live Dice.
    ``context_slices``: 2.5D input, the network sees each slice of a volume with this many
    neighbours on either side as extra channels (0: plain 2D slices; 2D images ignore it).
    ``patch_depth``: with a 3D network (``model.spatial_dims = 3``), the patch's extent
    along the slicing axis (0: ``patch_size``); patches are (patch_depth, patch_size,
    patch_size), e.g. 80 x 112 x 112 as the seeds' left-atrium V-Nets.
    ``intensity_augment``: the probability that each labelled crop, in every method
    (:meth:`~napari_semicl.methods.base.Method.labelled_view`), after flips and rotation also
    gets each of the strong view's intensity changes (gamma, contrast, brightness, blur, noise;
    no cutout), so that a network trained on a few volumes meets other volumes' contrasts
    (0: off).
    """

    axis: int = 0
    patch_size: int = 128
    batch_labelled: int = 4
    batch_unlabelled: int = 4
    unpainted: str = "ignore"
    normalise: str = "percentile"
    class_values: list[int] = field(default_factory=list)
    class_names: dict[str, str] = field(default_factory=dict)
    validation_slices: dict[str, list[int]] = field(default_factory=dict)
    context_slices: int = 0
    patch_depth: int = 0
    intensity_augment: float = 0.0

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of a 3D training patch."""
        return (self.patch_depth or self.patch_size, self.patch_size, self.patch_size)

    def validate(self, path: str = "data") -> None:
        _check_choice(f"{path}.unpainted", self.unpainted, UNPAINTED_CHOICES)
        _check_choice(f"{path}.normalise", self.normalise, NORMALISE_CHOICES)
        if self.patch_size < 16 or self.patch_size % 16:
            raise ConfigError(f"{path}.patch_size must be a multiple of 16 and >= 16, got {self.patch_size}")
        _check_positive(f"{path}.batch_labelled", self.batch_labelled)
        if not 0 <= self.intensity_augment <= 1:
            raise ConfigError(f"{path}.intensity_augment must be a probability in [0, 1], got {self.intensity_augment}")
        _check_positive(f"{path}.batch_unlabelled", self.batch_unlabelled, allow_zero=True)
        if self.axis < 0:
            raise ConfigError(f"{path}.axis must be >= 0, got {self.axis}")
        if self.patch_depth and (self.patch_depth < 16 or self.patch_depth % 16):
            raise ConfigError(f"{path}.patch_depth must be 0 or a multiple of 16 and >= 16, got {self.patch_depth}")
        if not 0 <= self.context_slices <= 8:
            raise ConfigError(f"{path}.context_slices must be in 0..8, got {self.context_slices}")
        if len(set(self.class_values)) != len(self.class_values):
            raise ConfigError(f"{path}.class_values has duplicates: {self.class_values}")
        if any(v < 0 for v in self.class_values):
            raise ConfigError(f"{path}.class_values must be >= 0: {self.class_values}")


@dataclass
class OptimConfig:
    """Adam(W) with a poly learning-rate decay over the iteration budget."""

    lr: float = 3e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9

    def validate(self, path: str = "optim") -> None:
        _check_positive(f"{path}.lr", self.lr)
        _check_positive(f"{path}.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive(f"{path}.poly_power", self.poly_power, allow_zero=True)


@dataclass
class PredictConfig:
    """How a predicted mask is finished. ``largest_component``: keep only the largest 3D
    connected component of each class (:func:`~napari_semicl.engine.postprocess.keep_largest_component`),
    for a structure that is one piece (stray blobs of other chambers or vessels go).
    ``adapt_batch_norm``: before predicting an image, re-estimate every batch-normalisation
    layer's statistics on that image (AdaBN, :func:`~napari_semicl.engine.inference.adapt_batch_norm`;
    a copy of the network, the trained weights unchanged), for images whose stain or intensity
    differs from the painted ones (e.g. H&E tiles from other labs); a network without batch
    normalisation predicts as it is. Costs one more pass over the image."""

    largest_component: bool = False
    adapt_batch_norm: bool = False

    def validate(self, path: str = "predict") -> None:
        for name in ("largest_component", "adapt_batch_norm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.{name} must be true or false, got {value!r}")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` beside each checkpoint.

    The budget is ``iterations`` steps, or ``minutes`` of wall-clock time when
    ``budget == 'minutes'`` (the iteration count then only shapes the schedules).
    """

    method: str = "supervised"
    iterations: int = 300
    minutes: float = 5.0
    budget: str = "iterations"
    seed: int = 0
    refresh_every: int = 50
    checkpoint_minutes: float = 5.0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)
    arco: ARCOConfig = field(default_factory=ARCOConfig)
    plgcl: PLGCLConfig = field(default_factory=PLGCLConfig)
    agcl: AGCLConfig = field(default_factory=AGCLConfig)
    aua: AUAConfig = field(default_factory=AUAConfig)
    wsi: WSIConfig = field(default_factory=WSIConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    #: settings the user chose explicitly, by key path (e.g. 'data.patch_size'): the memory check
    #: refuses these when they do not fit instead of shrinking them (:func:`is_forced`);
    #: :func:`set_option` adds to it
    forced: list[str] = field(default_factory=list)
    #: settings of registered methods without a field above (a method added by a plugin or
    #: a test: its ``config_class``), by method name; read and written as ``cfg.<name>``
    #: and saved at the top level of the JSON like the others
    method_sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str):
        # only reached when no field has that name: a registered method's own section
        if name.startswith("_") or name == "method_sections":
            raise AttributeError(name)
        sections = self.__dict__.get("method_sections")
        cls = _method_config_class(name)
        if sections is None or cls is None:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        if name not in sections:
            sections[name] = cls()
        return sections[name]

    def validate(self) -> "TrainConfig":
        """Check every value; return self. Raises :class:`ConfigError`."""
        from ..methods import available_methods  # the registry lives with the methods

        _check_choice("method", self.method, tuple(available_methods()))
        _check_choice("budget", self.budget, BUDGET_CHOICES)
        _check_positive("iterations", self.iterations)
        _check_positive("minutes", self.minutes)
        _check_positive("refresh_every", self.refresh_every)
        _check_positive("checkpoint_minutes", self.checkpoint_minutes)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        for name, section in self.method_sections.items():
            if hasattr(section, "validate"):
                section.validate(name)
        if self.model.spatial_dims == 3 and self.data.context_slices:
            raise ConfigError(
                "data.context_slices (2.5D) is for slice networks: a 3D network (model.spatial_dims = 3) "
                "sees its neighbours itself; set data.context_slices to 0 or model.spatial_dims to 2"
            )
        if self.model.spatial_dims == 3 and min(self.data.patch_shape) < 32:
            raise ConfigError(
                f"data.patch_size and data.patch_depth must be >= 32 with a 3D network (its instance norm needs "
                f"2 x 2 x 2 voxels after 4 halvings), got {self.data.patch_shape}"
            )
        # the chosen method's section exists (and is checked) even when never touched
        getattr(self, self.method, None)
        return self

    # --- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        getattr(self, self.method, None)  # the chosen method's section, even when never touched
        data = dataclasses.asdict(self)
        data.update(data.pop("method_sections"))
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"method_sections"}
        data = dict(data)
        data.pop("method_sections", None)
        sections = {}
        for key in [k for k in data if k not in names]:
            section_cls = _method_config_class(key)
            if section_cls is not None:  # a registered method's settings
                sections[key] = _from_dict(section_cls, data.pop(key), key)
        config = _from_dict(cls, data, "")
        config.method_sections.update(sections)
        return config.validate()

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "TrainConfig":
        """Load from a JSON string or a path to a JSON file (strict, see module doc)."""
        text = str(text_or_path)
        source = "config"
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            source = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _method_config_class(name: str):
    """The ``config_class`` of the registered method ``name``, or None."""
    from ..methods import available_methods, get_method  # the registry lives with the methods

    if name not in available_methods():
        return None
    section = get_method(name).config_class
    return section if section is not None and dataclasses.is_dataclass(section) else None


def set_option(cfg: TrainConfig, key: str, raw: str, *, default_section: str | None = None) -> None:
    """Set one setting from text: ``key`` is 'section.field' ('data.patch_size',
    'prior.mode', 'arco.sampler', a registered method's 'name.field') or a bare field of
    ``default_section``; ``raw`` is parsed as JSON when it parses, else kept as a string.
    The value goes through the strict loader, so a wrong type is a ConfigError naming it."""
    where, _, name = key.rpartition(".")
    where = where or default_section
    if where:
        section = getattr(cfg, where, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"no settings section {where!r} (for {key!r})")
        if name not in {f.name for f in dataclasses.fields(section)}:
            valid = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"{where} has no setting {name!r}; valid: {valid}")
        tp = typing.get_type_hints(type(section))[name]
    else:
        if name not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"no setting {name!r}: use section.field, e.g. data.patch_size")
        section, tp = cfg, typing.get_type_hints(TrainConfig)[name]
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        value = raw
    if tp is str and not isinstance(value, str):
        value = raw
    if tp is bool and isinstance(value, str):
        value = value.lower() in ("1", "true", "yes", "on")
    setattr(section, name, _coerce(tp, value, key))
    path = f"{where}.{name}" if where else name
    if path not in cfg.forced:
        cfg.forced.append(path)


def _default_of(key: str, spatial_dims: int):
    """The value ``key`` (one of :data:`MEMORY_SETTINGS`) has when the user sets nothing."""
    name = key.split(".")[1]
    if spatial_dims == 3:
        return {"patch_size": DEFAULT_3D_PATCH[1], "patch_depth": DEFAULT_3D_PATCH[0],
                "batch_labelled": DEFAULT_3D_BATCH[0], "batch_unlabelled": DEFAULT_3D_BATCH[1]}[name]
    return getattr(DataConfig(), name)


def is_forced(cfg: TrainConfig, key: str) -> bool:
    """Whether the user forced setting ``key`` (one of :data:`MEMORY_SETTINGS`): it is in
    ``cfg.forced`` (set with :func:`set_option`, e.g. ``--set`` or ``--patch-size``), or its
    value is neither its 2D default (:class:`DataConfig`'s) nor, for a 3D network, the 3D
    default (:data:`DEFAULT_3D_PATCH`, :data:`DEFAULT_3D_BATCH`). A forced value that does
    not fit in memory is refused; the others shrink to fit."""
    if key in cfg.forced:
        return True
    name = key.split(".")[1]
    value = getattr(cfg.data, name)
    return value not in (getattr(DataConfig(), name), _default_of(key, cfg.model.spatial_dims))


def apply_network_defaults(cfg: TrainConfig) -> list[str]:
    """Give a 3D network (``model.spatial_dims = 3``) the 3D patch and batch defaults
    (:data:`DEFAULT_3D_PATCH`, :data:`DEFAULT_3D_BATCH`) in place of the 2D ones where the
    user did not force a value (:func:`is_forced`); returns the keys changed. The 2D
    defaults (128 x 128 crops, 4 + 4) would need about 24 GB a step in 3D."""
    if cfg.model.spatial_dims != 3:
        return []
    changed = []
    for key in MEMORY_SETTINGS:
        name = key.split(".")[1]
        if not is_forced(cfg, key) and getattr(cfg.data, name) != _default_of(key, 3):
            setattr(cfg.data, name, _default_of(key, 3))
            changed.append(key)
    return changed


def recommended_config() -> TrainConfig:
    """The configuration the Train dock starts from for fully painted slices, and what
    ``bench ... --methods recommended`` measures (docs/prior.md gives the figures behind the
    choice): supervised training with the painted-slice prior (dense targets from the
    interpolation between the painted slices, and the mask fused with that prior where the
    network is unsure)."""
    cfg = TrainConfig(method="supervised")
    cfg.data.unpainted = "background"
    cfg.prior.mode = "targets"
    return cfg


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"unknown key(s){where}: {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        _check_choice(path, value, args)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be an object, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # pragma: no cover - programming error


__all__ = [
    "ConfigError",
    "DataConfig",
    "MeanTeacherConfig",
    "ModelConfig",
    "OptimConfig",
    "PriorConfig",
    "TrainConfig",
    "apply_network_defaults",
    "is_forced",
    "recommended_config",
    "set_option",
    "WSIConfig",
]


def setting_help(section) -> dict[str, tuple[str, str]]:
    """Readable ``(label, help)`` of each field of a config dataclass, for forms and tooltips.

    The label is the field's ``metadata['label']`` when it has one, else its name with
    spaces; the help is ``metadata['help']``, else the field's entry in the class docstring,
    written either numpydoc style (``name : type`` then an indented line) or inline
    (``name : what it does. other : ...``), else the whole docstring.
    """
    import re

    cls = section if isinstance(section, type) else type(section)
    doc = " ".join((cls.__doc__ or "").split())
    fields = dataclasses.fields(cls)
    # where each field's entry starts: 'name :' or 'name, other :' (names of this class only)
    names = "|".join(sorted((re.escape(f.name) for f in fields), key=len, reverse=True))
    entry = re.compile(rf"(?<![\w.`])((?:(?:{names})\s*,\s*)*(?:{names}))\s+:\s")
    starts = [(m.start(), m.end(), [n.strip() for n in m.group(1).split(",")]) for m in entry.finditer(doc)]
    found: dict[str, str] = {}
    for i, (_, end, entry_names) in enumerate(starts):
        text = doc[end: starts[i + 1][0] if i + 1 < len(starts) else len(doc)].strip()
        for n in entry_names:
            found.setdefault(n, text)
    out = {}
    for f in fields:
        label = f.metadata.get("label") or f.name.replace("_", " ")
        text = f.metadata.get("help") or found.get(f.name) or doc
        out[f.name] = (label, f"{f.name}: {text}" if text else f.name)
    return out
