"""Shared scaffolding of the tests: data fixtures, tiny networks, the architecture catalogue, and the
scikit-learn estimator checks that an image estimator cannot pass.

Test modules import the plain functions and constants with ``from conftest import ...`` (pytest puts
this folder on ``sys.path``).
"""

import os
import re
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import matplotlib
import pytest
import torch
from sklearn.utils.estimator_checks import estimator_checks_generator
from torch import nn

from sklearn_craft.models import (
    lightcnn9,
    mini_xception,
    mobilefacenet,
    mobilenet_v1,
    mobilenet_v2,
    mtcnn_onet,
    resnet18,
    vgg16,
)

matplotlib.use("Agg")

TESTS = Path(__file__).resolve().parent
#: The offline face data and weights placed beside the repository (see ../shared/data/README.md).
SHARED_DATA = Path(os.environ.get("SKLEARN_CRAFT_DATA", TESTS.parents[1] / "shared" / "data"))


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the real data are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run torch and BLAS on one thread.

    The test networks are tiny: a second intra-op thread only adds contention (on a loaded 2-core
    machine it made small convolutions up to 100x slower), and joblib workers would oversubscribe.
    """
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------- tiny networks


def conv_chain(in_channels=1, n_outputs=None, seed=0):
    """Three plain convolutions, ``"0"``, ``"4"`` and ``"6"`` (8, 16 and 12 filters), in eval mode.

    Conv-BN-ReLU-MaxPool, Conv-ReLU, Conv-ReLU: no coupling, so surgery keeps exactly the filters
    asked for. With ``n_outputs``, global average pooling, Flatten and a Linear head follow.
    """
    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 12, 3, padding=1),
        nn.ReLU(),
    ]
    if n_outputs is not None:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, n_outputs)]
    return nn.Sequential(*layers).eval()


def response_kinds_net(seed=0):
    """RGB Conv-BN-ReLU, Conv-BN, Conv alone, then a classifier head of 2 outputs.

    The three convolutions ``"0"``, ``"3"`` and ``"5"`` have the three kinds of response: an
    activation (``"2"``), a BatchNorm (``"4"``) and the convolution's own output. The BatchNorm
    layers have random statistics (see :func:`randomize`), so train and eval outputs differ.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.Conv2d(5, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    return randomize(model, seed)


def strided_grouped_net():
    """Conv (stride 2, padding 1) -> BN -> ReLU -> depthwise conv -> grouped 1x1 conv -> Flatten -> Linear.

    On a (3, 9, 11) input the maps are 5x6 then 3x4, and the Linear reads 6 x 3 x 4 features: every
    kind of convolution arithmetic (stride, padding, groups) in a size whose FLOPs and parameters
    can be counted by hand. Default PyTorch initialisation, in train mode.
    """
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),
        nn.Conv2d(8, 6, 1, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 3 * 4, 5),
    )


def trainable_net(n_outputs=1, seed=0, dropout=0.0):
    """One gray-scale convolution (4 filters, no BatchNorm), global pooling, dropout, a Linear head.

    The smallest network that trains: ``[0]`` is the convolution, ``[-1]`` the Linear layer.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4, n_outputs),
    )


def randomize(model, seed=0):
    """Give every BatchNorm random statistics and affine parameters, and every PReLU random slopes.

    Freshly built, a BatchNorm is the identity in eval mode and a PReLU has one slope: random
    values make a forgotten BatchNorm channel or a misplaced slope change the output. Returns
    ``model`` in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator))
    return model.eval()


# ---------------------------------------------------------------------- the architecture catalogue


