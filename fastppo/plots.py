"""`fastppo plot`: one PNG dashboard of a run's standard curves, several runs overlaid (docs/monitoring.md).

    PANELS        what each panel draws: metrics on its left axis, metrics on its right axis
    draw_panel    one panel of several runs on a matplotlib Axes (the demo draws its own figures with it)
    dashboard     every panel of one or more run directories (their metrics.jsonl) in one PNG

Each run has one colour; in a panel the left-axis metrics are solid lines, the right-axis ones dashed, evaluation
points (eval/*) markers. The iterations where the health monitor fired (health/<check>) are dotted vertical lines
in the run's colour. A panel no run logged is left out of the dashboard. matplotlib is an optional dependency
(the `plot` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    title: str
    left: tuple[str, ...]
    """Metrics on the left axis; a key ending in '@*' draws every logged k (eval/pass@*)."""
    right: tuple[str, ...] = ()
    """Metrics on a second axis, dashed."""


PANELS = (
    Panel("reward (train) and evaluation", ("score/raw/mean", "eval/reward_mean")),
    Panel("evaluation: pass@k, mean@k", ("eval/pass@*", "eval/mean@*")),
    Panel("KL to the reference (per sequence)", ("kl/ref_per_sequence",)),
    Panel("entropy and perplexity", ("policy/entropy",), ("policy/perplexity",)),
    Panel("response length and clipped fraction", ("response/length_mean",), ("response/clipped_frac",)),
    Panel("clip fraction and approx. KL of the update", ("policy/clipfrac",), ("policy/approx_kl",)),
    Panel("rollout mismatch (generator vs trainer)", ("rollout/kl_k3",), ("rollout/diff_gt_0.1_frac",)),
    Panel("throughput and memory", ("throughput/tokens_per_s",), ("memory/peak_mb",)),
)
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:grey")


def _keys(records: list[dict], pattern: str) -> list[str]:
    if not pattern.endswith("@*"):
        return [pattern]
    found = {k for r in records for k in r if k.startswith(pattern[:-1])}
    return sorted(found, key=lambda k: (len(k), k))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def logged(runs: dict[str, list[dict]], panel: Panel) -> bool:
    """Whether any run logged a metric of the panel."""
    return any(_series(records, key)[0] for records in runs.values() for pattern in (*panel.left, *panel.right)
               for key in _keys(records, pattern))


def draw_panel(ax, runs: dict[str, list[dict]], panel: Panel, colors: dict[str, str] | None = None) -> bool:
    """Draw `panel` for every run (name -> records) on `ax`; False when no run logged any of its metrics."""
    colors = colors or {name: COLORS[i % len(COLORS)] for i, name in enumerate(runs)}
    drawn, twin = False, None
    styles = ("-", "-.", ":", (0, (5, 1)))
    for side, patterns in (("left", panel.left), ("right", panel.right)):
        for name, records in runs.items():
            keys = [k for p in patterns for k in _keys(records, p)]
            for i, key in enumerate(keys):
                xs, ys = _series(records, key)
                if not xs:
                    continue
                if side == "right" and twin is None:
                    twin = ax.twinx()
                target = twin if side == "right" else ax
                label = f"{name}: {key}" if len(runs) > 1 else key
                is_eval = key.startswith("eval/")
                target.plot(xs, ys, color=colors[name], label=label, linewidth=1.4,
                            linestyle="--" if side == "right" else styles[i % len(styles)],
                            marker="o" if is_eval else None, markersize=3)
                drawn = True
    for name, records in runs.items():
        for r in records if drawn else []:
            if any(k.startswith("health/") and k != "health/alerts" for k in r):
                ax.axvline(r["iteration"], color=colors[name], linestyle=":", linewidth=1)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + [f"{label} (right)" for label in l2]
    if handles:
        ax.legend(handles, labels, fontsize=6, loc="best")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend; a clear error without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fastppo[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dashboard(run_dirs: list[str | Path] | dict[str, list[dict]], out: str | Path, *, title: str | None = None,
              extra=None, colors: dict[str, str] | None = None) -> Path:
    """One PNG of the PANELS any run logged, for one or more runs overlaid: run directories (named by their folder
    names), or name -> metric records. extra: (title, fn(ax)) of one more panel (the demo's held-out scores);
    colors: run name -> matplotlib colour (default: COLORS in order). Returns `out`."""
    plt = pyplot()
    if isinstance(run_dirs, dict):
        runs = run_dirs
    else:
        paths = [Path(p) for p in run_dirs]
        names = [p.name for p in paths]
        if len(set(names)) < len(names):                  # the same folder name twice: the whole paths tell them apart
            names = [str(p) for p in paths]
        runs = {n: read_metrics(p) for n, p in zip(names, paths)}
    panels = [p for p in PANELS if logged(runs, p)] or list(PANELS[:1])
    n_panels = len(panels) + (extra is not None)
    cols = 3
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        draw_panel(ax, runs, panel, colors)
    if extra is not None:
        ax = axes.flat[len(panels)]
        extra[1](ax)
        ax.set_title(extra[0], fontsize=9)
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title or "fastppo: " + ", ".join(runs), fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
