//! Helpers shared by the control plane's integration tests. Each test binary uses a
//! subset of them.
#![allow(dead_code)]

pub mod etcd;
pub mod fake_api;
pub mod identity;
pub mod promtool;

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
