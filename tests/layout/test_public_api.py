"""Every public name resolves, whether imported eagerly or on first use."""

import seqtensor


def test_every_public_name_resolves_and_is_documented():
    for name in seqtensor.__all__:
        obj = getattr(seqtensor, name)
        assert obj.__doc__, f"seqtensor.{name} has no docstring"
    assert set(seqtensor.__all__) <= set(dir(seqtensor))