class Architecture(NamedTuple):
    """A library architecture at a size the tests can afford."""

    #: The constructor of :mod:`sklearn_craft.models`.
    constructor: Callable[..., nn.Module]
    #: Arguments that make it small (the face networks have a fixed size: none).
    kwargs: dict
    #: Shape (C, H, W) of one input image.
    input_shape: tuple
    #: Whether the constructor takes ``num_classes`` and ``in_channels`` (the face networks do not).
    configurable: bool = True
    #: A convolution whose channels are the network's outputs (logits, embedding): pruning it
    #: changes what the network returns.
    output_conv: str | None = None

    def build(self, seed=0, **kwargs):
        """The network with seeded random weights, in eval mode; ``kwargs`` override :attr:`kwargs`."""
        torch.manual_seed(seed)
        return self.constructor(**{**self.kwargs, **kwargs}).eval()


#: Every architecture of the library, once. A network added here is built, traced and checked by
#: the model, pooling, surgery, profiling, export and pruner tests that loop over this catalogue.
ARCHITECTURES = {
    "vgg16": Architecture(vgg16, {"num_classes": 3, "input_size": 32, "width_mult": 0.125}, (3, 32, 32)),
    # Not square, and the last map is 2 x 1: Flatten -> Linear reads two cells per channel.
    "vgg16_bn": Architecture(
        vgg16, {"num_classes": 3, "input_size": (64, 48), "width_mult": 0.125, "batch_norm": True}, (3, 64, 48)
    ),
    "resnet18": Architecture(resnet18, {"num_classes": 3, "width_mult": 0.125}, (3, 48, 40)),
    "mobilenet_v1": Architecture(mobilenet_v1, {"num_classes": 3, "width_mult": 0.25}, (3, 64, 64)),
    "mobilenet_v2": Architecture(mobilenet_v2, {"num_classes": 3, "width_mult": 0.25}, (3, 64, 64)),
    "lightcnn9": Architecture(lightcnn9, {"num_classes": 3, "input_size": 36, "width_mult": 0.25}, (1, 36, 36)),
    "mobilefacenet": Architecture(mobilefacenet, {}, (3, 112, 96), configurable=False, output_conv="linear1.conv"),
    "mtcnn_onet": Architecture(mtcnn_onet, {}, (3, 48, 48), configurable=False),
    "mini_xception": Architecture(mini_xception, {}, (1, 64, 64), configurable=False, output_conv="conv_out"),
}
#: The architectures whose constructor takes ``num_classes`` and ``in_channels``.
CONFIGURABLE = [name for name, architecture in ARCHITECTURES.items() if architecture.configurable]


# ----------------------------------------------------------- estimator checks for image estimators

#: Checks of behaviour that every estimator must have, but that scikit-learn tests by fitting 2-D
#: tabular X, which an image estimator rejects: its own module must test them with images.
TABULAR_CHECKS = (
    "check_fit_score_takes_y",
    "check_estimators_overwrite_params",
    "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self",
    "check_readonly_memmap_input",
    "check_positive_only_tag_during_fit",
    "check_estimators_dtypes",
    "check_estimators_empty_data_messages",
    "check_pipeline_consistency",
    "check_estimators_nan_inf",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_fit2d_1sample",
    "check_fit2d_1feature",
    "check_fit2d_predict1d",
    "check_dict_unchanged",
    "check_fit_idempotent",
    "check_fit_check_is_fitted",
)
#: Tabular checks of estimators whose fit takes sample_weight.
SAMPLE_WEIGHT_CHECKS = (
    "check_sample_weights_pandas_series",
    "check_sample_weights_not_an_array",
    "check_sample_weights_list",
    "check_all_zero_sample_weights_error",
    "check_sample_weights_shape",
    "check_sample_weights_not_overwritten",
    "check_sample_weight_equivalence_on_dense_data",
)
#: Tabular checks of classifiers and regressors.
SUPERVISED_CHECKS = (
    "check_supervised_y_2d",
    "check_classifier_data_not_an_array",
    "check_classifiers_one_label",
    "check_classifiers_one_label_sample_weights",
    "check_classifiers_classes",
    "check_classifier_multioutput",
    "check_classifiers_train",
    "check_classifiers_regression_target",
    "check_classifiers_multilabel_representation_invariance",
    "check_classifiers_multilabel_output_format_predict",
    "check_classifiers_multilabel_output_format_predict_proba",
    "check_classifiers_multilabel_output_format_decision_function",
    "check_regressors_train",
    "check_regressor_data_not_an_array",
    "check_regressor_multioutput",
    "check_regressors_no_decision_function",
    "check_regressors_int",
)
TABULAR_CHECKS += SAMPLE_WEIGHT_CHECKS + SUPERVISED_CHECKS
#: Checks of features that only tabular data have, with the feature.
TABULAR_ONLY_CHECKS = {
    "check_n_features_in_after_fitting": "n_features_in_ (images have no feature count)",
    "check_n_features_in": "n_features_in_ (images have no feature count)",
    "check_complex_data": "complex-valued columns",
    "check_dtype_object": "object-dtype columns",
    "check_estimator_sparse_tag": "sparse matrices",
    "check_estimator_sparse_array": "sparse matrices",
    "check_estimator_sparse_matrix": "sparse matrices",
    "check_transformer_data_not_an_array": "array-likes that are not arrays (lists)",
}


