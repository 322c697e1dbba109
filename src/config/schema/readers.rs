//! The readers every field goes through: scalars that record their own error by field
//! path and return `None`, sequences, and `Obj`, the mapping that reports unknown fields.

use super::*;

// === scalar readers: each records its own error and returns None ===

type Reader<T> = fn(&Node, String, &mut Errors) -> Option<T>;

pub(crate) fn string(node: &Node, path: String, errs: &mut Errors) -> Option<String> {
    match node {
        Node::Str(s) => Some(s.clone()),
        other => errs.push(path, format!("expected a string, found {}", other.kind())),
    }
}

/// Variant and route names become metric labels and header values: keep them plain.
pub(super) fn name(node: &Node, path: String, errs: &mut Errors) -> Option<String> {
    let s = string(node, path.clone(), errs)?;
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return errs.push(
            path,
            format!("{s:?} must be 1-63 characters of [A-Za-z0-9._-]"),
        );
    }
    Some(s)
}

/// A model name is one path segment at the backend.
pub(crate) fn model_name(node: &Node, path: String, errs: &mut Errors) -> Option<String> {
    let s = string(node, path.clone(), errs)?;
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return errs.push(
            path,
            format!("{s:?} must be a non-empty model name of [A-Za-z0-9._-]"),
        );
    }
    Some(s)
}

pub(super) fn path_prefix(node: &Node, path: String, errs: &mut Errors) -> Option<String> {
    let s = string(node, path.clone(), errs)?;
    if !s.starts_with('/') || s.parse::<http::uri::PathAndQuery>().is_err() || s.contains('?') {
        return errs.push(path, format!("{s:?} must be a path starting with '/'"));
    }
    Some(s)
}

pub(super) fn header_name(node: &Node, path: String, errs: &mut Errors) -> Option<HeaderName> {
    let s = string(node, path.clone(), errs)?;
    match HeaderName::from_bytes(s.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => errs.push(path, format!("{s:?} is not a valid HTTP header name")),
    }
}

pub(super) fn number(node: &Node, path: String, errs: &mut Errors) -> Option<f64> {
    match node {
        Node::Int(i) => Some(*i as f64),
        Node::Float(f) => Some(*f),
        other => errs.push(path, format!("expected a number, found {}", other.kind())),
    }
}

pub(super) fn weight(node: &Node, path: String, errs: &mut Errors) -> Option<f64> {
    let w = number(node, path.clone(), errs)?;
    if w.is_nan() {
        return errs.push(path, "must be a number, not NaN".into());
    }
    if !w.is_finite() {
        return errs.push(path, "must be finite".into());
    }
    if w < 0.0 {
        return errs.push(path, "must be >= 0".into());
    }
    Some(w)
}

/// A sampling temperature: 0 (greedy) to 2, as OpenAI's API allows.
pub(crate) fn temperature(node: &Node, path: String, errs: &mut Errors) -> Option<f64> {
    let t = number(node, path.clone(), errs)?;
    if !(0.0..=2.0).contains(&t) {
        return errs.push(path, "must be between 0 and 2".into());
    }
    Some(t)
}

pub(super) fn fraction(node: &Node, path: String, errs: &mut Errors) -> Option<f64> {
    let f = number(node, path.clone(), errs)?;
    if !(0.0..=1.0).contains(&f) {
        return errs.push(path, "must be between 0 and 1".into());
    }
    Some(f)
}

pub(super) fn int(node: &Node, path: String, errs: &mut Errors) -> Option<u64> {
    match node {
        Node::Int(i) if *i >= 0 => Some(*i as u64),
        Node::Int(_) => errs.push(path, "must be >= 0".into()),
        other => errs.push(
            path,
            format!("expected a whole number, found {}", other.kind()),
        ),
    }
}

pub(crate) fn positive_int(node: &Node, path: String, errs: &mut Errors) -> Option<u64> {
    match int(node, path.clone(), errs)? {
        0 => errs.push(path, "must be >= 1".into()),
        n => Some(n),
    }
}

pub(super) fn duration(node: &Node, path: String, errs: &mut Errors) -> Option<Duration> {
    if let Node::Int(_) | Node::Float(_) = node {
        return errs.push(
            path,
            "durations need a unit: write e.g. \"5s\" or \"250ms\"".into(),
        );
    }
    let s = string(node, path.clone(), errs)?;
    match parse_duration(&s) {
        Ok(d) if d.is_zero() => errs.push(path, "must be greater than zero".into()),
        Ok(d) => Some(d),
        Err(e) => errs.push(path, e),
    }
}

/// A duration that may be zero (`0ms`: "do not wait at all").
pub(super) fn duration_or_zero(node: &Node, path: String, errs: &mut Errors) -> Option<Duration> {
    match node {
        Node::Int(_) | Node::Float(_) => duration(node, path, errs),
        _ => match parse_duration(&string(node, path.clone(), errs)?) {
            Ok(d) => Some(d),
            Err(e) => errs.push(path, e),
        },
    }
}

