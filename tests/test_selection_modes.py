"""CraftPruner's selection modes, criteria, filter rules, FLOPs target and the score before fine-tuning."""

import math
import warnings

import numpy as np
import pytest
import torch

import sklearn_craft._prefix
import sklearn_craft.pruner
from sklearn_craft.finetune import recalibrate_batchnorm
from sklearn_craft.pooling import ActivationPooler
from sklearn_craft.profiling import count_flops, filter_flops
from sklearn_craft.pruner import CraftPruner
from sklearn_craft.rules import FilterRule, L1NormRule, LassoRankRule, RandomRule, check_filter_rule, top_filters
from sklearn_craft.selection import LassoFilterSelector, find_knee
from sklearn_craft.surgery import channel_readers, coupled_groups, prune_channels, truncate

from conftest import ARCHITECTURES, conv_chain

GAMMA = 0.05


def _lasso_seed(random_state=0):
    """The seed CraftPruner gives its LASSO validation splits (the first it draws from random_state)."""
    return np.random.RandomState(random_state).randint(np.iinfo(np.int32).max, size=4)[0]


def _pooled(model, layer, X):
    return ActivationPooler(model, layers=[layer]).fit(X).transform(X)


def _lasso_choice(features, target, seed=None):
    seed = _lasso_seed() if seed is None else seed
    selector = LassoFilterSelector(gamma=GAMMA, random_state=seed).fit(features, target)
    return np.flatnonzero(selector.support_)


def _flops_share(pruner, shape):
    return count_flops(pruner.pruned_model_, shape) / count_flops(pruner.model, shape)


@pytest.fixture(scope="module")
def data():
    X = np.random.default_rng(0).random((160, 1, 16, 16), dtype=np.float32)
    features = _pooled(conv_chain(), "6", X).astype(np.float64)
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-12)
    y = features[:, [1, 5, 9]] @ np.random.default_rng(0).normal(size=3)
    return X, y + 0.1 * np.random.default_rng(1).normal(size=len(y))


