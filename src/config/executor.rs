//! The executor's config document (`braid executor --config FILE`), for serving several
//! models from one process. Read with the same strict YAML rules and field-path errors
//! as the proxy's config.

use super::node::Node;
use super::schema::{Obj, model_name, positive_int, seq, string, temperature};
use super::{ConfigError, Errors};
use crate::executor::server::ModelSpec;

/// Defaults shared with the CLI flags.
pub const DEFAULT_THREADS: u64 = 1;
pub const DEFAULT_QUEUE: u64 = 64;
pub const DEFAULT_MAX_BATCH: u64 = 256;

#[derive(Debug)]
pub struct ExecutorDocument {
    pub device: Option<String>,
    pub models: Vec<ModelSpec>,
}

pub fn load(text: &str) -> Result<ExecutorDocument, Vec<ConfigError>> {
    let root = super::parse_document(text)?;
    let mut errs = Errors::default();
    let doc = (|| {
        let mut obj = Obj::new(&root, String::new(), &mut errs)?;
        let device = obj.opt("device", string);
        let models = obj
            .req("models", |n, p, e| seq(n, p, e, model))
            .unwrap_or_default();
        obj.finish(&["device", "models"]);
        Some(ExecutorDocument {
            device,
            models: models.into_iter().map(|(_, m)| m).collect(),
        })
    })();
    match doc {
        Some(d) if errs.is_empty() => {
            let mut seen = std::collections::HashSet::new();
            for (i, m) in d.models.iter().enumerate() {
                if !seen.insert(&m.name) {
                    errs.0.push(ConfigError {
                        path: format!("models[{i}].name"),
                        message: format!("model {:?} is defined twice", m.name),
                    });
                }
            }
            if d.models.is_empty() {
                errs.0.push(ConfigError {
                    path: "models".into(),
                    message: "must list at least one model".into(),
                });
            }
            if errs.is_empty() { Ok(d) } else { Err(errs.0) }
        }
        _ => Err(errs.0),
    }
}

fn model(node: &Node, path: String, errs: &mut Errors) -> Option<ModelSpec> {
    let mut obj = Obj::new(node, path, errs)?;
    let name = obj.req("name", model_name);
    let source = obj.req("source", string);
    let labels = obj
        .opt("labels", |n, p, e| seq(n, p, e, string))
        .unwrap_or_default();
    let threads = obj.opt("threads", positive_int).unwrap_or(DEFAULT_THREADS);
    let compute_threads = obj.opt("compute_threads", positive_int);
    let queue = obj.opt("queue", positive_int).unwrap_or(DEFAULT_QUEUE);
    let max_batch = obj
        .opt("max_batch", positive_int)
        .unwrap_or(DEFAULT_MAX_BATCH);
    // A language model's default temperature under this name (a sampling preset).
    let default_temperature = obj.opt("temperature", temperature);
    obj.finish(&[
        "temperature",
        "name",
        "source",
        "labels",
        "threads",
        "compute_threads",
        "queue",
        "max_batch",
    ]);
    Some(ModelSpec {
        name: name?,
        source: source?,
        labels: labels.into_iter().map(|(_, l)| l).collect(),
        threads: threads as usize,
        compute_threads: compute_threads.map(|n| n as usize),
        queue: queue as usize,
        max_batch: max_batch as usize,
        default_temperature: default_temperature.map(|t| t as f32),
    })
}
