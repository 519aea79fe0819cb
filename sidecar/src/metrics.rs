//! Prometheus metrics of DESIGN §7.
//!
//! One [`Metrics`] per process, cheap to clone. Label values are bounded: `service` is a
//! configured service (`name.namespace`), `passthrough` for traffic to unknown
//! destinations, or the local service name on the inbound side. Never an address or host
//! taken from a request, which a client could use to blow up the series count.
//!
//! The text is encoded in the classic Prometheus format, which `promtool check metrics`
//! in Debian's prometheus 2.42 reads (it does not parse OpenMetrics).

use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label value for requests to destinations that match no configured service.
pub const PASSTHROUGH: &str = "passthrough";

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

pub struct Inner {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub tcp_connections_open: IntGaugeVec,
    pub tcp_connections_total: IntCounterVec,
    pub tcp_read_bytes: IntCounterVec,
    pub tcp_write_bytes: IntCounterVec,
    pub detect_timeouts: IntCounterVec,
    pub rejections_total: IntCounterVec,
    pub config_version: IntGauge,
    pub config_reload_errors: IntCounterVec,
    pub control_plane_connected: IntGauge,
    pub endpoints: IntGaugeVec,
    pub retries_total: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    pub identity_certificate_expiry: IntGauge,
    pub identity_certify_total: IntCounterVec,
    pub mesh_tls_handshakes: IntCounterVec,
    pub inbound_peer_requests: IntCounterVec,
    pub trace_spans_exported: prometheus::IntCounter,
    pub trace_spans_dropped: IntCounterVec,
    pub trace_export_requests: IntCounterVec,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// Latency buckets from 0.5 ms to 30 s: sidecar-added latency is sub-millisecond, and
/// operators look at the tail in seconds.
const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            // Registration only fails on a duplicate or inconsistent descriptor, which is a
            // programming error caught by the unit test below.
            r.register(Box::new(c.clone())).expect("metric descriptors are valid and unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
        };
        let inner = Inner {
            requests_total: counter(
                "ballast_requests_total",
                "HTTP requests completed, by direction, service, response status code and outcome (success, failure, rejected, error).",
                &["direction", "service", "status_code", "outcome"],
            ),
            request_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "ballast_request_duration_seconds",
                        "Time from receiving a request to sending its response headers.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["direction", "service"],
                )
                .expect("valid histogram"),
            ),
            tcp_connections_open: gauge_vec(
                "ballast_tcp_connections_open",
                "Accepted TCP connections currently open.",
                &["direction"],
            ),
            tcp_connections_total: counter(
                "ballast_tcp_connections_total",
                "Accepted TCP connections, by detected protocol (http1, http2, tls, opaque).",
                &["direction", "protocol"],
            ),
            tcp_read_bytes: counter(
                "ballast_tcp_read_bytes_total",
                "Bytes read from downstream peers of opaque and TLS connections.",
                &["direction"],
            ),
            tcp_write_bytes: counter(
                "ballast_tcp_write_bytes_total",
                "Bytes written to downstream peers of opaque and TLS connections.",
                &["direction"],
            ),
            detect_timeouts: counter(
                "ballast_protocol_detect_timeouts_total",
                "Connections whose client sent nothing before the detection timeout (forwarded as opaque TCP).",
                &["direction"],
            ),
            rejections_total: counter(
                "ballast_rejections_total",
                "Requests the mesh answered itself instead of the upstream, by reason.",
                &["direction", "service", "reason"],
            ),
            config_version: reg(
                &registry,
                IntGauge::new("ballast_config_version", "Version of the applied configuration.")
                    .expect("valid gauge"),
            ),
            config_reload_errors: counter(
                "ballast_config_rejected_total",
                "Configurations rejected (the previous one stays applied), by source.",
                &["source"],
            ),
            control_plane_connected: reg(
                &registry,
                IntGauge::new(
                    "ballast_control_plane_connected",
                    "1 while the control plane stream is up, else 0.",
                )
                .expect("valid gauge"),
            ),
            endpoints: gauge_vec(
                "ballast_endpoints",
                "Endpoints per service, by state.",
                &["service", "state"],
            ),
            retries_total: counter(
                "ballast_retries_total",
                "Retries sent (tries after the first), by service.",
                &["service"],
            ),
            retry_budget_exhausted: counter(
                "ballast_retry_budget_exhausted_total",
                "Retries not sent because the retry budget was spent; the upstream's response was returned.",
                &["service"],
            ),
            circuit_state: gauge_vec(
                "ballast_circuit_state",
                "Circuit breaker state per service: 0 closed, 1 open, 2 half-open.",
                &["service"],
            ),
            identity_certificate_expiry: reg(
                &registry,
                IntGauge::new(
                    "ballast_identity_certificate_expiry_timestamp_seconds",
                    "When this sidecar's workload certificate expires (Unix seconds); 0 before the first.",
                )
                .expect("valid gauge"),
            ),
            identity_certify_total: counter(
                "ballast_identity_certify_total",
                "Workload certificate requests to the control plane, by result (issued, failed).",
                &["result"],
            ),
            mesh_tls_handshakes: counter(
                "ballast_mesh_tls_handshakes_total",
                "Mesh mutual TLS handshakes, by direction and result (ok, failed).",
                &["direction", "result"],
            ),
            inbound_peer_requests: counter(
                "ballast_inbound_requests_by_peer_total",
                "Inbound HTTP requests by the caller's verified identity (SPIFFE ID; empty for plain text) and whether they came over mesh TLS.",
                &["service", "peer_identity", "tls"],
            ),
            trace_spans_exported: reg(
                &registry,
                prometheus::IntCounter::new(
                    "ballast_trace_spans_exported_total",
                    "Spans the OTLP exporter delivered to the collector.",
                )
                .expect("valid counter"),
            ),
            trace_spans_dropped: counter(
                "ballast_trace_spans_dropped_total",
                "Spans that were never delivered: queue_full (the export queue was full, the data path does not wait), export_failed (the collector refused or could not be reached), shutdown (still queued when the sidecar stopped).",
                &["reason"],
            ),
            trace_export_requests: counter(
                "ballast_trace_export_requests_total",
                "OTLP export calls (one per batch of spans) by result.",
                &["result"],
            ),
            registry,
        };
        Metrics { inner: Arc::new(inner) }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed metric.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements `ballast_tcp_connections_open` when dropped.
pub struct OpenConnection(IntGauge);

impl OpenConnection {
    pub fn new(metrics: &Metrics, direction: &str) -> Self {
        let g = metrics.tcp_connections_open.with_label_values(&[direction]);
        g.inc();
        OpenConnection(g)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let m = Metrics::new();
        m.requests_total.with_label_values(&["outbound", "a.default", "200", "success"]).inc();
        m.config_version.set(3);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains("ballast_requests_total{direction=\"outbound\",outcome=\"success\",service=\"a.default\",status_code=\"200\"} 1"), "{text}");
        assert!(text.contains("ballast_config_version 3"));
    }
}
