//! The text a scrape gets: OpenMetrics, or the same samples as Prometheus text 0.0.4.

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape gets: OpenMetrics when its `Accept` asks for it (as Prometheus does),
/// otherwise the same samples in the Prometheus text format 0.0.4, which every other
/// scraper and `promtool check metrics` read. Returns the body and its content type.
pub fn exposition(openmetrics: String, accept: Option<&str>) -> (String, &'static str) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (openmetrics, OPENMETRICS)
    } else {
        (prometheus_text(&openmetrics), PROMETHEUS_TEXT)
    }
}

/// OpenMetrics text rewritten as Prometheus text 0.0.4. A counter family's `# HELP` and
/// `# TYPE` name its samples' `_total` name, since a 0.0.4 parser matches metadata to
/// samples by name; an info family becomes a gauge named `_info`; `# UNIT`, `# EOF`
/// and exemplars, which 0.0.4 does not have, are left out; types 0.0.4 lacks are
/// `untyped`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            renamed.insert(name, (format!("{name}{suffix}"), kind));
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = |prefix: &str| {
            let rest = line.strip_prefix(prefix)?;
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            renamed.get(name).map(|r| (r, text))
        };
        if let Some(((name, _), help)) = meta("# HELP ") {
            out.push_str(&format!("# HELP {name} {help}\n"));
        } else if let Some(((name, kind), _)) = meta("# TYPE ") {
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else {
            // A sample; an exemplar follows its value after " # ".
            let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}
