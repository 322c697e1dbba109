//! `braid experiments`: a running braid's (or `braid controller`'s) experiment report,
//! read from its admin port and drawn as a table for people.

use std::process::ExitCode;

pub(super) fn experiments(admin: &str, json: bool, reset: Option<String>) -> ExitCode {
    let (method, path) = match &reset {
        Some(route) => ("POST", format!("/experiments/{route}/reset")),
        None => ("GET", "/experiments".to_string()),
    };
    match admin_request(admin, method, &path) {
        Ok((200, body)) if reset.is_some() || json => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((200, body)) => match serde_json::from_str(&body) {
            Ok(report) => {
                print!("{}", render_experiments(&report));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("braid experiments: {admin} answered something that is not JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Ok((status, body)) => {
            eprintln!("braid experiments: {admin}{path} answered {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("braid experiments: cannot reach braid's admin port at {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One request to the admin port; the status and the body.
fn admin_request(admin: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr = std::net::ToSocketAddrs::to_socket_addrs(admin)?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP answer"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    Ok((status, body.to_string()))
}

/// `/experiments` as a table per route, for people.
pub fn render_experiments(report: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let routes = report["routes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if routes.is_empty() {
        out.push_str("no experiments: no route has two variants or more\n");
    }
    for r in routes {
        let split = &r["split"];
        let _ = writeln!(
            out,
            "route {}  control: {}  split: {} (evidence 10^{:.1})",
            r["route"].as_str().unwrap_or("?"),
            r["control"].as_str().unwrap_or("-"),
            if split["healthy"] == true {
                "healthy"
            } else {
                "MISMATCH"
            },
            split["evidence_log10"].as_f64().unwrap_or(0.0),
        );
        let _ = writeln!(
            out,
            "  {:<16} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}  {:<26} {:<12} guardrail",
            "variant",
            "weight",
            "requests",
            "errors",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "bad rate vs control (95%)",
            "ramp",
        );
        let variants = r["variants"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for v in variants {
            variant_row(&mut out, v);
        }
        // Routes serving generations (OpenAI-style answers): what their users feel.
        generations(&mut out, variants);
        // The fleet's report (`--fleet`): how the traffic spread over the pods.
        if let Some(pods) = r["pods"].as_array() {
            pods_table(&mut out, variants, pods);
        }
    }
    out
}

fn pct(v: &serde_json::Value) -> String {
    v.as_f64()
        .map_or("-".into(), |x| format!("{:.2}%", x * 100.0))
}

fn num(v: &serde_json::Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.1}"))
}

/// One variant's line: its traffic, latency, difference to control, ramp, guardrail.
fn variant_row(out: &mut String, v: &serde_json::Value) {
    use std::fmt::Write;
    let diff = &v["vs_control"]["bad_rate_difference"];
    let vs = if diff.is_object() {
        format!(
            "{:+.2}% [{:+.2}, {:+.2}]",
            diff["estimate"].as_f64().unwrap_or(0.0) * 100.0,
            diff["low"].as_f64().unwrap_or(0.0) * 100.0,
            diff["high"].as_f64().unwrap_or(0.0) * 100.0
        )
    } else {
        "-".into()
    };
    let ramp = &v["ramp"];
    let ramp = if ramp.is_object() {
        match ramp["step"].as_u64() {
            Some(s) => format!(
                "{} {s}/{}",
                ramp["state"].as_str().unwrap_or(""),
                ramp["steps"]
            ),
            None => ramp["state"].as_str().unwrap_or("").to_string(),
        }
    } else {
        "-".into()
    };
    let g = &v["guardrail"];
    let guard = match g["state"].as_str() {
        Some("control") => "control".to_string(),
        Some(state) => format!(
            "{state} (evidence 10^{:.1} of 10^{:.1})",
            g["evidence_log10"].as_f64().unwrap_or(0.0),
            g["trips_at_log10"].as_f64().unwrap_or(0.0)
        ),
        None => "-".into(),
    };
    let _ = writeln!(
        out,
        "  {:<16} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}  {:<26} {:<12} {}",
        v["name"].as_str().unwrap_or("?"),
        num(&v["weight"]),
        v["requests"].to_string(),
        pct(&v["error_rate"]),
        num(&v["latency_ms"]["p50"]),
        num(&v["latency_ms"]["p95"]),
        num(&v["latency_ms"]["p99"]),
        vs,
        ramp,
        guard,
    );
}

/// The generation table, where any variant served generations.
fn generations(out: &mut String, variants: &[serde_json::Value]) {
    use std::fmt::Write;
    if !variants.iter().any(|v| v["generation"].is_object()) {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<16} {:>11} {:>9} {:>9} {:>11} {:>11} {:>10}",
        "generation", "generations", "TTFT p50", "TTFT p95", "per-token", "tokens/req", "tokens/s"
    );
    for v in variants {
        let g = &v["generation"];
        let _ = writeln!(
            out,
            "  {:<16} {:>11} {:>9} {:>9} {:>11} {:>11} {:>10}",
            v["name"].as_str().unwrap_or("?"),
            g["requests"].as_u64().unwrap_or(0),
            num(&g["ttft_ms"]["p50"]),
            num(&g["ttft_ms"]["p95"]),
            num(&g["tpot_ms"]["p50"]),
            num(&g["output_tokens_per_request"]),
            num(&g["output_tokens_per_second"]),
        );
    }
    let _ = writeln!(out, "  (times in ms)");
}

/// How the fleet's traffic spread over its pods, by variant.
fn pods_table(out: &mut String, variants: &[serde_json::Value], pods: &[serde_json::Value]) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "  {:<40} {:>8}  requests per variant ({})",
        "pod",
        "share",
        variants
            .iter()
            .map(|v| v["name"].as_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    for p in pods {
        let per: Vec<String> = p["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(
            out,
            "  {:<40} {:>8}  {}",
            p["pod"].as_str().unwrap_or("?"),
            pct(&p["share"]),
            per.join(" / ")
        );
    }
}
