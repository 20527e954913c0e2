import pytest

from sag.errors import SagConfigError
from sag.seeds import format_seeds, parse_seeds


@pytest.mark.parametrize(
    "spec, expected",
    [("0-3", [0, 1, 2, 3]), ("0,5,9", [0, 5, 9]), ("0-2,10-11", [0, 1, 2, 10, 11]), (7, [7]), ("4", [4])],
)
def test_parse(spec, expected):
    assert parse_seeds(spec) == expected


@pytest.mark.parametrize("spec", ["5-2", "a-b", "-1", "1,,2", "0-3,2", "", True])
def test_bad_specs_name_the_value(spec):
    with pytest.raises(SagConfigError) as e:
        parse_seeds(spec)
    assert "accepted" in str(e.value)
    assert "\n" not in str(e.value)


def test_format_roundtrip():
    seeds = [0, 1, 2, 5, 7, 8]
    assert format_seeds(seeds) == "0-2,5,7-8"
    assert parse_seeds(format_seeds(seeds)) == seeds
