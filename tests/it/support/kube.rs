//! A fake Kubernetes API server speaking the real wire format for what braid and
//! kubectl use: discovery (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/events.k8s.io/v1`),
//! ConfigMaps (get, list, watch with resourceVersion and field selectors, bookmarks,
//! create, merge patch, replace with optimistic concurrency, delete), Events (create),
//! and, for `braid controller`, Pods and EndpointSlices (list by label selector) and
//! coordination Leases (get, create, replace with optimistic concurrency). Faults can be injected:
//! the next requests answer a given status, history is compacted so old
//! resourceVersions get 410 Gone, and the server can be stopped and restarted on the
//! same port. Its fidelity is checked by driving it with the real `kubectl`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

type Body = BoxBody<Bytes, Infallible>;

/// One change, as a watch event.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// ConfigMaps by (namespace, name).
    configmaps: BTreeMap<(String, String), Value>,
    /// Changes still replayable to a watch; older resourceVersions get 410.
    history: Vec<Change>,
    /// Oldest resourceVersion a watch may start from.
    compacted_to: u64,
    events: Vec<Value>,
    /// Pods, EndpointSlices and Leases by (resource, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
    /// A change committed to a ConfigMap just before the next replace of it is
    /// handled, as a person's edit racing the writer: (namespace, name, key, value).
    race: Option<(String, String, String, String)>,
    /// Replaces answered 409 Conflict for a stale resourceVersion.
    conflicts: usize,
    /// Statuses for the next requests (outside discovery), in order.
    faults: Vec<u16>,
    requests: Vec<String>,
    /// Watches answered 410 Gone.
    gone: usize,
    /// Watches that are following changes.
    watching: usize,
    /// Bumped by `stop`: a watch opened before then sends nothing more, even while
    /// its connection is still being torn down.
    epoch: u64,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Dropped when the server stops, to end every open watch.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    bookmark_every: Duration,
    _dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_for(addr)).unwrap();
        let (changes, _) = broadcast::channel(1024);
        let api = FakeApi {
            addr,
            state: Arc::new(Mutex::new(State {
                rv: 100,
                compacted_to: 100,
                ..State::default()
            })),
            changes,
            task: Mutex::new(None),
            stop: Mutex::new(None),
            bookmark_every: Duration::from_millis(200),
            _dir: dir,
            kubeconfig,
        };
        api.serve(listener);
        api
    }

    fn serve(&self, listener: TcpListener) {
        let (stop_tx, stop_rx) = mpsc::channel::<()>(1);
        let stop_rx = Arc::new(tokio::sync::Mutex::new(stop_rx));
        let (state, changes, bookmark) = (
            self.state.clone(),
            self.changes.clone(),
            self.bookmark_every,
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (state, changes, stop_rx) = (state.clone(), changes.clone(), stop_rx.clone());
                let epoch = state.lock().unwrap().epoch;
                let mut stopped = {
                    // Each connection ends when the server stops.
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    let stop_rx = stop_rx.clone();
                    tokio::spawn(async move {
                        let _ = stop_rx.lock().await.recv().await;
                        let _ = tx.send(true);
                    });
                    rx
                };
                tokio::spawn(async move {
                    let svc_stopped = stopped.clone();
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (state, changes, stopped) =
                            (state.clone(), changes.clone(), svc_stopped.clone());
                        async move {
                            Ok::<_, Infallible>(
                                handle(req, state, changes, (stopped, epoch), bookmark).await,
                            )
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = until_stopped(&mut stopped) => {}
                    }
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
        *self.stop.lock().unwrap() = Some(stop_tx);
    }

    /// Stops listening and cuts every connection, as a crashed API server would.
    pub async fn stop(&self) {
        self.state.lock().unwrap().epoch += 1;
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
        self.stop.lock().unwrap().take();
        // Give aborted tasks a moment to release the port.
        tokio::task::yield_now().await;
    }

    /// Listens again on the same port, with the same state.
    pub async fn restart(&self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// Creates or replaces a ConfigMap with this data.
    pub fn put_configmap(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut s = self.state.lock().unwrap();
        let existing = s.configmaps.contains_key(&(ns.into(), name.into()));
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns}, "data": data});
        let kind = if existing { "MODIFIED" } else { "ADDED" };
        commit(&mut s, &self.changes, ns, name, Some(obj), kind);
    }

    pub fn delete_configmap(&self, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        commit(&mut s, &self.changes, ns, name, None, "DELETED");
    }

    pub fn configmap(&self, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .configmaps
            .get(&(ns.into(), name.into()))
            .cloned()
    }

    /// Forgets the change history: a watch resuming from an older resourceVersion gets
    /// 410 Gone and must list again.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.history.clear();
        s.rv += 1;
        s.compacted_to = s.rv;
    }

    /// The next requests (other than discovery) answer these statuses.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state
            .lock()
            .unwrap()
            .faults
            .extend_from_slice(statuses);
    }

    /// How many watch requests have been subscribed to changes so far.
    pub fn watches(&self) -> usize {
        self.state.lock().unwrap().watching
    }

    /// Creates or replaces a Pod that `braid controller` finds by its labels: running,
    /// at `ip`, with braid's admin port named as `braid inject` names it.
    pub fn put_pod(
        &self,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        ip: &str,
        admin_port: u16,
    ) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let obj = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": format!("uid-{name}")},
            "spec": {"containers": [{"name": "braid", "ports": [{"name": "braid-admin", "containerPort": admin_port}]}]},
            "status": {"phase": "Running", "podIP": ip}});
        self.put_object("pods", ns, name, obj);
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.objects.remove(&("pods".into(), ns.into(), name.into()));
    }

    /// Creates or replaces any object of `resource` (pods, endpointslices, leases).
    pub fn put_object(&self, resource: &str, ns: &str, name: &str, mut obj: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.objects
            .insert((resource.into(), ns.into(), name.into()), obj);
    }

    pub fn object(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&(resource.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Just before the next replace of this ConfigMap is handled, sets `key` to
    /// `value` in it (a person's edit landing first): the replace then carries a
    /// stale resourceVersion and is answered 409.
    pub fn race_next_replace(&self, ns: &str, name: &str, key: &str, value: &str) {
        self.state.lock().unwrap().race = Some((ns.into(), name.into(), key.into(), value.into()));
    }

    /// Replaces answered 409 Conflict so far.
    pub fn conflicts(&self) -> usize {
        self.state.lock().unwrap().conflicts
    }

    /// How many watches were answered 410 Gone.
    pub fn gone(&self) -> usize {
        self.state.lock().unwrap().gone
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// "METHOD path?query" of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn until_stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn kubeconfig_for(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
    )
}

/// Applies a change to a ConfigMap and records it for watches.
fn commit(
    s: &mut State,
    changes: &broadcast::Sender<Change>,
    ns: &str,
    name: &str,
    obj: Option<Value>,
    kind: &'static str,
) -> Option<Value> {
    s.rv += 1;
    let rv = s.rv;
    let key = (ns.to_string(), name.to_string());
    let object = match obj {
        Some(mut o) => {
            let created = s
                .configmaps
                .get(&key)
                .and_then(|old| {
                    old["metadata"]["creationTimestamp"]
                        .as_str()
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "2026-11-28T00:00:00Z".into());
            let uid = s
                .configmaps
                .get(&key)
                .and_then(|old| old["metadata"]["uid"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("uid-{ns}-{name}-{rv}"));
            let meta = o["metadata"].as_object_mut().unwrap();
            meta.insert("name".into(), json!(name));
            meta.insert("namespace".into(), json!(ns));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("uid".into(), json!(uid));
            meta.insert("creationTimestamp".into(), json!(created));
            o["apiVersion"] = json!("v1");
            o["kind"] = json!("ConfigMap");
            s.configmaps.insert(key, o.clone());
            o
        }
        None => {
            let mut o = s.configmaps.remove(&key)?;
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            o
        }
    };
    let change = Change {
        rv,
        kind,
        object: object.clone(),
    };
    s.history.push(change.clone());
    let _ = changes.send(change);
    Some(object)
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn full(s: String) -> Body {
    http_body_util::Full::new(Bytes::from(s)).boxed()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=x` (and `metadata.namespace=y`) selectors, the ones braid uses.
fn selected(field_selector: Option<&String>, obj: &Value) -> bool {
    let Some(sel) = field_selector else {
        return true;
    };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (field, want) = term.split_once('=').unwrap_or((term, ""));
        let want = want.trim_start_matches('=');
        match field {
            "metadata.name" => obj["metadata"]["name"] == want,
            "metadata.namespace" => obj["metadata"]["namespace"] == want,
            _ => false,
        }
    })
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
    (stopped, epoch): (tokio::sync::watch::Receiver<bool>, u64),
    bookmark_every: Duration,
) -> Response<Body> {
    if state.lock().unwrap().epoch != epoch {
        // Accepted before `stop`: a crashed server answers nothing more.
        return status(503, "ServiceUnavailable", "the API server is stopping");
    }
    let path = req.uri().path().to_string();
    let q = query(&req);
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {}", req.method(), req.uri()));
    // Discovery.
    match path.as_str() {
        "/version" => {
            return json_response(
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                    "gitCommit": "fake", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        "/api" => {
            return json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            );
        }
        "/apis" => {
            return json_response(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                    "name": "events.k8s.io",
                    "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "events.k8s.io/v1", "version": "v1"}}]}),
            );
        }
        "/api/v1" => {
            let verbs = json!([
                "create", "delete", "get", "list", "patch", "update", "watch"
            ]);
            return json_response(
                200,
                &json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                    {"name": "configmaps", "singularName": "configmap", "namespaced": true,
                     "kind": "ConfigMap", "verbs": verbs, "shortNames": ["cm"]},
                    {"name": "events", "singularName": "event", "namespaced": true,
                     "kind": "Event", "verbs": verbs, "shortNames": ["ev"]},
                    {"name": "namespaces", "singularName": "namespace", "namespaced": false,
                     "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]}]}),
            );
        }
        "/apis/events.k8s.io/v1" => {
            return json_response(
                200,
                &json!({"kind": "APIResourceList", "groupVersion": "events.k8s.io/v1", "resources": [
                    {"name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
                     "verbs": ["create", "get", "list", "patch", "watch"], "shortNames": ["ev"]}]}),
            );
        }
        _ => {}
    }
    if path.starts_with("/openapi") {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let fault = {
        let mut s = state.lock().unwrap();
        (!s.faults.is_empty()).then(|| s.faults.remove(0))
    };
    if let Some(code) = fault {
        let reason = match code {
            403 => "Forbidden",
            410 => "Expired",
            429 => "TooManyRequests",
            _ => "InternalError",
        };
        return status(code, reason, &format!("injected fault {code}"));
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "configmaps"] => {
            let ns = ns.to_string();
            if method == Method::POST {
                let body = read_json(req).await;
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let mut s = state.lock().unwrap();
                if s.configmaps.contains_key(&(ns.clone(), name.clone())) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("configmaps \"{name}\" already exists"),
                    );
                }
                let obj = commit(&mut s, &changes, &ns, &name, Some(body), "ADDED").unwrap();
                return json_response(201, &obj);
            }
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(ns, q, state, changes, (stopped, epoch), bookmark_every);
            }
            let s = state.lock().unwrap();
            let items: Vec<Value> = s
                .configmaps
                .iter()
                .filter(|((n, _), o)| *n == ns && selected(q.get("fieldSelector"), o))
                .map(|(_, o)| o.clone())
                .collect();
            json_response(
                200,
                &json!({"kind": "ConfigMapList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        ["api", "v1", "namespaces", ns, "configmaps", name] => {
            let (ns, name) = (ns.to_string(), name.to_string());
            match method {
                Method::GET => match state.lock().unwrap().configmaps.get(&(ns, name.clone())) {
                    Some(o) => json_response(200, o),
                    None => status(404, "NotFound", &format!("configmaps \"{name}\" not found")),
                },
                Method::PUT => {
                    let body = read_json(req).await;
                    let mut s = state.lock().unwrap();
                    if let Some((rns, rname, key, value)) = s.race.clone()
                        && rns == ns
                        && rname == name
                        && let Some(mut cm) = s.configmaps.get(&(ns.clone(), name.clone())).cloned()
                    {
                        s.race = None;
                        cm["data"][key] = json!(value);
                        commit(&mut s, &changes, &ns, &name, Some(cm), "MODIFIED");
                    }
                    let current = s
                        .configmaps
                        .get(&(ns.clone(), name.clone()))
                        .map(|o| o["metadata"]["resourceVersion"].clone());
                    let sent = &body["metadata"]["resourceVersion"];
                    if let Some(current) = current
                        && sent.is_string()
                        && *sent != current
                    {
                        s.conflicts += 1;
                        return status(
                            409,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                            ),
                        );
                    }
                    let obj = commit(&mut s, &changes, &ns, &name, Some(body), "MODIFIED").unwrap();
                    json_response(200, &obj)
                }
                Method::PATCH => {
                    let patch = read_json(req).await;
                    let mut s = state.lock().unwrap();
                    let Some(mut obj) = s.configmaps.get(&(ns.clone(), name.clone())).cloned()
                    else {
                        return status(
                            404,
                            "NotFound",
                            &format!("configmaps \"{name}\" not found"),
                        );
                    };
                    // For a ConfigMap a strategic merge patch is a JSON merge patch.
                    merge_patch(&mut obj, &patch);
                    let obj = commit(&mut s, &changes, &ns, &name, Some(obj), "MODIFIED").unwrap();
                    json_response(200, &obj)
                }
                Method::DELETE => {
                    let mut s = state.lock().unwrap();
                    match commit(&mut s, &changes, &ns, &name, None, "DELETED") {
                        Some(_) => json_response(
                            200,
                            &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                        ),
                        None => {
                            status(404, "NotFound", &format!("configmaps \"{name}\" not found"))
                        }
                    }
                }
                _ => status(405, "MethodNotAllowed", "method not allowed"),
            }
        }
        ["api", "v1", "namespaces", ns, "pods"]
        | [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ]
        | [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
        ] => {
            let resource = parts[parts.len() - 1].to_string();
            let ns = ns.to_string();
            let (kind, api_version) = match resource.as_str() {
                "pods" => ("Pod", "v1"),
                "endpointslices" => ("EndpointSlice", "discovery.k8s.io/v1"),
                _ => ("Lease", "coordination.k8s.io/v1"),
            };
            if method == Method::POST {
                let mut body = read_json(req).await;
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let mut s = state.lock().unwrap();
                let key = (resource.clone(), ns.clone(), name.clone());
                if s.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{resource} \"{name}\" already exists"),
                    );
                }
                s.rv += 1;
                body["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                body["metadata"]["namespace"] = json!(ns);
                body["apiVersion"] = json!(api_version);
                body["kind"] = json!(kind);
                s.objects.insert(key, body.clone());
                return json_response(201, &body);
            }
            let s = state.lock().unwrap();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, n, _), o)| {
                    *r == resource && *n == ns && labels_match(q.get("labelSelector"), o)
                })
                .map(|(_, o)| o.clone())
                .collect();
            json_response(
                200,
                &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
            name,
        ] => {
            let key = ("leases".to_string(), ns.to_string(), name.to_string());
            match method {
                Method::GET => match state.lock().unwrap().objects.get(&key) {
                    Some(o) => json_response(200, o),
                    None => status(
                        404,
                        "NotFound",
                        &format!("leases.coordination.k8s.io \"{name}\" not found"),
                    ),
                },
                Method::PUT => {
                    let mut body = read_json(req).await;
                    let mut s = state.lock().unwrap();
                    let Some(current) = s
                        .objects
                        .get(&key)
                        .map(|o| o["metadata"]["resourceVersion"].clone())
                    else {
                        return status(
                            404,
                            "NotFound",
                            &format!("leases.coordination.k8s.io \"{name}\" not found"),
                        );
                    };
                    if body["metadata"]["resourceVersion"] != current {
                        s.conflicts += 1;
                        return status(
                            409,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified"
                            ),
                        );
                    }
                    s.rv += 1;
                    body["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                    body["apiVersion"] = json!("coordination.k8s.io/v1");
                    body["kind"] = json!("Lease");
                    s.objects.insert(key, body.clone());
                    json_response(200, &body)
                }
                _ => status(405, "MethodNotAllowed", "method not allowed"),
            }
        }
        ["api", "v1", "namespaces", _, "events"]
        | ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]
            if method == Method::POST =>
        {
            let body = read_json(req).await;
            state.lock().unwrap().events.push(body.clone());
            json_response(201, &body)
        }
        ["api", "v1", "namespaces", _, "events"]
        | ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]
            if method == Method::PATCH =>
        {
            let body = read_json(req).await;
            state.lock().unwrap().events.push(body.clone());
            json_response(200, &body)
        }
        _ => status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// Equality label selectors (`app=x,tier=y`), the form `braid controller` is given in
/// the tests.
fn labels_match(selector: Option<&String>, obj: &Value) -> bool {
    let Some(sel) = selector else {
        return true;
    };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        obj["metadata"]["labels"][k.trim()] == v.trim_start_matches('=').trim()
    })
}

async fn read_json(req: Request<Incoming>) -> Value {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn watch(
    ns: String,
    q: BTreeMap<String, String>,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
    (mut stopped, epoch): (tokio::sync::watch::Receiver<bool>, u64),
    bookmark_every: Duration,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let selector = q.get("fieldSelector").cloned();
    let mut live = changes.subscribe();
    let (backlog, gone, current_rv) = {
        let mut s = state.lock().unwrap();
        s.watching += 1;
        if from != 0 && from < s.compacted_to {
            s.gone += 1;
        }
        if from != 0 && from < s.compacted_to {
            (Vec::new(), true, s.rv)
        } else if from == 0 {
            // No resourceVersion: the current state as ADDED, then changes.
            let added = s
                .configmaps
                .iter()
                .filter(|((n, _), _)| *n == ns)
                .map(|(_, o)| Change {
                    rv: s.rv,
                    kind: "ADDED",
                    object: o.clone(),
                })
                .collect();
            (added, false, s.rv)
        } else {
            let replay = s.history.iter().filter(|c| c.rv > from).cloned().collect();
            (replay, false, s.rv)
        }
    };
    let stopped_since = {
        let state = state.clone();
        move || state.lock().unwrap().epoch != epoch
    };
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if gone {
            let _ = tx
                .send(line(
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({current_rv})")}}),
                ))
                .await;
            return;
        }
        let wanted = |c: &Change| {
            c.object["metadata"]["namespace"] == ns.as_str()
                && selected(selector.as_ref(), &c.object)
        };
        let mut last = from.max(current_rv);
        for c in backlog.into_iter().filter(|c| wanted(c)) {
            last = last.max(c.rv);
            if tx
                .send(line(json!({"type": c.kind, "object": c.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(bookmark_every);
        loop {
            tokio::select! {
                c = live.recv() => match c {
                    Ok(_) if stopped_since() => return,
                    Ok(c) if c.rv > last => {
                        last = c.rv;
                        if wanted(&c) && tx.send(line(json!({"type": c.kind, "object": c.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = state.lock().unwrap().rv;
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": "ConfigMap", "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bm)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = until_stopped(&mut stopped) => return,
            }
        }
    });
    let mut r = Response::new(BodyExt::boxed(Lines(rx)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A watch body: one JSON line per message, ending when the sender is dropped.
struct Lines(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|l| l.map(|b| Ok(Frame::data(b))))
    }
}

/// Runs the real kubectl against the fake server.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("kubectl is installed on this machine (see README, Development)")
}
