//! Helpers shared by the control plane's integration tests. Each test binary uses a
//! subset of them.
#![allow(dead_code)]

pub mod etcd;
pub mod fake_api;
pub mod identity;
pub mod promtool;

use std::future::Future;
use std::time::Duration;

/// How long [`until`] and the tests' other waits give a condition.
pub const WAIT: Duration = Duration::from_secs(10);
/// How often [`until`] looks.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns `Some`, for at most [`WAIT`].
pub async fn until<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The value of the sample `series` (a metric name with its labels, as exposed) in the
/// text exposition `text`: the whole line must be that series and one value, so that
/// `x{a="b"}` neither matches `x{a="b",c="d"}` nor reads `1` out of `10`.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

/// Runs `command` to its end and returns its output; a command still running after
/// `timeout` is killed and the test fails.
pub async fn output_within(mut command: tokio::process::Command, timeout: Duration) -> std::process::Output {
    use std::process::Stdio;
    command.kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("the command starts");
    // On a timeout the child is dropped, which kills it (kill_on_drop).
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.expect("the command's output"),
        Err(_) => panic!("{command:?} still ran after {timeout:?}; killed"),
    }
}

/// A store for a test, on one backend: the embedded one, or a real etcd started for it
/// (and stopped when this is dropped).
pub struct Backend {
    pub store: ballast_control_plane::store::Store,
    _etcd: Option<etcd::EtcdServer>,
}

impl Backend {
    pub async fn memory() -> Self {
        Self { store: ballast_control_plane::store::Store::memory(), _etcd: None }
    }

    pub async fn etcd() -> Self {
        let server = etcd::EtcdServer::start();
        let store = ballast_control_plane::store::Store::etcd(&[server.endpoint()])
            .await
            .expect("connect to the test etcd");
        Self { store, _etcd: Some(server) }
    }
}

/// Each test once on the embedded store and once on a real etcd ([`Backend`]); the
/// test file needs `Backend` in scope (`use support::Backend`).
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::memory().await.store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = super::Backend::etcd().await;
                    super::$name(backend.store.clone()).await;
                }
            )*
        }
    };
}
