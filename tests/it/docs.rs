//! The reference in `docs/` stays complete: every field the config schema accepts is
//! in `docs/configuration.md`, every metric family in `docs/metrics.md`, and every
//! relative link in the README and the docs leads to a file that exists.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The string literals inside every `.finish(&[...])` call: the keys a config object
/// accepts (anything else is rejected as an unknown field).
fn schema_fields(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in source.match_indices(".finish(&[") {
        let list = &source[i..i + source[i..].find(']').unwrap()];
        out.extend(list.split('"').skip(1).step_by(2).map(String::from));
    }
    out
}

/// Whether `word` appears in `text` with no identifier character right after it
/// (so `max_delay` is not found inside `max_delay_ms`).
fn mentions(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !ident(before) && (!ident(after) || text[i + word.len()..].starts_with("_total"))
    })
}

#[test]
fn every_config_field_is_in_the_configuration_reference() {
    let doc = read("docs/configuration.md");
    let mut fields = Vec::new();
    for e in std::fs::read_dir(root().join("src/config/schema")).unwrap() {
        fields.extend(schema_fields(
            &std::fs::read_to_string(e.unwrap().path()).unwrap(),
        ));
    }
    fields.extend(schema_fields(&read("src/config/verdict.rs")));
    fields.extend(schema_fields(&read("src/config/executor.rs")));
    assert!(fields.len() > 30, "found only {fields:?}");
    let missing: Vec<&String> = fields.iter().filter(|f| !mentions(&doc, f)).collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not mention: {missing:?}"
    );
}

#[test]
fn every_metric_family_is_in_the_metrics_reference() {
    let doc = read("docs/metrics.md");
    // Every file of `src/metrics/`, and the controller's few.
    let mut source = read("src/fleet/mod.rs");
    for e in std::fs::read_dir(root().join("src/metrics")).unwrap() {
        source += &std::fs::read_to_string(e.unwrap().path()).unwrap();
    }
    assert!(
        source.contains("\"braid_requests\""),
        "the proxy's families were not read"
    );
    let families: Vec<&str> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("braid_"))
        .collect();
    assert!(families.len() > 20, "found only {families:?}");
    let missing: Vec<&&str> = families.iter().filter(|f| !mentions(&doc, f)).collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not mention: {missing:?}"
    );
}

#[test]
fn relative_links_lead_somewhere() {
    let mut pages = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = &text[i + 2..i + 2 + text[i + 2..].find(')').unwrap()];
            let target = target.split('#').next().unwrap();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            let dir = page.parent().unwrap_or(Path::new("."));
            if !dir.join(target).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:?}");
}
