"""The Explorer, driven headlessly through its buttons' handlers and its controls' values."""

from __future__ import annotations

import pytest
from conftest import token_pairs

from acdc_viz.widget import BUTTONS, Explorer


@pytest.fixture()
def explorer(gpt2, tmp_path):
    return Explorer(gpt2, token_pairs(), tau=1e-3, model_name="tiny", export_dir=tmp_path)


def click(ex, name):
    ex.buttons[name].click()


def test_controls_follow_the_contract(explorer):
    assert tuple(b.description for b in explorer.buttons.values()) == BUTTONS
    assert explorer.tau_slider.description == "tau" and explorer.tau_text.description == "tau"
    status = explorer.status_label.value
    assert "step 0 / 75" in status and "edges kept 75" in status
    assert explorer.device_dropdown.options[0] == "cpu"


def test_step_tests_exactly_one_edge(explorer):
    click(explorer, "Step")
    explorer.wait()
    assert len(explorer.trace.steps) == 1 and "step 1 / 75" in explorer.status_label.value
    click(explorer, "Step")
    explorer.wait()
    assert len(explorer.trace.steps) == 2


def test_run_then_pause_stops_after_the_current_step(explorer):
    click(explorer, "Run")
    click(explorer, "Pause")
    explorer.wait()
    n = len(explorer.trace.steps)
    assert 1 <= n < 75 and not explorer.running
    click(explorer, "Run")                    # continues
    explorer.wait()
    assert explorer.acdc.done
    assert explorer.buttons["Step"].disabled and explorer.buttons["Run"].disabled
    assert "step 75 / 75" in explorer.status_label.value


def test_run_twice_does_nothing_more(explorer):
    click(explorer, "Run")
    thread = explorer._thread
    click(explorer, "Run")
    assert explorer._thread is thread or thread is None
    explorer.wait()
    assert explorer.acdc.done


def test_stop_keeps_the_trace(explorer):
    click(explorer, "Step")
    explorer.wait()
    click(explorer, "Stop")
    assert len(explorer.trace.steps) == 1
    assert explorer.buttons["Run"].disabled and explorer.buttons["Step"].disabled
    path = explorer.export(".json")
    assert path.exists()


def test_replay_shows_the_state_after_step_i(explorer):
    explorer.run()
    explorer.wait()
    explorer.replay.value = 10
    assert "step 11 / 75" in explorer.status_label.value
    kept_after_10 = explorer.trace.steps[10].kept_edges
    assert f"edges kept {kept_after_10}" in explorer.status_label.value
    assert len(explorer.trace.steps) == 75            # nothing recomputed or lost


def test_tau_change_uses_the_cache(explorer):
    explorer.run()
    explorer.wait()
    first = explorer.acdc
    explorer.tau_text.value = "0.002"
    assert explorer.acdc is not first and len(explorer.trace.steps) == 0
    explorer.tau_text.value = "0.001"
    assert explorer.acdc is first and explorer.acdc.done


def test_bad_tau_is_flagged_and_nothing_runs(explorer):
    explorer.tau_text.value = "-3"
    assert "✗" in explorer.tau_text.description and "positive" in explorer.message.value
    assert explorer.buttons["Run"].disabled
    explorer.run()
    assert not explorer.running


def test_reset_returns_to_the_full_graph(explorer):
    explorer.step()
    explorer.wait()
    click(explorer, "Reset")
    assert len(explorer.trace.steps) == 0 and "edges kept 75" in explorer.status_label.value


def test_layout_and_positions_keep_the_trace(explorer):
    explorer.run()
    explorer.wait()
    trace = explorer.trace
    explorer.layout_dropdown.value = "spring"
    explorer.positions_toggle.value = True
    assert explorer.trace.graph.n_positions == 6
    explorer.positions_toggle.value = False
    assert explorer.trace is trace


def test_an_error_in_a_run_is_shown_and_the_trace_survives(explorer, monkeypatch):
    explorer.step()
    explorer.wait()
    def failing_steps():                    # independent of the engine's internals
        yield from ()
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(explorer.acdc, "steps", failing_steps)
    explorer.run()
    explorer.wait()
    assert "ZeroDivisionError" in explorer.message.value and len(explorer.trace.steps) == 1
    assert not explorer.running


def test_a_model_without_what_the_engine_needs_shows_the_message():
    import torch

    ex = Explorer(torch.nn.Linear(2, 2), token_pairs())
    assert "TransformerLens" in ex.message.value and ex.acdc is None


@pytest.mark.parametrize(("name", "features"), [
    ("falcon-alibi", ["ALiBi position biases outside Bloom"]),
    ("falcon-new-decoder", ["new_decoder_architecture"]),
])
def test_a_refused_family_shows_why_with_every_control_disabled(family, name, features):
    """No traceback into the cell: the message names the features and the families that work,
    the status line says no run is possible, and nothing can be started."""
    from model_families import VOCAB

    ex = Explorer(family(name).bridge, token_pairs(d_vocab=VOCAB))
    assert ex.acdc is None and ex.refused is not None
    for words in [*features, "ModelSupportError", "GPT-NeoX/Pythia", "Llama"]:
        assert words in ex.message.value, words
    assert "model not supported" in ex.status_label.value
    assert any("ModelSupportError" in out.get("text", "") for out in ex.log_output.outputs)
    controls = [*ex.buttons.values(), *ex.sweep_buttons.values(), *ex.exports.values(),
                ex.tau_slider, ex.tau_text, ex.metric_dropdown, ex.ablation_dropdown,
                ex.positions_toggle, ex.device_dropdown]
    assert all(control.disabled for control in controls)
    ex.run()
    ex.sweep()
    assert not ex.running and not ex.sweeping and ex.acdc is None


