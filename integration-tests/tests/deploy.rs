//! The container image, the Helm chart and the Grafana dashboard (docs/deploy.md), checked
//! without a cluster, a container engine or a broker:
//!
//! * `helm lint` and `helm template` of `deploy/helm/intentflow` with the default values, with a
//!   GPU, with an existing Kafka Secret and with a Secret made from values (helm comes from
//!   `scripts/helm`, which `scripts/setup` builds once; without it these tests fail, saying so);
//! * the rendered StatefulSet: state volume claims, stable instance ids, the probes on paths the
//!   operator serves and on the port its rendered `metrics_addr` binds, scrape annotations, memory
//!   from the budget, the security context, the grace period, and a PodDisruptionBudget;
//! * the rendered ConfigMap's TOML, with the pod's environment, accepted by the real binary's
//!   `intentflow config check`;
//! * every metric of the dashboard documented in docs/metrics.md;
//! * the Dockerfile: a release build of the binary, run as a non-root user.

use intentflow_integration_tests::intentflow_bin;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const CHART: &str = "deploy/helm/intentflow";
const RELEASE: &str = "demo";
/// The Secret of the "existing secret" renders.
const EXISTING_SECRET: &str = "kafka-credentials";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Runs `scripts/helm ARGS` in the repository root; its stdout, or a panic with its stderr.
fn helm(args: &[&str]) -> String {
    helm_ready();
    let out = Command::new(root().join("scripts/helm"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/helm: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/helm {} failed ({}):\n{stdout}\n{stderr}", args.join(" "), out.status);
    stdout.into_owned()
}

/// helm is there (scripts/helm builds it on first use; scripts/setup does that in CI): checked
/// once, so that parallel tests do not each build it.
fn helm_ready() {
    static READY: OnceLock<Result<String, String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let out = Command::new(root().join("scripts/helm"))
            .args(["version", "--short"])
            .current_dir(root())
            .output()
            .map_err(|e| format!("cannot run scripts/helm: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("scripts/helm version failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
        }
    });
    if let Err(e) = ready {
        panic!("helm is needed for the chart tests and is not available (run scripts/setup, which builds it with Go): {e}");
    }
}

/// One `helm template` of the chart.
struct Render {
    /// What the render is (for messages).
    name: &'static str,
    /// The manifests.
    docs: Vec<Value>,
}

impl Render {
    fn new(name: &'static str, set: &[&str]) -> Render {
        let mut args = vec!["template", RELEASE, CHART, "--namespace", "streams"];
        for s in set {
            // Annotation values are strings to Kubernetes, whatever they look like.
            args.extend([if s.starts_with("podAnnotations.") { "--set-string" } else { "--set" }, s]);
        }
        let text = helm(&args);
        let docs = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{name}: rendered YAML does not parse: {e}\n{text}")))
            .filter(|v| !v.is_null())
            .collect();
        Render { name, docs }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "{}: expected one {kind}, found {}", self.name, found.len());
        found[0]
    }

    fn statefulset(&self) -> &Value {
        self.one("StatefulSet")
    }

    fn container(&self) -> &Value {
        let containers = seq(&self.statefulset()["spec"]["template"]["spec"]["containers"]);
        let c = containers.iter().find(|c| c["name"].as_str() == Some("intentflow"));
        c.unwrap_or_else(|| panic!("{}: no container `intentflow` in the StatefulSet", self.name))
    }

    /// The operator's TOML from the ConfigMap the StatefulSet mounts at the config path.
    fn config_toml(&self) -> String {
        let c = self.container();
        let args: Vec<&str> = seq(&c["args"]).iter().filter_map(Value::as_str).collect();
        let at = args.iter().position(|a| *a == "--config").unwrap_or_else(|| panic!("{}: no --config in {args:?}", self.name));
        let path = args[at + 1];
        let mount = seq(&c["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("{}: nothing mounted at the config path {path}", self.name));
        let volume = self.volume(str_of(&mount["name"]));
        let cm_name = str_of(&volume["configMap"]["name"]);
        let cm = self
            .all("ConfigMap")
            .into_iter()
            .find(|m| m["metadata"]["name"].as_str() == Some(cm_name))
            .unwrap_or_else(|| panic!("{}: ConfigMap {cm_name} not rendered", self.name));
        let key = mount["subPath"].as_str().unwrap_or("intentflow.toml");
        str_of(&cm["data"][key]).to_string()
    }

    fn config(&self) -> toml::Table {
        let text = self.config_toml();
        text.parse().unwrap_or_else(|e| panic!("{}: the ConfigMap's TOML does not parse: {e}\n{text}", self.name))
    }

    fn volume(&self, name: &str) -> &Value {
        let volumes = seq(&self.statefulset()["spec"]["template"]["spec"]["volumes"]);
        volumes.iter().find(|v| v["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("{}: no volume {name}", self.name))
    }

    /// The container's environment as the kubelet would give it to pod `<statefulset>-0` in
    /// namespace `shop`: `fieldRef: metadata.name` is the pod name, `metadata.namespace` the
    /// namespace, a `secretKeyRef` the value `secrets` holds for the key, and `$(NAME)` in a
    /// value an earlier variable's value.
    fn pod_env(&self, secrets: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let pod = format!("{}-0", str_of(&self.statefulset()["metadata"]["name"]));
        let mut env: Vec<(String, String)> = Vec::new();
        for e in seq(&self.container()["env"]) {
            let name = str_of(&e["name"]).to_string();
            let value = if let Some(v) = e["value"].as_str() {
                env.iter().fold(v.to_string(), |v, (k, x)| v.replace(&format!("$({k})"), x))
            } else if e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("metadata.name") {
                pod.clone()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("metadata.namespace") {
                "shop".to_string()
            } else if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                secrets.get(key).unwrap_or_else(|| panic!("{}: no test value for secret key {key}", self.name)).clone()
            } else {
                panic!("{}: environment variable {name} of an unexpected source: {e:?}", self.name)
            };
            env.push((name, value));
        }
        env
    }
}

fn seq(v: &Value) -> &Vec<Value> {
    v.as_sequence().unwrap_or_else(|| panic!("expected a list, found {v:?}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, found {v:?}"))
}

/// A Kubernetes memory quantity in MiB.
fn mib(q: &str) -> u64 {
    let units = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40), ("k", 1000), ("M", 1_000_000), ("G", 1_000_000_000)];
    let (number, factor) = units.iter().find_map(|(u, f)| q.strip_suffix(u).map(|n| (n, *f))).unwrap_or((q, 1));
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("memory quantity {q:?}"));
    n * factor / (1 << 20)
}

/// The default, GPU, existing-Secret and values-Secret renders.
fn renders() -> &'static [Render] {
    static RENDERS: OnceLock<Vec<Render>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        vec![
            Render::new("default values", &[]),
            Render::new("gpu.enabled=true", &["gpu.enabled=true"]),
            Render::new("existing secret", &[&format!("kafka.existingSecret={EXISTING_SECRET}"), "model.existingClaim=intentflow-models"]),
            Render::new(
                "secret from values",
                &["kafka.secret.sasl\\.username=shop", "kafka.secret.sasl\\.password=hunter2", "config.state_cache_mib=2048"],
            ),
            // The scrape port given again among the pod annotations must not be rendered twice
            // (a duplicate key, which the YAML parser rejects).
            Render::new("startup probe, own scrape annotation", &["probes.startup.enabled=true", "podAnnotations.prometheus\\.io/port=9464"]),
        ]
    })
}

