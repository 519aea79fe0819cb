//! One term as leader: three watchers (ResiliencePolicies, Services, EndpointSlices, all
//! namespaces), their caches, and the passes that bring the store in line with them.
//!
//! Every event is handled in this one task, in order, so no two passes race each other
//! for the same keys. What each event costs:
//!
//! * a policy change: one list of `<prefix>/policies/` and a pass over every policy
//!   (conflicts span policies, and there is at most one per service);
//! * a Service or EndpointSlice change: the keys of that one service, read and fixed;
//! * a (re)list (`InitDone`, on start and whenever the watcher had to list again): once
//!   all three kinds are listed, a full resync: every kind against a full read of the
//!   store, which also deletes what the sync wrote for objects deleted while nobody
//!   watched (`ballast_control_plane_kubernetes_full_syncs_total` counts these: one when
//!   the term's three lists are in, one per later re-list, one per retry after a
//!   failure). Before that, the passes of the kinds listed so far.
//!
//! Services and endpoints are compared only once both Services and EndpointSlices are
//! listed: compared against half the picture, every endpoint would look deleted.
//!
//! A pass that fails (the store down, a write contended) is not retried alone: a full
//! pass of everything is owed and runs after a jittered backoff (0.5 s doubling up to
//! 30 s), until one succeeds. The first full sync of the term is done when all three
//! kinds are listed and nothing is owed.
//!
//! A status write that fails (RBAC without `patch` on `resiliencepolicies/status`, the
//! API server refusing it) leaves the store right, so it neither makes a full pass owed
//! nor holds back the first full sync (and so `/ready`): it is counted
//! (`ballast_control_plane_kubernetes_errors_total{operation="status"}`), logged, and
//! the statuses alone are written again after their own backoff, until they go
//! through.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;

use ballast_api::crd::{AcceptedReason, ResiliencePolicyResource};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::time::Instant;

use super::cache::{Cache, Change, name_of};
use super::mirror::{self, ATTEMPTS, ServiceKeys, commit, plan_service, read_service, read_services};
use super::policies::{self, Outcome, StoredPolicy};
use super::services::{self, SERVICE_NAME_LABEL, slice_service};
use super::status::StatusWriter;
use super::{Context, KubernetesError, SyncState};
use crate::keys::Key;
use crate::mesh::Name;

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

struct Term<'a> {
    ctx: &'a Context,
    policies: Cache<ResiliencePolicyResource>,
    services: Cache<KubeService>,
    slices: Cache<EndpointSlice>,
    status: StatusWriter,
    /// Each policy's outcome in the last policy pass, for the statuses.
    outcomes: BTreeMap<Name, Outcome>,
    /// A status write failed since the statuses were last written in full.
    status_failed: Option<KubernetesError>,
}

