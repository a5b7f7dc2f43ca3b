"""Adapters that put the stack behind familiar interfaces.

- ``estimators``: scikit-learn ``SequenceClassifier`` / ``SequenceRegressor``;
- ``forecast``: the ``Forecaster`` for long time series (NeuralForecast-style frames);
- ``text``: tensorized attention inside a pretrained Hugging Face causal LM.

Each loads its own heavy dependency (scikit-learn, pandas, transformers) only when imported.
"""