#[test]
fn the_chart_lints() {
    for set in [&[][..], &["gpu.enabled=true", "metrics.serviceMonitor.enabled=true"][..], &[&format!("kafka.existingSecret={EXISTING_SECRET}")[..]][..]] {
        let mut args = vec!["lint", "--strict", CHART];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = helm(&args);
        assert!(out.contains("0 chart(s) failed"), "helm lint {set:?}:\n{out}");
    }
}

#[test]
fn a_statefulset_keeps_state_on_claims_and_names_each_instance_by_its_pod() {
    for r in renders() {
        let sts = r.statefulset();
        let claims = seq(&sts["spec"]["volumeClaimTemplates"]);
        assert!(!claims.is_empty(), "{}: no volumeClaimTemplates", r.name);
        let state_dir = r.config()["state_dir"].as_str().unwrap_or_else(|| panic!("{}: no state_dir in the TOML", r.name)).to_string();
        let mount = seq(&r.container()["volumeMounts"]).iter().find(|m| m["mountPath"].as_str() == Some(&state_dir)).cloned();
        let mount = mount.unwrap_or_else(|| panic!("{}: nothing mounted at state_dir {state_dir}", r.name));
        assert!(
            claims.iter().any(|c| c["metadata"]["name"] == mount["name"]),
            "{}: state_dir {state_dir} is not on a volume claim template (mount {:?})",
            r.name,
            mount["name"]
        );
        let model_dir = r.config()["model_dir"].as_str().unwrap_or_else(|| panic!("{}: no model_dir", r.name)).to_string();
        assert!(
            seq(&r.container()["volumeMounts"]).iter().any(|m| m["mountPath"].as_str() == Some(&model_dir)),
            "{}: nothing mounted at model_dir {model_dir}",
            r.name
        );
        // The headless Service governs the StatefulSet.
        let service = str_of(&sts["spec"]["serviceName"]);
        let headless = r.all("Service").into_iter().find(|s| s["metadata"]["name"].as_str() == Some(service));
        let headless = headless.unwrap_or_else(|| panic!("{}: serviceName {service} is not rendered", r.name));
        assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"), "{}: {service} is not headless", r.name);

        let c = r.container();
        let id = seq(&c["env"]).iter().find(|e| e["name"].as_str() == Some("INTENTFLOW_INSTANCE_ID"));
        let id = id.unwrap_or_else(|| panic!("{}: no INTENTFLOW_INSTANCE_ID", r.name));
        assert_eq!(id["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("metadata.name"), "{}: instance id", r.name);
        assert!(!r.config().contains_key("instance_id"), "{}: a fixed instance_id in the shared TOML would give every pod the same id", r.name);
        assert!(c["command"].is_null(), "{}: `command` would replace the image's ENTRYPOINT", r.name);
        let args: Vec<&str> = seq(&c["args"]).iter().map(str_of).collect();
        assert_eq!(args, ["run", "--config", "/etc/intentflow/intentflow.toml"], "{}", r.name);
        let grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64();
        assert!(grace.is_some_and(|g| g >= 60), "{}: terminationGracePeriodSeconds {grace:?} < 60", r.name);
    }
}

#[test]
fn probes_hit_paths_the_operator_serves_on_the_port_of_metrics_addr() {
    let telemetry = read("pipeline/src/telemetry.rs");
    for r in renders() {
        let c = r.container();
        let cfg = r.config();
        let addr = cfg["metrics_addr"].as_str().unwrap_or_else(|| panic!("{}: no metrics_addr in the TOML", r.name));
        let (host, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("{}: metrics_addr {addr}", r.name));
        assert_eq!(host, "0.0.0.0", "{}: metrics_addr {addr} is not reachable from the kubelet", r.name);
        let port: u64 = port.parse().unwrap();
        let ports = seq(&c["ports"]);
        let named = |name: &str| ports.iter().find(|p| p["name"].as_str() == Some(name)).and_then(|p| p["containerPort"].as_u64());
        for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")] {
            let get = &c[probe]["httpGet"];
            if probe == "startupProbe" && !r.name.starts_with("startup probe") {
                assert!(c[probe].is_null(), "{}: a startup probe by default", r.name);
                continue;
            }
            assert_eq!(get["path"].as_str(), Some(path), "{}: {probe} path", r.name);
            assert!(telemetry.contains(&format!(".route(\"{path}\"")), "{}: {probe} asks for {path}, which pipeline/src/telemetry.rs does not serve", r.name);
            let probe_port = match &get["port"] {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => named(name),
                other => panic!("{}: {probe} port {other:?}", r.name),
            };
            assert_eq!(probe_port, Some(port), "{}: {probe} port is not metrics_addr's ({addr})", r.name);
        }
        let annotations = &r.statefulset()["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"), "{}: scrape annotation", r.name);
        assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"), "{}: scrape path", r.name);
        assert_eq!(annotations["prometheus.io/port"].as_str(), Some(port.to_string().as_str()), "{}: scrape port", r.name);
        assert!(telemetry.contains(".route(\"/metrics\""), "pipeline/src/telemetry.rs does not serve /metrics");
    }
}

