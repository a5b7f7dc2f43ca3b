import math

import pytest
import torch

from seqtensor import Learned, RoPE, Sinusoidal, TensorRoPE
from seqtensor.core.positional import make_positional

f64 = torch.float64


def rope_by_hand(x, pos, inv_freq):
    """Rotate-half RoPE written out pair by pair."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        c, s = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def test_rope_matches_hand_rotation_and_preserves_norm():
    rope = RoPE(8, base=100.0)
    q = torch.randn(1, 1, 5, 8, dtype=f64)
    rq, _ = rope.apply(q, q)
    inv = [100.0 ** (-2 * i / 8) for i in range(4)]
    for t in range(5):
        torch.testing.assert_close(rq[0, 0, t], rope_by_hand(q[0, 0, t], t, inv))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))


def test_linear_scaling_divides_positions():
    q = torch.randn(1, 1, 6, 8, dtype=f64)
    scaled, _ = RoPE(8, scaling="linear", factor=4.0).apply(q, q)
    plain = RoPE(8)
    expected, _ = plain.apply(q, q, positions=torch.arange(6, dtype=f64) / 4)
    torch.testing.assert_close(scaled, expected)


def test_ntk_and_yarn_keep_highest_frequency_and_slow_the_lowest():
    base = RoPE(64, base=1e4).inv_freq
    for scaling in ("ntk", "yarn"):
        scaled = RoPE(64, base=1e4, scaling=scaling, factor=8.0, original_max_len=2048).inv_freq
        assert math.isclose(float(scaled[0]), float(base[0]), rel_tol=1e-6)
        assert scaled[-1] < base[-1]
    yarn = RoPE(64, scaling="yarn", factor=8.0, original_max_len=2048)
    assert math.isclose(yarn.mscale, 0.1 * math.log(8.0) + 1)
    torch.testing.assert_close(
        yarn.inv_freq[-1], base[-1] / 8
    )  # lowest frequencies fully interpolated


def test_sinusoidal_is_the_vaswani_table():
    pe = Sinusoidal(4).encoding(torch.arange(3), f64)
    t = torch.arange(3, dtype=f64)
    expected = torch.stack([torch.sin(t), torch.sin(t / 100), torch.cos(t), torch.cos(t / 100)], -1)
    torch.testing.assert_close(pe, expected)


def test_learned_rejects_positions_beyond_max_len():
    q = torch.randn(1, 1, 9, 4)
    with pytest.raises(ValueError, match="max_len"):
        Learned(8, 4).apply(q, q)


def test_tensor_rope_hop_equals_rope_at_coordinates():
    x = torch.randn(3, 8, dtype=f64)
    pos = torch.tensor([4, 0, 2])
    inv = [1e4 ** (-2 * i / 8) for i in range(4)]
    out = TensorRoPE(8).hop(x, pos)
    for i in range(3):
        torch.testing.assert_close(out[i], rope_by_hand(x[i], int(pos[i]), inv))


def test_make_positional_names_and_errors():
    assert isinstance(make_positional("tensor_rope", 8), TensorRoPE)
    assert make_positional("none", 8) is None
    with pytest.raises(ValueError, match="positional"):
        make_positional("alibi", 8)
    with pytest.raises(ValueError, match="even"):
        TensorRoPE(7)


def test_inv_freq_keeps_its_precision_when_the_module_is_cast():
    """module.to(bfloat16) must not round the frequencies: at position ~4k that is radians of error."""
    for scheme in (TensorRoPE(64), RoPE(64), Sinusoidal(64)):
        exact = scheme.inv_freq.clone()
        scheme.to(torch.bfloat16)
        assert torch.equal(scheme.inv_freq, exact)
    x = torch.randn(1, 1, 4096, 64)
    cast = RoPE(64).to(torch.bfloat16)
    q, _ = cast.apply(x, x)
    q_ref, _ = RoPE(64).apply(x, x)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


def test_rotation_table_is_cached_grown_and_rebuilt_when_inv_freq_changes():
    rope = TensorRoPE(8)
    t = rope.rotation_table(10, torch.float32, "cpu")
    assert t.shape == (10, 8) and rope.rotation_table(5, torch.float32, "cpu") is t
    pos = torch.arange(10, dtype=torch.float64)[:, None] * rope.inv_freq[None, :]
    torch.testing.assert_close(t, torch.cat([pos.cos(), pos.sin()], 1).float())
    bigger = rope.rotation_table(20, torch.float32, "cpu")
    assert bigger.shape[0] == 20 and torch.equal(bigger[:10], t)
    assert rope.rotation_table(5, torch.float16, "cpu").dtype == torch.float16
    rope.inv_freq.mul_(2)  # edited in place: the table follows
    moved = rope.rotation_table(20, torch.float32, "cpu")
    assert moved is not bigger and torch.allclose(moved[1, :4], (2 * pos[1]).cos().float())
