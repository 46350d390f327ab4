import pytest

from fastkd.methods import METHODS, Method, build_method, method_class


def test_registry_names_and_interface():
    assert set(METHODS) == {"moma", "hybrid_distill", "resmoco", "mokd", "mocov3", "mae"}
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
    assert method_names("pretrain") == ("resmoco", "mocov3", "mae")
    assert method_names("distill") == ("moma", "hybrid_distill", "mokd")
    assert set(method_names("pretrain")) | set(method_names("distill")) == set(METHODS)
    with pytest.raises(ValueError, match="role must be one of"):
        method_names("finetune")


def test_old_module_and_names_are_deprecated_aliases():
    import fastkd.checks
    import fastkd.methods.backbones as backbones
    import fastkd.methods.base as base

    with pytest.deprecated_call(match="fastkd.methods.backbones"):
        from fastkd.methods.teachers import build_student, load_frozen_teacher
    assert build_student is backbones.build_student and load_frozen_teacher is backbones.load_frozen_teacher
    for name in ("check_bool", "check_choice", "check_kwargs", "check_str"):
        with pytest.deprecated_call(match=f"fastkd.checks.{name}"):
            assert getattr(base, name) is getattr(fastkd.checks, name)