#[test]
fn pods_are_guarded_sized_and_unprivileged() {
    for r in renders() {
        let pdb = r.one("PodDisruptionBudget");
        assert!(!pdb["spec"]["maxUnavailable"].is_null() || !pdb["spec"]["minAvailable"].is_null(), "{}: PDB without a bound", r.name);
        let pod_labels = &r.statefulset()["spec"]["template"]["metadata"]["labels"];
        let selector = pdb["spec"]["selector"]["matchLabels"].as_mapping().expect("PDB matchLabels");
        for (k, v) in selector {
            assert_eq!(&pod_labels[str_of(k)], v, "{}: the PDB's selector {k:?} does not match the pods", r.name);
        }

        // Memory: state_cache_mib + 128 MiB of memtables at least (the chart adds the model and process).
        let cache = r.config().get("state_cache_mib").and_then(toml::Value::as_integer).unwrap_or(256) as u64;
        let resources = &r.container()["resources"];
        let request = mib(str_of(&resources["requests"]["memory"]));
        assert!(request >= cache + 128, "{}: memory request {request} MiB < state_cache_mib {cache} + 128", r.name);
        let limit = mib(str_of(&resources["limits"]["memory"]));
        assert!(limit >= request, "{}: memory limit {limit} MiB below the request {request} MiB", r.name);

        let pod = &r.statefulset()["spec"]["template"]["spec"]["securityContext"];
        let ctr = &r.container()["securityContext"];
        assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true), "{}", r.name);
        assert_eq!(pod["runAsUser"].as_u64(), Some(10001), "{}", r.name);
        assert_eq!(pod["fsGroup"].as_u64(), Some(10001), "{}", r.name);
        assert_eq!(ctr["readOnlyRootFilesystem"].as_bool(), Some(true), "{}", r.name);
        assert_eq!(ctr["allowPrivilegeEscalation"].as_bool(), Some(false), "{}", r.name);

        let gpu = &resources["limits"]["nvidia.com/gpu"];
        let device = r.config().get("device").and_then(toml::Value::as_str).map(String::from);
        if r.name.starts_with("gpu") {
            assert_eq!(gpu.as_u64(), Some(1), "{}: GPU limit", r.name);
            assert_eq!(device.as_deref(), Some("cuda"), "{}: device", r.name);
        } else {
            assert!(gpu.is_null(), "{}: a GPU limit without gpu.enabled", r.name);
            assert_ne!(device.as_deref(), Some("cuda"), "{}: device", r.name);
        }
    }
}

