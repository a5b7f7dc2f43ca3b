"""Real data sets as long DataFrames (``unique_id``, ``ds``, ``y``) and the standard benchmark splits."""

from .timeseries import *  # noqa: F403  (the loaders are this package's public names)
from .timeseries import __all__
