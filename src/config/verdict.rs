//! The fleet's verdicts: a second key of the braid ConfigMap (`braid-verdicts.json` by
//! default), written by `braid controller` and read by every replica with the config
//! itself, so all of them apply the same decision from the same generation.
//!
//! ```json
//! {"routes": {"sentiment": {
//!     "experiment": "5f0c2a9e1b7d3c44",
//!     "variants": {"candidate": {"action": "rollback", "weight": 0,
//!         "reason": "fleet evidence 10^3.4 over 8 pods", "evidence_log10": 3.4,
//!         "at": "2026-12-07T23:10:00.000Z"}}}}}
//! ```
//!
//! A verdict is for one experiment: `experiment` is the route's settings digest the
//! pods report. When a person changes the route, the digest changes and the old verdict
//! no longer applies (a new experiment starts), so an edit never fights a stale
//! verdict. A verdict for a route or variant the config no longer has is skipped with a
//! warning; a malformed document is rejected with the config, by field path.

use super::node::{self, Node};
use super::schema::{Obj, string};
use super::{ConfigError, Errors};
use crate::route::RouteTable;
use crate::route::experiment::{Action, Verdict};

/// The ConfigMap key `braid controller` writes and the proxy reads, unless told otherwise.
pub const DEFAULT_KEY: &str = "braid-verdicts.json";

/// Reads `text` (the verdicts key) into `table`'s routes; `warnings` gets what was
/// skipped. Errors are located under `at` (the key's name).
pub fn bind(
    text: &str,
    at: &str,
    table: &mut RouteTable,
    warnings: &mut Vec<String>,
) -> Result<(), Vec<ConfigError>> {
    let root = node::parse(text).map_err(|message| {
        vec![ConfigError {
            path: at.to_string(),
            message,
        }]
    })?;
    let mut errs = Errors::default();
    let routes = read(&root, at, &mut errs);
    if !errs.is_empty() {
        return Err(errs.0);
    }
    for (route, experiment, variants) in routes.unwrap_or_default() {
        let Some(r) = table.routes.iter_mut().find(|r| *r.name == *route) else {
            warnings.push(format!(
                "{at}: a verdict for route {route:?}, which this config does not have, is skipped"
            ));
            continue;
        };
        if format!("{:016x}", r.fingerprint) != experiment {
            warnings.push(format!(
                "{at}: the verdict for route {route:?} is for experiment {experiment}; the route's settings changed since (now {:016x}), so it no longer applies",
                r.fingerprint
            ));
            continue;
        }
        let mut per_variant = vec![None; r.variants.len()];
        for (name, verdict) in variants {
            match r.variants.iter().position(|v| *v.name == *name) {
                Some(i) if r.guardrail.as_ref().is_some_and(|g| g.control == i) => {
                    warnings.push(format!(
                        "{at}: route {route:?}: a verdict against the control {name:?} is skipped"
                    ));
                }
                Some(i) => per_variant[i] = Some(verdict),
                None => warnings.push(format!(
                    "{at}: route {route:?} has no variant {name:?}; its verdict is skipped"
                )),
            }
        }
        r.verdicts = per_variant;
    }
    Ok(())
}

type Routes = Vec<(String, String, Vec<(String, Verdict)>)>;

fn read(root: &Node, at: &str, errs: &mut Errors) -> Option<Routes> {
    let mut obj = Obj::new(root, at.to_string(), errs)?;
    let routes = obj.opt("routes", |n, path, errs| {
        entries(n, &path, errs, |n, path, errs| {
            let mut obj = Obj::new(n, path.clone(), errs)?;
            let experiment = obj.req("experiment", string);
            let variants = obj.req("variants", |n, path, errs| entries(n, &path, errs, verdict));
            obj.finish(&["experiment", "variants"]);
            Some((experiment?, variants?))
        })
    });
    obj.finish(&["routes"]);
    Some(
        routes?
            .into_iter()
            .map(|(route, (experiment, variants))| (route, experiment, variants))
            .collect(),
    )
}