#[test]
fn kafka_credentials_come_from_a_secret_as_configuration_variables() {
    for r in renders() {
        let env = seq(&r.container()["env"]);
        let from_secret: Vec<&Value> = env.iter().filter(|e| !e["valueFrom"]["secretKeyRef"].is_null()).collect();
        // Credentials the chart renders roll the pods when they change; an existing Secret's
        // are rolled out by its owner.
        let checksum = &r.statefulset()["spec"]["template"]["metadata"]["annotations"]["checksum/secret"];
        assert_eq!(checksum.is_null(), r.name != "secret from values", "{}: checksum/secret {checksum:?}", r.name);
        let secret = match r.name {
            "existing secret" => {
                assert!(r.all("Secret").is_empty(), "{}: the chart made a Secret beside the existing one", r.name);
                EXISTING_SECRET.to_string()
            }
            "secret from values" => {
                let s = r.one("Secret");
                assert_eq!(s["stringData"]["sasl.password"].as_str(), Some("hunter2"), "{}", r.name);
                str_of(&s["metadata"]["name"]).to_string()
            }
            _ => {
                assert!(from_secret.is_empty(), "{}: secret variables without a Secret", r.name);
                continue;
            }
        };
        let mut keys: Vec<&str> = Vec::new();
        for e in &from_secret {
            let key_ref = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(key_ref["name"].as_str(), Some(secret.as_str()), "{}", r.name);
            let key = str_of(&key_ref["key"]);
            // The configuration layer's rule: INTENTFLOW_KAFKA__COMMON__<PROPERTY>, each `_` a `.`.
            let name = str_of(&e["name"]);
            let property = name.strip_prefix("INTENTFLOW_KAFKA__COMMON__").unwrap_or_else(|| panic!("{}: {name}", r.name));
            assert_eq!(property.to_ascii_lowercase().replace('_', "."), key, "{}: {name} is not [kafka.common] {key:?}", r.name);
            keys.push(key);
        }
        keys.sort();
        assert_eq!(keys, ["sasl.password", "sasl.username"], "{}", r.name);
    }
}

