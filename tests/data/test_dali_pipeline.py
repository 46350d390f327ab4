"""The DALI graph: defined identically for GPU (``mixed`` decoding, GPU ops) and CPU-only. The GPU
graph is constructed without a device (building it needs CUDA); the CPU graph also runs."""

import re

import pytest

pytest.importorskip("nvidia.dali")

from fastkd.data.dali_pipeline import build_dali_pipeline  # noqa: E402
from fastkd.data.recipes import build_recipe  # noqa: E402


def _graph(pipe) -> list[tuple[str, str]]:
    """``(operator, output device)`` of every node reachable from the outputs (``Image`` is
    ``decoders.image``, ``ImageRandomCrop`` is ``decoders.image_random_crop``)."""
    seen, stack, nodes = set(), list(pipe._graph_out), []
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        nodes.append((re.sub(r"^__|_\d+$", "", node.name.split("[")[0]), node.device))
        stack.extend(node.source.inputs)
    return sorted(nodes)


def _define(recipe, device_id):
    return build_dali_pipeline(build_recipe(recipe), iter([]), batch_size=2, num_threads=1, device_id=device_id, seed=0)


@pytest.mark.parametrize("recipe", ["mocov3", "dino_multicrop", "mae", "eval"])
def test_gpu_graph_mirrors_cpu_graph(recipe):
    gpu, cpu = _graph(_define(recipe, 0)), _graph(_define(recipe, None))
    assert [op for op, _ in gpu] == [op for op, _ in cpu]
    image_ops = {op for op, device in gpu if device == "gpu"}
    assert {op for op, device in cpu if device == "gpu"} == set()
    assert image_ops & {"Image", "ImageRandomCrop"} and "CropMirrorNormalize" in image_ops  # mixed decoding
    assert all(node.device == "gpu" for node in _define(recipe, 0)._graph_out)


def test_crop_fused_into_decoding_for_single_view():
    ops = [op for op, _ in _graph(_define("mae", None))]
    assert "ImageRandomCrop" in ops and "Image" not in ops and "RandomResizedCrop" not in ops
    ops = [op for op, _ in _graph(_define("mocov3", None))]
    assert ops.count("RandomResizedCrop") == 2 and ops.count("Image") == 1


def test_argument_errors():
    recipe = build_recipe("mae")
    with pytest.raises(TypeError, match="recipe"):
        build_dali_pipeline("mae", iter([]), batch_size=2, num_threads=1, device_id=None, seed=0)
    with pytest.raises(ValueError, match="device_id"):
        build_dali_pipeline(recipe, iter([]), batch_size=2, num_threads=1, device_id=-1, seed=0)
    with pytest.raises(ValueError, match="num_threads"):
        build_dali_pipeline(recipe, iter([]), batch_size=2, num_threads=0, device_id=None, seed=0)
