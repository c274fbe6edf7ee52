"""Optimization profiles as data: trtexec flag parsing, resolution against a model's inputs (KILN-E202/E203),
and the choice of profile for the shapes given (KILN-E406)."""
import argparse

import pytest

import kiln
from kiln.cli.args import add_profile_arguments, profiles_from_args
from kiln.engine.bindings import Binding
from kiln.engine.profiles import Profile, as_profile, choose_profile, flags_for, profiles_from_flags, resolve_profiles, symbol_sizes
from kiln.ir import DType

IMAGE = Binding("image", DType.float32, ("N", 3, 8, 8))
IDS = Binding("input_ids", DType.int64, ("batch", "seq"))
MASK = Binding("attention_mask", DType.int64, ("batch", "seq"))


def build_error(inputs, profiles, code, *words, use_model_shapes=False):
    with pytest.raises(kiln.BuildError) as error:
        resolve_profiles(inputs, profiles, use_model_shapes)
    assert error.value.code == code, str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)
    assert error.value.hint
    return error.value


def test_flags_in_trtexec_syntax_make_one_profile_per_repetition():
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    args = parser.parse_args(["--minShapes", "image:1x3x8x8", "--optShapes", "image:4x3x8x8", "--maxShapes", "image:8x3x8x8",
                              "--minShapes", "image:9x3x8x8", "--maxShapes", "image:16x3x8x8"])
    first, second = profiles_from_args(args)
    assert first.shapes["image"] == ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))
    assert second.shapes["image"] == ((9, 3, 8, 8), (16, 3, 8, 8), (16, 3, 8, 8))  # opt taken from max, as documented
    assert flags_for(first) == "--minShapes image:1x3x8x8 --optShapes image:4x3x8x8 --maxShapes image:8x3x8x8"


def test_several_inputs_and_names_with_colons():
    (profile,) = profiles_from_flags(["ns:ids:1x4,mask:1x4"], ["ns:ids:2x16,mask:2x16"], ["ns:ids:4x32,mask:4x32"])
    assert profile.shapes["ns:ids"] == ((1, 4), (2, 16), (4, 32)) and profile.shapes["mask"][2] == (4, 32)


def test_shapes_alone_make_a_fixed_profile():
    args = argparse.Namespace(shapes="image:2x3x8x8")
    (profile,) = profiles_from_args(args)
    assert profile.shapes["image"] == ((2, 3, 8, 8),) * 3


def test_bad_ranges_and_bad_syntax_are_kiln_errors():
    with pytest.raises(kiln.BuildError, match="min <= opt <= max"):
        Profile().set_shape("image", (4, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8))
    with pytest.raises(kiln.BuildError, match="different ranks"):
        Profile().set_shape("image", (1, 3, 8, 8), (2, 3, 8), (8, 3, 8, 8))
    with pytest.raises(kiln.KilnError, match="name:1x3x224x224"):
        profiles_from_flags(["image1x3x8x8"], None, None)
    with pytest.raises(kiln.BuildError, match=r"\(min, opt, max\)"):
        as_profile({"image": (1, 3, 8, 8)})


def test_dynamic_input_without_profile_names_it_and_the_flags():
    error = build_error([IMAGE], [], "KILN-E202", "'image'", "no optimization profile", "image[0] ('N')")
    assert "--minShapes image:1x3x8x8 --optShapes image:<N>x3x8x8 --maxShapes image:<N>x3x8x8" in error.hint
    # The Python form too, which works as written once the <names> are sizes, and the way to build for size 1
    python = "config.add_profile({'image': ((1, 3, 8, 8), (<N>, 3, 8, 8), (<N>, 3, 8, 8))})"
    assert python in error.hint and "--useModelShapes" in error.hint
    config = kiln.BuilderConfig()
    eval(python.replace("<N>", "4"), {"config": config})  # the hint's own text, with a size filled in
    (profile,) = resolve_profiles([IMAGE], config.profiles)
    assert profile.shapes["image"] == ((1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))


def test_model_shapes_build_what_the_model_leaves_open_at_1_and_say_so(caplog):
    with caplog.at_level("WARNING", logger="kiln"):
        (profile,) = resolve_profiles([IMAGE], [], use_model_shapes=True)
    assert profile.shapes["image"] == ((1, 3, 8, 8),) * 3
    assert "size 1 in image[0] ('N')" in caplog.text and "--minShapes image:1x3x8x8" in caplog.text
    static = Binding("image", DType.float32, (2, 3, 8, 8))
    assert resolve_profiles([static], [], use_model_shapes=True) == []  # nothing dynamic: a static engine