#[test]
fn the_rendered_config_passes_intentflow_config_check_with_the_pods_environment() {
    let bin = intentflow_bin();
    let secrets: BTreeMap<String, String> =
        [("sasl.username", "shop-user"), ("sasl.password", "pw-do-not-print")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    let dir = tempfile::tempdir().unwrap();
    for (i, r) in renders().iter().enumerate() {
        let file = dir.path().join(format!("intentflow-{i}.toml"));
        std::fs::write(&file, r.config_toml()).unwrap();
        let env = r.pod_env(&secrets);
        let mut cmd = Command::new(&bin);
        cmd.args(["config", "check"]).arg(&file);
        // Only the pod's INTENTFLOW_ variables, not the test run's own.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("INTENTFLOW_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let out = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{}: `intentflow config check` refused the chart's config ({}):\nstdout: {stdout}\nstderr: {stderr}\nfile:\n{}",
            r.name,
            out.status,
            r.config_toml()
        );
        let effective: toml::Table =
            stdout.parse().unwrap_or_else(|e| panic!("{}: `config check` printed no TOML ({e}):\n{stdout}", r.name));
        let pod = format!("{}-0", str_of(&r.statefulset()["metadata"]["name"]));
        assert_eq!(effective.get("instance_id").and_then(toml::Value::as_str), Some(pod.as_str()), "{}: instance id from the pod name:\n{stdout}", r.name);
        assert_eq!(effective.get("metrics_addr").and_then(toml::Value::as_str), r.config()["metrics_addr"].as_str(), "{}", r.name);
        // Per-user queries are redirected to the pod's stable name under the headless Service.
        let port = r.config()["metrics_addr"].as_str().and_then(|a| a.rsplit(':').next()).unwrap_or_else(|| panic!("{}: no metrics port", r.name)).to_string();
        let advertised = format!("{pod}.{}.shop.svc:{port}", str_of(&r.statefulset()["spec"]["serviceName"]));
        assert_eq!(effective.get("advertised_addr").and_then(toml::Value::as_str), Some(advertised.as_str()), "{}:\n{stdout}", r.name);
        let common = effective.get("kafka").and_then(|k| k.get("common"));
        if env.iter().any(|(k, _)| k.starts_with("INTENTFLOW_KAFKA__")) {
            let username = common.and_then(|c| c.get("sasl.username")).and_then(toml::Value::as_str);
            assert_eq!(username, Some("shop-user"), "{}: sasl.username from the Secret:\n{stdout}", r.name);
            assert!(common.is_some_and(|c| c.get("sasl.password").is_some()), "{}: sasl.password from the Secret:\n{stdout}", r.name);
        }
        assert!(!stdout.contains("pw-do-not-print") && !stderr.contains("pw-do-not-print"), "{}: `config check` printed the password", r.name);
    }
}

/// The metric names in the first column of docs/metrics.md's tables.
fn documented_metrics() -> Vec<String> {
    let doc = read("docs/metrics.md");
    let mut names = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let first = line.trim_start_matches('|').split('|').next().unwrap_or("");
        names.extend(first.split('`').skip(1).step_by(2).filter(|n| n.starts_with("intentflow_")).map(String::from));
    }
    names
}

