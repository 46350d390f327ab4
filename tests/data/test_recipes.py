import pytest

from fastkd.data.recipes import ColorJitter, Recipe, ViewSpec, build_recipe, recipe_names, register_recipe


def test_registered_recipes():
    assert {"mocov3", "dino_multicrop", "mae", "eval"} <= set(recipe_names())


def test_mocov3_is_asymmetric():
    first, second = build_recipe("mocov3").views
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0)
    assert (second.blur_p, second.solarize_p) == (0.1, 0.2)
    assert first.jitter == ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8) and first.grayscale_p == 0.2
    assert first.scale == (0.08, 1.0) and first.size == 224


def test_blur_false_drops_only_the_blur():
    for name in ("mocov3", "dino_multicrop"):
        with_blur, without = build_recipe(name).views, build_recipe(name, blur=False).views
        assert all(view.blur_p == 0.0 for view in without) and any(view.blur_p > 0 for view in with_blur)
        for a, b in zip(with_blur, without):
            assert (a.jitter, a.grayscale_p, a.solarize_p, a.scale, a.size) == (b.jitter, b.grayscale_p, b.solarize_p,
                                                                                b.scale, b.size)
    with pytest.raises(TypeError, match="blur must be a bool"):
        build_recipe("mocov3", blur="no")


def test_dino_multicrop_overrides():
    recipe = build_recipe("dino_multicrop", local_crops=3, global_scale=(0.4, 1.0))
    assert [v.size for v in recipe.views] == [224, 224, 96, 96, 96]
    assert recipe.views[0].scale == (0.4, 1.0) and recipe.views[2].scale == (0.05, 0.25)


def test_crop_interpolation_defaults_and_override():
    # DINO / official MOKD: bicubic random resized crops; MoCo v3: torchvision's bilinear default
    assert {v.interpolation for v in build_recipe("dino_multicrop").views} == {"bicubic"}
    assert {v.interpolation for v in build_recipe("mocov3").views} == {"bilinear"}
    assert {v.interpolation for v in build_recipe("dino_multicrop", interpolation="bilinear").views} == {"bilinear"}
    assert {v.interpolation for v in build_recipe("mocov3", interpolation="bicubic").views} == {"bicubic"}
    with pytest.raises(ValueError, match="interpolation"):
        build_recipe("dino_multicrop", interpolation="nearest")


def test_eval_is_centre_crop_without_shuffle():
    (view,) = build_recipe("eval").views
    assert view.scale is None and view.resize == 256 and view.size == 224 and view.flip_p == 0
    assert build_recipe("eval").shuffle is False


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="recipe must be one of"):
        build_recipe("simclr")
    with pytest.raises(TypeError, match="local_crops"):
        build_recipe("mocov3", local_crops=2)
    with pytest.raises(ValueError, match="ViewSpec.scale"):
        ViewSpec(size=32, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="ViewSpec.flip_p"):
        ViewSpec(size=32, flip_p=1.5)
    with pytest.raises(ValueError, match="ViewSpec.resize"):
        ViewSpec(size=32, scale=None, resize=16)
    with pytest.raises(ValueError, match="ColorJitter.hue"):
        ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="Recipe.views"):
        Recipe("empty", ())


def test_register_new_recipe():
    @register_recipe("test_single_view")
    def single(size: int = 32) -> Recipe:
        return Recipe("test_single_view", (ViewSpec(size=size),))

    assert build_recipe("test_single_view", size=48).views[0].size == 48
    with pytest.raises(ValueError, match="already registered"):
        register_recipe("test_single_view")(single)
