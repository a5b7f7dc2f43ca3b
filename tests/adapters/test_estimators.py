"""SequenceClassifier / SequenceRegressor: scikit-learn's own estimator suite, meta-estimators, inputs.

Legend: B samples, n sequence length, C channels per step.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from seqtensor import BalancedFold, ExtrapolatingFold
from seqtensor.adapters.estimators import SequenceClassifier, SequenceNet, SequenceRegressor


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation, and on a busy 2-core
    machine they stall (a 5 ms step becomes 100 ms). One thread keeps the suite fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recall_data(n_samples=120, seq_len=24, channels=None, seed=0):
    """y = sign of the value at one fixed, far step (step 2 of 24): needs position-aware reach."""
    rng = np.random.RandomState(seed)
    shape = (n_samples, seq_len) if channels is None else (n_samples, seq_len, channels)
    X = rng.normal(size=shape)
    signal = X[:, 2] if channels is None else X[:, 2, channels - 1]
    return X, (signal > 0).astype(int)


# ---------------------------------------------------------------- scikit-learn's own suite


@parametrize_with_checks([SequenceClassifier(), SequenceRegressor()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_tags_declare_input_layouts_and_determinism():
    tags = SequenceClassifier().__sklearn_tags__()
    assert tags.input_tags.two_d_array and tags.input_tags.three_d_array
    assert not tags.non_deterministic and not tags.input_tags.allow_nan
    assert not SequenceClassifier(vocab_size=10).__sklearn_tags__().input_tags.three_d_array
    assert SequenceRegressor(device="cuda").__sklearn_tags__().non_deterministic
    assert SequenceRegressor().__sklearn_tags__().target_tags.multi_output


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("fold", [(4, 6), BalancedFold(2), ExtrapolatingFold(8)], ids=repr)
def test_fold_is_stored_as_given_and_survives_clone_and_set_params(fold):
    clf = SequenceClassifier(fold=fold)
    assert clf.get_params()["fold"] is fold
    copy = clone(clf)
    assert copy.get_params()["fold"] == fold
    other = BalancedFold(3)
    assert clf.set_params(fold=other, d_model=8).fold is other and clf.d_model == 8
    X, y = recall_data(40)
    SequenceClassifier(fold=fold, max_epochs=1, random_state=0).fit(X, y)
    assert clf.fold is other  # fit never rewrites parameters


def test_not_fitted_error_before_fit():
    for est, methods in (
        (SequenceClassifier(), ("predict", "predict_proba", "score")),
        (SequenceRegressor(), ("predict", "score")),
    ):
        for method in methods:
            args = (np.zeros((2, 5)),) if method != "score" else (np.zeros((2, 5)), np.zeros(2))
            with pytest.raises(NotFittedError):
                getattr(est, method)(*args)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(attention="sparse"), "attention"),
        (dict(pooling="median"), "pooling"),
        (dict(d_model=0), "d_model"),
        (dict(max_epochs=1.5), "max_epochs"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(validation_fraction=1.0), "validation_fraction"),
        (dict(positional="alibi"), "positional"),
        (dict(d_model=10, n_heads=4), "divisible"),
        (dict(learning_rate=None), "learning_rate"),
        (dict(dropout=None), "dropout"),
        (dict(vocab_size=True), "vocab_size"),
    ],
)
def test_bad_hyper_parameters_fail_in_fit_with_named_errors(params, match):
    clf = SequenceClassifier(**params)  # __init__ only stores
    X, y = recall_data(20)
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y)


# ---------------------------------------------------------------- learning, layouts, modes


@pytest.mark.parametrize("attention", ["tensorized", "full"])
def test_classifier_learns_a_long_range_dependency(attention):
    X, y = recall_data(240)
    clf = SequenceClassifier(attention=attention, max_epochs=30, random_state=0).fit(
        X[:160], y[:160]
    )
    assert clf.n_features_in_ == 24 and clf.n_channels_ == 1
    assert clf.score(X[160:], y[160:]) > 0.85
    proba = clf.predict_proba(X[160:])
    assert proba.shape == (80, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(clf.predict(X[160:]), clf.classes_[proba.argmax(1)])


def test_multivariate_input_three_d():
    X, y = recall_data(160, channels=3)
    clf = SequenceClassifier(max_epochs=30, random_state=0).fit(X, y)
    assert clf.n_features_in_ == 24 and clf.n_channels_ == 3
    assert clf.x_mean_.shape == (3,)
    assert clf.score(X, y) > 0.85
    with pytest.raises(ValueError, match="features per step"):
        clf.predict(X[:, :, :2])
    with pytest.raises(ValueError, match="24 features"):
        clf.predict(X[:, :20])


def test_univariate_two_d_equals_three_d_with_one_channel():
    X, y = recall_data(40)
    a = SequenceRegressor(max_epochs=2, random_state=0).fit(X, y.astype(float))
    b = SequenceRegressor(max_epochs=2, random_state=0).fit(X[..., None], y.astype(float))
    np.testing.assert_allclose(a.predict(X), b.predict(X[..., None]))
    np.testing.assert_allclose(a.predict(X), a.predict(X[..., None]))


def test_token_sequences_through_vocab_size():
    rng = np.random.RandomState(0)
    X = rng.randint(0, 8, size=(400, 16))
    y = np.where(X[:, 13] < 4, "low", "high")  # the token at one step decides
    # three seeds: one unlucky initialization may stall near 0.8; two of three must learn the rule
    fits = [
        SequenceClassifier(vocab_size=8, max_epochs=20, random_state=seed).fit(X[:300], y[:300])
        for seed in range(3)
    ]
    clf = fits[0]
    assert list(clf.classes_) == ["high", "low"]
    assert isinstance(clf.model_.embed, torch.nn.Embedding)
    assert clf.x_mean_ is None
    scores = sorted(fit.score(X[300:], y[300:]) for fit in fits)
    assert scores[1] > 0.9 and scores[0] > 0.7, scores
    with pytest.raises(ValueError, match="vocab_size=8"):
        clf.predict(np.full((2, 16), 8))
    with pytest.raises(ValueError, match="integer token ids"):
        clf.predict(np.full((2, 16), 0.5))
    with pytest.raises(ValueError, match="dim 3"):
        clf.predict(np.zeros((2, 16, 1), dtype=int))


def test_regressor_single_and_multi_output():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(160, 12))
    Y = np.stack([X[:, 1] * 3.0 + 10.0, X[:, 9] - X[:, 0]], axis=1)  # (B, 2), far from zero mean
    reg = SequenceRegressor(max_epochs=40, random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (160, 2) and reg.predict(X).dtype == np.float64
    assert reg.score(X, Y) > 0.8
    single = SequenceRegressor(max_epochs=40, random_state=0).fit(X, Y[:, 0])
    assert single.predict(X).shape == (160,)
    assert single.score(X, Y[:, 0]) > 0.8
    np.testing.assert_allclose(single.y_mean_, [Y[:, 0].mean()])


def test_early_stopping_with_validation_fraction():
    X, y = recall_data(120)
    clf = SequenceClassifier(max_epochs=200, validation_fraction=0.25, random_state=0).fit(X, y)
    assert any("val_loss" in record for record in clf.history_)
    assert clf.n_iter_ < 200  # stopped early
    with pytest.raises(ValueError, match="validation_fraction"):
        SequenceRegressor(validation_fraction=0.5).fit(X[:1], y[:1])


def test_random_state_reproducible_and_global_rng_untouched():
    X, y = recall_data(60)
    np.random.seed(123)
    torch.manual_seed(123)
    expected_np, expected_torch = np.random.rand(), torch.rand(1)
    np.random.seed(123)
    torch.manual_seed(123)
    a = SequenceClassifier(max_epochs=3, random_state=7).fit(X, y)
    assert np.random.rand() == expected_np and torch.equal(torch.rand(1), expected_torch)
    b = SequenceClassifier(max_epochs=3, random_state=7).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    c = SequenceClassifier(max_epochs=3, random_state=8).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))


def test_pickle_round_trip_keeps_predictions():
    X, y = recall_data(40)
    reg = SequenceRegressor(max_epochs=2, random_state=0, fold=(4, 6)).fit(X, y.astype(float))
    again = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(again.predict(X), reg.predict(X))
    assert isinstance(again.model_, SequenceNet)


def test_dataframe_input_records_feature_names():
    pd = pytest.importorskip("pandas")
    X, y = recall_data(40, seq_len=6)
    frame = pd.DataFrame(X, columns=[f"t{i}" for i in range(6)])
    clf = SequenceClassifier(max_epochs=1, random_state=0).fit(frame, y)
    assert list(clf.feature_names_in_) == list(frame.columns)
    assert clf.predict(frame).shape == (40,)


# ---------------------------------------------------------------- meta-estimators


def test_inside_pipeline():
    X, y = recall_data(160)
    pipe = Pipeline(
        [("scale", StandardScaler()), ("clf", SequenceClassifier(max_epochs=30, random_state=0))]
    )
    pipe.fit(X[:120], y[:120])
    assert pipe.score(X[120:], y[120:]) > 0.8
    assert pipe.predict_proba(X[:3]).shape == (3, 2)
    # a pipeline step may also produce the 3-D layout: (B, n) -> (B, n, 2) with a lag channel
    lagged = FunctionTransformer(lambda Z: np.stack([Z, np.roll(Z, 1, axis=1)], axis=-1))
    reg = Pipeline([("lag", lagged), ("reg", SequenceRegressor(max_epochs=2, random_state=0))]).fit(
        X, y.astype(float)
    )
    assert reg.named_steps["reg"].n_channels_ == 2


def test_inside_grid_search():
    X, y = recall_data(90)
    grid = GridSearchCV(
        SequenceClassifier(max_epochs=15, random_state=0),
        {"attention": ["tensorized", "full"], "fold": [None, (4, 6)]},
        cv=2,
    )
    grid.fit(X, y)
    assert len(grid.cv_results_["params"]) == 4
    assert grid.best_estimator_.fold == grid.best_params_["fold"]
    assert grid.best_estimator_.predict(X).shape == (90,)
    regression = GridSearchCV(
        SequenceRegressor(max_epochs=3, random_state=0), {"d_model": [8, 16]}, cv=2, scoring="r2"
    )
    assert regression.fit(X, y.astype(float)).best_params_["d_model"] in (8, 16)


# ---------------------------------------------------------------- bad input


def bad_input_cases():
    X, y = recall_data(20, seq_len=6)
    nan_X, inf_X, nan_y = X.copy(), X.copy(), y.astype(float)
    nan_X[3, 2], inf_X[0, 0], nan_y[4] = np.nan, np.inf, np.nan
    return [
        ("nan in X", nan_X, y, "NaN"),
        ("inf in X", inf_X, y, "infinity"),
        ("nan in y", X, nan_y, "NaN"),
        ("empty", X[:0], y[:0], "0 sample"),
        ("zero length", X[:, :0], y, "0 feature"),
        ("1-D X", X[:, 0], y, "Expected 2D array"),
        ("4-D X", X.reshape(20, 6, 1, 1), y, "n_samples, seq_len"),
        ("mismatched lengths", X, y[:-1], "inconsistent numbers of samples"),
    ]


@pytest.mark.parametrize("Estimator", [SequenceClassifier, SequenceRegressor])
@pytest.mark.parametrize(
    "name, X, y, match", bad_input_cases(), ids=[c[0] for c in bad_input_cases()]
)
def test_bad_input_raises_clear_errors(Estimator, name, X, y, match):
    with pytest.raises(ValueError, match=match):
        Estimator(max_epochs=1).fit(X, y)


def test_classifier_rejects_one_class_and_continuous_targets():
    X, _ = recall_data(20, seq_len=6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        SequenceClassifier().fit(X, np.ones(20, dtype=int))
    with pytest.raises(ValueError, match="Unknown label type"):
        SequenceClassifier().fit(X, np.linspace(0, 1, 20))


def test_predict_rejects_bad_input_after_fit():
    X, y = recall_data(20, seq_len=6)
    clf = SequenceClassifier(max_epochs=1, random_state=0).fit(X, y)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(bad)
    with pytest.raises(ValueError, match="6 features"):
        clf.predict(X[:, :5])
    with pytest.raises(ValueError, match="Expected 2D array"):
        clf.predict(X[0])


def test_sequence_regressor_rejects_values_beyond_float32():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 8)), rng.normal(size=16)
    kw = dict(max_epochs=1, random_state=0, device="cpu")
    with pytest.raises(ValueError, match=r"y has values up to 2.37e\+200, beyond float32"):
        SequenceRegressor(**kw).fit(X, y * 1e200)
    with pytest.raises(ValueError, match="X has values up to"):
        SequenceRegressor(**kw).fit(X * 1e200, y)
    with pytest.raises(ValueError, match="infinity|inf"):
        SequenceRegressor(**kw).fit(np.where(X > 2, np.inf, X), y)
