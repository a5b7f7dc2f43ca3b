import pytest
import torch

import seqtensor as st
from seqtensor.nn import full_attention


def test_layers_share_weights_and_agree_on_an_order_one_fold():
    torch.manual_seed(0)
    full = st.FullAttention(32, 4, 2, causal=True, positional="rope").double()
    tens = st.TensorizedAttention(32, 4, 2, fold=(20,), causal=True, positional="rope").double()
    tens.load_state_dict(full.state_dict())
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(tens(x), full(x))


@pytest.mark.parametrize("causal", [False, True])
def test_layer_key_padding_equals_unpadded(causal):
    layer = st.TensorizedAttention(16, 2, fold=(4, 5), causal=causal).double().eval()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, 13:] = False
    out = layer(x, keep)
    torch.testing.assert_close(out[1:, :13], layer(x[1:, :13]))


def test_full_attention_all_masked_rows_are_zero_not_nan():
    q = torch.randn(1, 2, 5, 4)
    keep = torch.tensor([[False, False, True, True, True]])
    out = full_attention(q, q, q, causal=True, key_padding_mask=keep)
    assert torch.isfinite(out).all() and (out[:, :, :2] == 0).all()


def test_layer_gradients_flow_and_errors_are_clear():
    layer = st.TensorizedAttention(16, 4, 2, causal=True)
    x = torch.randn(2, 30, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())
    with pytest.raises(ValueError, match="embed_dim"):
        layer(torch.randn(2, 30, 8))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        st.TensorizedAttention(16, 4, 3)
    with pytest.raises(ValueError, match="global positional"):
        st.FullAttention(16, 4, positional="tensor_rope")


def test_public_api_is_exported_and_import_stays_light():
    import subprocess
    import sys

    code = "import sys, seqtensor; print('transformers' in sys.modules); print(all(hasattr(seqtensor, n) for n in seqtensor.__all__) and set(seqtensor.__all__) <= set(dir(seqtensor)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"], out


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (torch.ones(2, 6, dtype=torch.uint8), TypeError, "must be bool"),
        (torch.ones(2, 5, dtype=torch.bool), ValueError, r"shape \(B=2, n=6\)"),
        (torch.ones(6, dtype=torch.bool), ValueError, "2 dimensions"),
    ],
)
def test_both_layers_reject_the_same_bad_key_padding_masks(mask, error, match):
    x = torch.randn(2, 6, 16)
    for layer in (st.nn.FullAttention(16, 2), st.nn.TensorizedAttention(16, 2, fold=(2, 3))):
        with pytest.raises(error, match=match):
            layer(x, mask)