/// A mapping's entries, each read by `item` at `path.KEY`.
fn entries<T>(
    node: &Node,
    path: &str,
    errs: &mut Errors,
    item: impl Fn(&Node, String, &mut Errors) -> Option<T>,
) -> Option<Vec<(String, T)>> {
    let Node::Map(entries) = node else {
        return errs.push(
            path.to_string(),
            format!("expected a mapping, found {}", node.kind()),
        );
    };
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        if let Some(t) = item(v, format!("{path}.{k}"), errs) {
            out.push((k.clone(), t));
        }
    }
    Some(out)
}

fn verdict(node: &Node, path: String, errs: &mut Errors) -> Option<Verdict> {
    let mut obj = Obj::new(node, path.clone(), errs)?;
    let action = obj.req("action", |n, path, errs| {
        match string(n, path.clone(), errs)?.as_str() {
            "rollback" => Some(Action::Rollback),
            "hold" => Some(Action::Hold),
            other => errs.push(path, format!("{other:?} must be \"rollback\" or \"hold\"")),
        }
    });
    let weight = obj.opt("weight", non_negative).unwrap_or(0.0);
    let reason = obj.opt("reason", string).unwrap_or_default();
    let evidence_log10 = obj.opt("evidence_log10", |n, path, errs| match n {
        Node::Int(i) => Some(*i as f64),
        Node::Float(f) if f.is_finite() => Some(*f),
        other => errs.push(path, format!("expected a number, found {}", other.kind())),
    });
    let at = obj.opt("at", string).unwrap_or_default();
    obj.finish(&["action", "weight", "reason", "evidence_log10", "at"]);
    Some(Verdict {
        action: action?,
        weight,
        reason,
        evidence_log10,
        at,
    })
}

fn non_negative(node: &Node, path: String, errs: &mut Errors) -> Option<f64> {
    let w = match node {
        Node::Int(i) => *i as f64,
        Node::Float(f) => *f,
        other => return errs.push(path, format!("expected a number, found {}", other.kind())),
    };
    if !(w.is_finite() && w >= 0.0) {
        return errs.push(path, format!("{w} must be a finite number >= 0"));
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> crate::config::Snapshot {
        crate::config::load(
            "routes:\n  - model: m\n    variants:\n      - {name: stable, weight: 9, backend: \"http://127.0.0.1:1\"}\n      - {name: canary, weight: 1, backend: \"http://127.0.0.1:2\"}\n    guardrail: {control: stable}\n",
            "test",
        )
        .unwrap()
    }

    #[test]
    fn a_verdict_for_the_experiment_in_force_is_bound_and_a_stale_one_skipped() {
        let mut snap = table();
        let fp = format!("{:016x}", snap.routes.routes[0].fingerprint);
        let doc = format!(
            r#"{{"routes": {{"m": {{"experiment": "{fp}", "variants": {{"canary": {{"action": "rollback", "reason": "r"}}}}}}}}}}"#
        );
        let mut warnings = Vec::new();
        bind(&doc, DEFAULT_KEY, &mut snap.routes, &mut warnings).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let v = snap.routes.routes[0].verdicts[1].as_ref().unwrap();
        assert_eq!(
            (v.action, v.weight, v.reason.as_str()),
            (Action::Rollback, 0.0, "r")
        );
        assert!(snap.routes.routes[0].verdicts[0].is_none());

        let mut snap = table();
        let stale = doc.replace(&fp, "0000000000000000");
        bind(&stale, DEFAULT_KEY, &mut snap.routes, &mut warnings).unwrap();
        assert!(snap.routes.routes[0].verdicts.is_empty());
        assert!(warnings[0].contains("no longer applies"), "{warnings:?}");
    }

    #[test]
    fn a_malformed_verdict_is_rejected_by_field_path() {
        let mut snap = table();
        let doc = r#"{"routes": {"m": {"experiment": "x", "variants": {"canary": {"action": "pause", "weight": -1}}}}, "extra": 1}"#;
        let errs = bind(doc, DEFAULT_KEY, &mut snap.routes, &mut Vec::new()).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"braid-verdicts.json.routes.m.variants.canary.action"),
            "{errs:?}"
        );
        assert!(
            paths.contains(&"braid-verdicts.json.routes.m.variants.canary.weight"),
            "{errs:?}"
        );
        assert!(paths.contains(&"braid-verdicts.json.extra"), "{errs:?}");
    }
}
