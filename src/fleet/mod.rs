//! `braid controller`: one verdict for the whole fleet. Each experiment is judged
//! across every replica that runs it, and the verdict reaches every replica through
//! the ConfigMap they already watch.
//!
//! - `tally`: the pure arithmetic. Pods' reports are added per run, so a restart is a
//!   new factor and nothing is counted twice. The fleet's e-value is the product of
//!   the pods' (`route::evidence::FleetEvidence`).
//! - `lease`: one leader among the controller's replicas, by a coordination Lease that
//!   also carries the leader's state.
//! - `verdicts`: the ConfigMap write, under optimistic concurrency.
//! - `page`: the experiment page, served here and on each pod's admin port.
//!
//! A round, every `--interval`: renew the Lease (storing the last round's state),
//! find each fleet's pods, read every pod's `/experiments` (at most `FETCHES` at once,
//! each within `FETCH_TIMEOUT`), add the round up, and write what the fleet decided.
//! Only the leader reads pods or writes. A follower's `/readyz` is 503, so a Service
//! in front of the controller reaches the leader only.

pub mod lease;
pub mod page;
pub mod tally;
pub mod verdicts;

use crate::sync::lock;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::error::{Body, full, json_error, json_response};
use crate::server::{ConnInfo, Handler, RequestBody};

/// Pods read at once in a round.
const FETCHES: usize = 32;
/// How long one pod's report may take, at most: a round waits for its slowest pod, so
/// a shorter `--interval` shortens it too (never under `MIN_FETCH_TIMEOUT`).
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_FETCH_TIMEOUT: Duration = Duration::from_millis(250);
/// The largest report read from a pod.
const MAX_REPORT_BYTES: usize = 8 * 1024 * 1024;

/// How a fleet's pods are found.
#[derive(Debug, Clone, PartialEq)]
pub enum Members {
    /// Pods matching a label selector (`pods:app=sentiment`).
    Pods(String),
    /// The endpoints of a Service (`service:sentiment`), from its EndpointSlices.
    Service(String),
}

/// One braid ConfigMap and the pods that read it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    pub namespace: String,
    pub config_map: String,
    pub members: Members,
}

impl FleetSpec {
    /// `NAMESPACE/CONFIGMAP=pods:SELECTOR` or `NAMESPACE/CONFIGMAP=service:NAME`.
    pub fn parse(s: &str) -> Result<FleetSpec, String> {
        let bad = || {
            format!(
                "--fleet {s:?}: expected NAMESPACE/CONFIGMAP=pods:SELECTOR or NAMESPACE/CONFIGMAP=service:NAME"
            )
        };
        let (cm, members) = s.split_once('=').ok_or_else(bad)?;
        let (namespace, config_map) = cm.split_once('/').ok_or_else(bad)?;
        let members = match members.split_once(':') {
            Some(("pods", sel)) if !sel.is_empty() => Members::Pods(sel.to_string()),
            Some(("service", name)) if !name.is_empty() => Members::Service(name.to_string()),
            _ => return Err(bad()),
        };
        if namespace.is_empty() || config_map.is_empty() || config_map.contains('/') {
            return Err(bad());
        }
        Ok(FleetSpec {
            namespace: namespace.to_string(),
            config_map: config_map.to_string(),
            members,
        })
    }

    fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.config_map)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub fleets: Vec<FleetSpec>,
    /// The ConfigMap key the verdicts go to (the proxies' `--verdicts-key`).
    pub verdicts_key: String,
    /// The admin port of a pod with no container port named `braid-admin`.
    pub admin_port: u16,
    pub interval: Duration,
    pub lease_name: String,
    pub lease_namespace: String,
    pub lease_duration: Duration,
    pub identity: String,
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabels {
    fleet: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvidenceLabels {
    fleet: String,
    route: String,
    variant: String,
}

/// The controller's own families (the proxies' are in `crate::metrics`).
struct Metrics {
    registry: Registry,
    leader: Gauge,
    pods: Family<FleetLabels, Gauge>,
    scrape_errors: Family<FleetLabels, Counter>,
    verdicts: Family<FleetLabels, Counter>,
    evidence: Family<EvidenceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let leader = Gauge::default();
        registry.register(
            "braid_fleet_leader",
            "1 while this controller replica holds the Lease and acts",
            leader.clone(),
        );
        let pods = Family::default();
        registry.register(
            "braid_fleet_pods",
            "Pods whose experiments report was read in the last round",
            pods.clone(),
        );
        let scrape_errors = Family::default();
        registry.register(
            "braid_fleet_scrape_errors",
            "Pods that could not be read in a round (unreachable, slow, or not JSON)",
            scrape_errors.clone(),
        );
        let verdicts = Family::default();
        registry.register(
            "braid_fleet_verdicts",
            "Verdicts written into the ConfigMap",
            verdicts.clone(),
        );
        let evidence = Family::default();
        registry.register(
            "braid_fleet_evidence",
            "log10 of the fleet's e-value that a candidate is worse than its control (trips at log10(2/alpha))",
            evidence.clone(),
        );
        Metrics {
            registry,
            leader,
            pods,
            scrape_errors,
            verdicts,
            evidence,
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

// === impl Controller ===

/// What the HTTP side shows: the last round's report per fleet, and who leads.
#[derive(Default)]
struct Shown {
    reports: BTreeMap<String, Value>,
    leader: bool,
    holder: Option<String>,
}

pub struct Controller {
    opts: Options,
    client: Client,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Empty<Bytes>,
    >,
    tallies: Mutex<BTreeMap<String, tally::Tally>>,
    /// Per fleet: the experiments (route, fingerprints) its pods ran at the last write,
    /// so the ConfigMap is read and written only when there is a decision or something
    /// to prune, not every round.
    written_for: Mutex<BTreeMap<String, BTreeMap<String, BTreeSet<String>>>>,
    shown: Mutex<Shown>,
    metrics: Metrics,
}

impl Controller {
    pub fn new(opts: Options, client: Client) -> Arc<Controller> {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(FETCH_TIMEOUT));
        Arc::new(Controller {
            opts,
            client,
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector),
            tallies: Mutex::default(),
            written_for: Mutex::default(),
            shown: Mutex::default(),
            metrics: Metrics::new(),
        })
    }

    /// Runs rounds until `stop` fires; gives the Lease up on the way out.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let leases = Api::namespaced(self.client.clone(), &self.opts.lease_namespace);
        let mut elector = lease::Elector::new(
            leases,
            &self.opts.lease_name,
            &self.opts.identity,
            self.opts.lease_duration,
        );
        let mut ticks = tokio::time::interval(self.opts.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.changed() => break,
            }
            let state = {
                let t = lock(&self.tallies);
                let m: BTreeMap<&String, String> =
                    t.iter().map(|(k, v)| (k, v.to_json())).collect();
                serde_json::to_string(&m).unwrap_or_default()
            };
            let role = elector.tick(Some(&state)).await;
            let leading = match role {
                Ok(lease::Role::Leader { took_over }) => {
                    if let Some(carried) = took_over {
                        self.take_over(carried.as_deref());
                    }
                    true
                }
                Ok(lease::Role::Follower { holder }) => {
                    lock(&self.shown).holder = holder;
                    false
                }
                Err(e) => {
                    tracing::warn!("lease {}: {e}; not acting this round", self.opts.lease_name);
                    false
                }
            };
            self.metrics.leader.set(i64::from(leading));
            lock(&self.shown).leader = leading;
            if leading {
                for spec in &self.opts.fleets {
                    self.round(spec).await;
                }
            }
        }
        elector.release().await;
    }

    /// Becomes the leader: goes on from the state the last leader left in the Lease.
    fn take_over(&self, carried: Option<&str>) {
        let restored: BTreeMap<String, tally::Tally> = carried
            .and_then(|s| serde_json::from_str::<BTreeMap<String, String>>(s).ok())
            .map(|m| {
                m.into_iter()
                    .filter_map(|(k, v)| Some((k, tally::Tally::from_json(&v).ok()?)))
                    .collect()
            })
            .unwrap_or_default();
        tracing::info!(
            identity = %self.opts.identity,
            fleets = restored.len(),
            "leading: went on from the state the Lease carried"
        );
        *lock(&self.tallies) = restored;
    }

    /// One fleet's round: read its pods, add up, write what it decided.
    async fn round(&self, spec: &FleetSpec) {
        let name = spec.name();
        let labels = FleetLabels {
            fleet: name.clone(),
        };
        let pods = match self.members(spec).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(fleet = %name, "cannot list the fleet's pods: {e}");
                return;
            }
        };
        let reports: Vec<Option<(String, Value)>> = futures_util::stream::iter(pods)
            .map(|(pod, addr)| async move {
                let r = self.fetch(addr).await;
                r.map(|v| (pod, v))
            })
            .buffer_unordered(FETCHES)
            .collect()
            .await;
        let failed = reports.iter().filter(|r| r.is_none()).count();
        self.metrics
            .scrape_errors
            .get_or_create(&labels)
            .inc_by(failed as u64);
        let reports: Vec<(String, Value)> = reports.into_iter().flatten().collect();
        self.metrics
            .pods
            .get_or_create(&labels)
            .set(reports.len() as i64);
        let mut running: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (_, r) in &reports {
            for route in r["routes"].as_array().into_iter().flatten() {
                if let (Some(rt), Some(fp)) = (
                    route["route"].as_str(),
                    route["run"]["fingerprint"].as_str(),
                ) {
                    running.entry(rt.into()).or_default().insert(fp.into());
                }
            }
        }
        let (decisions, report, evidence) = {
            let mut tallies = lock(&self.tallies);
            let t = tallies.entry(name.clone()).or_default();
            let d = t.round(&reports);
            (d, t.report(), t.evidence())
        };
        for (route, variant, e) in evidence {
            self.metrics
                .evidence
                .get_or_create(&EvidenceLabels {
                    fleet: name.clone(),
                    route,
                    variant,
                })
                .set(e);
        }
        lock(&self.shown).reports.insert(name.clone(), report);
        if decisions.is_empty() && lock(&self.written_for).get(&name) == Some(&running) {
            return; // nothing decided, and no experiment came or went
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &spec.namespace);
        let at = crate::access::rfc3339_millis(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        match verdicts::write(
            &api,
            &spec.config_map,
            &self.opts.verdicts_key,
            &decisions,
            &running,
            &at,
        )
        .await
        {
            Ok(w) => {
                lock(&self.written_for).insert(name.clone(), running);
                if w.added > 0 {
                    self.metrics
                        .verdicts
                        .get_or_create(&labels)
                        .inc_by(w.added as u64);
                    for d in &decisions {
                        tracing::warn!(
                            fleet = %name, route = %d.route, variant = %d.variant,
                            action = %d.action, evidence = d.evidence_log10,
                            "fleet verdict written: {}", d.reason
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(fleet = %name, "cannot write the verdicts: {e}"),
        }
    }

    /// The fleet's pods: (name, admin address).
    async fn members(&self, spec: &FleetSpec) -> Result<Vec<(String, SocketAddr)>, kube::Error> {
        match &spec.members {
            Members::Pods(selector) => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &spec.namespace);
                let list = api.list(&ListParams::default().labels(selector)).await?;
                Ok(list
                    .items
                    .iter()
                    .filter_map(|p| {
                        let status = p.status.as_ref()?;
                        if p.metadata.deletion_timestamp.is_some()
                            || status.phase.as_deref() != Some("Running")
                        {
                            return None;
                        }
                        let ip: std::net::IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
                        let port = admin_port(p).unwrap_or(self.opts.admin_port);
                        Some((p.metadata.name.clone()?, SocketAddr::new(ip, port)))
                    })
                    .collect())
            }
            Members::Service(service) => {
                let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &spec.namespace);
                let list = api
                    .list(
                        &ListParams::default()
                            .labels(&format!("kubernetes.io/service-name={service}")),
                    )
                    .await?;
                let mut out = Vec::new();
                for slice in &list.items {
                    for ep in &slice.endpoints {
                        if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                            continue;
                        }
                        let Some(ip) = ep.addresses.first().and_then(|a| a.parse().ok()) else {
                            continue;
                        };
                        let name = ep
                            .target_ref
                            .as_ref()
                            .and_then(|t| t.name.clone())
                            .unwrap_or_else(|| format!("{ip}"));
                        out.push((name, SocketAddr::new(ip, self.opts.admin_port)));
                    }
                }
                Ok(out)
            }
        }
    }

    /// One pod's `/experiments`; `None` if it cannot be read in time.
    async fn fetch(&self, addr: SocketAddr) -> Option<Value> {
        let uri: http::Uri = format!("http://{addr}/experiments").parse().ok()?;
        let get = async {
            let resp = self.http.get(uri).await.ok()?;
            if resp.status() != StatusCode::OK {
                return None;
            }
            let body = Limited::new(resp.into_body(), MAX_REPORT_BYTES)
                .collect()
                .await
                .ok()?
                .to_bytes();
            serde_json::from_slice(&body).ok()
        };
        let limit = self.opts.interval.clamp(MIN_FETCH_TIMEOUT, FETCH_TIMEOUT);
        tokio::time::timeout(limit, get).await.ok().flatten()
    }

    fn report(&self) -> Response<Body> {
        let shown = lock(&self.shown);
        if !shown.leader {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "this controller replica is not the leader (the Lease is held by {})",
                    shown.holder.as_deref().unwrap_or("nobody yet")
                ),
            );
        }
        // One fleet's routes in the pod report's shape; several fleets are listed apart.
        let routes: Vec<Value> = shown
            .reports
            .iter()
            .flat_map(|(fleet, r)| {
                r["routes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |mut route| {
                        route["fleet"] = json!(fleet);
                        route
                    })
            })
            .collect();
        json_response(
            StatusCode::OK,
            serde_json::to_string_pretty(&json!({
                "controller": {"identity": self.opts.identity, "leader": true},
                "fleets": shown.reports.iter().map(|(k, v)| (k.clone(), v["fleet"].clone())).collect::<serde_json::Map<_, _>>(),
                "routes": routes,
            }))
            .unwrap_or_default(),
        )
    }
}

