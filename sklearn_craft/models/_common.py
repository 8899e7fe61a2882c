"""Argument checks, width scaling and weight initialisation shared by the architectures."""

from numbers import Integral, Real

from torch import nn


def check_positive_int(value, name):
    """Return ``value`` if it is an int >= 1; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def check_width_mult(width_mult):
    """Return ``width_mult`` as a float if it is a real number > 0."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, Real):
        raise TypeError(f"width_mult must be a real number, got {type(width_mult).__name__} {width_mult!r}")
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    return float(width_mult)


def check_dropout(dropout):
    """Return ``dropout`` as a float if it is a probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, Real):
        raise TypeError(f"dropout must be a real number, got {type(dropout).__name__} {dropout!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def check_input_size(input_size, minimum):
    """Return ``input_size`` (an int or an (H, W) pair) as an (H, W) tuple, each side >= ``minimum``."""
    sizes = (input_size, input_size) if isinstance(input_size, Integral) else input_size
    if (
        not isinstance(sizes, (tuple, list))
        or len(sizes) != 2
        or any(isinstance(s, bool) or not isinstance(s, Integral) for s in sizes)
    ):
        raise TypeError(f"input_size must be an int or a pair of ints (height, width), got {input_size!r}")
    if min(sizes) < minimum:
        raise ValueError(f"input_size must be at least {minimum} pixels on each side, got {input_size!r}")
    return int(sizes[0]), int(sizes[1])


def scaled(channels, width_mult):
    """Channel count ``channels * width_mult`` rounded down, at least 1 (the MobileNets width multiplier)."""
    return max(1, int(channels * width_mult))


def init_weights(model):
    """torchvision's initialisation: He (fan-out) for convolutions, N(0, 0.01) for Linear, BN at identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
