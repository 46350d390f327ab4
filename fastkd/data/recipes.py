"""Declarative view recipes: a :class:`Recipe` is a tuple of :class:`ViewSpec`, compiled by both the DALI and the
PyTorch/PIL pipeline. A view is, in order (torchvision / MoCo v3 semantics):

- ``RandomResizedCrop(size, scale, ratio)`` (area fraction ``scale``, aspect ratio log-uniform in ``ratio``) or,
  when ``scale is None``, ``Resize(resize)`` of the shorter side and ``CenterCrop(size)``;
- with probability ``jitter.p``: brightness/contrast/saturation factors uniform in ``[1 - x, 1 + x]`` and a hue
  shift uniform in ``[-hue, hue]`` turns (``ColorJitter``);
- with probability ``grayscale_p``: grey = 0.299 R + 0.587 G + 0.114 B on all three channels;
- with probability ``blur_p``: Gaussian blur with sigma uniform in ``blur_sigma``;
- with probability ``solarize_p``: ``x -> 255 - x`` where ``x >= 128``;
- with probability ``flip_p``: horizontal flip;
- ``(x / 255 - mean) / std`` with the ImageNet mean/std, as float32 ``[3, size, size]``.

``@register_recipe("name")`` adds a recipe factory; its keyword arguments are the overridable parameters.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from fastkd.checks import check_bool, check_choice, check_instance, check_number

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


def _check_range(name: str, value, low: float, high: float) -> tuple[float, float]:
    """``value`` as a ``(min, max)`` pair with ``low <= min <= max <= high``."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    check_number(f"{name}[0]", value[0], low=low, high=high)
    check_number(f"{name}[1] (>= {name}[0])", value[1], low=value[0], high=high)
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class ColorJitter:
    """Colour jitter applied with probability ``p`` (torchvision ``ColorJitter`` strengths)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    p: float = 0.8

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            check_number(f"ColorJitter.{name}", getattr(self, name), low=0.0, high=1.0, high_open=True)
        check_number("ColorJitter.hue", self.hue, low=0.0, high=0.5)
        check_number("ColorJitter.p (a probability)", self.p, low=0.0, high=1.0)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view (module docstring)."""

    size: int
    scale: tuple[float, float] | None = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int | None = None
    interpolation: str = "bilinear"
    flip_p: float = 0.5
    jitter: ColorJitter | None = None
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self):
        check_number("ViewSpec.size", self.size, low=1, integer=True)
        if self.scale is None:  # resize + centre crop
            check_number("ViewSpec.resize (scale None: resize, then centre crop size)", self.resize, low=self.size,
                         integer=True)
        else:
            object.__setattr__(self, "scale", _check_range("ViewSpec.scale", self.scale, 1e-6, 1.0))
            if self.resize is not None:
                raise ValueError(f"ViewSpec.resize must be None for a random-resized-crop view, got {self.resize!r}")
        object.__setattr__(self, "ratio", _check_range("ViewSpec.ratio", self.ratio, 1e-3, 1e3))
        object.__setattr__(self, "blur_sigma", _check_range("ViewSpec.blur_sigma", self.blur_sigma, 1e-3, 100.0))
        check_choice("ViewSpec.interpolation", self.interpolation, INTERPOLATIONS)
        check_instance("ViewSpec.jitter", self.jitter, (ColorJitter, type(None)), "a ColorJitter or None")
        for name in ("flip_p", "grayscale_p", "blur_p", "solarize_p"):
            check_number(f"ViewSpec.{name} (a probability)", getattr(self, name), low=0.0, high=1.0)


@dataclass(frozen=True)
class Recipe:
    """A named tuple of views; ``shuffle`` is whether training order is shuffled per epoch."""

    name: str
    views: tuple[ViewSpec, ...]
    shuffle: bool = True

    def __post_init__(self):
        if not self.views or not all(isinstance(v, ViewSpec) for v in self.views):
            raise ValueError(f"Recipe.views must be a non-empty tuple of ViewSpec, got {self.views!r}")


_RECIPES: dict[str, Callable[..., Recipe]] = {}


