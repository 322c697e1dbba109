//! The metrics text every scraper reads right: each family of the proxy and of the
//! executor, populated, in the Prometheus text format 0.0.4 that `/metrics` serves by
//! default, passes `promtool check metrics`; OpenMetrics stays what Prometheus
//! negotiates.

use std::sync::Arc;
use std::time::Duration;

use braid::metrics::{self, ExecutorMetrics, Metrics, OPENMETRICS, PROMETHEUS_TEXT};

use crate::support::promtool_check;

/// Every `# TYPE` family of a 0.0.4 text has at least one sample.
fn assert_every_family_has_samples(text: &str) {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, _) = rest.split_once(' ').unwrap();
        let sampled = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .any(|l| l.starts_with(name));
        assert!(
            sampled,
            "family {name} has no samples: populate it here\n{text}"
        );
    }
}

fn as_scraped(openmetrics: String) -> String {
    let (text, content_type) = metrics::exposition(openmetrics, Some("*/*"));
    assert_eq!(content_type, PROMETHEUS_TEXT);
    text
}

#[test]
fn every_proxy_family_passes_promtool() {
    let m = Metrics::new();
    let (route, a, b): (Arc<str>, Arc<str>, Arc<str>) = (
        Arc::from("sentiment"),
        Arc::from("stable"),
        Arc::from("candidate"),
    );
    m.requests(&route, &a).record(200, Duration::from_millis(3));
    m.grpc_request(&route, &a, "UNAVAILABLE");
    m.access_log_lines("written", 3);
    m.unrouted("unknown_model");
    m.config_reloaded("file", true, 1);
    m.inflight().set(1);
    let batch = m.batch(&route, &a);
    let class: Arc<str> = Arc::from("interactive");
    batch.flushed(
        "full",
        2,
        [(Some(&class), Duration::from_millis(1))].into_iter(),
    );
    batch.executed(Duration::from_millis(20));
    batch.dropped("deadline", None);
    batch.depth(Some(&class), 1);
    m.retry(&route, &a).outcome("retried");
    let health = m.health(&route, &b);
    health.ejections.inc();
    health.ejected.set(1);
    m.fallback(&route, &b);
    m.shadow(&route, &b, "ok", Some(0.01));
    let text = as_scraped(m.encode());
    assert_every_family_has_samples(&text);
    promtool_check(&text);
    // What Prometheus negotiates is left as OpenMetrics.
    let (om, content_type) = metrics::exposition(
        m.encode(),
        Some("application/openmetrics-text;version=1.0.0"),
    );
    assert_eq!(content_type, OPENMETRICS);
    assert!(om.contains("# TYPE braid_requests counter\n") && om.ends_with("# EOF\n"));
}

#[test]
fn every_executor_family_passes_promtool() {
    let m = ExecutorMetrics::new();
    m.request("minilm", 200);
    m.batch("minilm", 4, Duration::from_millis(30), 64, 40);
    m.queued("minilm", Duration::from_millis(2));
    m.queue_depth("minilm", 3);
    m.cancelled("minilm");
    let text = as_scraped(m.encode());
    assert_every_family_has_samples(&text);
    promtool_check(&text);
}

#[test]
fn openmetrics_only_syntax_is_rewritten_or_left_out() {
    let om = "# HELP build Build.\n# TYPE build info\nbuild_info{v=\"1\"} 1\n\
              # HELP bytes Bytes.\n# TYPE bytes counter\n# UNIT bytes bytes\n\
              bytes_total 5 # {trace_id=\"ab\"} 1.0\n# TYPE s stateset\ns{s=\"a\"} 1\n# EOF\n";
    assert_eq!(
        metrics::prometheus_text(om),
        "# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n\
         # HELP bytes_total Bytes.\n# TYPE bytes_total counter\nbytes_total 5\n\
         # TYPE s untyped\ns{s=\"a\"} 1\n"
    );
}
