"""Mask options (``worker/spec.py``): prompt splitting, validation at the edge, JSON transport."""

from __future__ import annotations

import json
import re

import pytest

from worker.errors import InvalidSpecError
from worker.spec import MaskSpec, split_prompts

# --- prompt splitting -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("person", ("person",)),
        ("person|dog", ("person", "dog")),
        ("  a cat | dog  |", ("a cat", "dog")),
        ("a| |b||c ", ("a", "b", "c")),
        ("|||", ()),
        ("", ()),
        (None, ()),
    ],
)
def test_split_prompts_strips_and_drops_empties(text, expected):
    # Given what a user typed, When split on "|", Then pieces are stripped and blanks dropped
    assert split_prompts(text) == expected


def test_split_prompts_keeps_inner_spaces_and_order():
    assert split_prompts("dog | a red car|dog") == ("dog", "a red car", "dog")


def test_from_text_splits_positive_and_negative_prompts():
    # Given prompt strings as typed on the command line
    spec = MaskSpec.from_text(" person | dog ", "background| sky |", threshold=0.3)
    # Then the spec holds the clean prompt lists, positives first in all_prompts
    assert spec.prompts == ("person", "dog")
    assert spec.negative_prompts == ("background", "sky")
    assert spec.threshold == 0.3
    assert spec.all_prompts == ("person", "dog", "background", "sky")


def test_defaults_follow_the_seed_node():
    spec = MaskSpec.from_text("cat")
    assert spec.threshold == 0.5
    assert spec.normalize is False
    assert spec.profile == "default"
    assert spec.negative_prompts == ()
    assert spec.raw_bits == 8


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", " | |", "|"])
def test_no_positive_prompt_is_an_error_mentioning_the_option(prompt):
    # Given a prompt string with nothing left after splitting
    # When a spec is built, Then it is refused and the message points at --prompt
    with pytest.raises(InvalidSpecError, match="--prompt"):
        MaskSpec.from_text(prompt, "background")


def test_only_negative_prompts_is_an_error():
    with pytest.raises(InvalidSpecError, match="--prompt"):
        MaskSpec(prompts=(), negative_prompts=("sky",))


def test_invalid_spec_error_is_a_value_error():
    # So callers that catch ValueError for bad input also catch it
    with pytest.raises(ValueError):
        MaskSpec.from_text("cat", threshold=2.0)


@pytest.mark.parametrize(
    "options, option_name",
    [
        ({"threshold": -0.01}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"profile": "fancy"}, "profile"),
        ({"blur_sigma": -1.0}, "blur"),
        ({"raw_bits": 12}, r"raw[-_]bits"),
        ({"max_side": 0}, r"max[-_]side"),
        ({"max_side": -5}, r"max[-_]side"),
    ],
)
def test_out_of_range_option_raises_naming_it(options, option_name):
    # Given one bad option, When a spec is built, Then the error names that option
    with pytest.raises(InvalidSpecError) as info:
        MaskSpec.from_text("cat", **options)
    assert re.search(option_name, str(info.value)), str(info.value)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 0.5])
def test_threshold_bounds_are_inclusive(threshold):
    assert MaskSpec.from_text("cat", threshold=threshold).threshold == threshold


@pytest.mark.parametrize("options", [{"raw_bits": 16}, {"profile": "masquerade"}, {"blur_sigma": 0.0}])
def test_valid_options_are_accepted(options):
    spec = MaskSpec.from_text("cat", **options)
    for key, value in options.items():
        assert getattr(spec, key) == value


# --- outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("given, outputs", [
    ("rle", ("rle",)), ("mask,rle", ("mask", "rle")), (" mask , raw,rle ", ("mask", "raw", "rle")),
    (["raw", "rle"], ("raw", "rle")), (("mask",), ("mask",)),
])
def test_outputs_take_rle_alone_or_beside_the_images_as_text_or_a_list(given, outputs):
    assert MaskSpec.from_text("cat", outputs=given).outputs == outputs


def test_outputs_default_to_both_images_without_rle():
    assert MaskSpec.from_text("cat").outputs == ("mask", "raw")


@pytest.mark.parametrize("given", ["rle,foo", "png", "", [], ["mask", 3]])
def test_bad_outputs_raise_naming_the_option_and_what_it_takes(given):
    with pytest.raises(InvalidSpecError) as info:
        MaskSpec.from_text("cat", outputs=given)
    assert "--outputs must be one or more of mask, raw, rle, comma-separated" in str(info.value)


def test_rle_travels_through_json_with_the_spec():
    spec = MaskSpec.from_text("cat", outputs="mask,rle")
    assert MaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(InvalidSpecError, match="--outputs must be"):
        MaskSpec.from_dict({**spec.to_dict(), "outputs": ["rle", "foo"]})


# --- JSON transport -----------------------------------------------------------------


def test_to_dict_from_dict_round_trips_through_json():
    # Given a spec with every option away from its default
    spec = MaskSpec.from_text(
        "person|dog",
        "background",
        threshold=0.25,
        normalize=True,
        profile="masquerade",
        blur_sigma=1.5,
        grow=-2,
        invert=True,
        raw_bits=16,
        max_side=1024,
    )
    # When it travels as JSON (as inside a Celery message)
    wire = json.dumps(spec.to_dict())
    back = MaskSpec.from_dict(json.loads(wire))
    # Then it comes back equal, with tuples for the prompt lists
    assert back == spec
    assert isinstance(back.prompts, tuple) and isinstance(back.negative_prompts, tuple)
    assert back.to_dict() == spec.to_dict()


def test_to_dict_is_plain_json():
    data = MaskSpec.from_text("a|b").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["prompts"] == ["a", "b"]


def test_from_dict_with_unknown_key_raises_naming_it():
    data = MaskSpec.from_text("cat").to_dict()
    data["treshold"] = 0.3  # a typo a user could make
    with pytest.raises(InvalidSpecError, match="treshold"):
        MaskSpec.from_dict(data)


def test_from_dict_validates_values_too():
    data = MaskSpec.from_text("cat").to_dict()
    data["threshold"] = 7
    with pytest.raises(InvalidSpecError, match="threshold"):
        MaskSpec.from_dict(data)


def test_spec_is_immutable():
    spec = MaskSpec.from_text("cat")
    with pytest.raises(AttributeError):
        spec.threshold = 0.9  # type: ignore[misc]