def test_inputs_sharing_dimensions_with_a_profiled_one_take_its_ranges():
    ids = Profile().set_shape("input_ids", (1, 4), (2, 16), (4, 32))
    (profile,) = resolve_profiles([IDS, MASK], [ids])
    assert profile.shapes["attention_mask"] == ((1, 4), (2, 16), (4, 32))
    assert list(ids.shapes) == ["input_ids"]  # the caller's profile is left as given
    assert symbol_sizes([IDS, MASK], profile, "max") == {"batch": 4, "seq": 32}
    assert symbol_sizes([IDS, MASK], profile.to_data(), "opt") == {"batch": 2, "seq": 16}


def test_profiles_that_contradict_the_model_are_refused():
    build_error([IMAGE], [{"imgae": ((1, 3, 8, 8),) * 3}], "KILN-E203", "'imgae'", "image")
    build_error([IMAGE], [{"image": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 9, 9))}], "KILN-E203", "image[2]", "fixes it at 8")
    build_error([IMAGE], [{"image": ((1, 3, 8), (2, 3, 8), (4, 3, 8))}], "KILN-E203", "rank 3")
    both = {"input_ids": ((1, 4), (2, 16), (4, 32)), "attention_mask": ((1, 4), (2, 8), (4, 32))}
    build_error([IDS, MASK], [both], "KILN-E203", "'seq'", "attention_mask[1]")


def test_an_input_the_profile_leaves_out_is_named():
    first = {"image": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))}
    build_error([IMAGE, Binding("scale", DType.float32, ("M",))], [first], "KILN-E202", "'scale'", "the profile gives no shapes")


def test_choice_takes_the_first_profile_that_fits_or_the_one_selected():
    profiles = resolve_profiles([IMAGE], [{"image": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))},
                                          {"image": ((8, 3, 8, 8), (16, 3, 8, 8), (16, 3, 8, 8))}])
    assert choose_profile(profiles, {"image": (3, 3, 8, 8)}) == 0
    assert choose_profile(profiles, {"image": (8, 3, 8, 8)}) == 0
    assert choose_profile(profiles, {"image": (12, 3, 8, 8)}) == 1
    assert choose_profile(profiles, {"image": (8, 3, 8, 8)}, selected=1) == 1
    with pytest.raises(kiln.BindingError) as error:
        choose_profile(profiles, {"image": (17, 3, 8, 8)})
    text = str(error.value)
    assert error.value.code == "KILN-E406" and "'image'" in text and "[17, 3, 8, 8]" in text
    assert "profile 0: image [1..8]x3x8x8" in text and "profile 1: image [8..16]x3x8x8" in text
    with pytest.raises(kiln.BindingError, match="outside profile 1") as error:
        choose_profile(profiles, {"image": (2, 3, 8, 8)}, selected=1)
    assert "profile=None" in error.value.hint
    with pytest.raises(kiln.BindingError, match="does not exist") as error:
        choose_profile(profiles, {"image": (2, 3, 8, 8)}, selected=2)
    assert error.value.code == "KILN-E406"


def test_stored_data_round_trips():
    profile = Profile().set_shape("image", (1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))
    data = profile.to_data()
    assert data == {"image": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}}
    assert Profile.from_data(data) == profile and as_profile(data) == profile
    assert str(profile) == "image: [1..8]x3x8x8 (opt 4x3x8x8)"


def test_builder_config_add_profile_returns_a_profile_to_fill():
    config = kiln.BuilderConfig()
    config.add_profile().set_shape("image", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    config.add_profile({"image": ((5, 3, 8, 8), (6, 3, 8, 8), (8, 3, 8, 8))})
    assert [p.shape("image", "max") for p in config.profiles] == [(4, 3, 8, 8), (8, 3, 8, 8)]


def test_dim_size_evaluates_derived_dimensions_without_running_code():
    from kiln.engine.profiles import dim_size

    sizes = {"batch": 3, "seq": 12, "N": 7}
    cases = {"batch": 3, "2*batch": 6, "batch*seq": 36, "floor(N/2) + 1": 4, "ceiling(N/2)": 4, "seq - 1": 11,
             "Max(batch, seq)": 12, "unk__0": None, "N/2": None, "batch - seq": None, "__import__('os')": None,
             "seq.real": None, "": None}
    assert {dim: dim_size(dim, sizes) for dim in cases} == cases