def test_sequential_on_a_chain_selects_each_layer_on_the_cut_network(data):
    X, y = data
    pruner = CraftPruner(conv_chain(), gamma=GAMMA, selection="sequential", random_state=0).fit(X, y)

    current = conv_chain()
    example = torch.zeros(1, *X.shape[1:])
    for layer in ["0", "4", "6"]:
        chosen = _lasso_choice(_pooled(current, layer, X), y)
        np.testing.assert_array_equal(pruner.selected_[layer], chosen)
        if len(chosen) < current.get_submodule(layer).out_channels:
            current = recalibrate_batchnorm(prune_channels(current, {layer: chosen}, example), X)
    one_shot = CraftPruner(conv_chain(), gamma=GAMMA, random_state=0).fit(X, y)
    # The first layer sees the same network in both modes; the later ones do not.
    np.testing.assert_array_equal(pruner.selected_["0"], one_shot.selected_["0"])
    assert any(not np.array_equal(pruner.selected_[layer], one_shot.selected_[layer]) for layer in ["4", "6"])
    assert pruner.stages_["layers"].tolist() == [["0"], ["4"], ["6"]]
    assert pruner.stages_["n_selected"].tolist() == [len(pruner.selected_[layer]) for layer in ["0", "4", "6"]]
    assert set(pruner.selectors_) == {"0", "4", "6"} and pruner.selector_ is None
    assert pruner.curves_["group"].unique().tolist() == ["0", "4", "6"]
    # The final network is the one the loop cut, BatchNorm statistics included.
    np.testing.assert_allclose(pruner.transform(X), _pooled(current, "6", X), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_sequential_on_coupled_architectures_cuts_group_by_group(name):
    architecture = ARCHITECTURES[name]
    model = architecture.build()
    X = np.random.default_rng(0).random((64, *architecture.input_shape), dtype=np.float32)
    example = torch.zeros(1, *architecture.input_shape)
    layers = ActivationPooler(model).fit(X[:1]).layers_
    y = _pooled(model, layers[len(layers) // 2], X)[:, :3].sum(axis=1)
    pruner = CraftPruner(
        model, gamma=0.1, selection="sequential", random_state=0, selector_params={"alphas": 20}
    ).fit(X, y)

    groups = coupled_groups(truncate(model, pruner.head_layer_, example), example)
    assert pruner.stages_["layers"].tolist() == [[layer for layer in group if layer in layers] for group in groups]
    for group in groups:
        assert len({tuple(pruner.keep_[layer]) for layer in group}) == 1
        # Every member votes, a depthwise convolution too: the group keeps the union of their choices.
        members = [layer for layer in group if layer in pruner.keep_]
        if members:
            union = np.unique(np.concatenate([pruner.selected_[layer] for layer in members]))
            np.testing.assert_array_equal(pruner.keep_[members[0]], union)
    body = pruner.pruned_model_
    assert all(body.get_submodule(layer).out_channels == len(kept) for layer, kept in pruner.keep_.items())
    assert pruner.report_.loc["flops", "reduction_pct"] > 0
    np.testing.assert_allclose(
        pruner.decision_function(X), pruner.satellites_[pruner.head_layer_].predict(pruner.transform(X)), rtol=1e-3, atol=1e-4
    )


def test_sequential_with_one_layer_is_one_shot(data):
    X, y = data
    one_shot = CraftPruner(conv_chain(), gamma=GAMMA, layers=["4"], random_state=0).fit(X, y)
    sequential = CraftPruner(conv_chain(), gamma=GAMMA, layers=["4"], selection="sequential", random_state=0).fit(X, y)
    np.testing.assert_array_equal(sequential.selected_["4"], one_shot.selected_["4"])
    assert sequential.keep_ == one_shot.keep_
    np.testing.assert_array_equal(sequential.predict(X), one_shot.predict(X))
    np.testing.assert_array_equal(sequential.curves_.to_numpy(), one_shot.curves_.to_numpy())
    assert sequential.satellite_scores_.equals(one_shot.satellite_scores_)


@pytest.mark.parametrize("gamma", [0.0, GAMMA])
def test_sequential_leaves_the_model_alone(data, gamma):
    X, y = data
    model = conv_chain(n_outputs=1)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    pruner = CraftPruner(
        model, gamma=gamma, head="original", selection="sequential", finetune_params={"epochs": 1}, random_state=0
    ).fit(X, y)
    assert pruner.pruned_model_ is not model and pruner.pruned_model_before_finetune_ is not model
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in state.items())


def test_sequential_uses_memory_for_every_stage(data, tmp_path):
    X, y = data
    first = CraftPruner(conv_chain(), gamma=GAMMA, selection="sequential", random_state=0, memory=str(tmp_path)).fit(X, y)
    entries = sorted(path.name for path in tmp_path.rglob("*") if path.is_file())
    second = CraftPruner(conv_chain(), gamma=GAMMA, selection="sequential", random_state=0, memory=str(tmp_path)).fit(X, y)
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == entries
    assert all(np.array_equal(first.selected_[layer], second.selected_[layer]) for layer in first.layers_)


def test_channel_readers_of_a_chain():
    assert channel_readers(conv_chain(), torch.zeros(1, 1, 16, 16)) == {"0": ["4"], "4": ["6"], "6": []}


@pytest.mark.parametrize("selection", ["one-shot", "sequential"])
def test_reconstruction_selects_on_the_pooled_responses_of_the_readers(data, selection):
    X, y = data
    pruner = CraftPruner(conv_chain(), gamma=GAMMA, criterion="reconstruction", selection=selection, random_state=0)
    pruner.fit(X, y)
    original = conv_chain()
    readers = _pooled(original, "4", X).astype(np.float64)
    readers = readers[:, readers.std(axis=0) > 0]
    target = (readers - readers.mean(axis=0)) / readers.std(axis=0) / math.sqrt(readers.shape[1])
    # The first layer's responses are the original network's in both modes.
    np.testing.assert_array_equal(pruner.selected_["0"], _lasso_choice(_pooled(original, "0", X), target))
    task = CraftPruner(conv_chain(), gamma=GAMMA, selection=selection, random_state=0).fit(X, y)
    assert not np.array_equal(pruner.selected_["0"], task.selected_["0"])
    if selection == "one-shot":
        # Nothing reads the last layer: the task selects it.
        np.testing.assert_array_equal(pruner.selected_["6"], task.selected_["6"])
        assert pruner.selectors_["0"] is not pruner.selectors_["4"] and pruner.selector_ is None


def test_both_mixes_the_task_and_the_readers(data):
    X, y = data
    both = CraftPruner(conv_chain(), gamma=GAMMA, criterion="both", random_state=0).fit(X, y)
    original = conv_chain()
    readers = _pooled(original, "4", X).astype(np.float64)
    readers = readers[:, readers.std(axis=0) > 0]
    blocks = [y[:, None], readers]
    target = np.hstack([(b - b.mean(axis=0)) / b.std(axis=0) / math.sqrt(b.shape[1]) for b in blocks])
    np.testing.assert_array_equal(both.selected_["0"], _lasso_choice(_pooled(original, "0", X), target))


def test_l1_norm_rule_keeps_the_filters_of_largest_l1_norm(data):
    X, y = data
    lasso = CraftPruner(conv_chain(), gamma=GAMMA, random_state=0).fit(X, y)
    pruner = CraftPruner(conv_chain(), gamma=GAMMA, filter_rule="l1_norm", random_state=0).fit(X, y)
    model = conv_chain()
    for layer in pruner.layers_:
        norms = model.get_submodule(layer).weight.detach().abs().sum(dim=(1, 2, 3)).numpy()
        count = len(lasso.selected_[layer])
        kept = pruner.selected_[layer]
        assert len(kept) == count
        assert norms[kept].min() >= np.delete(norms, kept).max()


def test_random_rule_is_seeded_by_the_pruner(data):
    X, y = data
    fits = [CraftPruner(conv_chain(), gamma=GAMMA, filter_rule="random", random_state=seed).fit(X, y) for seed in (0, 0, 1)]
    assert all(np.array_equal(fits[0].selected_[layer], fits[1].selected_[layer]) for layer in fits[0].layers_)
    assert any(not np.array_equal(fits[0].selected_[layer], fits[2].selected_[layer]) for layer in fits[0].layers_)
    lasso = CraftPruner(conv_chain(), gamma=GAMMA, random_state=0).fit(X, y)
    assert [len(fits[0].selected_[layer]) for layer in lasso.layers_] == [len(s) for s in lasso.selected_.values()]


@pytest.mark.parametrize("rule", ["l1_norm", "random"])
def test_flops_target_is_reached_with_one_keep_ratio(data, rule):
    X, y = data
    shape = X.shape[1:]
    # A share one ratio reaches: that of the network keeping ceil(0.4 * width) filters everywhere.
    network = conv_chain(n_outputs=1)
    widths = {"0": 8, "4": 16, "6": 12}
    keep = {layer: list(range(math.ceil(0.4 * width))) for layer, width in widths.items()}
    reachable = count_flops(prune_channels(network, keep, torch.zeros(1, *shape)), shape) / count_flops(network, shape)
    pruner = CraftPruner(
        conv_chain(n_outputs=1), filter_rule=rule, flops_target=reachable, head="original", random_state=0
    ).fit(X, y)
    assert abs(_flops_share(pruner, shape) - reachable) <= sklearn_craft.pruner._FLOPS_TOLERANCE
    assert 0 < pruner.keep_ratio_ <= 1
    for layer, width in widths.items():
        assert len(pruner.selected_[layer]) == max(1, math.ceil(pruner.keep_ratio_ * width))
    assert pruner.selector_ is None and pruner.curves_ is None and pruner.selectors_ == {}


def test_flops_target_with_a_satellite_head_counts_the_head(data):
    X, y = data
    pruner = CraftPruner(conv_chain(), filter_rule="l1_norm", flops_target=0.5, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.fit(X, y)
    share = 1 - pruner.report_.loc["flops", "reduction_pct"] / 100
    assert share == pytest.approx(_flops_share(pruner, X.shape[1:]))
    # Within the tolerance, or the closest share one ratio reaches, which the warning gives.
    missed = [str(w.message) for w in caught if "closest network" in str(w.message)]
    assert abs(share - 0.5) <= sklearn_craft.pruner._FLOPS_TOLERANCE or f"{share:.4f}" in missed[0]


@pytest.mark.parametrize("selection", ["one-shot", "sequential"])
def test_flops_knee_prices_each_layer_by_the_flops_of_its_filters(data, selection):
    X, y = data
    pruner = CraftPruner(conv_chain(), gamma=GAMMA, knee="flops", selection=selection, random_state=0).fit(X, y)
    # FLOPs per filter over the mean FLOPs of a whole layer (8, 16 and 12 filters), in every stage alike.
    flops = filter_flops(conv_chain(), X.shape[1:])
    mean = np.mean([flops["0"] * 8, flops["4"] * 16, flops["6"] * 12])
    costs = {layer: flops[layer] / mean for layer in ["0", "4", "6"]}
    for layer, selector in pruner.selectors_.items():
        assert selector.knee == "cost" and selector.group_costs.keys() == costs.keys()
        np.testing.assert_allclose([selector.group_costs[name] for name in costs], list(costs.values()), rtol=1e-12)
        curve = pruner.curves_[pruner.curves_["group"] == layer].reset_index(drop=True)
        knee = pruner.knees_.set_index("group").loc[layer]
        assert knee["alpha"] == curve["alpha"].iloc[find_knee(curve, GAMMA, cost=selector.group_costs[layer])]
        assert knee["n_selected"] == len(pruner.selected_[layer])


def test_lasso_rank_rule_orders_filters_by_their_entry_in_the_path():
    rng = np.random.default_rng(3)
    responses = rng.normal(size=(300, 6)) * [1.0, 5.0, 0.2, 1.0, 3.0, 1.0]
    Y = responses[:, [4]] / 3 * 2.0 + responses[:, [2]] / 0.2 * 1.0 - responses[:, [0]] * 0.5 + 0.05 * rng.normal(size=(300, 1))
    rule = LassoRankRule(alphas=50)
    scores = rule.score_filters(torch.nn.Conv2d(1, 6, 1), responses, Y)
    # Standardized, filter 4 (weight 2) enters first, then 2 (1), then 0 (0.5); the scale of a response does not matter.
    assert top_filters(scores, 3).tolist() == [0, 2, 4]
    assert np.argsort(-scores)[:3].tolist() == [4, 2, 0]
    # The first to enter has the largest correlation with the target.
    correlation = np.abs(((responses - responses.mean(0)) / responses.std(0)).T @ (Y - Y.mean()))[:, 0]
    assert np.argmax(scores) == np.argmax(correlation)
    # Integer sample weights are repeated samples; several targets are one group path.
    weights = rng.integers(1, 3, size=300)
    weighted = rule.score_filters(None, responses, Y, sample_weight=weights.astype(float))
    repeated = rule.score_filters(None, np.repeat(responses, weights, axis=0), np.repeat(Y, weights, axis=0))
    np.testing.assert_array_equal(np.floor(weighted), np.floor(repeated))  # the same entry in the path
    np.testing.assert_allclose(weighted, repeated, rtol=1e-3)  # coefficients to the solver's tolerance
    assert np.isfinite(rule.score_filters(None, responses, np.hstack([Y, -Y, responses[:, [1]]]))).all()
    assert repr(rule) == "LassoRankRule(alphas=50, eps=0.0001)" and check_filter_rule("lasso_rank").alphas == 100


def test_lasso_rank_at_matched_flops_keeps_the_counts_of_any_ranking_rule(data):
    X, y = data
    options = dict(flops_target=0.6, head="original", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the closest share one ratio reaches
        ranked = CraftPruner(conv_chain(n_outputs=1), filter_rule="lasso_rank", **options).fit(X, y)
        l1 = CraftPruner(conv_chain(n_outputs=1), filter_rule="l1_norm", **options).fit(X, y)
    assert ranked.keep_ratio_ == l1.keep_ratio_
    features = _pooled(conv_chain(n_outputs=1), "6", X)
    for layer in ranked.layers_:
        assert len(ranked.selected_[layer]) == len(l1.selected_[layer])
    scores = LassoRankRule().score_filters(None, features, y[:, None])
    np.testing.assert_array_equal(ranked.selected_["6"], top_filters(scores, len(ranked.selected_["6"])))


class _Broken(FilterRule):
    def score_filters(self, conv, responses, Y, *, sample_weight=None, random_state=None):
        return np.ones(conv.out_channels + 1)


def test_a_rule_returning_the_wrong_number_of_scores_is_named(data):
    X, y = data
    with pytest.raises(ValueError, match=r"_Broken\(\).score_filters must return 8 finite scores for '0'"):
        CraftPruner(conv_chain(), gamma=GAMMA, filter_rule=_Broken()).fit(X, y)


def test_rules_and_their_names():
    assert isinstance(check_filter_rule("l1_norm"), L1NormRule)
    assert isinstance(check_filter_rule("random"), RandomRule)
    assert check_filter_rule("lasso") is None
    rule = L1NormRule()
    assert check_filter_rule(rule) is rule
    with pytest.raises(ValueError, match="filter_rule must be"):
        check_filter_rule("l2_norm")
    with pytest.raises(TypeError, match="filter_rule must be"):
        check_filter_rule(3)
    np.testing.assert_array_equal(top_filters([3.0, 1.0, 3.0, 2.0], 2), [0, 2])


def test_score_before_finetune_is_the_score_without_finetuning(data):
    X, y = data
    tuned = CraftPruner(conv_chain(), gamma=GAMMA, finetune_params={"epochs": 2}, random_state=0).fit(X, y)
    untuned = CraftPruner(conv_chain(), gamma=GAMMA, random_state=0).fit(X, y)
    assert tuned.score_before_finetune(X, y) == untuned.score(X, y)
    np.testing.assert_array_equal(tuned.predict_before_finetune(X), untuned.predict(X))
    assert tuned.score(X, y) != tuned.score_before_finetune(X, y)
    assert tuned.pruned_model_before_finetune_ is not tuned.pruned_model_
    assert untuned.pruned_model_before_finetune_ is untuned.pruned_model_
    assert untuned.score_before_finetune(X, y) == untuned.score(X, y)


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"selection": "greedy"}, ValueError, "selection"),
        ({"criterion": "readers"}, ValueError, "criterion"),
        ({"filter_rule": "l2_norm"}, ValueError, "filter_rule"),
        ({"filter_rule": L1NormRule}, TypeError, "filter_rule"),
        ({"flops_target": 0.0, "filter_rule": "l1_norm"}, ValueError, "flops_target"),
        ({"flops_target": 1.5, "filter_rule": "l1_norm"}, ValueError, "flops_target"),
        ({"flops_target": "half", "filter_rule": "l1_norm"}, TypeError, "flops_target"),
        ({"flops_target": 0.5}, ValueError, "flops_target needs a filter_rule that ranks"),
        ({"flops_target": 0.5, "filter_rule": "random", "selection": "sequential"}, ValueError, "flops_target needs selection"),
        ({"flops_target": 0.5, "filter_rule": "random", "criterion": "both"}, ValueError, "criterion='both' has no effect"),
        ({"flops_target": 0.5, "filter_rule": "random", "head_layer": "best"}, ValueError, "flops_target needs head_layer"),
        ({"flops_target": 0.5, "filter_rule": "random", "knee": "flops"}, ValueError, "knee='flops' has no effect"),
        ({"knee": "cheap"}, ValueError, "knee"),
        ({"selector_params": {"group_costs": {}}}, ValueError, "selector_params must not set"),
        ({"scale_filters": True, "filter_rule": "l1_norm"}, ValueError, "scale_filters=True needs filter_rule='lasso'"),
        ({"scale_filters": True, "criterion": "reconstruction"}, ValueError, "scale_filters=True needs"),
    ],
)
def test_bad_new_parameters_fail_before_anything_runs(data, monkeypatch, params, error, match):
    X, y = data

    def refuse(*args, **kwargs):
        raise AssertionError("pooled before the parameters were checked")

    monkeypatch.setattr(sklearn_craft.pruner, "ActivationPooler", refuse)
    pruner = CraftPruner(conv_chain(), **params)
    with pytest.raises(error, match=match):
        pruner.fit(X, y)
    assert not [name for name in vars(pruner) if name.endswith("_") and not name.startswith("_")]


