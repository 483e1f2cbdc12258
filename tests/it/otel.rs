//! Traces over OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, `otter train` exports the
//! spans of its step phases (OTLP/HTTP protobuf POSTs to `/v1/traces`). The collector here is a minimal in-test HTTP receiver.

use crate::common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

/// Accepts OTLP/HTTP export requests; keeps (path, body) of each.
fn collector() -> (String, Arc<Mutex<Vec<(String, Vec<u8>)>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let got: Arc<Mutex<Vec<(String, Vec<u8>)>>> = Default::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    g.lock().unwrap().push((path, body));
                    w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n").unwrap();
                }
            });
        }
    });
    (addr, got)
}

fn run_config(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let (ok, _, err) = run_otter(&["data", "synth", "--out", data.to_str().unwrap(), "--samples", "12", "--image-px", "40"]);
    assert!(ok, "{err}");
    let yaml = format!(
        "model: {{dir: {}}}\ndata:\n  tokenizer: {}\n  image_size: 32\n  batch_size: 2\n  shard_batches: 2\n  seed: 4\n  datasets:\n    - {{name: SYN, group: IMAGE_TEXT_IN_CONTEXT, instructions: data/SYN_instructions.json, images: data/SYN.json, train_config: data/SYN_train.json}}\ntrain:\n  epochs: 1\n  lr: 1.0e-3\n  warmup_ratio: 0.1\n  save_every: 2\n  out_dir: run\n",
        tiny_model().display(),
        tiny_model().join("tokenizer.json").display()
    );
    let p = dir.join("run.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// The parts of OTLP's `ExportTraceServiceRequest` (opentelemetry-proto, trace/v1) this
/// test reads; prost skips the rest.
mod otlp {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    /// `AnyValue`'s `string_value` (field 1 of its oneof).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(string, tag = "1")]
        pub string_value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
    }
}

#[test]
fn with_an_otlp_endpoint_otter_train_exports_its_step_phase_spans() {
    let d = tempfile::tempdir().unwrap();
    let cfg = run_config(d.path());
    let (endpoint, got) = collector();
    let out = std::process::Command::new(otter_bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = got.lock().unwrap();
    assert!(!got.is_empty(), "no OTLP export reached the collector");
    assert!(got.iter().all(|(p, _)| p == "/v1/traces"), "{:?}", got.iter().map(|g| &g.0).collect::<Vec<_>>());
    use prost::Message;
    let requests: Vec<otlp::ExportTraceServiceRequest> =
        got.iter().map(|(_, b)| otlp::ExportTraceServiceRequest::decode(b.as_slice()).expect("a valid OTLP trace export")).collect();
    let resources: Vec<&otlp::ResourceSpans> = requests.iter().flat_map(|r| &r.resource_spans).collect();
    let services: Vec<&str> = resources
        .iter()
        .flat_map(|r| r.resource.iter().flat_map(|res| &res.attributes))
        .filter(|kv| kv.key == "service.name")
        .filter_map(|kv| kv.value.as_ref().map(|v| v.string_value.as_str()))
        .collect();
    assert!(!services.is_empty() && services.iter().all(|s| *s == "otter"), "service.name: {services:?}");
    let spans: Vec<&otlp::Span> = resources.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans).collect();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let steps = named("step");
    assert!(!steps.is_empty(), "step spans: {:?}", spans.iter().map(|s| &s.name).collect::<std::collections::BTreeSet<_>>());
    for phase in ["data", "forward", "backward", "optimizer"] {
        let found = named(phase);
        assert!(!found.is_empty(), "span {phase} exported");
        assert!(found.iter().all(|p| steps.iter().any(|s| s.span_id == p.parent_span_id)), "every {phase} span is a child of a step span");
    }
    assert!(!named("checkpoint").is_empty(), "span checkpoint exported");
    println!("{} OTLP export(s), {} spans", got.len(), spans.len());
}
