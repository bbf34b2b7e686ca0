"""``Explorer``: pick tau, then run, pause, step and replay ACDC in JupyterLab.

The widget only orchestrates: ACDC (``acdc.Acdc``) runs in a background thread, so the kernel and
every button stay responsive, and each recorded step reaches the seq-graph (``figure``) as an in-
place update, at most one per ``REDRAW_SECONDS``. Runs are cached by their settings (tau, metric,
ablation, positions, device), so switching back to a setting shows its trace at once.

``Sweep`` fills that cache for many taus at once, in another background thread, through
``acdc_viz.sweep`` (locally or on Ray); each finished run appears in a plot of kept edges and
final metric against tau, where clicking a point opens that run.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go
import torch

from acdc_viz.acdc import Acdc
from acdc_viz.data import TokenPairs
from acdc_viz.errors import ModelSupportError, SettingsError
from acdc_viz.figure import TRACE_IDS, build_figure, update_figure
from acdc_viz.layout import LAYOUTS
from acdc_viz.patching import ABLATIONS
from acdc_viz.runtime import display_name, torch_threads
from acdc_viz.sweep import SweepResult, SweepRun
from acdc_viz.sweep import sweep as run_sweep
from acdc_viz.taus import check_tau, parse_taus
from acdc_viz.trace import Trace, save_trace

log = logging.getLogger(__name__)

REDRAW_SECONDS = 0.05
"""Steps that come faster than this are coalesced into one redraw; no backlog is queued."""
REDRAW_SHARE_FACTOR = 8.0
"""A redraw that took t seconds waits at least this many t before the next (drawing <= ~1/9)."""

BUTTONS = ("Run", "Pause", "Step", "Stop", "Reset")
SWEEP_BUTTONS = ("Sweep", "Cancel")
DEFAULT_SWEEP = "1e-4:1e-1:8"
"""The sweep box's initial taus: LOW:HIGH:COUNT, log-spaced."""

_CSS = """<style>
.acdc-explorer .acdc-controls {
  border: 1px solid var(--jp-border-color2, #e0e0e0); border-radius: 4px; padding: 2px 6px;
  box-sizing: border-box;
}
.acdc-explorer .acdc-actions, .acdc-explorer .acdc-view, .acdc-explorer .acdc-sweep {
  border-top: 1px solid var(--jp-border-color3, #eeeeee); padding-top: 2px; margin-top: 2px;
}
.acdc-explorer .acdc-tau-text .widget-label { display: none; }
.acdc-explorer .acdc-invalid input { border-color: #B00020; background: #FDECEE; }
.acdc-explorer .acdc-status { margin-left: 4px; }
.acdc-explorer .acdc-side { padding-left: 4px; }
</style>"""
"""Styles of the Explorer's parts, scoped by its CSS classes (a hidden HTML widget carries them)."""
_NODES = TRACE_IDS.index("nodes")
HISTORY_WIDTH = 224
"""Pixels: narrow enough to sit beside a one-column seq-graph in JupyterLab at 1280 px."""
_STYLE = {"description_width": "initial"}
_ROW = {"flex_flow": "row wrap", "align_items": "center", "width": "100%"}
_METRIC_COLOUR, _EDGES_COLOUR = "#0072B2", "#E69F00"


@dataclass(frozen=True)
class RunKey:
    """The settings a cached run depends on."""

    tau: float
    metric: str
    ablation: str
    positions: bool
    device: str


def parse_tau(text: str) -> float | None:
    """A positive tau that ``check_tau`` accepts, or None."""
    try:
        value = check_tau(text)
    except SettingsError:
        return None
    return value if value > 0 else None


def _row(children: list[Any], css_class: str | None = None) -> w.HBox:
    """One row of controls that wraps when the notebook is narrow."""
    row = w.HBox(children, layout=w.Layout(**_ROW))
    if css_class:
        row.add_class(css_class)
    return row


def _series(figure: Any) -> list[Any]:
    """A figure's traces: plotly's ``data``, which the type checker cannot follow."""
    return list(figure.data)


