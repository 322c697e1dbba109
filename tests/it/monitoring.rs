//! deploy/monitoring: the fleet's rules, checked with `promtool test rules` on written
//! series, and run by a real Prometheus server scraping three braid proxies, whose
//! fleet evidence agrees with `braid controller`'s figure.

use std::time::{Duration, Instant};

use crate::fleet::{send, watched_fleet};
use crate::support::*;

/// The rule groups of deploy/monitoring/prometheusrule.yaml, as a plain rule file
/// (its `spec`), with each group's interval replaced by `interval`.
fn rule_file(interval: &str) -> String {
    let rule = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/monitoring/prometheusrule.yaml"
    ))
    .unwrap();
    let (_, spec) = rule.split_once("\nspec:\n").expect("a spec");
    spec.lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .map(|l| {
            if l.trim_start().starts_with("interval: ") {
                format!("    interval: {interval}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The fleet evidence sums every pod's per-theta products: two pods that alone stay
/// under the threshold page together; p99 over 500 ms and errors over 1% page per
/// variant across the fleet, and a fleet where all is well pages for nothing.
#[test]
fn the_fleet_rules_page_on_the_summed_evidence_latency_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rule_file("1m")).unwrap();
    // Each pod's products, per theta: 1.5 at 2m (together (3 - ln 2) / ln 10 = 10^1.0),
    // 5 at 4m: together (10 - ln 2) / ln 10 = 10^4.04 over the 10^3.301 threshold,
    // each pod alone (5 - ln 2) / ln 10 = 10^1.87 under it.
    let mut series = String::new();
    for pod in ["p1", "p2"] {
        for theta in ["1.25", "1.5", "2", "3", "5"] {
            series.push_str(&format!(
                "      - series: 'braid_guardrail_log_lr{{namespace=\"ml\",pod=\"{pod}\",route=\"m\",variant=\"canary\",theta=\"{theta}\"}}'\n        values: '0 0 1.5 1.5 5 5 5'\n"
            ));
        }
    }
    std::fs::write(
        dir.path().join("test.yaml"),
        format!(
            r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}      - series: 'braid_requests_total{{namespace="ml",pod="p1",route="m",variant="canary",code="200"}}'
        values: '0+100x30'
      - series: 'braid_requests_total{{namespace="ml",pod="p1",route="m",variant="canary",code="500"}}'
        values: '0+5x30'
      - series: 'braid_requests_total{{namespace="ml",pod="p1",route="m",variant="stable",code="200"}}'
        values: '0+100x30'
      - series: 'braid_request_duration_seconds_bucket{{namespace="ml",pod="p1",route="m",variant="canary",le="0.5"}}'
        values: '0+90x30'
      - series: 'braid_request_duration_seconds_bucket{{namespace="ml",pod="p1",route="m",variant="canary",le="1"}}'
        values: '0+105x30'
      - series: 'braid_request_duration_seconds_bucket{{namespace="ml",pod="p1",route="m",variant="canary",le="+Inf"}}'
        values: '0+105x30'
      - series: 'braid_request_duration_seconds_bucket{{namespace="ml",pod="p1",route="m",variant="stable",le="0.5"}}'
        values: '0+100x30'
      - series: 'braid_request_duration_seconds_bucket{{namespace="ml",pod="p1",route="m",variant="stable",le="+Inf"}}'
        values: '0+100x30'
    alert_rule_test:
      - eval_time: 2m
        alertname: BraidFleetGuardrailEvidence
        exp_alerts: []
      - eval_time: 4m
        alertname: BraidFleetGuardrailEvidence
        exp_alerts:
          - exp_labels: {{severity: critical, namespace: ml, route: m, variant: canary}}
            exp_annotations:
              summary: "the fleet's evidence that m/canary is worse than its control reached 10^4.04: roll it back"
              description: "Anytime-valid at alpha 0.001 over every pod alive now. braid controller writes the verdict into the ConfigMap itself; without it, set the candidate's weight to 0."
      - eval_time: 20m
        alertname: BraidFleetErrorRateHigh
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: ml, route: m, variant: canary}}
            exp_annotations:
              summary: "more than 1% of m/canary requests across the fleet fail with 5xx"
      - eval_time: 20m
        alertname: BraidFleetLatencyHigh
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: ml, route: m, variant: canary}}
            exp_annotations:
              summary: "p99 latency of m/canary across the fleet is above 500 ms"
      - eval_time: 20m
        alertname: BraidFleetVerdict
        exp_alerts: []
"#
        ),
    )
    .unwrap();
    promtool_in(dir.path(), &["check", "rules", "rules.yaml"]);
    promtool_in(dir.path(), &["test", "rules", "test.yaml"]);
}

/// A Prometheus server started for the test, stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(targets: &[(String, std::net::SocketAddr)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), rule_file("1s")).unwrap();
        let static_configs: String = targets
            .iter()
            .map(|(pod, addr)| {
                format!(
                    "      - targets: ['{addr}']\n        labels: {{namespace: ml, pod: {pod}}}\n"
                )
            })
            .collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: braid\n    static_configs:\n{static_configs}"
            ),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = std::process::Command::new(promtool().with_file_name("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for_status(&client(), &format!("{}/-/ready", p.url), 200).await;
        p
    }

    /// The value of an instant query with one result, if it has one.
    async fn value(&self, query: &str) -> Option<f64> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b':' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let r = get(
            &client(),
            &format!("{}/api/v1/query?query={q}", self.url),
            &[],
        )
        .await;
        let v = r.json();
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

/// Three proxies judged by the controller and scraped by a real Prometheus: the rule's
/// fleet evidence is the controller's "from the start" figure, to float precision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sums_the_same_fleet_evidence_as_the_controller() {
    let fleet = watched_fleet(3).await;
    let (proxies, replica) = (&fleet.proxies, &fleet.replica);
    for i in 0..300 {
        send(proxies, i).await;
    }
    let targets: Vec<(String, std::net::SocketAddr)> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("model-{i}"), p.admin))
        .collect();
    let prom = Prometheus::start(&targets).await;
    let controller_figure = async || {
        replica.report().await["routes"][0]["variants"][1]["guardrail"]["evidence_from_start_log10"]
            .as_f64()
    };
    let start = Instant::now();
    let (ours, theirs) = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "prometheus never agreed"
        );
        let ours = controller_figure().await;
        let theirs = prom
            .value("braid:fleet_guardrail_evidence:log10{route=\"/\",variant=\"candidate\"}")
            .await;
        if let (Some(a), Some(b)) = (ours, theirs)
            && (a - b).abs() < 1e-9
        {
            break (a, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("fleet evidence: controller 10^{ours}, prometheus 10^{theirs}");
    assert!(ours > 0.5, "too little evidence to compare: 10^{ours}");
}
