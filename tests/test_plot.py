"""`fastppo plot`: the dashboard of one or several runs, from their metrics.jsonl."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from fastppo.cli import main  # noqa: E402
from fastppo.plots import PANELS, Panel, dashboard, draw_panel, pyplot  # noqa: E402


def _run(path, n: int, scale: float, *, with_eval: bool = True, alert_at: int | None = None):
    path.mkdir(parents=True)
    records = []
    for i in range(n + 1):
        r = {"iteration": i}
        if i:
            r.update({"score/raw/mean": scale * i, "kl/ref_per_sequence": 0.1 * i, "policy/entropy": 1 - 0.01 * i,
                      "policy/perplexity": 2 + 0.01 * i, "response/length_mean": 10 + i, "response/clipped_frac": 0.0,
                      "policy/clipfrac": 0.01, "policy/approx_kl": 1e-3, "throughput/tokens_per_s": 100.0,
                      "memory/peak_mb": 50.0, "health/alerts": float(alert_at is not None and i >= alert_at)})
        if with_eval and i % 2 == 0:
            r.update({"eval/reward_mean": scale, "eval/pass@1": 0.2, "eval/pass@4": 0.5, "eval/mean@4": 0.2})
        if alert_at == i:
            r["health/entropy_collapse"] = 1.0
        records.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_plot_overlays_several_runs_in_one_png(tmp_path, capsys):
    _run(tmp_path / "a", 6, 1.0, alert_at=3)
    _run(tmp_path / "b", 4, 2.0, with_eval=False)
    out = tmp_path / "dash.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    image = pyplot().imread(out)
    rows = -(-(len(PANELS) - 1) // 3)          # every panel but the rollout mismatch, which neither run logged
    assert image.shape[:2] == (round(3.6 * rows * 100), round(5.2 * 3 * 100))      # figsize x dpi of `dashboard`
    # One run: RUN_DIR/dashboard.png by default; without evaluation (nor mismatch) 6 panels, 2 rows.
    assert main(["plot", str(tmp_path / "b")]) == 0
    assert pyplot().imread(tmp_path / "b" / "dashboard.png").shape[:2] == (round(3.6 * 2 * 100), round(5.2 * 3 * 100))


def test_a_panel_draws_each_runs_metrics_on_its_axes(tmp_path):
    runs = {"a": _run(tmp_path / "a", 6, 1.0, alert_at=3), "b": _run(tmp_path / "b", 4, 2.0, with_eval=False)}
    plt = pyplot()
    fig, ax = plt.subplots()
    assert draw_panel(ax, runs, Panel("t", ("policy/entropy",), ("policy/perplexity",)))
    twin = [a for a in fig.axes if a is not ax][0]
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == \
        ["a: policy/entropy", "b: policy/entropy"]
    assert [line.get_label() for line in twin.get_lines()] == ["a: policy/perplexity", "b: policy/perplexity"]
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [3]   # the alert
    plt.close(fig)
    fig, ax = plt.subplots()
    draw_panel(ax, runs, Panel("eval", ("eval/pass@*", "eval/mean@*")))
    lines = ax.get_lines()
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == \
        ["a: eval/pass@1", "a: eval/pass@4", "a: eval/mean@4"]                    # run b has no evaluation
    assert list(lines[0].get_xdata()) == [0, 2, 4, 6]
    assert not draw_panel(plt.subplots()[1], runs, Panel("none", ("rollout/kl_k3",)))
    plt.close("all")


def test_plot_of_a_folder_without_metrics_says_so(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) != 0
    assert f"{tmp_path} holds no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        dashboard([tmp_path], tmp_path / "x.png")
