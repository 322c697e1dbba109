//! Experiments that protect themselves, end to end over real sockets: a guardrail that
//! takes a failing candidate's traffic back to the control (and what releases it), a
//! ramp on the wall clock that two replicas follow key for key, a skewed split flagged,
//! `/experiments` and `braid experiments`, and bad settings rejected whole.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;

const INFER: &str = "/v2/models/sentiment/infer";

fn guarded(control: &str, candidate: &str, extra: &str) -> String {
    format!(
        r#"routes:
  - model: sentiment
    variants:
      - {{ name: stable, weight: 50, backend: "{control}" }}
      - {{ name: canary, weight: 50, backend: "{candidate}" }}
    sticky_header: x-user-id
    guardrail: {{ control: stable, warmup: 0s, min_bad_events: 5 }}
{extra}"#
    )
}

async fn experiments(proxy: &TestProxy) -> serde_json::Value {
    let r = get(&client(), &proxy.admin_url("/experiments"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn variant<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["routes"][0]["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no variant {name} in {report}"))
}

/// Each key's variant, one request per key.
async fn assignments(proxy: &TestProxy, keys: &[String]) -> HashMap<String, String> {
    let c = client();
    let mut out = HashMap::new();
    for k in keys {
        let r = post(&c, &proxy.url(INFER), &[("x-user-id", k)], "{}").await;
        out.insert(k.clone(), r.variant().to_string());
    }
    out
}

/// `braid ARGS` off the runtime's thread, so the in-process proxy it talks to can answer.
async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        braid(&args, b"")
    })
    .await
    .unwrap()
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

