//! Span export: a bounded queue the data path never waits on, drained by one thread
//! that batches spans and hands them to `opentelemetry-otlp`'s exporter.
//!
//! Not the SDK's `BatchSpanProcessor`: it counts the spans it drops only in its own
//! internal log, and the issue (and any operator) wants them in `/metrics`; and the
//! sidecar builds finished spans itself (see [`super::Tracing`]), with no SDK tracer to
//! feed a processor. What is kept from the SDK is its batching settings, read from the
//! same `OTEL_BSP_*` variables with the same defaults, and the OTLP encoding and
//! transports of `opentelemetry-otlp` (which also reads `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `_HEADERS`, `_TIMEOUT` and `_COMPRESSION` and their `_TRACES_` forms).
//!
//! The thread has its own single-threaded runtime, as the admin server does: a slow or
//! absent collector costs that thread, never a proxy worker. A span that finds the queue
//! full is dropped and counted (`ballast_trace_spans_dropped_total{reason="queue_full"}`);
//! a batch the collector refuses or cannot take in time is dropped and counted
//! (`export_failed`) after the OTLP exporter's own retries (3, with backoff from 100 ms,
//! for statuses that say "try again"), which hold up only this thread, so a dead
//! collector never grows the sidecar's memory. On shutdown the queue is flushed within a
//! bound (`shutdown` counts what is left).

use std::sync::Mutex;
use std::time::Duration;

use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// The OTLP transport (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`/`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Export settings, from the standard variables.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    pub protocol: Protocol,
    /// For reporting only: `opentelemetry-otlp` reads the variables itself.
    pub endpoint: String,
    pub max_queue_size: usize,
    pub max_batch_size: usize,
    pub schedule_delay: Duration,
    pub export_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "{var}={value:?} is not an OTLP protocol Ballast speaks: use grpc or http/protobuf (http/json is not built in)"
    )]
    Protocol { var: &'static str, value: String },
    #[error("{var}={value:?} is not a positive whole number")]
    Number { var: &'static str, value: String },
    #[error(
        "the OTLP endpoint {0} uses https, and the sidecar's exporter speaks plain http only: send spans to a collector on the node or in the pod (http://...), which forwards them with TLS"
    )]
    Tls(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    #[error("cannot start the span export thread: {0}")]
    Thread(std::io::Error),
}

impl ExportConfig {
    /// The settings the environment describes, or `None` when no OTLP endpoint is set
    /// (or `OTEL_TRACES_EXPORTER=none`): no spans are recorded then.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ExportError> {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        if var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none") {
            return Ok(None);
        }
        let Some(endpoint) =
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            return Ok(None);
        };
        let (pvar, pvalue) = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(v)),
            None => ("OTEL_EXPORTER_OTLP_PROTOCOL", var("OTEL_EXPORTER_OTLP_PROTOCOL")),
        };
        // The spec's default transport is http/protobuf.
        let protocol = match pvalue.as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => return Err(ExportError::Protocol { var: pvar, value: other.to_owned() }),
        };
        if endpoint.trim().starts_with("https:") {
            return Err(ExportError::Tls(endpoint));
        }
        let number = |k: &'static str, default: u64| -> Result<u64, ExportError> {
            match var(k) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(ExportError::Number { var: k, value: v }),
                },
            }
        };
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)? as usize;
        Ok(Some(Self {
            protocol,
            endpoint,
            max_queue_size,
            // The spec: a batch never exceeds the queue.
            max_batch_size: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)? as usize).min(max_queue_size),
            schedule_delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
            export_timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30_000)?),
        }))
    }
}

/// The queue's sending end, shared by every request.
pub struct Exporter {
    tx: mpsc::Sender<SpanData>,
    queue_full: IntCounter,
    closed: IntCounter,
    stop: Mutex<Option<(tokio::sync::oneshot::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl Exporter {
    /// Starts the export thread; fails when the exporter cannot be built.
    pub fn start(config: ExportConfig, resource: Resource, metrics: &Metrics) -> Result<Self, ExportError> {
        let (tx, rx) = mpsc::channel(config.max_queue_size);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        let worker = Worker {
            rx,
            exported: metrics.trace_spans_exported.clone(),
            dropped: metrics.trace_spans_dropped.clone(),
            requests: metrics.trace_export_requests.clone(),
        };
        std::thread::Builder::new()
            .name("ballast-otlp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = built_tx.send(Err(ExportError::Build(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    // Built inside the runtime: tonic's channel needs one.
                    let exporter = match build(&config, &resource) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = built_tx.send(Ok(()));
                    worker.run(exporter, &config, stop_rx).await;
                });
                let _ = done_tx.send(());
            })
            .map_err(ExportError::Thread)?;
        built_rx
            .recv()
            .map_err(|_| ExportError::Build("the export thread ended while starting".into()))??;
        Ok(Self {
            tx,
            queue_full: metrics.trace_spans_dropped.with_label_values(&["queue_full"]),
            closed: metrics.trace_spans_dropped.with_label_values(&["shutdown"]),
            stop: Mutex::new(Some((stop_tx, done_rx))),
        })
    }

    /// Queues a finished span; never waits.
    pub fn send(&self, span: SpanData) {
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.queue_full.inc(),
            Err(mpsc::error::TrySendError::Closed(_)) => self.closed.inc(),
        }
    }

    /// Exports what is queued, waiting at most `deadline`; later spans are dropped.
    pub fn shutdown(&self, deadline: Duration) {
        let Some((stop, done)) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = stop.send(());
        if done.recv_timeout(deadline).is_err() {
            tracing::warn!(?deadline, "span export did not finish in time; queued spans are lost");
        }
    }
}

