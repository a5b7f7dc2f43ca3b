"""The default path of the op reads no tensor value on the host (so a GPU call never waits for the
device and can be captured in a CUDA graph): every Tensor -> Python conversion raises here."""

import pytest
import torch

import seqtensor as st
from seqtensor.core.positional import TensorRoPE

pytestmark = pytest.mark.interpreter
pytest.importorskip("triton")


def no_host_reads(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("positional", [None, "tensor_rope", "rope"])
def test_default_call_reads_no_tensor_value(positional):
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    TensorRoPE(16).rotation_table(8, torch.float32, "cpu")  # warm the module-level caches
    st.tensorized_attention(q, k, v, (4, 6), causal=True, positional=positional, backend="triton")
    with pytest.MonkeyPatch.context() as mp:
        no_host_reads(mp)
        out = st.tensorized_attention(
            q, k, v, (4, 6), causal=True, positional=positional, backend="triton"
        )
        out.backward(torch.ones_like(out))
    assert q.grad is not None and out.shape == (1, 2, 24, 16)


def test_check_finite_is_the_opt_in_host_read():
    q = torch.randn(1, 2, 24, 16)
    with pytest.MonkeyPatch.context() as mp:
        no_host_reads(mp)
        with pytest.raises(AssertionError, match="host"):
            st.tensorized_attention(q, q, q, (4, 6), check_finite=True, backend="triton")
