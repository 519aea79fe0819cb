//! `routes`: per-route overrides of `timeouts` and `retries`.
//!
//! Each route gets its own small stack — the request's time limits, faults, retry — over
//! the service's shared circuit breaker and balancer, and a router sends each request
//! down the first route whose `match` it meets, else the policy's default. A
//! route's `timeouts` and `retries` override the policy's field by field: a route that
//! says `retries: {attempts: 0}` keeps the policy's conditions and backoff but never
//! retries; `timeouts: {request: 5s}` keeps the policy's `perTry`. Every route draws on
//! the service's one retry budget.
//!
//! A match is a path prefix (compared on the path, without the query) and/or a list of
//! methods; an empty match takes every request.

use std::sync::Arc;

use ballast_api::policy::{PolicySpec, Retries, RouteMatch, Timeouts};

use super::retry::{Retry, RetryConfig, RetryShared};
use super::{Guard, faults, timeout};
use crate::stack::{HttpRequest, HttpService};

/// The policy's route stacks over `lower` (the breaker and balancer).
pub fn routes(lower: HttpService, policy: &PolicySpec, budget: &RetryShared) -> HttpService {
    let default =
        route_stack(lower.clone(), policy.timeouts.as_ref(), policy.retries.as_ref(), policy, budget);
    if policy.routes.is_empty() {
        return default;
    }
    let routes = policy
        .routes
        .iter()
        .map(|r| {
            let timeouts = merge_timeouts(policy.timeouts.as_ref(), r.timeouts.as_ref());
            let retries = merge_retries(policy.retries.as_ref(), r.retries.as_ref());
            (
                r.match_.clone(),
                route_stack(lower.clone(), timeouts.as_ref(), retries.as_ref(), policy, budget),
            )
        })
        .collect();
    // Sends each request down the first matching route.
    let routes: Arc<Vec<(RouteMatch, HttpService)>> = Arc::new(routes);
    HttpService::from_fn(move |req: HttpRequest| {
        let svc = routes.iter().find(|(m, _)| matches(m, &req)).map(|(_, s)| s).unwrap_or(&default);
        svc.call(req)
    })
}

fn route_stack(
    lower: HttpService,
    timeouts: Option<&Timeouts>,
    retries: Option<&Retries>,
    policy: &PolicySpec,
    budget: &RetryShared,
) -> HttpService {
    let mut svc = lower;
    if let Some(r) = retries {
        let config = RetryConfig::from_policy(r);
        if config.attempts > 0 {
            svc = Retry::new(config, budget.clone()).layer(svc);
        }
    }
    if let Some(f) = &policy.faults {
        svc = faults::Faults::new(f.clone()).layer(svc);
    }
    // Every layer below bounds its waits by the limits (see `timeout`).
    timeout::limits(
        svc,
        timeouts.and_then(|t| t.request).map(|d| d.get()),
        timeouts.and_then(|t| t.per_try).map(|d| d.get()),
    )
}

fn merge_timeouts(base: Option<&Timeouts>, over: Option<&Timeouts>) -> Option<Timeouts> {
    match (base, over) {
        (b, None) => b.cloned(),
        (None, Some(o)) => Some(o.clone()),
        (Some(b), Some(o)) => Some(Timeouts {
            request: o.request.or(b.request),
            per_try: o.per_try.or(b.per_try),
            connect: o.connect.or(b.connect),
            idle: o.idle.or(b.idle),
        }),
    }
}

fn merge_retries(base: Option<&Retries>, over: Option<&Retries>) -> Option<Retries> {
    match (base, over) {
        (b, None) => b.cloned(),
        (None, Some(o)) => Some(o.clone()),
        (Some(b), Some(o)) => Some(Retries {
            attempts: o.attempts.or(b.attempts),
            on: if o.on.is_empty() { b.on.clone() } else { o.on.clone() },
            backoff: o.backoff.or(b.backoff),
            budget: b.budget,
            non_idempotent: o.non_idempotent.or(b.non_idempotent),
        }),
    }
}

fn matches(m: &RouteMatch, req: &HttpRequest) -> bool {
    m.path_prefix.as_deref().is_none_or(|p| req.uri().path().starts_with(p))
        && (m.methods.is_empty() || m.methods.iter().any(|x| x == req.method().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str) -> HttpRequest {
        http::Request::builder().method(method).uri(uri).body(crate::body::empty()).expect("request")
    }

    #[test]
    fn match_by_prefix_and_method() {
        let m = RouteMatch { path_prefix: Some("/charge".into()), methods: vec!["POST".into()] };
        assert!(matches(&m, &req("POST", "http://pay/charge/1?x=1")));
        assert!(!matches(&m, &req("GET", "/charge")));
        assert!(!matches(&m, &req("POST", "/refund")));
        assert!(matches(&RouteMatch::default(), &req("DELETE", "/")));
    }

    #[test]
    fn route_fields_override_the_policy_one_by_one() {
        let d = |s: &str| s.parse::<ballast_api::Duration>().expect("duration");
        let base = Timeouts { request: Some(d("2s")), per_try: Some(d("500ms")), ..Default::default() };
        let over = Timeouts { request: Some(d("5s")), ..Default::default() };
        let t = merge_timeouts(Some(&base), Some(&over)).expect("merged");
        assert_eq!((t.request, t.per_try), (Some(d("5s")), Some(d("500ms"))));
        let base = Retries { attempts: Some(3), on: vec!["5xx".parse().expect("on")], ..Default::default() };
        let over = Retries { attempts: Some(0), ..Default::default() };
        let r = merge_retries(Some(&base), Some(&over)).expect("merged");
        assert_eq!(r.attempts, Some(0));
        assert_eq!(r.on, base.on);
    }
}
