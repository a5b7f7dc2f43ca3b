"""The named argument checks every public entry point uses."""

import numpy as np
import pytest

from seqtensor._validation import check_int, check_real, is_int
from seqtensor.nn import ModelConfig


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = check_int("h", value, low=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, "3", None])
def test_check_int_refuses_non_integers_by_name(value):
    with pytest.raises(TypeError, match="h must be an int"):
        check_int("h", value)
    assert not is_int(value)


def test_check_int_bounds_are_named():
    with pytest.raises(ValueError, match=r"h must be a positive int, got 0"):
        check_int("h", 0, low=1)
    with pytest.raises(ValueError, match=r"h must be an int >= 2, got 1"):
        check_int("h", 1, low=2)
    with pytest.raises(ValueError, match=r"in \[1, 4\]"):
        check_int("h", 5, low=1, high=4)


def test_check_real():
    assert check_real("lr", np.float32(0.5), low=0.0) == 0.5
    assert check_real("lr", 2, low=0.0) == 2.0
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="lr must be a finite real"):
            check_real("lr", bad, low=0.0)
    with pytest.raises(ValueError, match="> 0"):
        check_real("lr", 0.0, low=0.0, open_low=True)
    with pytest.raises(TypeError, match="lr must be a real"):
        check_real("lr", True)


def test_model_config_takes_numpy_ints_and_stays_json():
    cfg = ModelConfig(d_model=np.int64(32), n_heads=np.int64(4), n_layers=np.int32(1))
    assert type(cfg.d_model) is int and ModelConfig.from_json(cfg.to_json()) == cfg
