from pathlib import Path

import pytest

from fastkd.config import (
    ConfigError, DataConfig, apply_overrides, build_dataclass, load_config, run_config_from_dict,
)
from fastkd.data.loader import BACKENDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {"method": {"name": "mae", "mask_ratio": 0.75}, "data": {"source": "/data/train", "batch_size": 32}}


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "method: {name: mae, mask_ratio: 0.75}\ndata: {source: /d, batch_size: 8}\n"
                           "optim: {blr: 1e-3}\n")
    config = load_config(path, ["optim.betas=[0.9, 0.95]", "train.compile=true", "method.mask_ratio=0.6",
                                "data.recipe_options.size=32", "train.output_dir=/tmp/x"])
    assert config.optim.blr == pytest.approx(1e-3)  # '1e-3' is a string to YAML 1.1
    assert config.optim.betas == [0.9, 0.95] and config.train.compile is True
    assert config.method_name == "mae" and config.method_config == {"mask_ratio": 0.6}
    assert config.data.recipe_options == {"size": 32} and config.train.output_dir == "/tmp/x"
    assert run_config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("override, message", [
    ("optimm.lr=1", "unknown config key 'optimm'; did you mean 'optim'?"),
    ("optim.wieght_decay=0.1", "unknown config key 'optim.wieght_decay'; did you mean 'optim.weight_decay'?"),
    ("train.epoch=3", "did you mean 'train.epochs'?"),
    ("data.batchsize=3", "did you mean 'data.batch_size'?"),
    ("optim.per_model.a.lrr=1", "unknown config key 'optim.per_model.a.lrr'; did you mean 'optim.per_model.a.lr'?"),
])
def test_unknown_keys_name_the_nearest_valid_one(tmp_path, override, message):
    path = write(tmp_path, "method: {name: mae}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert message in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp8", "train.precision must be one of"),
    ("optim.accum_steps=0", "optim.accum_steps must be >= 1, got 0"),
    ("data.backend=gpu", "data.backend must be"),
    ("optim.betas=0.9", "optim.betas must be two numbers"),
    ("train.compile=maybe", "train.compile must be true, false or 'auto'"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "method: {name: mae}\n"), [override])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loader_backend_validates(tmp_path, backend):
    """The config accepts exactly the backends fastkd.data.build_loader does (dali_cpu included)."""
    assert "dali_cpu" in BACKENDS
    config = load_config(write(tmp_path, f"method: {{name: mae}}\ndata: {{backend: {backend}}}\n"))
    assert config.data.backend == backend
    with pytest.raises(ConfigError, match="'dali_cpu'"):
        DataConfig(backend="dali-cpu")

def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="'method' must be a mapping with a 'name'"):
        run_config_from_dict({"data": {}})
    with pytest.raises(ConfigError, match="data must be a mapping"):
        build_dataclass(DataConfig, [1], "data.")
    assert run_config_from_dict({"method": "mae"}).method == {"name": "mae"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("demo/*.yaml")),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_validate(path):
    """Every recipe passes the run schema, its method's config class and its data recipe."""
    from fastkd.data import build_recipe
    from fastkd.methods import method_class
    from fastkd.methods.base import method_config_from_dict

    config = load_config(path)
    cls = method_class(config.method_name)
    method_config_from_dict(cls.config_class, config.method_config)
    build_recipe(config.data.recipe or cls.recipe, **config.data.recipe_options)
    for tag in config.optim.per_model:
        config.optim.for_model(tag)


def test_every_method_has_a_demo_recipe_and_the_shipped_ones_imagenet_recipes():
    """Every registered method has a demo recipe; the six shipped methods also have ImageNet recipes (a new
    method needs only its source file, demo YAML and test), and every recipe names a registered method."""
    from fastkd.methods import METHODS

    names = {load_config(p).method_name for p in CONFIGS.glob("*.yaml")}
    demo = {load_config(p).method_name for p in CONFIGS.glob("demo/*.yaml")}
    assert demo == set(METHODS)
    assert {"moma", "hybrid_distill", "resmoco", "mokd", "mocov3", "mae"} <= names <= set(METHODS)


def test_yaml_python_tags_never_execute(tmp_path):
    """Configs are read with ``yaml.safe_load``: a ``!!python`` tag is an error, its code never runs."""
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(f"method: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(Exception) as error:
        load_config(config)
    assert not marker.exists()
    assert "python/object/apply" in str(error.value)