#[test]
fn the_dashboard_uses_only_documented_metrics() {
    let text = read("deploy/grafana/intentflow.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("deploy/grafana/intentflow.json is not JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let documented = documented_metrics();
    assert!(documented.len() > 10, "found only {documented:?} in docs/metrics.md's tables");

    // Every expression, and every `intentflow_…` word anywhere in the file (descriptions too).
    let mut exprs = Vec::new();
    fn walk<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "only {} panel expressions", exprs.len());
    let mut used = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(i) = text[at..].find("intentflow_").map(|i| at + i) {
        let end = i + bytes[i..].iter().take_while(|b| b.is_ascii_lowercase() || **b == b'_').count();
        let word = &text[i..end];
        let name = ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
        used.insert(name.to_string());
        at = end;
    }
    let undocumented: Vec<&String> = used.iter().filter(|n| !documented.contains(n)).collect();
    assert!(undocumented.is_empty(), "the dashboard uses metrics docs/metrics.md does not document: {undocumented:?}");
    // Histograms are read through their buckets.
    for e in exprs.iter().filter(|e| e.contains("histogram_quantile")) {
        assert!(e.contains("_bucket"), "histogram_quantile without buckets: {e}");
    }
}

/// The Dockerfile's instructions, continuation lines joined.
fn dockerfile() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

#[test]
fn the_image_builds_the_release_binary_and_runs_it_unprivileged() {
    let pipeline = read("pipeline/Cargo.toml");
    let manifest: toml::Table = pipeline.parse().unwrap();
    let package = manifest["package"]["name"].as_str().unwrap();
    let bins = manifest["bin"].as_array().expect("pipeline [[bin]]");
    assert!(bins.iter().any(|b| b["name"].as_str() == Some("intentflow")), "pipeline has no `intentflow` bin");

    let lines = dockerfile();
    let word = |l: &String| l.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
    let build = lines.iter().find(|l| word(l) == "RUN" && l.contains("cargo build"));
    let build = build.expect("no RUN cargo build in the Dockerfile");
    for part in ["--release", "--locked", &format!("-p {package}"), "--bin intentflow"] {
        assert!(build.contains(part), "the Dockerfile's cargo build lacks `{part}`: {build}");
    }
    let last_from = lines.iter().rposition(|l| word(l) == "FROM").expect("FROM");
    let runtime = &lines[last_from..];
    assert!(runtime[0].contains("debian:bookworm-slim") || runtime[0].contains("RUNTIME_IMAGE"), "runtime stage: {}", runtime[0]);
    assert!(runtime.iter().any(|l| word(l) == "COPY" && l.contains("--from=builder") && l.contains("intentflow")), "no binary copied from the builder");
    let user = runtime.iter().rev().find(|l| word(l) == "USER").expect("the runtime stage sets no USER (it would run as root)");
    let user = user.split_whitespace().nth(1).unwrap_or("");
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&uid), "the image runs as {user}");
    let entry = runtime.iter().rev().find(|l| word(l) == "ENTRYPOINT").expect("no ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry.split_once(' ').unwrap().1).expect("ENTRYPOINT in exec (JSON) form");
    assert!(entry[0] == "intentflow" || entry[0].ends_with("/intentflow"), "ENTRYPOINT {entry:?}");
    let cmd = runtime.iter().rev().find(|l| word(l) == "CMD").expect("no CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd.split_once(' ').unwrap().1).expect("CMD in exec (JSON) form");
    assert_eq!(cmd, ["run", "--config", "/etc/intentflow/intentflow.toml"]);
    assert!(runtime.iter().any(|l| word(l) == "EXPOSE" && l.contains("9464")), "EXPOSE 9464");

    // The chart's pod user is the image's.
    for r in renders() {
        let pod_user = r.statefulset()["spec"]["template"]["spec"]["securityContext"]["runAsUser"].as_u64().map(|u| u.to_string());
        assert_eq!(pod_user.as_deref(), Some(uid), "{}: runAsUser differs from the image's USER", r.name);
    }
    let ignore = read(".dockerignore");
    for entry in ["target", ".git"] {
        assert!(ignore.lines().any(|l| l.trim().trim_end_matches('/') == entry), ".dockerignore lacks {entry}");
    }
    assert!(Path::new(&root().join("Cargo.lock")).is_file(), "--locked needs Cargo.lock");
}