#[tokio::test]
async fn a_failing_candidate_loses_its_traffic_to_the_control_until_the_config_changes() {
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let config = guarded(&stable.url(), &canary.url(), "");
    let proxy = TestProxy::start(&config).await;
    let keys = keys(200);
    let before = assignments(&proxy, &keys).await;
    let on_canary = before.values().filter(|v| *v == "canary").count();
    assert!(
        (60..140).contains(&on_canary),
        "{on_canary} of 200 on canary"
    );
    let report = experiments(&proxy).await;
    assert_eq!(report["routes"][0]["split"]["healthy"], true, "{report}");
    assert_eq!(variant(&report, "canary")["guardrail"]["state"], "watching");

    // The canary starts failing one request in five; the control stays healthy.
    canary.set(|f| f.fail_every = 5);
    let c = client();
    let mut tripped_after = None;
    for i in 0..4_000 {
        let key = &keys[i % keys.len()];
        post(&c, &proxy.url(INFER), &[("x-user-id", key)], "{}").await;
        if i % 20 == 19
            && metric(
                &proxy,
                "braid_guardrail_tripped{route=\"sentiment\",variant=\"canary\"}",
            )
            .await
                == 1.0
        {
            tripped_after = Some(i + 1);
            break;
        }
    }
    let tripped_after = tripped_after.expect("the guardrail never tripped");
    assert!(
        tripped_after < 1_000,
        "tripped after {tripped_after} requests"
    );

    // Every key now gets the control; the control's own keys never moved.
    let after = assignments(&proxy, &keys).await;
    for k in &keys {
        assert_eq!(after[k], "stable", "{k} was {} before", before[k]);
    }
    // The override header still reaches the candidate.
    let r = post(
        &c,
        &proxy.url(INFER),
        &[("x-braid-variant", "canary")],
        "{}",
    )
    .await;
    assert_eq!(r.variant(), "canary");

    let report = experiments(&proxy).await;
    let g = &variant(&report, "canary")["guardrail"];
    assert_eq!(g["state"], "tripped", "{report}");
    assert!(g["evidence_at_trip_log10"].as_f64().unwrap() >= 3.0, "{g}");
    assert_eq!(variant(&report, "canary")["weight"], 0.0);
    assert_eq!(variant(&report, "stable")["guardrail"]["state"], "control");
    let diff = &variant(&report, "canary")["vs_control"]["bad_rate_difference"];
    // Watched since the start: the healthy requests before the failures count too.
    assert!(diff["estimate"].as_f64().unwrap() > 0.05, "{diff}");
    assert_eq!(
        metric(
            &proxy,
            "braid_variant_weight{route=\"sentiment\",variant=\"canary\"}"
        )
        .await,
        0.0
    );
    assert_eq!(
        metric(
            &proxy,
            "braid_guardrail_trips_total{route=\"sentiment\",variant=\"canary\"}"
        )
        .await,
        1.0
    );
    assert!(
        metric(
            &proxy,
            "braid_guardrail_evidence{route=\"sentiment\",variant=\"canary\"}"
        )
        .await
            >= 3.0
    );

    // The CLI's table says the same.
    let out = cli(vec![
        "experiments".into(),
        "--admin".into(),
        proxy.admin.to_string(),
    ])
    .await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("route sentiment"), "{table}");
    assert!(table.contains("tripped (evidence"), "{table}");
    // Columns line up: each variant row is as wide as the header up to the guardrail.
    let rows: Vec<&str> = table.lines().skip(1).collect();
    let at = |l: &str| l.find('%').unwrap_or(0);
    assert!(rows[1..].iter().all(|l| at(l) == at(rows[1])), "{table}");

    // A reload of the same document keeps the latch...
    let other_route = format!(
        "{config}  - path_prefix: /other\n    variants: [{{ name: x, backend: \"{}\" }}]\n",
        stable.url()
    );
    proxy.reload(&other_route).await;
    assert_eq!(assignments(&proxy, &keys).await, after);
    // ...a change to the route's config releases it: the candidate's keys come back.
    canary.set(|f| f.fail_every = 0);
    proxy
        .reload(&other_route.replace("min_bad_events: 5", "min_bad_events: 6"))
        .await;
    assert_eq!(assignments(&proxy, &keys).await, before);
    assert_eq!(
        metric(
            &proxy,
            "braid_guardrail_tripped{route=\"sentiment\",variant=\"canary\"}"
        )
        .await,
        0.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn reset_on_the_admin_port_releases_a_trip() {
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    canary.set(|f| f.status = 503);
    let proxy = TestProxy::start(&guarded(&stable.url(), &canary.url(), "")).await;
    let c = client();
    let keys = keys(100);
    for _ in 0..5 {
        assignments(&proxy, &keys).await;
    }
    let report = experiments(&proxy).await;
    assert_eq!(
        variant(&report, "canary")["guardrail"]["state"],
        "tripped",
        "{report}"
    );

    let r = send(
        &c,
        "GET",
        &proxy.admin_url("/experiments/sentiment/reset"),
        &[],
        b"",
    )
    .await;
    assert_json_error(&r, 405, "POST");
    let r = send(
        &c,
        "POST",
        &proxy.admin_url("/experiments/nope/reset"),
        &[],
        b"",
    )
    .await;
    assert_json_error(&r, 404, "no experiment on route \"nope\"");
    canary.set(|f| f.status = 0);
    let args = [
        "experiments",
        "--admin",
        &proxy.admin.to_string(),
        "--reset",
        "sentiment",
    ];
    let out = cli(args.iter().map(|a| a.to_string()).collect()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = experiments(&proxy).await;
    assert_eq!(
        variant(&report, "canary")["guardrail"]["state"],
        "watching",
        "{report}"
    );
    let now = assignments(&proxy, &keys).await;
    assert!(now.values().any(|v| v == "canary"));
    proxy.stop().await;
}

/// A config whose canary ramps 10 -> 50 -> 100 against a control at 100, its ramp
/// started `ago` before now (negative: not yet).
fn ramped(control: &str, candidate: &str, started_ago: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let start = braid::access::rfc3339_millis(Duration::from_secs((now - started_ago) as u64));
    format!(
        r#"routes:
  - model: sentiment
    variants:
      - {{ name: stable, weight: 100, backend: "{control}" }}
      - name: canary
        weight: 0
        backend: "{candidate}"
        ramp:
          start: "{start}"
          steps:
            - {{ weight: 10, hold: 1h }}
            - {{ weight: 50, hold: 1h }}
            - {{ weight: 100, hold: 1h }}
    sticky_header: x-user-id
"#
    )
}

#[tokio::test]
async fn a_ramp_moves_through_its_steps_and_two_replicas_agree_on_every_key() {
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let a = TestProxy::start(&ramped(&stable.url(), &canary.url(), -600)).await;
    let b = TestProxy::start(&ramped(&stable.url(), &canary.url(), -600)).await;
    let keys = keys(400);
    let mut previous: HashSet<String> = HashSet::new();
    // (seconds since the ramp started, expected canary share, step shown)
    let phases = [
        (-600, 0.0, serde_json::Value::Null),
        (1_800, 10.0 / 110.0, 1.into()),
        (5_400, 50.0 / 150.0, 2.into()),
        (9_000, 0.5, 3.into()),
        (20_000, 0.5, 3.into()),
    ];
    for (i, (ago, share, step)) in phases.into_iter().enumerate() {
        if i > 0 {
            // The two replicas load the same document at slightly different moments.
            a.reload(&ramped(&stable.url(), &canary.url(), ago)).await;
            b.reload(&ramped(&stable.url(), &canary.url(), ago)).await;
        }
        let (on_a, on_b) = (assignments(&a, &keys).await, assignments(&b, &keys).await);
        assert_eq!(on_a, on_b, "replicas disagree at {ago}s");
        let canary_keys: HashSet<String> = on_a
            .iter()
            .filter(|(_, v)| *v == "canary")
            .map(|(k, _)| k.clone())
            .collect();
        let got = canary_keys.len() as f64 / keys.len() as f64;
        assert!(
            (got - share).abs() < 0.07,
            "at {ago}s: share {got}, want {share}"
        );
        // A rising weight only moves keys into the canary.
        assert!(
            previous.is_subset(&canary_keys),
            "a key left the canary at {ago}s"
        );
        previous = canary_keys;
        let report = experiments(&a).await;
        let ramp = &variant(&report, "canary")["ramp"];
        assert_eq!(ramp["step"], step, "{ramp}");
        let state = if ago < 0 {
            "pending"
        } else if ago >= 10_800 {
            "done"
        } else {
            "running"
        };
        assert_eq!(ramp["state"], state, "{ramp}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_skewed_split_is_flagged() {
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let proxy = TestProxy::start(&guarded(&stable.url(), &canary.url(), "")).await;
    let c = client();
    // One heavy user: every request lands on one arm, though the weights say 50/50.
    for _ in 0..100 {
        post(&c, &proxy.url(INFER), &[("x-user-id", "batch-job")], "{}").await;
    }
    let report = experiments(&proxy).await;
    let split = &report["routes"][0]["split"];
    assert_eq!(split["healthy"], false, "{split}");
    assert!(split["evidence_log10"].as_f64().unwrap() >= 3.0);
    assert_eq!(
        metric(&proxy, "braid_split_mismatch{route=\"sentiment\"}").await,
        1.0
    );
    proxy.stop().await;
}

#[test]
fn bad_guardrails_and_ramps_are_rejected_with_their_field_paths() {
    let base = |extra_route: &str, extra_variant: &str| {
        format!(
            "routes:\n  - model: m\n    variants:\n      - {{name: a, backend: \"http://127.0.0.1:1\"}}\n      - name: b\n        backend: \"http://127.0.0.1:2\"\n{extra_variant}{extra_route}"
        )
    };
    let cases = [
        (
            base("    guardrail: {control: ghost}\n", ""),
            "routes[0].guardrail.control: unknown variant \"ghost\" (this route has: a, b)",
        ),
        (
            base("    guardrail: {control: a, alpha: 0.5}\n", ""),
            "routes[0].guardrail.alpha: 0.5 must be between 0 and 0.5 (exclusive)",
        ),
        (
            base("    guardrail: {control: a, alpha: 0}\n", ""),
            "routes[0].guardrail.alpha: 0 must be between 0 and 0.5 (exclusive)",
        ),
        (
            base("    guardrail: {control: a, errors: false}\n", ""),
            "routes[0].guardrail: watches nothing",
        ),
        (
            base("    guardrail: {control: a, action: revert}\n", ""),
            "routes[0].guardrail.action: \"revert\" must be \"rollback\" or \"hold\"",
        ),
        (
            base(
                "",
                "        ramp: {start: \"2026-12-01T09:00:00Z\", steps: [{weight: lots, hold: 1h}]}\n",
            ),
            "routes[0].variants[1].ramp.steps[0].weight: expected a number, found a string",
        ),
        (
            base(
                "",
                "        ramp: {start: \"2026-12-01 09:00\", steps: [{weight: 1, hold: 1h}]}\n",
            ),
            "routes[0].variants[1].ramp.start: \"2026-12-01 09:00\" is not an RFC 3339 time",
        ),
        (
            base(
                "",
                "        ramp: {start: \"2026-12-01T09:00:00Z\", steps: [{weight: 1, hold: 1h}, {weight: 5, hold: 0s}]}\n",
            ),
            "routes[0].variants[1].ramp.steps[1].hold: must be greater than zero",
        ),
        (
            base(
                "",
                "        ramp: {start: \"2026-12-01T09:00:00Z\", steps: []}\n",
            ),
            "routes[0].variants[1].ramp.steps: must list at least one step",
        ),
    ];
    for (doc, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, &doc).unwrap();
        let out = braid(&["check", path.to_str().unwrap()], b"");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{doc}\n{stdout}");
        assert!(stdout.contains(want), "want {want:?} in:\n{stdout}");
    }
}

#[tokio::test]
async fn a_bad_guardrail_in_a_reload_keeps_the_last_good_config() {
    let (stable, canary) = (
        Backend::start("stable").await,
        Backend::start("canary").await,
    );
    let good = guarded(&stable.url(), &canary.url(), "");
    let proxy = TestProxy::start(&good).await;
    write_atomically(
        &proxy.config_path,
        &good.replace("control: stable", "control: stable, alpha: 0.9"),
    );
    let c = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let cfg = loop {
        let j = get(&c, &proxy.admin_url("/config"), &[]).await.json();
        if !j["last_rejected"].is_null() {
            break j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rejection never reported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(cfg["generation"], 1);
    assert_eq!(
        cfg["last_rejected"]["errors"][0]["path"],
        "routes[0].guardrail.alpha"
    );
    let report = experiments(&proxy).await;
    assert_eq!(report["routes"][0]["guardrail"]["alpha"], 0.001);
    let r = post(&c, &proxy.url(INFER), &[("x-user-id", "u")], "{}").await;
    assert_eq!(r.status, 200);
    proxy.stop().await;
}

/// The example PrometheusRule's groups are valid rules, and `promtool test rules`
/// confirms the page fires when any one replica trips and stays quiet otherwise.
#[test]
fn the_prometheus_rule_pages_when_any_replica_trips() {
    let rule = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/example/monitoring/prometheusrule.yaml"
    ))
    .unwrap();
    let (_, spec) = rule.split_once("\nspec:\n").expect("a spec");
    let groups: String = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &groups).unwrap();
    std::fs::write(
        dir.path().join("test.yaml"),
        r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'braid_guardrail_tripped{namespace="ml",pod="p1",route="sentiment",variant="canary"}'
        values: '0 0 1 1 1'
      - series: 'braid_guardrail_tripped{namespace="ml",pod="p2",route="sentiment",variant="canary"}'
        values: '0 0 0 0 0'
      - series: 'braid_split_mismatch{namespace="ml",pod="p1",route="sentiment"}'
        values: '0 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 1m
        alertname: BraidGuardrailTripped
        exp_alerts: []
      - eval_time: 3m
        alertname: BraidGuardrailTripped
        exp_alerts:
          - exp_labels: {severity: critical, namespace: ml, route: sentiment, variant: canary}
            exp_annotations:
              summary: "the guardrail of sentiment/canary tripped: the candidate fails or slows more than the control; roll it back fleet-wide"
              description: "At least one replica took the candidate's traffic back to the control. See `braid experiments --admin POD:9901` for the evidence."
      - eval_time: 9m
        alertname: BraidSplitMismatch
        exp_alerts: []
"#,
    )
    .unwrap();
    promtool_in(dir.path(), &["check", "rules", "rules.yaml"]);
    promtool_in(dir.path(), &["test", "rules", "test.yaml"]);
}
