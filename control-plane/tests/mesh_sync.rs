//! The control plane's view of the mesh survives etcd going away and coming back: it
//! keeps the last mesh meanwhile and catches up with what changed (real etcd).

mod support;

use std::time::Duration;

use ballast_control_plane::keys::Keys;
use ballast_control_plane::store::Store;
use ballast_control_plane::sync::MeshSync;
use support::etcd::EtcdServer;

fn service_json(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "ballast.io/v1alpha1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"port": 80}]}
    }))
    .expect("json")
}

fn service_names(sync: &MeshSync) -> Vec<String> {
    sync.mesh.read().expect("lock").services().map(|(_, n)| n).collect()
}

#[tokio::test]
async fn keeps_the_last_mesh_while_etcd_is_down_and_catches_up_after() {
    let mut etcd = EtcdServer::start();
    let store = Store::etcd(&[etcd.endpoint()]).await.expect("connect");
    let r = store.put("/ballast/services/shop/catalog", service_json("catalog"), None).await.expect("put");
    let sync = MeshSync::start(store.clone(), Keys::default());
    assert!(sync.caught_up(r, Duration::from_secs(5)).await, "first read");

    etcd.stop();
    // Once the sync has noticed (its watch broke), the mesh it keeps is still the last one.
    let mut connected = sync.connected.clone();
    tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| !*c))
        .await
        .expect("the sync notices that etcd is gone")
        .expect("sync running");
    assert_eq!(service_names(&sync), ["catalog"], "the last mesh stays while etcd is down");

    etcd.restart();
    // Written after the restart: the sync must re-read and watch again to see it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        match store.put("/ballast/services/shop/payments", service_json("payments"), None).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "etcd is back within 20 s: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        sync.caught_up(r, Duration::from_secs(15)).await,
        "caught up after etcd came back\n{}",
        etcd.log_tail(20)
    );
    assert_eq!(service_names(&sync), ["catalog", "payments"]);
}
