//! The metric reference in `docs/metrics.md` and the Grafana dashboard in `deploy/grafana/`
//! against what a real `kvtier-server` serves on `GET /metrics`, so neither can drift from
//! the code. `KVTIER_BLESS=1 cargo test -p kvtier-server --test metric_reference` rewrites
//! the generated table after a metric is added or renamed.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::*;
use kvtier::metrics::{MetricInfo, Metrics};
use kvtier::KvCache;
use kvtier_client::KvClient;

const BEGIN: &str = "<!-- BEGIN GENERATED: metric table -->";
const END: &str = "<!-- END GENERATED: metric table -->";

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// One metric family as `/metrics` declares it.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
}

/// The families declared by `# HELP` / `# TYPE` lines, by name.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.to_string()).or_default().help = help.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.to_string()).or_default().kind = kind.trim().to_string();
        }
    }
    out
}

/// The names a sample of `family` of `kind` is exported under (counters get `_total`,
/// histograms `_bucket`/`_sum`/`_count`).
fn sample_names(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{name}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        _ => vec![name.to_string()],
    }
}

/// The markdown table the reference holds between its markers: every family the engine
/// registers (from its catalog, so also those with no series yet).
fn table(catalog: &[MetricInfo]) -> String {
    let mut t = String::from("| Metric | Type | Labels | Meaning |\n|---|---|---|---|\n");
    let mut rows: Vec<&MetricInfo> = catalog.iter().collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    for m in rows {
        let shown = sample_names(&m.name, &m.kind)
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let labels = if m.labels.is_empty() {
            "".to_string()
        } else {
            m.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        t.push_str(&format!(
            "| {shown} | {} | {labels} | {} |\n",
            m.kind, m.help
        ));
    }
    t
}

/// `/metrics` of a real server with an L1 and a disk tier after a store, a lookup and a
/// retrieve.
fn served_metrics() -> String {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let yaml = format!(
        "{}local_disk: {}\nmax_local_disk_size: 16MiB\n",
        base_yaml(),
        disk.display()
    );
    let srv = Server::start(dir.path(), &yaml, &[], &[]);
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    c.store(&tokens(0, 64), None, &payload(0, 64)).unwrap();
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 64);
    let (code, text) = srv.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{text}");
    text
}

#[test]
fn the_metric_reference_matches_what_the_server_exports() {
    let text = served_metrics();
    let served = families(&text);
    assert!(served.len() >= 10, "too few metric families in\n{text}");
    let catalog = Metrics::new().catalog().to_vec();
    // What the server declares is in the catalog, with the same type and help.
    for (name, f) in &served {
        let m = catalog
            .iter()
            .find(|m| &m.name == name)
            .unwrap_or_else(|| panic!("GET /metrics serves {name}, which Metrics::catalog lacks: register it through Registrar::add"));
        assert_eq!(f.kind, m.kind, "{name}");
        assert_eq!(
            f.help.trim_end_matches('.'),
            m.help.trim_end_matches('.'),
            "{name}"
        );
    }
    for m in &catalog {
        assert!(
            !m.help.is_empty(),
            "{}: every metric needs help text",
            m.name
        );
    }
    let generated = table(&catalog);
    let path = repo_file("docs/metrics.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (head, rest) = doc
        .split_once(BEGIN)
        .unwrap_or_else(|| panic!("{} lacks the line {BEGIN}", path.display()));
    let (current, tail) = rest
        .split_once(END)
        .unwrap_or_else(|| panic!("{} lacks the line {END}", path.display()));
    if current.trim() == generated.trim() {
        return;
    }
    if std::env::var_os("KVTIER_BLESS").is_some() {
        std::fs::write(&path, format!("{head}{BEGIN}\n{generated}{END}{tail}")).unwrap();
        return;
    }
    panic!(
        "docs/metrics.md does not match GET /metrics. Regenerate it with\n  \
         KVTIER_BLESS=1 cargo test -p kvtier-server --test metric_reference\n\
         and describe new metrics in the prose around the table.\n\
         --- generated ---\n{generated}--- in the file ---\n{}",
        current.trim()
    );
}

/// Every `kvtier_*` series a dashboard panel queries is one the engine exports.
#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let exported: Vec<String> = Metrics::new()
        .catalog()
        .iter()
        .flat_map(|m| sample_names(&m.name, &m.kind))
        .collect();
    let path = repo_file("deploy/grafana/kvtier-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 8, "too few queries in {}", path.display());
    let mut used = 0;
    for expr in &exprs {
        for name in metric_names(expr) {
            used += 1;
            assert!(
                exported.contains(&name),
                "the dashboard queries {name} ({expr}), which kvtier does not export"
            );
        }
    }
    assert!(used >= exprs.len(), "a query names no kvtier metric");
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `kvtier_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kvtier_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names("sum(rate(kvtier_hit_tokens_total[5m])) / sum(rate(kvtier_requested_tokens_total{job=\"kvtier\"}[5m]))"),
        ["kvtier_hit_tokens_total", "kvtier_requested_tokens_total"]
    );
    assert!(metric_names("up").is_empty());
}
