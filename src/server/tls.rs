//! TLS for the listeners, with rustls (ring provider only): the certificate, reloaded
//! when its files change, and the server config with ALPN. The client side is
//! `upstream::tls`; what both read (PEM files, the provider) is `crate::tls`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

pub use crate::tls::provider;
use crate::tls::{read_certs, read_key};

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = read_certs(cert)?;
    let key = provider()
        .key_provider
        .load_private_key(read_key(key)?)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, key);
    ck.keys_match()
        .map_err(|e| format!("{} does not match its key: {e}", cert.display()))?;
    Ok(ck)
}

/// The listener's certificate: read at start, re-read when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    digest: std::sync::Mutex<[u8; 32]>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn files_digest(cert: &Path, key: &Path) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(std::fs::read(cert).ok()?);
    h.update(std::fs::read(key).ok()?);
    Some(h.finalize().into())
}

impl ReloadingCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ReloadingCert>, String> {
        let ck = certified_key(cert, key)?;
        Ok(Arc::new(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            digest: std::sync::Mutex::new(files_digest(cert, key).unwrap_or_default()),
        }))
    }

    /// Re-reads the files if their content changed. A pair that does not load (half
    /// written, mismatched) keeps the current certificate; the next check tries again.
    pub fn refresh(&self) -> Result<bool, String> {
        let Some(digest) = files_digest(&self.cert, &self.key) else {
            return Err(format!(
                "cannot read {} or {}",
                self.cert.display(),
                self.key.display()
            ));
        };
        let mut last = crate::sync::lock(&self.digest);
        if *last == digest {
            return Ok(false);
        }
        let ck = certified_key(&self.cert, &self.key)?;
        self.current.store(Arc::new(ck));
        *last = digest;
        Ok(true)
    }

    /// Checks the files every `every` for as long as the process runs.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match me.refresh() {
                    Ok(true) => {
                        tracing::info!(cert = %me.cert.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("TLS certificate not reloaded, keeping the current one: {e}")
                    }
                }
            }
        })
    }
}

/// The inbound config: ALPN h2 and http/1.1, the reloading certificate.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<ServerConfig, String> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
