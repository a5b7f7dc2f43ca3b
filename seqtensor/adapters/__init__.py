"""Adapters that put tensorized attention behind a familiar interface: ``Forecaster`` for time series."""

from .forecast_model import ForecastModelConfig, PatchForecastModel, forecast_loss
from .timeseries import Forecaster

__all__ = ["Forecaster", "ForecastModelConfig", "PatchForecastModel", "forecast_loss"]
