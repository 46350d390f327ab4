"""One DALI pipeline builder for every view recipe, on GPU or CPU-only with the same graph.

Graph: encoded bytes -> decode once -> per view: crop (:class:`ViewSpec`) -> colour twist (grayscale as
saturation 0) -> blur and solarize under DALI conditionals -> ``crop_mirror_normalize`` (flip, normalise, CHW
float32). A single random-crop view is fused into decoding. ``device_id`` an int: ``mixed`` (nvJPEG) decoding, all
on GPU. Unlike torchvision, DALI's colour twist applies its factors in a fixed order and in YIQ space.
"""

from __future__ import annotations

from nvidia.dali import Pipeline, fn, pipeline_def, types

from fastkd.checks import check_instance, check_number, check_positive_ints

from .recipes import IMAGENET_MEAN, IMAGENET_STD, Recipe, ViewSpec

_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
_SOLARIZE_TABLE = [k if k < 128 else 255 - k for k in range(256)]


def _uniform(low: float, high: float):
    """A per-sample uniform draw in ``[low, high]`` (a constant when ``low == high``)."""
    return float(low) if low == high else fn.random.uniform(range=(low, high))


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _colour(image, spec: ViewSpec):
    """Colour jitter with probability ``jitter.p`` and grayscale with probability ``grayscale_p``."""
    saturation = 1.0
    kwargs = {}
    if spec.jitter is not None and spec.jitter.p > 0:
        j = spec.jitter
        on = fn.cast(_coin(j.p), dtype=types.FLOAT)
        kwargs["brightness"] = 1.0 + on * _uniform(-j.brightness, j.brightness)
        kwargs["contrast"] = 1.0 + on * _uniform(-j.contrast, j.contrast)
        kwargs["hue"] = on * _uniform(-360.0 * j.hue, 360.0 * j.hue)
        saturation = 1.0 + on * _uniform(-j.saturation, j.saturation)
    if spec.grayscale_p > 0:
        saturation = saturation * (1.0 - fn.cast(_coin(spec.grayscale_p), dtype=types.FLOAT))
    if not kwargs and spec.grayscale_p == 0:
        return image
    return fn.color_twist(image, saturation=saturation, **kwargs)


def _solarize(image):
    return fn.lookup_table(image, keys=list(range(256)), values=_SOLARIZE_TABLE, dtype=types.UINT8)


def _view(encoded, decoded, spec: ViewSpec, decode_device: str, fused_crop: bool):
    """The DataNode of one normalised CHW float view."""
    interp = _INTERP[spec.interpolation]
    crop = None
    if spec.scale is None:
        image = fn.resize(decoded, resize_shorter=spec.resize, interp_type=interp, antialias=True)
        crop = (spec.size, spec.size)
    elif fused_crop:
        image = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                              random_area=spec.scale, random_aspect_ratio=spec.ratio)
        image = fn.resize(image, size=(spec.size, spec.size), interp_type=interp, antialias=True)
    else:
        image = fn.random_resized_crop(decoded, size=(spec.size, spec.size), random_area=spec.scale,
                                       random_aspect_ratio=spec.ratio, interp_type=interp, antialias=True)
    image = _colour(image, spec)
    for p, op in ((spec.blur_p, lambda x: fn.gaussian_blur(x, sigma=_uniform(*spec.blur_sigma))),
                  (spec.solarize_p, _solarize)):
        if p >= 1.0:
            image = op(image)
        elif p > 0:
            if _coin(p):  # a DALI conditional: per sample
                image = op(image)
    return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                    mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD],
                                    mirror=fn.random.coin_flip(probability=spec.flip_p) if spec.flip_p > 0 else 0)


def build_dali_pipeline(recipe: Recipe, source, *, batch_size: int, num_threads: int, device_id: int | None,
                        seed: int, prefetch: int = 2) -> Pipeline:
    """Unbuilt pipeline whose outputs are ``recipe``'s views, each a batch of ``[3, H, W]`` float32;
    ``source`` yields per batch a list of 1-D uint8 arrays (encoded files) and ends with the epoch."""
    check_instance("recipe", recipe, Recipe, "a Recipe")
    if device_id is not None:
        check_number("device_id (None: CPU-only, else a CUDA device index)", device_id, low=0, integer=True)
    check_positive_ints(batch_size=batch_size, num_threads=num_threads, prefetch=prefetch)
    decode_device = "cpu" if device_id is None else "mixed"
    fused_crop = sum(spec.scale is not None for spec in recipe.views) == 1 and len(recipe.views) == 1
    @pipeline_def(enable_conditionals=True)
    def views_graph():
        encoded = fn.external_source(source=source, batch=True, cycle="raise", dtype=types.UINT8, ndim=1)
        decoded = None if fused_crop else fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        return tuple(_view(encoded, decoded, spec, decode_device, fused_crop) for spec in recipe.views)

    return views_graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed % 2**31,
                       prefetch_queue_depth=prefetch)