def test_clicking_a_node_highlights_its_paths(explorer):
    explorer.tau_text.value = "1e-6"
    explorer.run()
    explorer.wait()
    kept = explorer.trace.final_kept_edges
    node = next(e.split("->")[0] for e in kept if not e.startswith("Embed"))
    explorer.highlight(node)
    paths = explorer.fig.data[9]
    assert len(paths.x) > 0
    explorer.highlight(None)
    assert len(explorer.fig.data[9].x) == 0


def test_export_buttons_write_files(explorer):
    explorer.step()
    explorer.wait()
    explorer.exports[".html"].click()
    html_files = list(explorer.export_dir.glob("*.html"))
    assert len(html_files) == 1 and "plotly" in html_files[0].read_text()[:200000].lower()
    explorer.exports[".json"].click()
    assert list(explorer.export_dir.glob("*.json"))


def test_after_a_complete_run_reset_and_new_tau_enable_the_buttons(explorer):
    explorer.run()
    explorer.wait()
    assert explorer.buttons["Step"].disabled
    explorer.tau_text.value = "0.05"
    assert not explorer.buttons["Step"].disabled and not explorer.buttons["Run"].disabled
    explorer.tau_text.value = "0.001"                 # the cached complete run
    assert explorer.buttons["Step"].disabled
    click(explorer, "Reset")
    assert not explorer.buttons["Step"].disabled and not explorer.buttons["Run"].disabled


def test_explorer_on_a_bundled_task_by_name(tmp_path):
    from acdc_viz import Explorer as LazyExplorer

    ex = LazyExplorer("induction", export_dir=tmp_path)
    ex.run()
    ex.wait()
    assert ex.acdc.done and ex.trace.tokens[0] == "BOS"


def test_sweep_fills_the_cache_and_the_tau_plot(explorer, gpt2):
    from plotly.callbacks import Points

    from acdc_viz import Acdc

    assert tuple(b.description for b in explorer.sweep_buttons.values()) == ("Sweep", "Cancel")
    explorer.sweep_taus.value = "1e-4,1e-3,1e-2"
    explorer.sweep_buttons["Sweep"].click()
    explorer.wait_sweep()
    assert not explorer.sweeping and "3 / 3" in explorer.sweep_status.value
    metric, kept = explorer.sweep_plot.data
    assert list(kept.x) == [1e-4, 1e-3, 1e-2] and explorer.sweep_plot.layout.xaxis.type == "log"
    traces = [explorer.sweep_traces[k] for k in sorted(explorer.sweep_traces, key=lambda k: k.tau)]
    assert list(kept.y) == [len(t.final_kept_edges) for t in traces]
    assert list(metric.y) == [t.final_metric for t in traces]
    assert len(explorer.trace.steps) == 0              # the open run (tau 1e-3) is not touched ...

    kept._dispatch_on_click(Points(point_inds=[2], xs=[1e-2], ys=[kept.y[2]],
                                   trace_name="edges kept", trace_index=1), None)
    assert explorer.tau == 1e-2 and explorer.acdc.done
    assert "from the sweep" in explorer.message.value
    assert not explorer.running and explorer.buttons["Run"].disabled          # nothing to compute
    alone = Acdc(gpt2, explorer.pairs, tau=1e-2, model_name="tiny").run()
    assert explorer.trace.canonical_json() == alone.canonical_json()
    assert "step 75 / 75" in explorer.status_label.value
    assert list(kept.marker.size) == [6, 6, 11]        # the open run is marked

    explorer.select_tau(1e-3)                          # ... until it is opened: then the sweep's
    assert explorer.acdc.done and len(explorer.trace.steps) == 75
    explorer.sweep()                                   # everything is cached: nothing to run
    assert not explorer.sweeping and "cached" in explorer.sweep_status.value


def test_reset_forgets_a_swept_run(explorer):
    explorer.sweep(taus=[1e-3])
    explorer.wait_sweep()
    explorer.select_tau(1e-3)
    assert explorer.acdc.done
    click(explorer, "Reset")
    assert len(explorer.trace.steps) == 0 and not explorer.buttons["Run"].disabled


def test_cancel_stops_a_sweep_and_keeps_what_finished(explorer):
    explorer.sweep(taus="1e-5:1e-1:12")
    explorer.cancel_sweep()
    explorer.wait_sweep()
    assert not explorer.sweeping and explorer.sweep_result.cancelled
    assert len(explorer.sweep_traces) < 12 and "cancelled" in explorer.sweep_status.value
    assert not explorer.sweep_buttons["Sweep"].disabled
    assert explorer.sweep_buttons["Cancel"].disabled


def test_bad_sweep_taus_are_flagged(explorer):
    explorer.sweep_taus.value = "1e-3:oops"
    explorer.sweep()
    assert not explorer.sweeping and "sweep taus" in explorer.message.value
