//! The ConfigMap source: `braid proxy --config-map NAMESPACE/NAME [--config-key KEY]`.
//!
//! One ConfigMap is watched through the API with kube-runtime's watcher, filtered by a
//! field selector on its name, so a Role limited by `resourceNames` is enough. A
//! document is published only after a complete list (`InitDone`), and afterwards on
//! every change whose content differs. Everything goes through the same validation as a
//! file; a rejected document keeps the last good snapshot (logged, counted, on
//! `/config`, and posted as a Kubernetes Event on the ConfigMap when RBAC allows).
//! A deleted ConfigMap or a missing key keeps the last good config and is reported the
//! same way. Watch timeouts, 410 Gone (relist), API restarts and 5xx/403 are retried by
//! the watcher with exponential backoff, never in a hot loop. Until the first good
//! document arrives, `/readyz` stays 503. A second key, the fleet's verdicts
//! (`verdict.rs`), is read with the document and validated with it.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client, Resource};

use super::{ConfigError, Store};

/// Metric label for this source in `braid_config_reloads_total`.
pub const KIND: &str = "configmap";

#[derive(Debug, Clone)]
pub struct ConfigMapSource {
    pub namespace: String,
    pub name: String,
    /// The key in `data` holding the document.
    pub key: String,
    /// The key in `data` holding the fleet's verdicts (`braid controller` writes it).
    pub verdicts_key: String,
    /// A kubeconfig to use instead of in-cluster credentials or `KUBECONFIG`.
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl ConfigMapSource {
    /// Parses `NAMESPACE/NAME`.
    pub fn parse(spec: &str, key: &str) -> Result<ConfigMapSource, String> {
        match spec.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ConfigMapSource {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    key: key.to_string(),
                    verdicts_key: super::verdict::DEFAULT_KEY.to_string(),
                    kubeconfig: None,
                })
            }
            _ => Err(format!("--config-map {spec:?}: expected NAMESPACE/NAME")),
        }
    }

    /// How `/config` and the logs name a document from this source.
    pub fn describe(&self) -> String {
        format!(
            "configmap {}/{} key {}",
            self.namespace, self.name, self.key
        )
    }

    /// Watches until the task is dropped.
    pub async fn watch(self, client: Client, store: Arc<Store>) {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "braid".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        // Objects seen since the last `Init`, published only at `InitDone`.
        let mut listing: Option<Option<ConfigMap>> = None;
        let mut last_digest = None;
        while let Some(event) = events.next().await {
            let published = match event {
                Ok(WatchEvent::Init) => {
                    listing = Some(None);
                    continue;
                }
                Ok(WatchEvent::InitApply(cm)) => {
                    listing = Some(Some(cm));
                    continue;
                }
                Ok(WatchEvent::InitDone) => match listing.take().flatten() {
                    Some(cm) => cm,
                    None => {
                        self.report_missing(&store, "the ConfigMap does not exist");
                        continue;
                    }
                },
                Ok(WatchEvent::Apply(cm)) => cm,
                Ok(WatchEvent::Delete(cm)) => {
                    self.report_missing(&store, "the ConfigMap was deleted");
                    self.event(
                        &recorder,
                        &cm,
                        EventType::Warning,
                        "ConfigDeleted",
                        "braid keeps serving its last good config",
                    )
                    .await;
                    last_digest = None;
                    continue;
                }
                Err(e) => {
                    // The watcher backs off and retries (relisting after 410 Gone).
                    tracing::warn!(source = %self.describe(), "watch failed, retrying with backoff: {e}");
                    continue;
                }
            };
            let Some(text) = published.data.as_ref().and_then(|d| d.get(&self.key)) else {
                let errors = vec![ConfigError {
                    path: format!("data.{}", self.key),
                    message: "key missing from the ConfigMap".into(),
                }];
                store.reject(&self.describe(), KIND, errors, None);
                self.event(
                    &recorder,
                    &published,
                    EventType::Warning,
                    "ConfigRejected",
                    &format!(
                        "key {:?} is missing; braid keeps its last good config",
                        self.key
                    ),
                )
                .await;
                last_digest = None;
                continue;
            };
            let verdicts = published
                .data
                .as_ref()
                .and_then(|d| d.get(&self.verdicts_key))
                .map(|v| (self.verdicts_key.as_str(), v.as_str()));
            let digest = super::digest_with(text, verdicts.map(|(_, v)| v));
            if last_digest == Some(digest) {
                continue; // metadata-only update, or a relist of the same content
            }
            last_digest = Some(digest);
            match store.apply_with(text, verdicts, &self.describe(), KIND) {
                Ok(generation) => {
                    self.event(
                        &recorder,
                        &published,
                        EventType::Normal,
                        "ConfigApplied",
                        &format!("generation {generation} in force"),
                    )
                    .await;
                }
                Err(errors) => {
                    let note = errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.event(
                        &recorder,
                        &published,
                        EventType::Warning,
                        "ConfigRejected",
                        &format!("rejected, last good config keeps serving: {note}"),
                    )
                    .await;
                }
            }
        }
    }

    fn report_missing(&self, store: &Store, why: &str) {
        let errors = vec![ConfigError {
            path: format!("configmap {}/{}", self.namespace, self.name),
            message: format!("{why}; the last good config keeps serving"),
        }];
        store.reject(&self.describe(), KIND, errors, None);
    }

    /// Posts an Event on the ConfigMap; lack of RBAC for events is logged, not fatal.
    async fn event(
        &self,
        recorder: &Recorder,
        cm: &ConfigMap,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        let mut note = note.to_string();
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reload".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &cm.object_ref(&())).await {
            tracing::debug!(source = %self.describe(), "could not post an Event: {e}");
        }
    }
}

/// A client from `kubeconfig`, or in-cluster credentials, or `KUBECONFIG`; with the ring
/// provider.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes credentials (in-cluster or KUBECONFIG): {e}"))?,
    };
    Client::try_from(config).map_err(|e| e.to_string())
}
