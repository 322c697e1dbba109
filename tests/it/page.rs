//! The experiment page, rendered by a real browser (Debian's Chromium, headless)
//! against a running fleet: the numbers a person reads on it are the numbers the
//! reports hold, and a screenshot is kept under target/artifacts for CI.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::fleet::{send, watched_fleet};
use crate::support::*;

/// Chromium's DOM of `url` once the page's script has run, and a screenshot of it.
async fn render(url: &str, screenshot: &std::path::Path) -> String {
    let run = |extra: Vec<String>| {
        let mut cmd = std::process::Command::new(chromium());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1400,1500",
            "--virtual-time-budget=4000",
        ]);
        cmd.args(extra).arg(url);
        cmd
    };
    let dom = tokio::task::spawn_blocking({
        let mut cmd = run(vec!["--dump-dom".into()]);
        move || cmd.output().expect("chromium runs")
    })
    .await
    .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot = tokio::task::spawn_blocking({
        let mut cmd = run(vec![format!("--screenshot={}", screenshot.display())]);
        move || cmd.output().expect("chromium runs")
    })
    .await
    .unwrap();
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let png = std::fs::read(screenshot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// The text of the `<td data-field=FIELD>` in the row of `variant` (the page's table).
fn cell(dom: &str, variant: &str, field: &str) -> String {
    let row = dom
        .split(&format!("data-variant=\"{variant}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no row for {variant}"));
    let row = &row[..row.find("</tr>").unwrap()];
    let at = row
        .find(&format!("data-field=\"{field}\""))
        .unwrap_or_else(|| panic!("no {field} for {variant}"));
    let after = &row[at..];
    let start = after.find('>').unwrap() + 1;
    let end = after.find("</td>").unwrap();
    after[start..end].to_string()
}

fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pct(v: &Value) -> String {
    format!("{:.2}%", v.as_f64().unwrap() * 100.0)
}

/// The controller's page shows the fleet: each variant's requests and error rate as
/// the fleet's report has them, the evidence and its threshold, a chart for each
/// figure, and every pod's share. A pod's own page shows its own traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_what_the_reports_hold_in_a_real_browser() {
    let fleet = watched_fleet(3).await;
    let (proxies, replica) = (&fleet.proxies, &fleet.replica);
    for i in 0..240 {
        send(proxies, i).await;
        if i % 40 == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await; // rounds in between
        }
    }
    // Two rounds after the last request, so the report holds every one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = replica.report().await;
    let route = &report["routes"][0];
    let dom = render(
        &format!("http://{}/experiments/page", replica.addr),
        &artifacts().join("fleet-page.png"),
    )
    .await;
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the script did not run:\n{dom}"
    );
    assert!(dom.contains("the whole fleet"), "{dom}");
    for (i, name) in ["control", "candidate"].iter().enumerate() {
        let v = &route["variants"][i];
        assert_eq!(
            cell(&dom, name, "requests"),
            v["requests"].to_string(),
            "{name}"
        );
        assert_eq!(
            cell(&dom, name, "error_rate"),
            pct(&v["error_rate"]),
            "{name}"
        );
    }
    let requests: u64 = ["control", "candidate"]
        .iter()
        .map(|n| cell(&dom, n, "requests").parse::<u64>().unwrap())
        .sum();
    assert_eq!(requests, 240);
    let evidence = cell(&dom, "candidate", "evidence");
    let g = &route["variants"][1]["guardrail"];
    assert_eq!(
        evidence,
        format!(
            "{:.2} / {:.2}",
            g["evidence_log10"].as_f64().unwrap(),
            g["trips_at_log10"].as_f64().unwrap()
        )
    );
    for chart in ["latency", "errors", "evidence", "pods"] {
        assert!(
            dom.contains(&format!("data-chart=\"{chart}\"")),
            "no {chart} chart"
        );
    }
    assert!(dom.contains("<path d=\"M"), "no line drawn");
    for i in 0..3 {
        assert!(
            dom.contains(&format!("data-pod=\"model-{i}\"")),
            "pod {i} missing"
        );
    }
    // A pod's page: its own traffic, 80 of the 240.
    let dom = render(
        &proxies[0].admin_url("/experiments/page"),
        &artifacts().join("pod-page.png"),
    )
    .await;
    assert!(dom.contains("this pod's own traffic"), "{dom}");
    let own: u64 = ["control", "candidate"]
        .iter()
        .map(|n| cell(&dom, n, "requests").parse::<u64>().unwrap())
        .sum();
    assert_eq!(own, 80);
}
