//! Sidecar injection, shared by `braid inject` (YAML in, YAML out) and `braid webhook`
//! (a JSONPatch for the API server).
//!
//! For each pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//! CronJob, and the items of a List), unless it says `braid.dev/inject: disabled`:
//!
//! - the braid container is added: as a native sidecar (an init container with
//!   `restartPolicy: Always`, Kubernetes >= 1.29) so it starts before and stops after
//!   the model, or as a plain container with `--native-sidecar=false`;
//! - its config: the ConfigMap named by `braid.dev/config-map` (default
//!   `<workload>-braid`) mounted at `/etc/braid` and watched as a file, or watched
//!   through the API with `braid.dev/config-source: api`;
//! - traffic: braid takes over the named port the Service targets (`braid.dev/port`,
//!   default `http`): the model container's port of that name is renamed
//!   `braid-upstream` and braid's own port gets the name, so the Service (which targets
//!   the name) now reaches braid without being edited. The model container's probes
//!   that used the name are rewritten to the port number;
//! - probes on braid's admin port, resources, a locked-down security context.
//!
//! A template that already has a container named `braid` is left as it is, so
//! injecting twice equals injecting once. Everything else is preserved.

pub mod webhook;

use serde_json::{Map, Value, json};

pub const ANNOTATION_INJECT: &str = "braid.dev/inject";
pub const ANNOTATION_CONFIG_MAP: &str = "braid.dev/config-map";
pub const ANNOTATION_CONFIG_SOURCE: &str = "braid.dev/config-source";
pub const ANNOTATION_PORT: &str = "braid.dev/port";
pub const ANNOTATION_INJECTED: &str = "braid.dev/injected";
pub const CONTAINER: &str = "braid";
pub const UPSTREAM_PORT_NAME: &str = "braid-upstream";
pub const CONFIG_VOLUME: &str = "braid-config";

#[derive(Debug, Clone)]
pub struct Options {
    pub image: String,
    /// An init container with `restartPolicy: Always` (Kubernetes >= 1.29).
    pub native_sidecar: bool,
    /// braid's data port inside the pod.
    pub proxy_port: u16,
    pub admin_port: u16,
    /// Default for `braid.dev/port`.
    pub port_name: String,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: format!("ghcr.io/braid-dev/braid:{}", env!("CARGO_PKG_VERSION")),
            native_sidecar: true,
            proxy_port: 8180,
            admin_port: 9901,
            port_name: "http".into(),
            cpu_request: "100m".into(),
            memory_request: "64Mi".into(),
            memory_limit: "256Mi".into(),
        }
    }
}

/// What happened to one pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected { warnings: Vec<String> },
    AlreadyInjected,
    OptedOut,
}

/// Injects every pod template found in `doc` (recursing into `List` items); returns a
/// line per template for the user.
pub fn inject_object(doc: &mut Value, opts: &Options) -> Vec<String> {
    let mut report = Vec::new();
    walk(doc, opts, &mut report);
    report
}

fn walk(doc: &mut Value, opts: &Options, report: &mut Vec<String>) {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or("(unnamed)")
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                walk(item, opts, report);
            }
        }
        return;
    }
    let template = match kind.as_str() {
        "Pod" => Some(&mut *doc),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            doc.get_mut("spec").and_then(|s| s.get_mut("template"))
        }
        "CronJob" => doc
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|j| j.get_mut("spec"))
            .and_then(|s| s.get_mut("template")),
        _ => return,
    };
    let Some(template) = template else {
        report.push(format!("{kind}/{name}: no pod template, left alone"));
        return;
    };
    match inject_template(template, &format!("{name}-braid"), opts) {
        Outcome::Injected { warnings } => {
            report.push(format!("{kind}/{name}: injected"));
            report.extend(warnings.into_iter().map(|w| format!("{kind}/{name}: {w}")));
        }
        Outcome::AlreadyInjected => report.push(format!("{kind}/{name}: already injected")),
        Outcome::OptedOut => report.push(format!("{kind}/{name}: {ANNOTATION_INJECT}: disabled")),
    }
}

fn obj(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("made an object")
}

fn list<'a>(spec: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    let entry = obj(spec).entry(key).or_insert_with(|| json!([]));
    if !entry.is_array() {
        *entry = json!([]);
    }
    entry.as_array_mut().expect("made an array")
}

