import pytest

from fastkd.methods import METHODS, Method, build_method, method_class


def test_registry_names_and_interface():
    # the shipped methods; a new method file registers itself beside them (no list to edit)
    assert set(METHODS) >= {"moma", "hybrid_distill", "resmoco", "mokd", "mocov3", "mae"}
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.recipe in ("mocov3", "dino_multicrop", "mae")
        assert method_class(name) is cls
        for attr in ("forward", "after_step", "param_groups"):
            assert callable(getattr(cls, attr))


def test_unknown_names_and_keys():
    with pytest.raises(ValueError, match="did you mean 'mocov3'"):
        method_class("mocov2")
    with pytest.raises(TypeError, match="name"):
        method_class(3)
    with pytest.raises(ValueError, match="did you mean 'residual_weight'"):
        build_method("resmoco", {"residual_wieght": 1.0})
    with pytest.raises(TypeError, match="dict"):
        build_method("mae", [("arch", "x")])


def test_every_method_has_a_role_and_the_cli_lists_come_from_it():
    from fastkd.methods import ROLES, method_names

    for name, cls in METHODS.items():
        assert cls.role in ROLES, name
    assert set(method_names("pretrain")) >= {"mae", "mocov3", "resmoco"}
    assert set(method_names("distill")) >= {"hybrid_distill", "mokd", "moma"}
    assert all(list(names) == sorted(names) for names in (method_names("pretrain"), method_names("distill")))
    assert set(method_names("pretrain")) | set(method_names("distill")) == set(METHODS)
    with pytest.raises(ValueError, match="role must be one of"):
        method_names("finetune")


def test_every_method_has_a_demo_config():
    """``configs/demo/<name>.yaml`` is how ``fastkd bench e2e`` and the docs build a method."""
    from fastkd.configs import demo_config_dir

    assert [name for name in METHODS if not (demo_config_dir() / f"{name}.yaml").is_file()] == []


def test_a_method_registers_from_its_class_keywords_and_a_subclass_inherits_them():
    from fastkd.methods.base import REGISTRY
    from fastkd.methods.mae import MAEConfig

    class Probe(Method, name="probe_method", recipe="mae", role="pretrain", config=MAEConfig):
        pass

    class ProbeChild(Probe, name="probe_child"):
        pass

    try:
        assert method_class("probe_method") is Probe and method_class("probe_child") is ProbeChild
        assert (ProbeChild.recipe, ProbeChild.role, ProbeChild.config_class) == ("mae", "pretrain", MAEConfig)
        with pytest.raises(TypeError, match="role must be one of"):
            class _BadRole(Method, name="probe_bad", role="finetune"):
                pass
        assert "probe_bad" not in REGISTRY
    finally:
        REGISTRY.pop("probe_method", None), REGISTRY.pop("probe_child", None)
