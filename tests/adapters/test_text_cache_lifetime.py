"""A tensorized model's generation cache dies with the last reference to it, as stock attention's does.

Reference cycles would leave it (and its tensors: the K/V cache and the value levels, gigabytes at
long contexts) to Python's cyclic collector, which may run much later. Each test runs with the
cyclic collector off, so only reference counting can free anything.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tiny_llama import tiny_llama  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from seqtensor.adapters.text.tensorize import tensorize  # noqa: E402


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _model(**kwargs) -> LlamaForCausalLM:
    model = tiny_llama()
    return tensorize(model, fold=(2, 3, 4), backend="reference", **kwargs)


def _tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors(item, seen)]


def _watch(cache) -> list[weakref.ref]:
    """Weak references to the cache, its tensorized states and every tensor they hold."""
    states = getattr(cache, "_seqtensor_states", {})
    tensors = _tensors(cache)
    assert states and len(tensors) > 10  # the test watches a real, populated cache
    return [weakref.ref(cache), *(weakref.ref(s) for s in states.values())] + [
        weakref.ref(t) for t in tensors
    ]


def _alive(refs: list[weakref.ref]) -> list[str]:
    return [type(r()).__name__ for r in refs if r() is not None]


@pytest.mark.parametrize("top_level_cache", ["native", "int8"])
def test_dropping_the_output_frees_the_cache(no_cyclic_gc, top_level_cache):
    model = _model(top_level_cache=top_level_cache)
    ids = torch.randint(3, 61, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        # a decode step too: it builds and shares the step plan across layers
        out = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    refs = _watch(out.past_key_values)
    del out
    assert _alive(refs) == []


def test_generate_frees_its_cache(no_cyclic_gc):
    model = _model()
    ids = torch.randint(3, 61, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    refs = _watch(out.past_key_values)
    del out
    assert _alive(refs) == []


def test_a_deep_copy_of_the_cache_is_freed_and_edits_itself(no_cyclic_gc):
    """Branching a prefilled prompt (deepcopy) keeps the two caches apart and frees each alone."""
    model = _model()
    ids = torch.randint(3, 61, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    keys = cache.layers[0].keys.clone()
    levels = [x.clone() for x in _tensors(cache._seqtensor_states[0])]
    twin = copy.deepcopy(cache)
    twin.reorder_cache(torch.tensor([1, 0]))
    a, b = cache._seqtensor_states[0], twin._seqtensor_states[0]
    assert torch.equal(cache.layers[0].keys, keys) and torch.equal(
        twin.layers[0].keys, keys.flip(0)
    )
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a), levels))  # the original untouched
    refs = _watch(twin)
    del twin, b
    assert _alive(refs) == []
    assert cache._seqtensor_states[0] is a  # the original is untouched