/// Runs the term until the caller drops it (lease lost, or stopping): it never returns.
pub async fn run(ctx: &Context, state: &watch::Sender<SyncState>) -> Infallible {
    let client = ctx.client.clone();
    let config = watcher::Config::default();
    let mut policies = watcher(Api::<ResiliencePolicyResource>::all(client.clone()), config.clone())
        .default_backoff()
        .boxed();
    let mut services =
        watcher(Api::<KubeService>::all(client.clone()), config.clone()).default_backoff().boxed();
    // Only the slices that belong to a Service.
    let mut slices = watcher(Api::<EndpointSlice>::all(client.clone()), config.labels(SERVICE_NAME_LABEL))
        .default_backoff()
        .boxed();
    let mut term = Term {
        ctx,
        policies: Cache::default(),
        services: Cache::default(),
        slices: Cache::default(),
        status: StatusWriter::new(client),
        outcomes: BTreeMap::new(),
        status_failed: None,
    };
    let mut owed: Option<Instant> = None;
    let mut retry = RETRY_MIN;
    // The statuses' own retry: they never hold back the store's passes or readiness.
    let mut statuses_owed: Option<Instant> = None;
    let mut status_retry = RETRY_MIN;
    let mut synced = false;
    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        let result = tokio::select! {
            Some(e) = policies.next() => match e {
                Ok(e) => { let change = term.policies.apply(e); term.on_policy(change).await }
                Err(e) => { term.watch_failed("resiliencepolicies.ballast.io", &e); Ok(()) }
            },
            Some(e) = services.next() => match e {
                Ok(e) => { let change = term.services.apply(e); term.on_service(change).await }
                Err(e) => { term.watch_failed("services", &e); Ok(()) }
            },
            Some(e) = slices.next() => match e {
                Ok(e) => { let change = term.slices.apply(e); term.on_slice(change).await }
                Err(e) => { term.watch_failed("endpointslices.discovery.k8s.io", &e); Ok(()) }
            },
            _ = tokio::time::sleep_until(owed.unwrap_or(far)), if owed.is_some() => {
                owed = None;
                let r = term.full().await;
                if r.is_ok() {
                    tracing::info!("Kubernetes and the store agree again");
                    retry = RETRY_MIN;
                }
                r
            }
            _ = tokio::time::sleep_until(statuses_owed.unwrap_or(far)), if statuses_owed.is_some() => {
                statuses_owed = None;
                term.write_statuses().await;
                Ok(())
            }
        };
        term.count();
        match term.status_failed.take() {
            Some(e) => {
                ctx.metrics.kubernetes_errors.with_label_values(&[e.operation()]).inc();
                if statuses_owed.is_none() {
                    let delay = status_retry.mul_f64(rand::random_range(0.8..1.2));
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot write a ResiliencePolicy status; the store is in line, the statuses are written again later");
                    statuses_owed = Some(Instant::now() + delay);
                    status_retry = (status_retry * 2).min(RETRY_MAX);
                } else {
                    tracing::warn!(error = %e, "cannot write a ResiliencePolicy status; a retry is already due");
                }
            }
            // Every status went through (a pass wrote them all, or had none to write).
            None if statuses_owed.is_none() => status_retry = RETRY_MIN,
            None => {}
        }
        if let Err(e) = result {
            ctx.metrics.kubernetes_errors.with_label_values(&[e.operation()]).inc();
            if owed.is_none() {
                let delay = retry.mul_f64(rand::random_range(0.8..1.2));
                tracing::warn!(error = %e, retry_in = ?delay, "the Kubernetes sync failed; a full pass follows");
                owed = Some(Instant::now() + delay);
                retry = (retry * 2).min(RETRY_MAX);
            } else {
                tracing::warn!(error = %e, "the Kubernetes sync failed; a full pass is already due");
            }
        }
        if !synced && owed.is_none() && term.listed() {
            synced = true;
            ctx.metrics.kubernetes_synced.set(1);
            state.send_modify(|s| {
                s.synced = true;
                s.ready = true;
            });
            tracing::info!(
                policies = term.policies.len(),
                services = term.services.len(),
                endpoint_slices = term.slices.len(),
                "first full sync from Kubernetes done"
            );
        }
    }
}

