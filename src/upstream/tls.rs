//! TLS for `https://` backends: a client config trusting only the configured CA
//! bundle, with an optional client certificate and server name.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};

use crate::tls::{provider, read_certs, read_key};

/// How braid connects to one `https://` backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// SNI and the name checked in the backend's certificate; default: the URL's host.
    pub server_name: Option<String>,
}

/// A client config trusting only `ca_file`, presenting the client certificate if any.
pub fn client_config(t: &UpstreamTls) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(&t.ca_file)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", t.ca_file.display()))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(verifier);
    let cfg = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| format!("{}: {e}", cert.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("cert_file and key_file go together".into()),
    };
    // ALPN (h2, http/1.1) is set by the connector.
    Ok(cfg)
}