def _twin_axis_plot(metric_name: str, height: int, xaxis: dict[str, Any],
                    markers: bool = False, **layout: Any) -> go.FigureWidget:
    """A narrow plot of a metric (left axis, blue) and kept edges (right axis, orange)."""
    plot = go.FigureWidget()
    mode = "lines+markers" if markers else "lines"
    plot.add_scatter(name=metric_name, mode=mode, line={"color": _METRIC_COLOUR},
                     marker={"size": 6} if markers else None)
    plot.add_scatter(name="edges kept", mode=mode, yaxis="y2", line={"color": _EDGES_COLOUR},
                     marker={"size": 6, "symbol": "square"} if markers else None)
    plot.update_layout(
        height=height, width=HISTORY_WIDTH, margin={"l": 38, "r": 38, "t": 40, "b": 36},
        template="simple_white", font={"size": 11}, showlegend=False,
        title={"text": f"<span style='color:{_METRIC_COLOUR}'>{metric_name}</span> and "
                       f"<span style='color:{_EDGES_COLOUR}'>edges kept</span>",
               "font_size": 12, "x": 0.5, "xanchor": "center", "y": 0.97, "yanchor": "top"},
        xaxis=xaxis,
        yaxis={"color": _METRIC_COLOUR, "rangemode": "tozero"},
        yaxis2={"overlaying": "y", "side": "right", "color": _EDGES_COLOUR, "rangemode": "tozero",
                "tickmode": "auto", "nticks": 6, "tickformat": "d"},
        **layout,
    )
    return plot


