"""ETL Figure 2: MobileFaceNet filters whose pooled response follows the head's yaw (Pointing'04).

Pointing'04 (15 people, 2 series, tilt in {-15, 0, 15}, pan = yaw from -90 to 90 by 15 degrees),
faces cut out with the annotated box and read with MobileFaceNet's preset (RGB 112x96). The
responses of ``--layer`` (default: MobileFaceNet's last convolution, ``linear1.conv``, the 128-d
embedding) are pooled with ``ActivationPooler``. Half of the ``--top`` filters drawn are those of
largest |Pearson r| between response and yaw (left- or right-facing filters, the paper's panels a
and b), the others those of largest |r| with |yaw| (sideways or frontal filters, panels c and d),
over all images: response (mean over series and tilts) against pan, one line per identity.

Full size (no --quick): all 1,170 images. --quick: the tilt-0 images only (390).
Run: python benchmarks/bench_yaw_filters.py [--quick] [--layer conv2.conv] [--top 4]
Writes benchmarks/results/yaw_filters.md and docs/_static/yaw_filters.png.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import _bench
from sklearn_craft.datasets import load_pointing04
from sklearn_craft.models import mobilefacenet, preset
from sklearn_craft.pooling import ActivationPooler


def pearson(responses, angle):
    """Pearson r of every column of ``responses`` with ``angle`` (0 for a constant column)."""
    centred = responses - responses.mean(axis=0)
    spread = np.sqrt((centred**2).sum(axis=0) * ((angle - angle.mean()) ** 2).sum())
    return (centred * (angle - angle.mean())[:, None]).sum(axis=0) / np.where(spread > 0, spread, np.inf)


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--layer", default="linear1.conv", help="convolution of MobileFaceNet to pool")
    p.add_argument("--top", type=int, default=4, help="number of filters drawn")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = args.results or _bench.RESULTS / "yaw_filters.md"
    args.figures.mkdir(parents=True, exist_ok=True)
    input_preset = preset("mobilefacenet")
    images, labels = load_pointing04(
        args.data_root / "pointing04", preset=input_preset, cache=None if args.cache is None else str(args.cache)
    )
    chosen = np.ones(len(labels), dtype=bool)
    if args.quick:
        chosen &= (labels["tilt"] == 0).to_numpy()
    if args.n is not None:
        chosen &= np.arange(len(labels)) < args.n
    images, labels = images[chosen], labels[chosen]

    net = mobilefacenet(weights=args.data_root / _bench.WEIGHTS["mobilefacenet"])
    pooler = ActivationPooler(net, layers=[args.layer], preprocess=input_preset.preprocess).fit(images)
    responses = pooler.transform(images).astype(np.float64)
    pan = labels["pan"].to_numpy(dtype=float)
    r, r_abs = pearson(responses, pan), pearson(responses, np.abs(pan))
    by_yaw = np.argsort(-np.abs(r), kind="stable")[: (args.top + 1) // 2]
    by_abs = [i for i in np.argsort(-np.abs(r_abs), kind="stable") if i not in by_yaw][: args.top - len(by_yaw)]
    order = np.concatenate([by_yaw, by_abs]).astype(int)
    ranked_by = ["yaw"] * len(by_yaw) + ["abs_yaw"] * len(by_abs)

    per_identity = pd.DataFrame(responses[:, order], columns=[f"filter {i}" for i in order])
    per_identity["person"], per_identity["pan"] = labels["person"].to_numpy(), pan
    means = per_identity.groupby(["person", "pan"]).mean()
    # Within-identity correlation: does the filter follow yaw for every person, not only on average?
    within = {
        column: means[column].groupby(level="person").apply(
            lambda s: np.corrcoef(s.index.get_level_values("pan"), s.to_numpy())[0, 1]
        )
        for column in means.columns
    }

    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.0), sharex=True, squeeze=False)
    for ax, column in zip(axes[0], means.columns):
        for person, series in means[column].groupby(level="person"):
            ax.plot(series.index.get_level_values("pan"), series.to_numpy(), lw=1, alpha=0.8)
        index = int(column.split()[1])
        ax.set_title(f"{args.layer}:{index}\nr(yaw)={r[index]:+.2f}, r(|yaw|)={r_abs[index]:+.2f}", fontsize=9)
        ax.set_xlabel("pan / yaw (degrees)")
    axes[0][0].set_ylabel("pooled response")
    fig.suptitle(f"MobileFaceNet filters most correlated with yaw, one line per identity ({labels['person'].nunique()})"
                 + (" (--quick)" if args.quick else ""), fontsize=10, y=1.08)
    figure = args.figures / "yaw_filters.png"
    fig.savefig(figure, dpi=120, bbox_inches="tight")
    plt.close(fig)

    summary = pd.DataFrame(
        {
            "filter": [f"{args.layer}:{i}" for i in order],
            "r_yaw": r[order],
            "r_abs_yaw": r_abs[order],
            "ranked_by": ranked_by,
            "median_within_identity_r": [float(np.median(within[c])) for c in means.columns],
            "identities_same_sign_as_r_yaw": [
                int((np.sign(within[c]) == np.sign(r[i])).sum()) for c, i in zip(means.columns, order)
            ],
        }
    ).set_index("filter")
    summary.to_csv(results.with_suffix(".csv"))
    print(summary.to_string())
    print(f"|r| with yaw: best {np.abs(r).max():.2f}, median over {len(r)} filters {np.median(np.abs(r)):.2f}; "
          f"|r| with |yaw|: best {np.abs(r_abs).max():.2f}, median {np.median(np.abs(r_abs)):.2f}")
    intro = (
        f"ETL paper Figure 2 on Pointing'04: {len(labels)} images of {labels['person'].nunique()} identities, "
        f"MobileFaceNet `{args.layer}` pooled responses ({len(r)} filters). Filters are ranked by "
        "|Pearson r| of their response with yaw (pan; left/right-facing filters) and with |yaw| (sideways vs "
        f"frontal filters); {len(order)} are drawn (mean over series and tilts), one line per "
        f"identity. Median over all filters: |r(yaw)| {np.median(np.abs(r)):.2f}, |r(|yaw|)| "
        f"{np.median(np.abs(r_abs)):.2f}. median_within_identity_r: Pearson r with yaw within each identity."
    )
    blocks = [_bench.table(summary), "", f"Figure: `{figure.name}`"]
    _bench.write_section(results, "Filters that respond to yaw (ETL Figure 2)", intro, blocks, args.quick)
    return summary


if __name__ == "__main__":
    main()
