"""Real data sets as long DataFrames (``unique_id``, ``ds``, ``y``) and the standard benchmark
splits."""

from . import timeseries
from .timeseries import *  # noqa: F403  (the loaders are this package's public names)

__all__ = list(timeseries.__all__)
