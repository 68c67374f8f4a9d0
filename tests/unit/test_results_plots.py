"""Issue 34: ``mirasol results``' plot of a single run: the held-out curve with the training clips' beside it, the
training loss in its own panel, and the legend outside the axes (the figure's inputs, not its pixels)."""

from __future__ import annotations

from mirasol_ray.launch import results


def test_a_single_runs_plot_has_the_training_clip_curve_and_the_loss(tmp_path, monkeypatch):
    figures = []
    real = results.png_bytes
    monkeypatch.setattr(results, "png_bytes", lambda fig: figures.append(fig) or real(fig))
    res = {"kind": "run", "name": "r", "metric": "val/qa", "mode": "max", "best": {"trial_id": "r"}, "space": {},
           "trials": [{"trial_id": "r", "status": "finished", "config": {},
                       "curve": [(10, 0.2), (20, 0.4)], "train_curve": [(10, 0.3), (20, 0.7)],
                       "loss_curve": [(1, 5.0), (10, 4.0), (20, 3.5)]}]}
    written = results.write_plots(res, str(tmp_path))
    assert written == [str(tmp_path / "learning_curves.png")]
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metric_ax, loss_ax = figures[0].axes
    curves = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in metric_ax.lines}
    assert curves == {"held-out": ([10, 20], [20.0, 40.0]), "training clips": ([10, 20], [30.0, 70.0])}  # percent
    assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in loss_ax.lines] == [([1, 10, 20], [5.0, 4.0, 3.5])]
    # the legend sits below the axes: it covers no curve
    legend = metric_ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().transformed(metric_ax.transAxes.inverted()).y0 < 0


def test_the_runs_own_learning_curve_has_the_training_clips_and_legends_below(tmp_path, monkeypatch):
    from mirasol_ray.launch import plots

    figures = []
    real = plots.png_bytes
    monkeypatch.setattr(plots, "png_bytes", lambda fig: figures.append(fig) or real(fig))
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "val": {"loss": 4.5, "qa": 0.2},
                                          "train_eval": {"loss": 3.9, "qa": 0.5}}]
    png = str(tmp_path / "curve.png")
    assert plots.plot_curves(records, png) == png and (tmp_path / "curve.png").stat().st_size > 0
    loss_ax, metric_ax = figures[0].axes
    assert {ln.get_label() for ln in loss_ax.lines} == {"loss", "validation loss", "loss on training clips"}
    assert {ln.get_label(): list(ln.get_ydata()) for ln in metric_ax.lines} == {"qa (held-out)": [0.2],
                                                                                "qa (train)": [0.5]}
    for ax in (loss_ax, metric_ax):
        assert ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y0 < 0