def image_estimator_expected_failures(covered_by):
    """The scikit-learn estimator checks an image estimator must fail, each with its reason.

    Parameters
    ----------
    covered_by : dict of str to str
        For every check of :data:`TABULAR_CHECKS` that scikit-learn runs on the estimator, the
        test that checks the same behaviour with images: ``"test_name"`` in the estimator's own
        test module, or ``"test_module.py::test_name"``.

    Returns
    -------
    dict of str to str
        Check name -> reason, for :func:`run_image_estimator_check`.
    """
    unknown = sorted(set(covered_by) - set(TABULAR_CHECKS))
    if unknown:
        raise ValueError(f"covered_by must name checks of TABULAR_CHECKS, got {unknown}")
    reasons = {
        check: f"feeds 2-D tabular X, which an image estimator rejects; tested with images in {test}"
        for check, test in covered_by.items()
    }
    reasons.update({check: f"tests a tabular-only feature: {what}" for check, what in TABULAR_ONLY_CHECKS.items()})
    return reasons


def check_name(check):
    """The name of a check yielded by scikit-learn (a function or a functools.partial)."""
    return getattr(check, "func", check).__name__


def run_image_estimator_check(estimator, check, expected_failures):
    """Run one scikit-learn check; one of ``expected_failures`` must fail.

    Expected failures are asserted rather than marked xfail (``expected_failed_checks``): pytest
    formats every xfail traceback by re-parsing scikit-learn's estimator_checks.py, about a minute
    for 30 checks.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if check_name(check) not in expected_failures:
            check(estimator)
            return
        with pytest.raises((ValueError, TypeError, AssertionError)):
            check(estimator)


def assert_expected_failures_are_current(estimator, expected_failures, module):
    """Every expected failure names a check that runs on ``estimator`` (tabular-only ones aside),
    and every test named as covering a check exists.

    ``module`` is the estimator's test module (``sys.modules[__name__]``).
    """
    names = {check_name(check) for _, check in estimator_checks_generator(estimator)}
    stale = sorted(set(expected_failures) - names - set(TABULAR_ONLY_CHECKS))
    assert not stale, f"expected failures that scikit-learn no longer runs: {stale}"
    missing = sorted(set(TABULAR_CHECKS) & names - set(expected_failures))
    assert not missing, f"checks that feed tabular X with no covering test named: {missing}"
    for check, reason in expected_failures.items():
        found = re.search(r"tested with images in (?:(\S+\.py)::)?(\w+)$", reason)
        if found is None:
            continue
        file, test = found.groups()
        source = (TESTS / file).read_text() if file else Path(module.__file__).read_text()
        assert f"def {test}(" in source, f"{check}: the covering test {test} does not exist"
