//! Writes the fleet's verdicts into the braid ConfigMap's verdicts key, under optimistic
//! concurrency: each write carries the `resourceVersion` it read, a conflict (a person's
//! edit, another writer) re-reads and merges again, and only the verdicts key is ever
//! touched, so neither the person's edit nor the verdict is lost.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use super::tally::Decision;

/// Attempts at a write that keeps conflicting before the round gives up (the next
/// round tries again).
const ATTEMPTS: usize = 5;

/// What a write did.
#[derive(Debug, Default, PartialEq)]
pub struct Written {
    /// Verdicts added.
    pub added: usize,
    /// Stale route entries removed (for an experiment no pod runs any more).
    pub pruned: usize,
    /// Writes that lost a race and were merged again.
    pub conflicts: usize,
}

/// Merges `decisions` into the verdicts document and prunes entries for experiments
/// that no pod runs (`running`: per route, the fingerprints pods report). Writes only
/// when something changed.
pub async fn write(
    api: &Api<ConfigMap>,
    name: &str,
    key: &str,
    decisions: &[Decision],
    running: &BTreeMap<String, BTreeSet<String>>,
    at: &str,
) -> Result<Written, kube::Error> {
    let mut written = Written::default();
    for _ in 0..ATTEMPTS {
        let mut cm = api.get(name).await?;
        let text = cm.data.as_ref().and_then(|d| d.get(key)).cloned();
        let mut doc: Value = text
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        let (added, pruned) = merge(&mut doc, decisions, running, at);
        if added == 0 && pruned == 0 {
            return Ok(written);
        }
        cm.data.get_or_insert_with(Default::default).insert(
            key.to_string(),
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
        );
        match api.replace(name, &PostParams::default(), &cm).await {
            Ok(_) => {
                written.added = added;
                written.pruned = pruned;
                return Ok(written);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => written.conflicts += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The pure part of `write`: (verdicts added, route entries pruned).
pub fn merge(
    doc: &mut Value,
    decisions: &[Decision],
    running: &BTreeMap<String, BTreeSet<String>>,
    at: &str,
) -> (usize, usize) {
    if !doc["routes"].is_object() {
        doc["routes"] = json!({});
    }
    let routes = doc["routes"].as_object_mut().expect("an object, set above");
    let before = routes.len();
    routes.retain(|route, entry| {
        let fp = entry["experiment"].as_str().unwrap_or_default();
        running
            .get(route)
            .is_none_or(|fps| fps.is_empty() || fps.contains(fp))
    });
    let pruned = before - routes.len();
    let mut added = 0;
    for d in decisions {
        let entry = routes
            .entry(d.route.clone())
            .or_insert_with(|| json!({"experiment": d.fingerprint, "variants": {}}));
        if entry["experiment"] != d.fingerprint.as_str() {
            *entry = json!({"experiment": d.fingerprint, "variants": {}});
        }
        if !entry["variants"].is_object() {
            entry["variants"] = json!({});
        }
        let variants = entry["variants"].as_object_mut().expect("an object");
        if variants.contains_key(&d.variant) {
            continue; // decided already: a verdict is written once
        }
        variants.insert(
            d.variant.clone(),
            json!({
                "action": d.action,
                "weight": if d.action == "hold" { d.weight } else { 0.0 },
                "reason": d.reason,
                "evidence_log10": (d.evidence_log10 * 1000.0).round() / 1000.0,
                "at": at,
            }),
        );
        added += 1;
    }
    (added, pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(variant: &str) -> Decision {
        Decision {
            route: "m".into(),
            fingerprint: "fp1".into(),
            variant: variant.into(),
            action: "rollback".into(),
            weight: 5.0,
            reason: "r".into(),
            evidence_log10: 3.456_789,
        }
    }

    #[test]
    fn a_verdict_is_added_once_and_a_stale_experiment_pruned() {
        let mut doc = json!({"routes": {"old": {"experiment": "gone", "variants": {}}}});
        let running: BTreeMap<String, BTreeSet<String>> = [
            ("m".to_string(), ["fp1".to_string()].into()),
            ("old".to_string(), ["new".to_string()].into()),
        ]
        .into();
        assert_eq!(merge(&mut doc, &[decision("c")], &running, "t"), (1, 1));
        assert_eq!(merge(&mut doc, &[decision("c")], &running, "t"), (0, 0));
        let v = &doc["routes"]["m"]["variants"]["c"];
        assert_eq!(v["weight"], 0.0);
        assert_eq!(v["evidence_log10"], 3.457);
        assert!(doc["routes"].get("old").is_none());
    }
}
