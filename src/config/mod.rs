//! Configuration: parse -> validate -> immutable `Snapshot` -> one `ArcSwap` (store.rs).
//!
//! Nothing outside this module parses YAML. A document is either accepted whole or
//! rejected whole with every problem listed by field path.

pub mod executor;
pub mod file;
pub mod kube;
pub mod node;
pub mod schema;
pub mod store;
pub mod validate;
pub mod verdict;

use std::fmt;

pub use store::{Active, Rejection, Store};
pub use validate::Snapshot;

/// One problem in a document, located by its field path (`routes[0].variants[1].weight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Where the proxy's config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file, watched (a ConfigMap mounted as a volume works too).
    File(file::FileSource),
    /// A ConfigMap watched through the Kubernetes API.
    ConfigMap(kube::ConfigMapSource),
}

/// Errors collected while reading a document, so `braid check` can list them all.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<ConfigError>);

impl Errors {
    /// Records an error; returns `None` so readers can `return errs.push(..)`.
    pub fn push<T>(&mut self, path: String, message: String) -> Option<T> {
        self.0.push(ConfigError { path, message });
        None
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses YAML, reporting a syntax error (or a rejected bomb) as a document-level error.
pub fn parse_document(text: &str) -> Result<node::Node, Vec<ConfigError>> {
    node::parse(text).map_err(|message| {
        vec![ConfigError {
            path: "(document)".into(),
            message,
        }]
    })
}

/// Parses and validates a document. `source` names where it came from (for `/config`).
pub fn load(text: &str, source: &str) -> Result<Snapshot, Vec<ConfigError>> {
    let root = parse_document(text)?;
    let mut errs = Errors::default();
    let Some(doc) = schema::document(&root, &mut errs) else {
        return Err(errs.0);
    };
    // Cross-field rules run even when some fields were bad, so one `braid check` lists
    // everything; rules about completeness are skipped for a partly read document.
    let partial = !errs.is_empty();
    match validate::compile(doc, root, source, text, partial) {
        Ok(snap) if !partial => Ok(snap),
        Ok(_) => Err(errs.0),
        Err(mut more) => {
            errs.0.append(&mut more);
            Err(errs.0)
        }
    }
}

/// `load`, then the fleet's verdicts (`verdicts`: the ConfigMap key's name and text)
/// bound to the routes they are for. Either document's errors reject both.
pub fn load_with(
    text: &str,
    verdicts: Option<(&str, &str)>,
    source: &str,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut snap = load(text, source)?;
    if let Some((key, v)) = verdicts {
        verdict::bind(v, key, &mut snap.routes, &mut snap.warnings)?;
    }
    snap.digest = digest_with(text, verdicts.map(|(_, v)| v));
    Ok(snap)
}

/// The digest of a document and its verdicts, as sources compare them.
pub fn digest_with(text: &str, verdicts: Option<&str>) -> u64 {
    digest(text.as_bytes()) ^ verdicts.map_or(0, |v| digest(v.as_bytes()).rotate_left(1))
}

/// A stable 64-bit digest (FNV-1a): the file source uses it to skip unchanged content.
pub fn digest(bytes: &[u8]) -> u64 {
    crate::hash::fnv1a(crate::hash::FNV_OFFSET, bytes)
}