def test_recalibrating_some_batchnorm_layers_keeps_the_others(data):
    X, _ = data
    model = conv_chain()
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="layers must name BatchNorm layers"):
        recalibrate_batchnorm(model, X, layers=["0"])
    recalibrate_batchnorm(model, X, layers=[])
    torch.testing.assert_close(model[1].running_mean, before)
    recalibrate_batchnorm(model, X, layers=["1"])
    assert not torch.equal(model[1].running_mean, before)
    torch.testing.assert_close(model[1].running_mean, recalibrate_batchnorm(conv_chain(), X)[1].running_mean)


class _CountedImages(torch.utils.data.Dataset):
    """Images that count how many are read: every pass from the images reads all of them."""

    def __init__(self, X):
        self.X, self.reads = torch.from_numpy(X), 0

    def __len__(self):
        return len(self.X)

    def __getitem__(self, index):
        self.reads += 1
        return self.X[index]


def test_sequential_passes_start_from_the_values_before_the_last_stage(monkeypatch):
    # Each stage's pooling keeps the values before its first layer; the next stage's BatchNorm,
    # pooling and compensation passes start there instead of at the images, with the same result.
    architecture = ARCHITECTURES["resnet18"]
    X = np.random.default_rng(0).random((48, *architecture.input_shape), dtype=np.float32)
    model = architecture.build()
    layers = ActivationPooler(model).fit(X[:1]).layers_
    y = _pooled(model, layers[len(layers) // 2], X)[:, :3].sum(axis=1)
    options = dict(
        gamma=0.1, selection="sequential", compensate=True, batch_size=16, random_state=0, selector_params={"alphas": 10}
    )
    fits = {}
    for budget in (sklearn_craft._prefix._PREFIX_BYTES, 0):
        monkeypatch.setattr(sklearn_craft._prefix, "_PREFIX_BYTES", budget)
        images = _CountedImages(X)
        fits[budget] = CraftPruner(model, **options).fit(images, y), images.reads
    (kept, kept_reads), (alone, alone_reads) = fits.values()
    assert kept_reads < alone_reads / 4
    assert kept.keep_.keys() == alone.keep_.keys()
    assert all(np.array_equal(kept.keep_[layer], alone.keep_[layer]) for layer in alone.keep_)
    expected = alone.pruned_model_.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in kept.pruned_model_.state_dict().items())