/// The container port named `braid-admin` (what `braid inject` adds).
fn admin_port(p: &Pod) -> Option<u16> {
    let spec = p.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some("braid-admin"))
        .and_then(|port| u16::try_from(port.container_port).ok())
}

impl Handler for Controller {
    async fn call(&self, req: Request<RequestBody>, _conn: &ConnInfo) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "the controller's endpoints accept GET only",
            );
        }
        match req.uri().path() {
            "/experiments" => self.report(),
            "/" | "/experiments/page" => page::response(),
            "/metrics" => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (body, content_type) =
                    crate::metrics::exposition(self.metrics.encode(), accept);
                let mut resp = Response::new(full(body));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                resp
            }
            "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"}).to_string()),
            "/readyz" => {
                let leader = lock(&self.shown).leader;
                let (status, why) = if leader {
                    (StatusCode::OK, "leading")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "following")
                };
                json_response(status, json!({"status": why}).to_string())
            }
            other => json_error(StatusCode::NOT_FOUND, &format!("no endpoint {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_specs_parse_or_say_what_they_expect() {
        assert_eq!(
            FleetSpec::parse("ml/braid=pods:app=sentiment,tier in (a)").unwrap(),
            FleetSpec {
                namespace: "ml".into(),
                config_map: "braid".into(),
                members: Members::Pods("app=sentiment,tier in (a)".into()),
            }
        );
        assert_eq!(
            FleetSpec::parse("ml/braid=service:sentiment")
                .unwrap()
                .members,
            Members::Service("sentiment".into())
        );
        for bad in [
            "ml/braid",
            "braid=pods:a=b",
            "ml/braid=pods:",
            "ml/braid=nodes:x",
        ] {
            assert!(FleetSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
