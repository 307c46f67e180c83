"""Prometheus exposition of the server metrics: the text parses under the format's rules (HELP/TYPE before the
samples, histogram buckets cumulative and ending at +Inf, _count == the +Inf bucket), and values follow updates,
also from many threads at once."""

import math
import threading

import pytest

from omnivox.server.metrics import Metrics, format_value
from server_support import parse, value


def test_fresh_metrics_render_every_family_with_its_type():
    f = parse(Metrics().render())
    assert {k: d["type"] for k, d in f.items()} == {
        "omnivox_sessions": "gauge", "omnivox_queue_depth": "gauge",
        "omnivox_first_audio_seconds": "histogram", "omnivox_end_of_turn_to_first_audio_seconds": "histogram",
        "omnivox_realtime_factor": "histogram", "omnivox_errors_total": "counter",
        "omnivox_responses_total": "counter",
    }
    assert value(f, "omnivox_first_audio_seconds", "omnivox_first_audio_seconds_count") == 0
    assert value(f, "omnivox_responses_total", status="completed") == 0
    assert all(d["help"] for d in f.values())


def test_values_follow_updates():
    m = Metrics()
    m.sessions.inc()
    m.sessions.inc()
    m.sessions.dec()
    queued = [3]
    m.queue_depth.set_function(lambda: queued[0])
    for s in (0.04, 0.3, 0.3, 2.5, 100.0):
        m.first_audio_seconds.observe(s)
    m.realtime_factor.observe(0.5)
    m.end_of_turn_to_first_audio_seconds.observe(0.9)
    m.errors_total.inc(type="invalid_request_error")
    m.errors_total.inc(type="invalid_request_error")
    m.errors_total.inc(type="server_busy")
    m.responses_total.inc(status="completed")
    f = parse(m.render())
    assert value(f, "omnivox_sessions") == 1
    assert value(f, "omnivox_queue_depth") == 3
    queued[0] = 7
    assert value(parse(m.render()), "omnivox_queue_depth") == 7
    h = "omnivox_first_audio_seconds"
    assert value(f, h, h + "_bucket", le="0.05") == 1
    assert value(f, h, h + "_bucket", le="0.3") == 3
    assert value(f, h, h + "_bucket", le="2") == 3
    assert value(f, h, h + "_bucket", le="3") == 4
    assert value(f, h, h + "_bucket", le="60") == 4
    assert value(f, h, h + "_bucket", le="+Inf") == 5
    assert value(f, h, h + "_count") == 5
    assert value(f, h, h + "_sum") == pytest.approx(0.04 + 0.3 + 0.3 + 2.5 + 100.0)
    assert value(f, "omnivox_realtime_factor", "omnivox_realtime_factor_count") == 1
    assert value(f, "omnivox_end_of_turn_to_first_audio_seconds",
                 "omnivox_end_of_turn_to_first_audio_seconds_sum") == pytest.approx(0.9)
    assert value(f, "omnivox_errors_total", type="invalid_request_error") == 2
    assert value(f, "omnivox_errors_total", type="server_busy") == 1
    assert value(f, "omnivox_responses_total", status="completed") == 1
    assert value(f, "omnivox_responses_total", status="cancelled") == 0


def test_label_values_are_escaped_and_still_parse():
    m = Metrics()
    m.errors_total.inc(type='odd "type"\\ with\nnewline')
    f = parse(m.render())
    assert value(f, "omnivox_errors_total", type='odd \\"type\\"\\\\ with\\nnewline') == 1


def test_a_failing_gauge_source_renders_nan_instead_of_breaking_the_scrape():
    m = Metrics()
    m.queue_depth.set_function(lambda: 1 / 0)
    assert math.isnan(value(parse(m.render()), "omnivox_queue_depth"))


def test_counters_reject_decrements_and_wrong_labels():
    m = Metrics()
    with pytest.raises(ValueError):
        m.errors_total.inc(-1, type="x")
    with pytest.raises(ValueError):
        m.errors_total.inc(status="x")


def test_concurrent_updates_are_not_lost():
    m = Metrics()

    def work():
        for _ in range(2000):
            m.first_audio_seconds.observe(0.1)
            m.responses_total.inc(status="completed")
            m.sessions.inc()
            m.render() if _ % 500 == 0 else None

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f = parse(m.render())
    assert value(f, "omnivox_first_audio_seconds", "omnivox_first_audio_seconds_count") == 8000
    assert value(f, "omnivox_responses_total", status="completed") == 8000
    assert value(f, "omnivox_sessions") == 8000


def test_quantile_interpolates_inside_the_bucket():
    m = Metrics()
    assert math.isnan(m.first_audio_seconds.quantile(0.5))
    for _ in range(10):
        m.first_audio_seconds.observe(0.15)   # all in the (0.1, 0.2] bucket
    assert m.first_audio_seconds.quantile(0.5) == pytest.approx(0.15)
    assert m.first_audio_seconds.quantile(1.0) == pytest.approx(0.2)


def test_format_value():
    assert [format_value(v) for v in (3, 3.0, 0.25, float("inf"), float("-inf"), float("nan"))] == \
        ["3", "3", "0.25", "+Inf", "-Inf", "NaN"]
