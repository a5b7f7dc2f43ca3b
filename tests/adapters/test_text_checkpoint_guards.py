"""A tensorized model cannot silently turn into a stock one: not by loading its checkpoint with
plain ``from_pretrained``, not by switching its attention implementation."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny_llama import tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from seqtensor.adapters.text.tensorize import (  # noqa: E402
    load_tensorized,
    tensorize,
    untensorize,
)


def _stock() -> LlamaForCausalLM:
    return tiny_llama()


def _ids() -> torch.Tensor:
    return torch.randint(3, 61, (1, 24), generator=torch.Generator().manual_seed(1))


def test_plain_from_pretrained_refuses_a_tensorized_checkpoint(tmp_path):
    model = tensorize(_stock(), fold=(2, 3, 4), backend="reference")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="seqtensor_tensorized_llama"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = load_tensorized(str(tmp_path))
    assert reloaded.config.model_type == "llama"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, model(_ids()).logits)
    # saved again from the reloaded model: still marked, still reloadable
    reloaded.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="seqtensor_tensorized_llama"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert load_tensorized(str(tmp_path / "again")).config.seqtensor["fold"] == [2, 3, 4]


def test_an_untensorized_model_saves_a_stock_checkpoint(tmp_path):
    model = untensorize(tensorize(_stock(), fold=(2, 3, 4), backend="reference"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, _stock()(_ids()).logits)


def test_set_attn_implementation_refuses_on_a_tensorized_model():
    stock = _stock()
    with torch.no_grad():
        expected = stock(_ids()).logits
    model = tensorize(_stock(), fold=(2, 3, 4), positional="tensor_rope", backend="reference")
    with pytest.raises(ValueError, match="untensorize"):
        model.set_attn_implementation("sdpa")
    model.set_attn_implementation("seqtensor")  # its own implementation stays allowed
    untensorize(model)
    model.set_attn_implementation("eager")  # stock again: RoPE back, any implementation
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, expected, rtol=1e-5, atol=1e-5)