class Explorer:
    """ACDC on a bundled task or on your own model, step by step, in a notebook.

    Args:
        task: a task name from ``acdc-viz tasks`` (default ``"induction"``), or a TransformerLens
            model, in which case ``pairs`` (clean and corrupt token ids) is required.
        pairs: ``TokenPairs`` or ``(clean, corrupt)`` for a model.
        tau, metric, ablation, positions, layout, device: the initial settings (a task's defaults
            otherwise).
        prompts: how many prompt pairs a task generates.
        tokens: token strings of one prompt, for the column labels (a task provides its own).
        export_dir: where the export buttons write files (default: the working directory).
    """

    def __init__(
        self,
        task: Any = "induction",
        pairs: Any = None,
        *,
        tau: float | None = None,
        metric: str | None = None,
        ablation: str | None = None,
        positions: bool = False,
        layout: str = "seq",
        device: str | None = None,
        prompts: int | None = None,
        tokens: list[str] | None = None,
        model_name: str | None = None,
        export_dir: str | Path = ".",
    ) -> None:
        """Load the task (or take the model and pairs), build the controls, show the first run."""
        self.export_dir = Path(export_dir)
        self._metrics: dict[str, Any] = {"kl": "kl", "mse": "mse"}
        if isinstance(task, str):
            from acdc_viz.tasks import get_task

            spec = get_task(task)
            prepared = spec.prepare(device or "cpu", prompts)
            self.model, self.pairs = prepared.model, prepared.pairs
            self._metrics = prepared.metrics
            tau = tau if tau is not None else spec.default_tau
            metric = metric or spec.default_metric
            ablation = ablation or spec.default_ablation
            tokens = tokens or prepared.tokens
            self.name = model_name or spec.name
        else:
            if pairs is None:
                raise ValueError("Explorer(model, pairs): give clean and corrupt token ids for "
                                 "your model")
            self.model = task
            self.pairs = pairs if isinstance(pairs, TokenPairs) else TokenPairs.from_batch(pairs)
            self.name = display_name(task, model_name)
        self.tokens = tokens
        self.runs: dict[RunKey, Acdc] = {}
        self.acdc: Acdc | None = None
        self.error: str | None = None
        self.refused: str | None = None
        """Why acdc_viz refuses the model (a ``ModelSupportError``), or None: with a refused
        model every control is disabled and the message stays on show."""
        self._thread: threading.Thread | None = None
        self._pause = threading.Event()
        self._stop = threading.Event()
        self._stopped: set[RunKey] = set()
        self._highlight: str | None = None
        self._syncing = False
        self.sweep_traces: dict[RunKey, Trace] = {}
        """Complete traces from sweeps, by settings; ``_select_run`` turns one into a run."""
        self.sweep_result: SweepResult | None = None
        self._sweep_thread: threading.Thread | None = None
        self._sweep_cancel = threading.Event()
        self._sweep_lock = threading.Lock()
        self.redraws = 0
        self.redraw_seconds = 0.0
        self._build_controls(tau if tau is not None else 0.01, metric or "kl",
                             ablation or "resample", positions, layout, device)
        self._select_run()

    # ----- controls ----------------------------------------------------------------------------

    def _build_controls(self, tau: float, metric: str, ablation: str, positions: bool, layout: str,
                        device: str | None) -> None:
        """Build every row of controls, connect them, and arrange the Explorer.

        Top to bottom: the controls (1. what to run; 2. running it, and where it stands; 3. how
        to look at it: view options and replay; 4. sweeps); then the seq-graph with the
        metric-and-edges plots and the export buttons beside it, or below it when the notebook
        is too narrow for both (JupyterLab at 1280 px with its file browser open).
        """
        rows = [self._settings_row(tau, metric, ablation, positions, device), self._actions_row(),
                self._status_row(), self._view_row(layout), self._sweep_row()]
        controls = w.VBox(rows, layout=w.Layout(width="100%"))
        controls.add_class("acdc-controls")
        # The seq-graph has the fixed size its layout was computed for: it is never squeezed or
        # clipped. A figure wider than the notebook scrolls sideways in its own box (and nothing
        # scrolls vertically: the notebook does that).
        self.figure_box = w.Box(layout=w.Layout(flex="0 1 auto", max_width="100%",
                                                overflow="auto hidden"))
        self.figure_box.add_class("acdc-figure")
        body = w.HBox([self.figure_box, self._side_panel()],
                      layout=w.Layout(flex_flow="row wrap", align_items="flex-start",
                                      width="100%", margin="4px 0 0 0"))
        css = w.HTML(_CSS, layout=w.Layout(display="none"))
        self.widget = w.VBox([css, controls, body], layout=w.Layout(width="100%"))
        self.widget.add_class("acdc-explorer")

    def _settings_row(self, tau: float, metric: str, ablation: str, positions: bool,
                      device: str | None) -> w.HBox:
        """What to run: tau (slider and exact value), metric, ablation, device, positions."""
        self.tau_slider = w.FloatLogSlider(value=tau, base=10, min=-6, max=0, step=0.05,
                                           description="tau", readout=False,
                                           continuous_update=False, style=_STYLE,
                                           layout=w.Layout(width="180px"))
        # The exact value, shown as the slider's readout: its own "tau" label is hidden (CSS), and
        # an invalid value is flagged by the box's colour and by the message line.
        self.tau_text = w.Text(value=f"{tau:g}", description="tau",
                               style={"description_width": "0px"},
                               tooltip="tau: type an exact value, then Enter",
                               layout=w.Layout(width="76px"), continuous_update=False)
        self.tau_text.add_class("acdc-tau-text")
        self.metric_dropdown = w.Dropdown(options=list(self._metrics),
                                          value=metric if metric in self._metrics else "kl",
                                          description="metric", style=_STYLE,
                                          layout=w.Layout(width="162px"))
        self.ablation_dropdown = w.Dropdown(options=list(ABLATIONS), value=ablation,
                                            description="ablation", style=_STYLE,
                                            layout=w.Layout(width="150px"))
        self.positions_toggle = w.ToggleButton(value=positions, description="positions",
                                               tooltip="split every edge by token position",
                                               layout=w.Layout(width="84px"))
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.device_dropdown = w.Dropdown(options=devices,
                                          value=device if device in devices else "cpu",
                                          description="device", style=_STYLE,
                                          layout=w.Layout(width="108px"))
        self.tau_slider.observe(self._on_tau_slider, "value")
        self.tau_text.observe(self._on_tau_text, "value")
        for control in (self.metric_dropdown, self.ablation_dropdown, self.positions_toggle,
                        self.device_dropdown):
            control.observe(lambda _change: self._select_run(), "value")
        return _row([self.tau_slider, self.tau_text, self.metric_dropdown, self.ablation_dropdown,
                     self.device_dropdown, self.positions_toggle], "acdc-settings")

    def _actions_row(self) -> w.HBox:
        """Running it: Run, Pause, Step, Stop, Reset, and the progress bar with its ETA."""
        self.buttons = {name: w.Button(description=name, layout=w.Layout(width="60px"))
                        for name in BUTTONS}
        self.buttons["Run"].button_style = "primary"
        self.progress = w.IntProgress(min=0, max=1, layout=w.Layout(
            flex="1 1 60px", max_width="300px", min_width="60px"))
        self.eta = w.Label(layout=w.Layout(width="auto", min_width="64px"))
        self.buttons["Run"].on_click(lambda _b: self.run())
        self.buttons["Pause"].on_click(lambda _b: self.pause())
        self.buttons["Step"].on_click(lambda _b: self.step())
        self.buttons["Stop"].on_click(lambda _b: self.stop())
        self.buttons["Reset"].on_click(lambda _b: self.reset())
        return _row([*self.buttons.values(), self.progress, self.eta], "acdc-actions")

    def _status_row(self) -> w.HBox:
        """Where the run stands (``step i / N``, ``edges kept k``), and the last message."""
        self.status_label = w.HTML(layout=w.Layout(flex="0 1 auto"))
        self.status_label.add_class("acdc-status")
        self.message = w.HTML(layout=w.Layout(flex="0 1 auto", margin="0 0 0 12px"))
        self.message.add_class("acdc-message")
        return _row([self.status_label, self.message])

    def _view_row(self, layout: str) -> w.HBox:
        """How to look at it: the layout, removed edges shown or not, and the replay slider."""
        self.layout_dropdown = w.Dropdown(options=list(LAYOUTS), value=layout,
                                          description="layout", style=_STYLE,
                                          layout=w.Layout(width="170px"))
        self.show_removed = w.Checkbox(value=True, description="show removed", indent=False,
                                       layout=w.Layout(width="120px"))
        self.replay = w.IntSlider(value=-1, min=-1, max=-1, description="replay step",
                                  style=_STYLE, continuous_update=True,
                                  layout=w.Layout(flex="1 1 240px", max_width="520px",
                                                  min_width="200px"))
        self.play = w.Play(value=-1, min=-1, max=-1, interval=150, description="Play",
                           layout=w.Layout(width="auto"))
        w.jslink((self.play, "value"), (self.replay, "value"))
        self.layout_dropdown.observe(lambda _change: self._redraw(), "value")
        self.show_removed.observe(lambda _change: self._redraw(), "value")
        self.replay.observe(self._on_replay, "value")
        return _row([self.layout_dropdown, self.show_removed, self.play, self.replay],
                    "acdc-view")

    def _sweep_row(self) -> w.HBox:
        """Sweeps: the taus, where they run (here or on Ray), Sweep and Cancel, and progress."""
        self.sweep_taus = w.Text(value=DEFAULT_SWEEP, description="sweep taus", style=_STYLE,
                                 tooltip="LOW:HIGH:COUNT (log-spaced) or a comma-separated list",
                                 layout=w.Layout(width="210px"), continuous_update=False)
        executors = ["local"] + (["ray"] if importlib.util.find_spec("ray") is not None else [])
        self.sweep_executor = w.Dropdown(
            options=executors, value="local", description="on", style=_STYLE,
            layout=w.Layout(width="100px"),
            tooltip="local: one run after another in this kernel; "
                    "ray: Ray tasks (a local instance, or ray.init first)")
        self.sweep_buttons = {name: w.Button(description=name, layout=w.Layout(width="72px"))
                              for name in SWEEP_BUTTONS}
        self.sweep_buttons["Sweep"].tooltip = "run every tau of the list in the background"
        self.sweep_buttons["Cancel"].disabled = True
        self.sweep_status = w.HTML(layout=w.Layout(flex="0 1 auto", margin="0 0 0 8px"))
        self.sweep_buttons["Sweep"].on_click(lambda _b: self.sweep())
        self.sweep_buttons["Cancel"].on_click(lambda _b: self.cancel_sweep())
        return _row([self.sweep_taus, self.sweep_executor, *self.sweep_buttons.values(),
                     self.sweep_status], "acdc-sweep")

    def _side_panel(self) -> w.VBox:
        """Beside the seq-graph: the run's history, the sweep plot, the exports and the log."""
        self.history = _twin_axis_plot("metric", 250, {"title": {"text": "step", "standoff": 4}})
        self.sweep_plot = _twin_axis_plot(
            "final metric", 230, {"title": {"text": "tau (click: open)", "standoff": 4},
                                  "type": "log"}, markers=True, clickmode="event")
        for series in _series(self.sweep_plot):
            series.on_click(self._on_sweep_click)
        self.exports = {ext: w.Button(description=label,
                                      tooltip=f"write the {label} to the export folder",
                                      layout=w.Layout(width="auto", min_width="64px"))
                        for ext, label in ((".html", "HTML"), (".png", "PNG"), (".svg", "SVG"),
                                           (".json", "Trace JSON"))}
        for ext, button in self.exports.items():
            button.on_click(lambda _b, ext=ext: self.export(ext))
        self.log_output = w.Output(layout=w.Layout(max_height="120px", overflow="auto"))
        exports = list(self.exports.values())
        side = w.VBox([self.history, self.sweep_plot, w.HTML("<b>export</b>"),
                       w.HBox(exports[:2]), w.HBox(exports[2:]), self.log_output],
                      layout=w.Layout(flex=f"0 0 {HISTORY_WIDTH + 4}px",
                                      width=f"{HISTORY_WIDTH + 4}px"))
        side.add_class("acdc-side")
        return side

    @contextlib.contextmanager
    def _syncing_controls(self) -> Iterator[None]:
        """Controls changed from code inside this block don't act on it (``_syncing``)."""
        before = self._syncing
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = before

    # ----- settings and the run cache ------------------------------------------------------------

    def _on_tau_slider(self, change: dict) -> None:
        if self._syncing:
            return
        with self._syncing_controls():
            self.tau_text.value = f"{change['new']:.3g}"
        self._select_run()

    def _on_tau_text(self, change: dict) -> None:
        """Check a typed tau: flag it if invalid, else move the slider and show its run."""
        tau = parse_tau(change["new"])
        if tau is None:
            self.tau_text.add_class("acdc-invalid")
            self.tau_text.description = "tau ✗"
            self._show_message(f"tau must be a positive number, not {change['new']!r}", error=True)
            self._sync_buttons()
            return
        self.tau_text.remove_class("acdc-invalid")
        self.tau_text.description = "tau"
        if not self._syncing:
            with self._syncing_controls():
                self.tau_slider.value = min(max(tau, 10**self.tau_slider.min),
                                            10**self.tau_slider.max)
        self._select_run()

    @property
    def tau(self) -> float | None:
        return parse_tau(self.tau_text.value)

    def run_key(self) -> RunKey | None:
        """The settings of the controls, or None while tau is invalid."""
        tau = self.tau
        return None if tau is None else self._settings_key(tau)

    def _settings_key(self, tau: float) -> RunKey:
        return RunKey(tau, str(self.metric_dropdown.value), str(self.ablation_dropdown.value),
                      bool(self.positions_toggle.value), str(self.device_dropdown.value))

    @property
    def _layout_name(self) -> str:
        return str(self.layout_dropdown.value)

    def _select_run(self) -> None:
        """Show the run of the current settings: the cached one, or a fresh one at step -1."""
        if self.running:
            self._show_message("finish or pause the current run before changing settings",
                               error=True)
            return
        key = self.run_key()
        if key is None:
            self._sync_buttons()
            return
        with self._sweep_lock:
            swept = self.sweep_traces.get(key)
        current = self.runs.get(key)
        if current is None or (swept is not None and not current.done):
            try:
                # A sweep's complete trace becomes a finished run (replayed, nothing recomputed).
                self.runs[key] = Acdc(self.model, self.pairs, tau=key.tau,
                                      metric=self._metrics[key.metric], ablation=key.ablation,
                                      positions=key.positions, device=key.device,
                                      model_name=self.name, tokens=self.tokens, resume=swept)
            except Exception as exc:  # noqa: BLE001 - shown in the widget, never raised into the cell
                self.acdc = None
                self._show_error(exc)
                if isinstance(exc, ModelSupportError):   # the model, whatever the settings
                    self._refuse_model(exc)
                self._sync_buttons()
                return
            self._stopped.discard(key)
            cached = "" if swept is None else " (from the sweep)"
        else:
            cached = " (cached run)"
        self.acdc = self.runs[key]
        self._highlight = None
        self._new_figure()
        self._show_message(f"tau = {key.tau:g}{cached}")
        self._redraw()
        self._sync_buttons()   # a fresh run (Reset, a new tau) can be run and stepped again
        self._refresh_sweep_plot()

    def _new_figure(self) -> None:
        assert self.acdc is not None
        self.fig = build_figure(self.acdc.trace, None, layout=self._layout_name,
                                show_removed=self.show_removed.value, widget=True)
        _series(self.fig)[_NODES].on_click(self._on_node_click)
        self.figure_box.children = (self.fig,)

    # ----- actions -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def trace(self) -> Trace | None:
        return None if self.acdc is None else self.acdc.trace

    def run(self, max_steps: int | None = None) -> None:
        """Start or continue in the background (what the ``Run`` button does)."""
        if self.running or self.acdc is None or self.acdc.done or self.tau is None:
            return
        if self.run_key() in self._stopped:
            return
        self._pause.clear()
        self._stop.clear()
        self.error = None
        self._thread = threading.Thread(target=self._work, args=(self.acdc, max_steps),
                                        daemon=True, name="acdc-viz-run")
        self._thread.start()
        self._sync_buttons()

    def step(self) -> None:
        """Test exactly one edge (the ``Step`` button)."""
        self.run(max_steps=1)

    def pause(self) -> None:
        """Halt after the current step; ``Run`` continues."""
        self._pause.set()

    def stop(self) -> None:
        """End the run; its trace is kept (export it, replay it, or ``Reset``)."""
        key = self.run_key()
        if key is not None and self.acdc is not None and not self.acdc.done:
            self._stopped.add(key)
        self._stop.set()
        self._sync_buttons()

    def reset(self) -> None:
        """Back to the full graph: forget the run of the current settings."""
        if self.running:
            self._stop.set()
            self.wait()
        key = self.run_key()
        if key is not None:
            self.runs.pop(key, None)
            self._stopped.discard(key)
            with self._sweep_lock:
                self.sweep_traces.pop(key, None)
        self.error = None
        self._select_run()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background run halts (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self, acdc: Acdc, max_steps: int | None) -> None:
        """The run thread: step, redraw now and then, halt on Pause, Stop or ``max_steps``."""
        done, last, gap = 0, 0.0, REDRAW_SECONDS
        # A second OpenMP team (this thread's) next to the kernel thread's made CPU runs about 4x
        # slower here (benchmarks/bench_widget.py); one intra-op thread avoids that.
        try:
            with torch_threads(1 if acdc.device.type == "cpu" else None):
                for _ in acdc.steps():
                    done += 1
                    now = time.perf_counter()
                    if now - last >= gap:
                        self._redraw(follow=True)
                        last = time.perf_counter()
                        # big figures redraw less often: drawing stays a small share of the run
                        gap = max(REDRAW_SECONDS, REDRAW_SHARE_FACTOR * (last - now))
                    if (self._pause.is_set() or self._stop.is_set()
                            or (max_steps and done >= max_steps)):
                        break
        except Exception as exc:  # noqa: BLE001 - shown in the widget; the trace so far survives
            self._show_error(exc)
        finally:
            self._thread = None
            self._redraw(follow=True)
            self._sync_buttons()
            if acdc.done:
                self._refresh_sweep_plot()

    # ----- sweeps --------------------------------------------------------------------------------

    @property
    def sweeping(self) -> bool:
        return self._sweep_thread is not None and self._sweep_thread.is_alive()

    def sweep(self, taus: str | list[float] | None = None, executor: str | None = None,
              **options: Any) -> None:
        """Run every tau not cached yet, in the background (what the ``Sweep`` button does).

        Uses the current metric, ablation, positions and device. ``taus`` defaults to the sweep
        box (``LOW:HIGH:COUNT`` or a comma list), ``executor`` to its dropdown; ``options`` go to
        ``acdc_viz.sweep`` (``address``, ``num_cpus``, ``num_gpus``, ...).
        """
        if self.sweeping or self.refused is not None:
            return
        spec = self.sweep_taus.value if taus is None else taus
        try:
            wanted = parse_taus(spec) if isinstance(spec, str) else [check_tau(t) for t in spec]
        except (SettingsError, ValueError) as exc:
            self._show_message(f"sweep taus: {exc}", error=True)
            return
        template = self._settings_key(0.0)
        cached = self._sweep_series(template)
        todo = sorted({t for t in wanted if t not in cached})
        if not todo:
            self.sweep_status.value = f"all {len(wanted)} taus are cached"
            return
        self._sweep_cancel.clear()
        self._sweep_thread = threading.Thread(
            target=self._sweep_work,
            args=(todo, template, executor or self.sweep_executor.value, options),
            daemon=True, name="acdc-viz-sweep")
        self._sweep_thread.start()
        self._sync_sweep_buttons()

    def cancel_sweep(self) -> None:
        """Stop the sweep: the runs that finished stay cached (the ``Cancel`` button)."""
        self._sweep_cancel.set()

    def wait_sweep(self, timeout: float | None = None) -> None:
        """Block until the background sweep ends (for scripts and tests)."""
        thread = self._sweep_thread
        if thread is not None:
            thread.join(timeout)

    def _sweep_work(self, taus: list[float], template: RunKey, executor: str,
                    options: dict[str, Any]) -> None:
        """The sweep thread: run the taus, caching each trace and updating the plot as it ends."""
        counts = {"done": 0, "failed": 0}
        self.sweep_status.value = f"sweep: 0 / {len(taus)} ({executor})"

        def on_result(run: SweepRun) -> None:
            counts["done" if run.ok else "failed"] += 1
            if run.trace is not None:
                key = RunKey(run.job.tau, template.metric, template.ablation, template.positions,
                             template.device)
                with self._sweep_lock:
                    self.sweep_traces[key] = run.trace
                self._refresh_sweep_plot()
            else:
                self.log_output.append_stdout(f"sweep: tau={run.job.tau:g} failed: {run.error}\n")
            failed = f", {counts['failed']} failed" if counts["failed"] else ""
            self.sweep_status.value = (f"sweep: {counts['done'] + counts['failed']} / {len(taus)}"
                                       f"{failed} ({executor})")

        # One torch thread per run, as in _work: a second OpenMP team next to the kernel's slows
        # both down, and runs with equal thread counts give bit-identical traces.
        options = {"num_cpus": 1} | options
        try:
            self.sweep_result = run_sweep(
                self.model, taus, self.pairs, metric=self._metrics[template.metric],
                ablation=template.ablation, positions=template.positions, device=template.device,
                model_name=self.name, tokens=self.tokens, executor=executor, progress=False,
                on_result=on_result, cancel=self._sweep_cancel, **options)
        except Exception as exc:  # noqa: BLE001 - shown in the widget, never raised into the cell
            self._show_error(exc)
        else:
            result = self.sweep_result
            state = "cancelled" if result.cancelled else "done"
            self.sweep_status.value += f": {state} in {result.wall_seconds:.1f} s"
        finally:
            self._sweep_thread = None
            self._sync_sweep_buttons()

    def _sweep_series(self, template: RunKey) -> dict[float, Trace]:
        """tau -> complete trace of the cached runs (swept or not) with the template's settings."""
        def same(key: RunKey) -> bool:
            return (key.metric, key.ablation, key.positions, key.device) == (
                template.metric, template.ablation, template.positions, template.device)

        series = {k.tau: acdc.trace for k, acdc in list(self.runs.items()) if same(k) and acdc.done}
        with self._sweep_lock:
            for key, trace in self.sweep_traces.items():
                if same(key):
                    series.setdefault(key.tau, trace)
        return dict(sorted(series.items()))

    def _refresh_sweep_plot(self) -> None:
        """The sweep plot shows every complete run of the current settings, the open one larger."""
        series = self._sweep_series(self._settings_key(0.0))
        taus = list(series)
        selected = self.tau
        sizes = [11 if t == selected else 6 for t in taus]
        with self.sweep_plot.batch_update():
            metric, kept = _series(self.sweep_plot)
            metric.x = kept.x = taus
            metric.y = [t.final_metric for t in series.values()]
            kept.y = [len(t.final_kept_edges) for t in series.values()]
            metric.marker.size = kept.marker.size = sizes

    def _on_sweep_click(self, series: Any, points: Any, _selector: Any) -> None:
        if points.point_inds:
            self.select_tau(float(series.x[points.point_inds[0]]))

    def select_tau(self, tau: float) -> None:
        """Open the run at ``tau`` with the current settings (what a sweep-plot click does)."""
        text = repr(float(tau))
        if self.tau_text.value == text:
            self._select_run()
        else:
            self.tau_text.value = text

    def _sync_sweep_buttons(self) -> None:
        if self.refused is not None:
            return
        sweeping = self.sweeping
        self.sweep_buttons["Sweep"].disabled = sweeping
        self.sweep_buttons["Cancel"].disabled = not sweeping

    # ----- drawing -------------------------------------------------------------------------------

    def _on_replay(self, change: dict) -> None:
        if not self._syncing:
            self._redraw(step=change["new"])

    def _on_node_click(self, _trace: Any, points: Any, _selector: Any) -> None:
        if not points.point_inds:
            return
        key = _series(self.fig)[_NODES].customdata[points.point_inds[0]]
        self.highlight(None if key == self._highlight else key)

    def highlight(self, node_key: str | None) -> None:
        """Emphasise a node's kept paths to ``Out`` and from ``Embed`` (what a click does)."""
        self._highlight = node_key
        self._redraw(step=self.replay.value)

    def _redraw(self, step: int | None = None, follow: bool = False) -> None:
        """Draw the current run after ``step`` (the latest when ``follow`` or None)."""
        acdc = self.acdc
        if acdc is None:
            return
        start = time.perf_counter()
        trace = acdc.trace
        last = trace.last_step
        shown = last if (follow or step is None) else min(step, last)
        with self._syncing_controls():
            self.replay.max = self.play.max = last
            if follow or step is None:
                self.replay.value = self.play.value = shown
        try:
            update_figure(self.fig, trace, shown, show_removed=self.show_removed.value,
                          highlight=self._highlight, layout=self._layout_name)
        except (KeyError, ValueError):   # a node of another graph shape was highlighted
            self._highlight = None
            update_figure(self.fig, trace, shown, show_removed=self.show_removed.value,
                          layout=self._layout_name)
        xs = list(range(-1, shown + 1))
        with self.history.batch_update():
            metric_line, kept_line = _series(self.history)
            metric_line.x = kept_line.x = xs
            metric_line.y = [trace.metric_after(i) for i in xs]
            kept_line.y = [trace.kept_count(i) for i in xs]
        state = "complete" if acdc.done and shown == last else ("running" if self.running else "")
        sep = " &nbsp;·&nbsp; "
        self.status_label.value = (
            f"<b>step {shown + 1} / {trace.n_edges}</b>{sep}edges kept {trace.kept_count(shown)}"
            f"{sep}{html.escape(trace.settings['metric'])} {trace.metric_after(shown):.4g}"
            f"{sep}tau {trace.settings['tau']:g}" + (f"{sep}<i>{state}</i>" if state else "")
        )
        self.progress.max = trace.n_edges
        self.progress.value = trace.resume_from
        self.eta.value = self._eta(trace)
        self.redraws += 1
        self.redraw_seconds += time.perf_counter() - start

    @staticmethod
    def _eta(trace: Trace) -> str:
        recent = trace.steps[-200:]
        remaining = trace.n_edges - trace.resume_from
        if not recent or remaining == 0:
            return "done" if remaining == 0 else ""
        per_step = sum(s.seconds for s in recent) / len(recent)
        return f"ETA {remaining * per_step:.0f} s" if remaining * per_step >= 1 else "ETA <1 s"

    def _refuse_model(self, exc: ModelSupportError) -> None:
        """The model cannot run at any setting: say so in the status line, disable every
        control (the message and the log keep the reason)."""
        self.refused = str(exc)
        self.status_label.value = "<b>model not supported</b>: no ACDC run is possible"
        controls = [self.tau_slider, self.tau_text, self.metric_dropdown, self.ablation_dropdown,
                    self.positions_toggle, self.device_dropdown, self.layout_dropdown,
                    self.show_removed, self.replay, self.play, self.sweep_taus,
                    self.sweep_executor, *self.sweep_buttons.values(), *self.exports.values()]
        for control in controls:
            control.disabled = True

    def _sync_buttons(self) -> None:
        if self.refused is not None:
            for button in self.buttons.values():
                button.disabled = True
            return
        running = self.running
        key = self.run_key()
        finished = self.acdc is None or self.acdc.done or key in self._stopped or key is None
        self.buttons["Run"].disabled = running or finished
        self.buttons["Step"].disabled = running or finished
        self.buttons["Pause"].disabled = not running
        self.buttons["Stop"].disabled = not running and finished
        self.buttons["Reset"].disabled = self.acdc is None and key is None

    def _show_message(self, text: str, error: bool = False) -> None:
        colour = "#B00020" if error else "#555"
        self.message.value = f"<span style='color:{colour}'>{html.escape(text)}</span>"

    def _show_error(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.warning("acdc_viz widget: %s", self.error)
        self._show_message(self.error, error=True)
        self.log_output.append_stdout(self.error + "\n")

    # ----- export --------------------------------------------------------------------------------

    def export(self, ext: str) -> Path | None:
        """Write the figure (``.html``, ``.png``, ``.svg``) or the trace (``.json``) to
        ``export_dir``: the path, or None after an error (shown in the widget, not raised)."""
        if self.acdc is None:
            return None
        trace = self.acdc.trace
        key = self.run_key()
        stem = (f"acdc_{self.name}_tau{trace.settings['tau']:g}"
                + ("_pos" if key and key.positions else ""))
        path = self.export_dir / f"{stem}{ext}"
        try:
            if ext == ".json":
                save_trace(trace, path)
            else:
                from acdc_viz.export import export_figure

                figure = build_figure(trace, self.replay.value, layout=self._layout_name,
                                      show_removed=self.show_removed.value,
                                      highlight=self._highlight)
                export_figure(figure, path)
        except Exception as exc:  # noqa: BLE001 - e.g. no browser for PNG: shown, not raised
            self._show_error(exc)
            return None
        self._show_message(f"wrote {path}")
        return path

    # ----- display -------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