def register_recipe(name: str) -> Callable[[Callable[..., Recipe]], Callable[..., Recipe]]:
    """Decorator registering a recipe factory under ``name``."""

    def decorate(factory: Callable[..., Recipe]) -> Callable[..., Recipe]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        _RECIPES[name] = factory
        return factory

    return decorate


def recipe_names() -> list[str]:
    """Names of the registered recipes."""
    return sorted(_RECIPES)


def build_recipe(name: str | Recipe, **overrides) -> Recipe:
    """The recipe ``name`` with its keyword parameters overridden (a Recipe passes through)."""
    if isinstance(name, Recipe):
        if overrides:
            raise ValueError(f"recipe overrides {sorted(overrides)} need a recipe name, got a Recipe object")
        return name
    check_choice("recipe", name, recipe_names())
    factory = _RECIPES[name]
    allowed = set(inspect.signature(factory).parameters)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"recipe {name!r} has no parameters {unknown}; it accepts {sorted(allowed)}")
    return factory(**overrides)


def _mocov3_view(size: int, scale, blur_p: float, solarize_p: float, blur: bool, interpolation: str) -> ViewSpec:
    check_bool("blur", blur)  # the views check the rest
    return ViewSpec(size=size, scale=tuple(scale), interpolation=interpolation, jitter=ColorJitter(), grayscale_p=0.2,
                    blur_p=blur_p if blur else 0.0, solarize_p=solarize_p)


def _asymmetric_pair(size: int, scale, blur: bool, interpolation: str) -> tuple[ViewSpec, ViewSpec]:
    """MoCo v3's / BYOL's two views: blur 1.0 and 0.1, solarize 0 and 0.2."""
    return (_mocov3_view(size, scale, 1.0, 0.0, blur, interpolation),
            _mocov3_view(size, scale, 0.1, 0.2, blur, interpolation))


@register_recipe("mocov3")
def mocov3(size: int = 224, scale=(0.08, 1.0), blur: bool = True, interpolation: str = "bilinear") -> Recipe:
    """MoCo v3 / BYOL: two asymmetric views; ``blur=False`` for CIFAR-size views (as those recipes do); bilinear
    as MoCo v3's ``main_moco.py``."""
    return Recipe("mocov3", _asymmetric_pair(size, scale, blur, interpolation))


@register_recipe("dino_multicrop")
def dino_multicrop(global_size: int = 224, global_scale=(0.25, 1.0), local_crops: int = 8, local_size: int = 96,
                   local_scale=(0.05, 0.25), blur: bool = True, interpolation: str = "bicubic") -> Recipe:
    """DINO multi-crop: MoCo v3's two global views, then ``local_crops`` local views (blur p 0.5, no solarize);
    bicubic as DINO's and MOKD's code."""
    check_number("local_crops", local_crops, low=0, integer=True)
    local = _mocov3_view(local_size, local_scale, 0.5, 0.0, blur, interpolation)
    global_views = _asymmetric_pair(global_size, global_scale, blur, interpolation)
    return Recipe("dino_multicrop", global_views + (local,) * local_crops)


@register_recipe("mae")
def mae(size: int = 224, scale=(0.2, 1.0)) -> Recipe:
    """MAE: one random-resized crop (bicubic) and a flip."""
    return Recipe("mae", (ViewSpec(size=size, scale=tuple(scale), interpolation="bicubic"),))


@register_recipe("eval")
def eval_recipe(size: int = 224, resize: int = 256) -> Recipe:
    """Evaluation: resize the shorter side to ``resize`` (bicubic), centre crop ``size``; no shuffle."""
    return Recipe("eval", (ViewSpec(size=size, scale=None, resize=resize, interpolation="bicubic", flip_p=0.0),),
                  shuffle=False)


@register_recipe("linear")
def linear(size: int = 224, scale=(0.08, 1.0), interpolation: str = "bicubic") -> Recipe:
    """Linear-probe training (DINO ``eval_linear.py``, MoCo v3 ``main_lincls.py``): a random resized crop and a
    flip; both scripts crop bilinear, which :mod:`fastkd.eval.linear_protocols` passes."""
    return Recipe("linear", (ViewSpec(size=size, scale=tuple(scale), interpolation=interpolation, flip_p=0.5),))
