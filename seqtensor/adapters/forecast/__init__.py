"""Long time-series forecasting: ``Forecaster`` (fit / predict / cross_validation) and baselines."""

from .baselines import DLinear, DLinearForecaster, seasonal_naive
from .forecaster import Forecaster
from .model import ForecastModelConfig, PatchForecastModel, forecast_loss

__all__ = [
    "Forecaster",
    "DLinearForecaster",
    "DLinear",
    "seasonal_naive",
    "ForecastModelConfig",
    "PatchForecastModel",
    "forecast_loss",
]
