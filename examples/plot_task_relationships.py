"""
==============================================
Which network carries which face task, where?
==============================================

The task-relationship analysis of the Low-cost transfer learning paper (section 3, Figures 5
and 11) on synthetic faces. Four small CNNs are trained, each on one *primary* task of
:func:`~sklearn_craft.datasets.make_faces` (identity, head yaw, smile, glasses). On held-out
images, a linear *satellite* model on the pooled responses of each network's last convolution
predicts every task, including two no network was trained for (gender and age group):

1. the task-relationship matrix: cross-validated satellite score, networks × tasks;
2. the relative drop: how much is lost against the network trained for that very task;
3. the layer × task matrix of the identity network: in which layer each task is best encoded.

Run ``python examples/plot_task_relationships.py --out docs/_static`` to save the figures;
without ``--out`` they are shown. About a minute on two idle CPU cores.
"""

import argparse
from collections import OrderedDict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from sklearn_craft.datasets import make_faces
from sklearn_craft.finetune import finetune
from sklearn_craft.plotting import plot_layer_task_matrix, plot_task_matrix
from sklearn_craft.relationships import layer_task_matrix, relative_drop, task_relationship_matrix

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[1])
parser.add_argument("--out", type=Path, help="directory where the figures are saved (default: show them)")
args = parser.parse_args()
torch.manual_seed(0)

# %%
# Data: primary networks and satellite models never see the same images
# ----------------------------------------------------------------------
# As in the paper, the primary networks are trained on one part of the data and the
# satellite tasks are evaluated on a separate, smaller part.
N_IDENTITIES = 12
images, labels = make_faces(n_samples=2000, image_size=32, n_identities=N_IDENTITIES, random_state=0)
primary_images, satellite_images = images[:1200], images[1200:]
primary_labels, satellite_labels = labels.iloc[:1200], labels.iloc[1200:].reset_index(drop=True)

# %%
# Four small networks, one per primary task
# -----------------------------------------
# The same architecture learns identity (classification), yaw (regression), smile and
# glasses (binary), each with the loss of its task.


def small_cnn(n_outputs):
    widths = [3, 12, 16, 24, 32]
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers += [(f"conv{i}", nn.Conv2d(n_in, n_out, 3, padding=1, bias=False))]
        layers += [(f"bn{i}", nn.BatchNorm2d(n_out)), (f"relu{i}", nn.ReLU())]
        if i < len(widths) - 1:
            layers += [(f"pool{i}", nn.MaxPool2d(2))]
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(widths[-1], n_outputs)),
    ]
    return nn.Sequential(OrderedDict(layers))


primaries = {
    "identity": ("cross_entropy", N_IDENTITIES, primary_labels["identity"].to_numpy()),
    "yaw": ("mse", 1, primary_labels["yaw"].to_numpy() / 30.0),
    "smile": ("bce", 1, primary_labels["smile"].to_numpy(dtype=np.float32)),
    "glasses": ("bce", 1, primary_labels["glasses"].to_numpy(dtype=np.float32)),
}
networks = {}
for task, (loss, n_outputs, target) in primaries.items():
    print(f"training the {task} network")
    networks[task] = small_cnn(n_outputs)
    finetune(networks[task], primary_images, target, loss=loss, epochs=5, lr=3e-3, random_state=0)

# %%
# Satellite tasks
# ---------------
# Column kinds are inferred (integers → multiclass, bool → binary, floats → continuous); age is
# binned into ordered groups, regressed and rounded to the nearest group as in the paper.
tasks = pd.DataFrame(
    {
        "identity": satellite_labels["identity"],
        "male": satellite_labels["male"],
        "age group": pd.cut(
            satellite_labels["age"], [0, 30, 45, 60, 100], labels=["<30", "30-45", "45-60", "60+"]
        ),
        "yaw": satellite_labels["yaw"],
        "smile": satellite_labels["smile"],
        "glasses": satellite_labels["glasses"],
    }
)
matrix = task_relationship_matrix(networks, satellite_images, tasks, cv=5, random_state=0)
print(matrix.round(3))
print(matrix.attrs["metric"])

fig, ax = plt.subplots(figsize=(7, 3.6))
plot_task_matrix(matrix, ax=ax)
ax.set_title("Linear satellite score (accuracy; RMSE in degrees for yaw)")
ax.set_ylabel("network trained for")
fig.tight_layout()

# %%
# Relative drop against the network trained for the task
# --------------------------------------------------------
# The diagonal is the network's own task; each cell is the percentage lost by reading the task
# from another network's features instead (lower is better; for yaw, an RMSE increase is a loss).
drop = relative_drop(matrix[list(networks)])
print(drop.round(1))

fig_drop, ax = plt.subplots(figsize=(5.2, 3.6))
# Losses beyond 100 % (yaw from networks that learnt to ignore it) share the end colour.
plot_task_matrix(drop, ax=ax, fmt=".0f", vmax=100)
ax.set_title("Relative drop (%) against the task's own network")
ax.set_ylabel("network trained for")
fig_drop.tight_layout()

# %%
# Where in the identity network is each task encoded?
# ---------------------------------------------------
# All four convolutions are pooled in one pass over the images and probed with the same protocol.
layers, best_layer = layer_task_matrix(networks["identity"], satellite_images, tasks, cv=5, random_state=0)
print(best_layer)

fig_layers, ax = plt.subplots(figsize=(7, 3.2))
plot_layer_task_matrix(layers, best_layer, ax=ax)
ax.set_title("Identity network: satellite score per layer (best outlined)")
fig_layers.tight_layout()

if args.out is None:
    plt.show()
else:
    args.out.mkdir(parents=True, exist_ok=True)
    for figure, name in [
        (fig, "task_matrix"),
        (fig_drop, "relative_drop"),
        (fig_layers, "layer_task_matrix"),
    ]:
        figure.savefig(args.out / f"relationships_{name}.png", dpi=90)