/// Injects one pod template (`metadata` + `spec`); `default_config_map` applies when
/// the template has no `braid.dev/config-map` annotation.
pub fn inject_template(template: &mut Value, default_config_map: &str, opts: &Options) -> Outcome {
    let annotations = template["metadata"]["annotations"].clone();
    let annotation = |k: &str| annotations[k].as_str().map(str::to_string);
    if annotation(ANNOTATION_INJECT).as_deref() == Some("disabled") {
        return Outcome::OptedOut;
    }
    let spec = obj(template).entry("spec").or_insert_with(|| json!({}));
    let has_braid = ["containers", "initContainers"].iter().any(|k| {
        spec[*k]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == CONTAINER))
    });
    if has_braid {
        return Outcome::AlreadyInjected;
    }
    let mut warnings = Vec::new();
    let config_map =
        annotation(ANNOTATION_CONFIG_MAP).unwrap_or_else(|| default_config_map.to_string());
    let api_source = annotation(ANNOTATION_CONFIG_SOURCE).as_deref() == Some("api");
    let port_name = annotation(ANNOTATION_PORT).unwrap_or_else(|| opts.port_name.clone());

    // Take over the named port: the model keeps its number under another name.
    let mut took_over = false;
    let mut model_container = None;
    for c in list(spec, "containers").iter_mut() {
        let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) else {
            continue;
        };
        let Some(port) = ports.iter_mut().find(|p| p["name"] == port_name.as_str()) else {
            continue;
        };
        let number = port["containerPort"].clone();
        port["name"] = json!(UPSTREAM_PORT_NAME);
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                if c[probe][handler]["port"] == port_name.as_str() {
                    c[probe][handler]["port"] = number.clone();
                }
            }
        }
        model_container = c["name"].as_str().map(str::to_string);
        took_over = true;
        break;
    }
    if !took_over {
        warnings.push(format!(
            "no container port named {port_name:?}: braid listens on {} but no Service traffic is redirected to it",
            opts.proxy_port
        ));
    }

    let mut args = vec![json!("proxy")];
    if api_source {
        args.extend([
            json!("--config-map"),
            json!(format!("$(POD_NAMESPACE)/{config_map}")),
        ]);
    } else {
        args.extend([json!("--config"), json!("/etc/braid/braid.yaml")]);
    }
    args.extend([
        json!("--listen"),
        json!(format!("0.0.0.0:{}", opts.proxy_port)),
        json!("--admin"),
        json!(format!("0.0.0.0:{}", opts.admin_port)),
    ]);
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": opts.admin_port}, "periodSeconds": 5});
    let mut braid = json!({
        "name": CONTAINER,
        "image": opts.image,
        "args": args,
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [
            {"name": if took_over { port_name.as_str() } else { "braid" }, "containerPort": opts.proxy_port},
            {"name": "braid-admin", "containerPort": opts.admin_port},
        ],
        "startupProbe": {"httpGet": {"path": "/healthz", "port": opts.admin_port}, "periodSeconds": 1, "failureThreshold": 30},
        "livenessProbe": probe("/healthz"),
        "readinessProbe": probe("/readyz"),
        "resources": {
            "requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
            "limits": {"memory": opts.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if !api_source {
        braid["volumeMounts"] =
            json!([{"name": CONFIG_VOLUME, "mountPath": "/etc/braid", "readOnly": true}]);
        let volumes = list(spec, "volumes");
        if !volumes.iter().any(|v| v["name"] == CONFIG_VOLUME) {
            volumes.push(json!({"name": CONFIG_VOLUME, "configMap": {"name": config_map}}));
        }
    }
    if opts.native_sidecar {
        braid["restartPolicy"] = json!("Always");
        // First, so it is up before the other init containers and the model.
        list(spec, "initContainers").insert(0, braid);
    } else {
        list(spec, "containers").push(braid);
    }

    let meta = obj(template).entry("metadata").or_insert_with(|| json!({}));
    let annotations = obj(meta).entry("annotations").or_insert_with(|| json!({}));
    let annotations = obj(annotations);
    annotations.insert(ANNOTATION_INJECTED.into(), json!(env!("CARGO_PKG_VERSION")));
    if let Some(model) = model_container {
        // `kubectl logs` and `exec` keep going to the model by default.
        annotations
            .entry("kubectl.kubernetes.io/default-container")
            .or_insert(json!(model));
    }
    Outcome::Injected { warnings }
}

/// Reads one or more YAML documents (with strict YAML 1.2 booleans).
pub fn read_yaml(text: &str) -> Result<Vec<Value>, String> {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_multiple_with_options::<Value>(text, options)
        .map(|docs| docs.into_iter().filter(|d| !d.is_null()).collect())
        .map_err(|e| e.to_string())
}

pub fn write_yaml(docs: &[Value]) -> Result<String, String> {
    serde_saphyr::to_string_multiple(docs).map_err(|e| e.to_string())
}

/// `braid inject`: YAML in, YAML out, and a report line per template.
pub fn inject_yaml(text: &str, opts: &Options) -> Result<(String, Vec<String>), String> {
    let mut docs = read_yaml(text)?;
    let mut report = Vec::new();
    for d in &mut docs {
        report.extend(inject_object(d, opts));
    }
    Ok((write_yaml(&docs)?, report))
}

/// RFC 6902 operations turning `before` into `after`: objects are compared key by
/// key, anything else (arrays included) is replaced whole when it differs.
pub fn json_patch(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff(before, after, String::new(), &mut ops);
    ops
}

fn diff(a: &Value, b: &Value, path: String, ops: &mut Vec<Value>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let p = format!("{path}/{}", escape(k));
                match y.get(k) {
                    Some(vb) => diff(va, vb, p, ops),
                    None => ops.push(json!({"op": "remove", "path": p})),
                }
            }
            for (k, vb) in y {
                if !x.contains_key(k) {
                    ops.push(
                        json!({"op": "add", "path": format!("{path}/{}", escape(k)), "value": vb}),
                    );
                }
            }
        }
        _ => ops.push(json!({"op": "replace", "path": path, "value": b})),
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}
