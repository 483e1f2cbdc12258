//! Logging and tracing set-up shared by the binaries: human-readable logs on stderr
//! (`RUST_LOG`, default per binary) and, only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, OpenTelemetry traces over OTLP/HTTP
//! (protobuf): spans of step phases (`data`, `forward`, `backward`, `allreduce`,
//! `optimizer`, `checkpoint`) and of the coordinator's RPCs. Off by default: no exporter,
//! no thread, no cost beyond the disabled spans.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
pub struct OtelGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("otel: flushing traces: {e}");
            }
        }
    }
}

fn endpoint_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"].iter().any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Installs the global subscriber. `service` names this process in traces
/// (`service.name`, unless `OTEL_SERVICE_NAME` overrides it); `default_level` is the log
/// filter when `RUST_LOG` is unset.
pub fn init(service: &'static str, default_level: &str) -> OtelGuard {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()));
    let (otel, provider) = if endpoint_configured() {
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => {
                let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
                let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
                let provider =
                    opentelemetry_sdk::trace::SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build();
                let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, service);
                // Our spans at info and above; dependencies' only at warn.
                let filter = EnvFilter::new("warn,otter=info");
                (Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter)), Some(provider))
            }
            Err(e) => {
                eprintln!("otel: OTLP exporter not started: {e}");
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    tracing_subscriber::registry().with(fmt).with(otel).init();
    OtelGuard { provider }
}
