//! The control plane's Prometheus metrics (`/metrics` on the admin port).
//!
//! Named like the sidecars' (DESIGN §7: `ballast_` prefix, base units, counters ending
//! `_total`), under `ballast_control_plane_` so one Prometheus can scrape both without
//! the names colliding.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

pub struct Inner {
    registry: Registry,
    /// Sidecar streams open on this replica.
    pub proxies_connected: IntGauge,
    /// Configurations pushed, by kind (`full` or `incremental`).
    pub pushes: IntCounterVec,
    /// From sending a version to its ack.
    pub push_ack_seconds: Histogram,
    pub nacks: IntCounter,
    /// Failed store operations, by operation.
    pub store_errors: IntCounterVec,
    /// 1 while the mesh follows the store (read done, watch open).
    pub store_connected: IntGauge,
    /// The store revision the mesh has applied.
    pub mesh_revision: IntGauge,
    /// The Kubernetes sync ([`crate::kubernetes`]): 1 while this replica holds its lock.
    pub kubernetes_leader: IntGauge,
    /// 1 once this replica, as leader, completed a full sync in its current term.
    pub kubernetes_synced: IntGauge,
    /// Kubernetes objects watched, by kind.
    pub kubernetes_objects: IntGaugeVec,
    /// ResiliencePolicy resources by their `Accepted` reason.
    pub kubernetes_policies: IntGaugeVec,
    /// Keys the sync put or deleted, by kind and operation.
    pub kubernetes_store_writes: IntCounterVec,
    /// Status writes, by the `Accepted` reason written.
    pub kubernetes_status_writes: IntCounterVec,
    /// Full comparisons of Kubernetes with the store.
    pub kubernetes_full_syncs: IntCounter,
    /// Failures, by operation.
    pub kubernetes_errors: IntCounterVec,
    /// Certify calls by result (`issued`, `unauthenticated`, `denied`, `invalid`, `error`).
    pub certificates_issued: IntCounterVec,
    /// The mesh CA certificate's expiry (unix seconds), with identity on; 0 otherwise.
    pub ca_expiry: IntGauge,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// From 1 ms (a push on loopback) to 10 s (a sidecar stuck applying).
const PUSH_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            // Only a duplicate or inconsistent descriptor fails, a programming error that
            // the unit test below catches.
            r.register(Box::new(c.clone())).expect("metric descriptors are valid and unique");
            c
        }
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid gauge"));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"))
        };
        let inner = Inner {
            proxies_connected: gauge(
                "ballast_control_plane_proxies_connected",
                "Sidecar streams open on this control-plane replica.",
            ),
            pushes: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "ballast_control_plane_pushes_total",
                        "Configurations pushed to sidecars, by kind (full snapshot or incremental).",
                    ),
                    &["kind"],
                )
                .expect("valid counter"),
            ),
            push_ack_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ballast_control_plane_push_ack_seconds",
                        "Time from pushing a configuration version to the sidecar's ack.",
                    )
                    .buckets(PUSH_BUCKETS.to_vec()),
                )
                .expect("valid histogram"),
            ),
            nacks: reg(
                &registry,
                IntCounter::new(
                    "ballast_control_plane_nacks_total",
                    "Configuration versions sidecars refused (they keep their previous one).",
                )
                .expect("valid counter"),
            ),
            store_errors: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "ballast_control_plane_store_errors_total",
                        "Failed store (etcd) operations, by operation.",
                    ),
                    &["operation"],
                )
                .expect("valid counter"),
            ),
            store_connected: gauge(
                "ballast_control_plane_store_connected",
                "1 while the mesh follows the store (read done, watch open), 0 while it retries.",
            ),
            mesh_revision: gauge(
                "ballast_control_plane_mesh_revision",
                "The store revision the in-memory mesh has applied.",
            ),
            kubernetes_leader: gauge(
                "ballast_control_plane_kubernetes_leader",
                "1 while this replica holds the Kubernetes sync's lock and mirrors Kubernetes into the store.",
            ),
            kubernetes_synced: gauge(
                "ballast_control_plane_kubernetes_synced",
                "1 once this replica, as the Kubernetes sync's leader, completed a full sync; 0 otherwise.",
            ),
            kubernetes_objects: gauge_vec(
                "ballast_control_plane_kubernetes_objects",
                "Kubernetes objects the sync watches, by kind (ResiliencePolicy, Service, EndpointSlice).",
                &["kind"],
            ),
            kubernetes_policies: gauge_vec(
                "ballast_control_plane_kubernetes_policies",
                "ResiliencePolicy resources by the reason of their Accepted condition (Accepted, Invalid, Conflict).",
                &["reason"],
            ),
            kubernetes_store_writes: counter_vec(
                "ballast_control_plane_kubernetes_store_writes_total",
                "Keys the Kubernetes sync wrote to or deleted from the store, by kind (policy, service, endpoint) and operation (put, delete).",
                &["kind", "operation"],
            ),
            kubernetes_status_writes: counter_vec(
                "ballast_control_plane_kubernetes_status_writes_total",
                "ResiliencePolicy status updates the Kubernetes sync wrote, by the reason of the Accepted condition.",
                &["reason"],
            ),
            kubernetes_full_syncs: reg(
                &registry,
                IntCounter::new(
                    "ballast_control_plane_kubernetes_full_syncs_total",
                    "Full resyncs: every ResiliencePolicy, Service and EndpointSlice compared with a full read of the store. One when a new leader term has listed all three kinds, one per later re-list of any kind, one per retry after a failed pass.",
                )
                .expect("valid counter"),
            ),
            kubernetes_errors: counter_vec(
                "ballast_control_plane_kubernetes_errors_total",
                "Failures of the Kubernetes sync, by operation (watch, store, status, lock); each is retried.",
                &["operation"],
            ),
            certificates_issued: counter_vec(
                "ballast_control_plane_certificates_issued_total",
                "Workload certificate requests (Identity/Certify), by result: issued, unauthenticated (bad, unknown or expired token), denied (token for another identity), invalid (bad CSR or names), error (store, Kubernetes API or CA failure).",
                &["result"],
            ),
            ca_expiry: gauge(
                "ballast_control_plane_ca_expiry_timestamp_seconds",
                "When the mesh CA certificate expires, in seconds since the Unix epoch (0 with identity off). Rotate the CA well before.",
            ),
            registry,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on a metric family that cannot be encoded,
        // which the registry does not produce.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_encodes() {
        let m = Metrics::new();
        m.pushes.with_label_values(&["full"]).inc();
        m.store_errors.with_label_values(&["put"]).inc();
        m.kubernetes_objects.with_label_values(&["Service"]).set(2);
        m.kubernetes_policies.with_label_values(&["Accepted"]).set(1);
        m.kubernetes_store_writes.with_label_values(&["endpoint", "put"]).inc();
        m.kubernetes_status_writes.with_label_values(&["Invalid"]).inc();
        m.kubernetes_errors.with_label_values(&["watch"]).inc();
        m.certificates_issued.with_label_values(&["issued"]).inc();
        let text = String::from_utf8(m.encode()).expect("utf-8");
        for name in [
            "ballast_control_plane_proxies_connected",
            "ballast_control_plane_pushes_total",
            "ballast_control_plane_push_ack_seconds_bucket",
            "ballast_control_plane_nacks_total",
            "ballast_control_plane_store_errors_total",
            "ballast_control_plane_store_connected",
            "ballast_control_plane_mesh_revision",
            "ballast_control_plane_kubernetes_leader",
            "ballast_control_plane_kubernetes_synced",
            "ballast_control_plane_kubernetes_objects",
            "ballast_control_plane_kubernetes_policies",
            "ballast_control_plane_kubernetes_store_writes_total",
            "ballast_control_plane_kubernetes_status_writes_total",
            "ballast_control_plane_kubernetes_full_syncs_total",
            "ballast_control_plane_kubernetes_errors_total",
            "ballast_control_plane_certificates_issued_total",
            "ballast_control_plane_ca_expiry_timestamp_seconds",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