fn build(config: &ExportConfig, resource: &Resource) -> Result<SpanExporter, ExportError> {
    let mut exporter = match config.protocol {
        Protocol::Grpc => SpanExporter::builder().with_tonic().with_timeout(config.export_timeout).build(),
        Protocol::HttpProtobuf => {
            SpanExporter::builder().with_http().with_timeout(config.export_timeout).build()
        }
    }
    .map_err(|e| ExportError::Build(e.to_string()))?;
    exporter.set_resource(resource);
    Ok(exporter)
}

struct Worker {
    rx: mpsc::Receiver<SpanData>,
    exported: IntCounter,
    dropped: IntCounterVec,
    requests: IntCounterVec,
}

impl Worker {
    async fn run(
        mut self,
        exporter: SpanExporter,
        config: &ExportConfig,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        tokio::pin!(stop);
        let mut stopping = false;
        while !stopping {
            let mut batch = Vec::with_capacity(config.max_batch_size);
            // Wait for a first span, then up to the schedule delay for a full batch.
            tokio::select! {
                n = self.rx.recv_many(&mut batch, config.max_batch_size) => if n == 0 { return },
                _ = &mut stop => stopping = true,
            }
            let deadline = tokio::time::Instant::now() + config.schedule_delay;
            while !stopping && batch.len() < config.max_batch_size {
                let room = config.max_batch_size - batch.len();
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, room) => if n == 0 { break },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = &mut stop => stopping = true,
                }
            }
            if stopping {
                // Flush: what is queued now, in batches; the caller bounds the wait.
                self.rx.close();
                while let Ok(span) = self.rx.try_recv() {
                    batch.push(span);
                    if batch.len() == config.max_batch_size {
                        self.export(&exporter, std::mem::take(&mut batch), config.export_timeout).await;
                    }
                }
            }
            if !batch.is_empty() {
                self.export(&exporter, batch, config.export_timeout).await;
            }
        }
        let _ = exporter.shutdown();
    }

    async fn export(&self, exporter: &SpanExporter, batch: Vec<SpanData>, timeout: Duration) {
        let n = batch.len() as u64;
        // The exporter has its own timeout; this one also bounds a connect that hangs.
        match tokio::time::timeout(timeout + Duration::from_secs(1), exporter.export(batch)).await {
            Ok(Ok(())) => {
                self.exported.inc_by(n);
                self.requests.with_label_values(&["success"]).inc();
            }
            Ok(Err(e)) => self.failed(n, &e.to_string()),
            Err(_) => self.failed(n, "timed out"),
        }
    }

    fn failed(&self, n: u64, why: &str) {
        self.dropped.with_label_values(&["export_failed"]).inc_by(n);
        self.requests.with_label_values(&["failure"]).inc();
        tracing::debug!(spans = n, error = why, "span export failed; the batch is dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Option<ExportConfig>, ExportError> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ExportConfig::from_env(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn off_without_an_endpoint_or_with_exporter_none() {
        assert!(config(&[]).expect("valid").is_none());
        assert!(config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).expect("valid").is_none());
        let none = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_TRACES_EXPORTER", "none")];
        assert!(config(&none).expect("valid").is_none());
    }

    #[test]
    fn reads_protocol_and_batch_settings() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).expect("valid").expect("on");
        assert_eq!(c.protocol, Protocol::HttpProtobuf, "the spec's default");
        assert_eq!((c.max_queue_size, c.max_batch_size), (2048, 512));
        assert_eq!(c.schedule_delay, Duration::from_secs(5));
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ])
        .expect("valid")
        .expect("on");
        assert_eq!(c.protocol, Protocol::Grpc, "the signal's own variable wins");
        assert_eq!((c.max_queue_size, c.max_batch_size), (100, 100));
        assert_eq!(c.schedule_delay, Duration::from_millis(50));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .expect_err("rejected");
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\""), "{e}");
        let e = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_BSP_MAX_QUEUE_SIZE", "0")])
            .expect_err("rejected");
        assert!(e.to_string().contains("OTEL_BSP_MAX_QUEUE_SIZE"), "{e}");
        let e = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c")]).expect_err("rejected");
        assert!(e.to_string().contains("https"), "{e}");
    }
}