impl Term<'_> {
    fn listed(&self) -> bool {
        self.policies.listed() && self.services.listed() && self.slices.listed()
    }

    fn count(&self) {
        let objects = &self.ctx.metrics.kubernetes_objects;
        objects.with_label_values(&["ResiliencePolicy"]).set(self.policies.len() as i64);
        objects.with_label_values(&["Service"]).set(self.services.len() as i64);
        objects.with_label_values(&["EndpointSlice"]).set(self.slices.len() as i64);
    }

    fn watch_failed(&self, resource: &'static str, e: &watcher::Error) {
        let e = KubernetesError::watch(resource, e);
        self.ctx.metrics.kubernetes_errors.with_label_values(&[e.operation()]).inc();
        tracing::warn!(error = %e, "Kubernetes watch failed; retrying with backoff");
    }

    async fn on_policy(&mut self, change: Change<ResiliencePolicyResource>) -> Result<(), KubernetesError> {
        match change {
            Change::None => Ok(()),
            Change::Relisted => self.full().await,
            Change::Object { .. } => self.sync_policies().await,
        }
    }

    async fn on_service(&mut self, change: Change<KubeService>) -> Result<(), KubernetesError> {
        match change {
            Change::None => Ok(()),
            Change::Relisted => self.full().await,
            Change::Object { before, after } => match after.as_ref().or(before.as_ref()) {
                Some(s) => self.sync_service(&name_of(s)).await,
                None => Ok(()),
            },
        }
    }

    async fn on_slice(&mut self, change: Change<EndpointSlice>) -> Result<(), KubernetesError> {
        match change {
            Change::None => Ok(()),
            Change::Relisted => self.full().await,
            Change::Object { before, after } => {
                // A slice that moved to another Service (its label changed) touches both.
                let touched: BTreeSet<Name> =
                    [before, after].iter().flatten().filter_map(slice_service).collect();
                for name in touched {
                    self.sync_service(&name).await?;
                }
                Ok(())
            }
        }
    }

    /// Everything, against a full read of the store: a full resync, the one place it is
    /// counted, once all three kinds are listed; before that, the passes of the kinds
    /// listed so far.
    async fn full(&mut self) -> Result<(), KubernetesError> {
        if self.listed() {
            self.ctx.metrics.kubernetes_full_syncs.inc();
        }
        let policies = self.sync_policies().await;
        let services = self.sync_all_services().await;
        policies.and(services)
    }

    /// Every policy: the store's policies written and deleted, then the statuses (whose
    /// failures go to `status_failed`, not into the result).
    async fn sync_policies(&mut self) -> Result<(), KubernetesError> {
        if !self.policies.listed() {
            return Ok(());
        }
        let Context { store, keys, metrics, .. } = self.ctx;
        for _ in 0..ATTEMPTS {
            let (kvs, _) = store.list(&keys.kind_root("policies")).await?;
            let stored: BTreeMap<Name, StoredPolicy> = kvs
                .into_iter()
                .filter_map(|kv| match keys.parse(&kv.key) {
                    Some(Key::Policy { namespace, name }) => {
                        Some(((namespace, name), StoredPolicy::from_kv(kv)))
                    }
                    _ => None,
                })
                .collect();
            let resources: Vec<&ResiliencePolicyResource> = self.policies.values().collect();
            let plan = policies::plan(keys, &resources, &stored);
            if !commit(store, metrics, plan.ops).await? {
                continue;
            }
            let mut by_reason: BTreeMap<&str, i64> = BTreeMap::new();
            for outcome in plan.outcomes.values() {
                *by_reason.entry(outcome.reason.as_str()).or_default() += 1;
            }
            for reason in [AcceptedReason::Accepted, AcceptedReason::Invalid, AcceptedReason::Conflict] {
                let n = by_reason.get(reason.as_str()).copied().unwrap_or(0);
                metrics.kubernetes_policies.with_label_values(&[reason.as_str()]).set(n);
            }
            self.outcomes = plan.outcomes;
            self.write_statuses().await;
            let cache = &self.policies;
            self.status.retain(|ns, name, uid| {
                cache
                    .get(&(ns.to_owned(), name.to_owned()))
                    .is_some_and(|r| r.metadata.uid.as_deref().unwrap_or_default() == uid)
            });
            return Ok(());
        }
        Err(KubernetesError::Contended { what: format!("the policies under {}", keys.kind_root("policies")) })
    }

    /// Each policy's status for its outcome in the last policy pass (only those that
    /// change). The first failure is kept in `status_failed`; the rest are still tried.
    async fn write_statuses(&mut self) {
        let metrics = &self.ctx.metrics;
        for r in self.policies.values() {
            let Some(outcome) = self.outcomes.get(&name_of(r)) else { continue };
            if let Err(e) = self.status.write(r, outcome, metrics).await {
                self.status_failed.get_or_insert(e);
            }
        }
    }

    fn both_listed(&self) -> bool {
        self.services.listed() && self.slices.listed()
    }

    /// What the store should hold for `name`, from the caches.
    fn desired(&self, name: &Name, slices: &[&EndpointSlice]) -> Option<services::Mirrored> {
        services::mirror(self.services.get(name)?, slices)
    }

    /// One service's keys, read now and fixed.
    async fn sync_service(&mut self, name: &Name) -> Result<(), KubernetesError> {
        if !self.both_listed() {
            return Ok(());
        }
        let Context { store, keys, metrics, .. } = self.ctx;
        let slices: Vec<&EndpointSlice> =
            self.slices.values().filter(|s| slice_service(s).as_ref() == Some(name)).collect();
        let desired = self.desired(name, &slices);
        for _ in 0..ATTEMPTS {
            let current = read_service(store, keys, name).await?;
            let ops = plan_service(keys, name, desired.as_ref(), &current);
            if ops.is_empty() || commit(store, metrics, ops).await? {
                return Ok(());
            }
        }
        Err(KubernetesError::Contended { what: format!("the keys of service {}/{}", name.0, name.1) })
    }

    /// Every service, against one read of the store: what Kubernetes has, and whatever
    /// the sync wrote before for services Kubernetes no longer has.
    async fn sync_all_services(&mut self) -> Result<(), KubernetesError> {
        if !self.both_listed() {
            return Ok(());
        }
        let Context { store, keys, metrics, .. } = self.ctx;
        let current = read_services(store, keys).await?;
        let mut grouped: BTreeMap<Name, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in self.slices.values() {
            if let Some(name) = slice_service(s) {
                grouped.entry(name).or_default().push(s);
            }
        }
        let names: BTreeSet<Name> = self
            .services
            .values()
            .map(name_of)
            .chain(current.iter().filter(|(_, k)| k.owns_any()).map(|(n, _)| n.clone()))
            .collect();
        let none = ServiceKeys::default();
        let mut contended = Vec::new();
        for name in names {
            let slices = grouped.get(&name).map(Vec::as_slice).unwrap_or_default();
            let desired = self.desired(&name, slices);
            let ops = plan_service(keys, &name, desired.as_ref(), current.get(&name).unwrap_or(&none));
            if !ops.is_empty() && !mirror::commit(store, metrics, ops).await? {
                contended.push(name);
            }
        }
        // Written by someone else since the read: each one again, from a fresh read.
        for name in contended {
            self.sync_service(&name).await?;
        }
        Ok(())
    }
}