use crate::headers::parse_duration;

pub(super) fn backend(node: &Node, path: String, errs: &mut Errors) -> Option<BackendSpec> {
    if matches!(node, Node::Str(s) if s == "local") {
        return Some(BackendSpec::Local);
    }
    if let Node::Str(s) = node
        && !s.contains("://")
    {
        return errs.push(
            path,
            format!("{s:?} must be \"local\" or a URL starting with http://, h2c:// or https://"),
        );
    }
    upstream(node, path, errs).map(BackendSpec::Remote)
}

/// A credential in a URL is refused, never echoed: braid would send it in `Host`
/// (RFC 9110 §4.2.4 forbids a sender to) and show it on `/config`.
pub(super) fn no_userinfo(uri: &Uri, path: &str, errs: &mut Errors) -> Option<()> {
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return errs.push(
            path.to_string(),
            "must not carry credentials (user:password@): braid sends none to a backend \
             and shows its config on the admin port; authenticate with mTLS or a \
             network policy instead"
                .into(),
        );
    }
    Some(())
}

pub(super) fn upstream(node: &Node, path: String, errs: &mut Errors) -> Option<Upstream> {
    let raw = string(node, path.clone(), errs)?;
    let s = crate::addr::redacted(&raw);
    let uri: Uri = match raw.parse() {
        Ok(u) => u,
        Err(e) => return errs.push(path, format!("{s:?} is not a URL: {e}")),
    };
    no_userinfo(&uri, &path, errs)?;
    let protocol = match uri.scheme_str() {
        Some("http") => Protocol::Http1,
        Some("h2c") => Protocol::H2c,
        Some("https") => Protocol::Tls,
        _ => {
            return errs.push(
                path,
                format!("{s:?} must be a URL starting with http://, h2c:// or https://"),
            );
        }
    };
    let Some(authority) = uri.authority().cloned() else {
        return errs.push(path, format!("{s:?} has no host"));
    };
    if authority.port_u16().is_none() && protocol == Protocol::H2c {
        return errs.push(path, format!("{s:?}: h2c:// needs an explicit port"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return errs.push(
            path,
            format!("{s:?} must not have a path: requests keep their own path"),
        );
    }
    Some(Upstream {
        scheme: if protocol == Protocol::Tls {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        },
        authority,
        protocol,
    })
}

/// A list; each good item comes with its index.
pub(crate) fn seq<T>(
    node: &Node,
    path: String,
    errs: &mut Errors,
    item: Reader<T>,
) -> Option<Vec<(usize, T)>> {
    let Node::Seq(items) = node else {
        return errs.push(path, format!("expected a list, found {}", node.kind()));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, n) in items.iter().enumerate() {
        if let Some(v) = item(n, format!("{path}[{i}]"), errs) {
            out.push((i, v));
        }
    }
    Some(out)
}

// === impl Obj ===

/// A mapping being read: remembers which keys were consumed so the rest are reported
/// as unknown fields.
pub(crate) struct Obj<'a> {
    entries: &'a [(String, Node)],
    path: String,
    errs: &'a mut Errors,
}

impl<'a> Obj<'a> {
    pub(crate) fn new(node: &'a Node, path: String, errs: &'a mut Errors) -> Option<Self> {
        match node {
            Node::Map(entries) => Some(Obj {
                entries,
                path,
                errs,
            }),
            other => {
                let at = if path.is_empty() {
                    "(document)".into()
                } else {
                    path
                };
                errs.push(at, format!("expected a mapping, found {}", other.kind()))
            }
        }
    }

    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// An optional field; explicit `null` counts as absent.
    pub(crate) fn opt<T>(
        &mut self,
        key: &str,
        read: impl FnOnce(&Node, String, &mut Errors) -> Option<T>,
    ) -> Option<T> {
        match self.get(key) {
            None | Some(Node::Null) => None,
            Some(n) => read(n, self.field_path(key), self.errs),
        }
    }

    pub(crate) fn req<T>(
        &mut self,
        key: &str,
        read: impl FnOnce(&Node, String, &mut Errors) -> Option<T>,
    ) -> Option<T> {
        match self.get(key) {
            None | Some(Node::Null) => self.errs.push(self.field_path(key), "is required".into()),
            Some(n) => read(n, self.field_path(key), self.errs),
        }
    }

    pub(crate) fn finish(self, known: &[&str]) {
        for (k, _) in self.entries {
            if !known.contains(&k.as_str()) {
                let path = if self.path.is_empty() {
                    k.clone()
                } else {
                    format!("{}.{k}", self.path)
                };
                self.errs.0.push(ConfigError {
                    path,
                    message: format!("unknown field (expected one of: {})", known.join(", ")),
                });
            }
        }
    }
}
