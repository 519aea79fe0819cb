//! The etcd backend of the store against a real etcd (`support::etcd`): each operation
//! once, watches from a revision, compaction ending a watch, lease expiry, and etcd going
//! away and coming back. The backend-agnostic conformance suite runs on top of this.

mod support;

use std::time::{Duration, Instant};

use ballast_control_plane::store::{Event, KeyValue, LeaseId, Revision, Store, StoreError, Watch};
use support::etcd::EtcdServer;

async fn connect(etcd: &EtcdServer) -> Store {
    Store::etcd(&[etcd.endpoint()]).await.expect("connecting to the test etcd")
}

/// The next batch of `watch`, which must come within 5 s and not be an error.
async fn next_batch(watch: &mut Watch) -> Vec<Event> {
    match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        Ok(Some(Ok(batch))) => batch,
        Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch batch within 5 s"),
    }
}

/// The error that ends `watch`, which must come within `within`.
async fn watch_error(watch: &mut Watch, within: Duration) -> StoreError {
    match tokio::time::timeout(within, watch.next()).await {
        Ok(Some(Err(e))) => e,
        Ok(Some(Ok(batch))) => panic!("expected the watch to end with an error, got {batch:?}"),
        Ok(None) => panic!("the watch ended without an error"),
        Err(_) => panic!("the watch did not end within {within:?}"),
    }
}

fn put_event(key: &str, value: &[u8], revision: Revision, create_revision: Revision) -> Event {
    Event::Put(KeyValue {
        key: key.into(),
        value: value.to_vec(),
        create_revision,
        mod_revision: revision,
        lease: None,
    })
}

#[tokio::test]
async fn put_get_list_delete() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    assert_eq!(store.describe(), format!("etcd at {}", etcd.endpoint()));

    let r1 = store.put("/t/a", b"1".to_vec(), None).await.unwrap();
    let (kv, at) = store.get("/t/a").await.unwrap();
    let kv = kv.expect("the key just written");
    assert_eq!((kv.key.as_str(), kv.value.as_slice()), ("/t/a", &b"1"[..]));
    assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (r1, r1, None));
    assert_eq!(at, r1);

    let r2 = store.put("/t/a", b"2".to_vec(), None).await.unwrap();
    assert_eq!(r2, r1 + 1, "each write is the next revision");
    let kv = store.get("/t/a").await.unwrap().0.unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision), (&b"2"[..], r1, r2));

    store.put("/t/c", b"c".to_vec(), None).await.unwrap();
    store.put("/t/b", b"b".to_vec(), None).await.unwrap();
    let last = store.put("/u/x", b"x".to_vec(), None).await.unwrap();
    let (listed, at) = store.list("/t/").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b", "/t/c"], "a prefix's keys, in key order");
    assert_eq!(at, last);
    let (everything, _) = store.list("").await.unwrap();
    assert_eq!(everything.len(), 4);

    let deleted = store.delete("/t/b").await.unwrap();
    assert_eq!(deleted, Some(last + 1));
    assert_eq!(store.delete("/t/b").await.unwrap(), None, "nothing left to delete");
    assert_eq!(store.get("/t/b").await.unwrap(), (None, last + 1));
}

#[tokio::test]
async fn list_returns_every_key_of_a_large_prefix() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    // More keys than one list page holds, written 32 at a time.
    const KEYS: usize = 1234;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (worker..KEYS).step_by(32) {
                store.put(&format!("/big/{i:05}"), vec![b'v'; 100], None).await.unwrap();
            }
        });
    }
    tasks.join_all().await;
    store.put("/bigger", b"outside".to_vec(), None).await.unwrap();

    let (listed, at) = store.list("/big/").await.unwrap();
    assert_eq!(listed.len(), KEYS);
    let expected: Vec<String> = (0..KEYS).map(|i| format!("/big/{i:05}")).collect();
    let keys: Vec<&String> = listed.iter().map(|kv| &kv.key).collect();
    assert!(keys.iter().zip(&expected).all(|(a, b)| *a == b), "keys in key order");
    assert!(listed.iter().all(|kv| kv.mod_revision < at));
}

#[tokio::test]
async fn watch_replays_history_then_follows() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let r1 = store.put("/w/a", b"1".to_vec(), None).await.unwrap();

    // From after r1: only what follows.
    let mut live = store.watch("/w/", r1).await.unwrap();
    let r2 = store.put("/w/b", b"2".to_vec(), None).await.unwrap();
    store.put("/elsewhere", b"not watched".to_vec(), None).await.unwrap();
    assert_eq!(next_batch(&mut live).await, [put_event("/w/b", b"2", r2, r2)]);
    let r3 = store.delete("/w/a").await.unwrap().unwrap();
    assert_eq!(next_batch(&mut live).await, [Event::Delete { key: "/w/a".into(), revision: r3 }]);

    // From before r1: the history first, one batch per revision, then new changes.
    let mut replay = store.watch("/w/", r1 - 1).await.unwrap();
    assert_eq!(next_batch(&mut replay).await, [put_event("/w/a", b"1", r1, r1)]);
    assert_eq!(next_batch(&mut replay).await, [put_event("/w/b", b"2", r2, r2)]);
    assert_eq!(next_batch(&mut replay).await, [Event::Delete { key: "/w/a".into(), revision: r3 }]);
    let r4 = store.put("/w/c", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next_batch(&mut replay).await, [put_event("/w/c", b"4", r4, r4)]);
    assert_eq!(next_batch(&mut live).await, [put_event("/w/c", b"4", r4, r4)]);

    // A revoked lease deletes all its keys in one revision: one batch.
    let lease = store.grant(Duration::from_secs(30)).await.unwrap();
    store.put("/w/l1", Vec::new(), Some(lease)).await.unwrap();
    store.put("/w/l2", Vec::new(), Some(lease)).await.unwrap();
    assert_eq!(next_batch(&mut live).await.len(), 1);
    assert_eq!(next_batch(&mut live).await.len(), 1);
    store.revoke(lease).await.unwrap();
    let batch = next_batch(&mut live).await;
    let keys: Vec<&str> = batch.iter().map(Event::key).collect();
    assert_eq!(keys, ["/w/l1", "/w/l2"]);
    assert!(batch.iter().all(|e| matches!(e, Event::Delete { .. }) && e.revision() == batch[0].revision()));
}

#[tokio::test]
async fn compaction_ends_a_watch_from_before_it() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let r1 = store.put("/c/a", b"1".to_vec(), None).await.unwrap();
    store.put("/c/a", b"2".to_vec(), None).await.unwrap();
    let r3 = store.put("/c/a", b"3".to_vec(), None).await.unwrap();
    store.compact(r3).await.unwrap();

    // Its start (r1 + 1) is gone: the watch ends with Compacted and nothing else.
    let mut watch = store.watch("/c/", r1).await.unwrap();
    assert_eq!(
        watch_error(&mut watch, Duration::from_secs(5)).await,
        StoreError::Compacted { compact_revision: r3 }
    );
    assert!(watch.next().await.is_none(), "a watch is over after its error");

    // The watch needs the revisions after `after`: after r3 - 1 means r3 and on, and the
    // compaction at r3 keeps only what r3 left, not its events, so that is gone too.
    let mut watch = store.watch("/c/", r3 - 1).await.unwrap();
    assert_eq!(
        watch_error(&mut watch, Duration::from_secs(5)).await,
        StoreError::Compacted { compact_revision: r3 }
    );
    // From the compaction revision on, the watch works.
    let mut watch = store.watch("/c/", r3).await.unwrap();
    let r4 = store.put("/c/b", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next_batch(&mut watch).await, [put_event("/c/b", b"4", r4, r4)]);

    // A deletion at the compaction revision: etcd 3.4.23 drops it from the history of a
    // watch that starts at that revision (etcd-io/etcd#18089); the store must say
    // Compacted rather than skip it.
    let deleted = store.delete("/c/a").await.unwrap().unwrap();
    store.compact(deleted).await.unwrap();
    let mut watch = store.watch("/c/", deleted - 1).await.unwrap();
    assert_eq!(
        watch_error(&mut watch, Duration::from_secs(5)).await,
        StoreError::Compacted { compact_revision: deleted }
    );
    let mut watch = store.watch("/c/", deleted).await.unwrap();
    let r6 = store.put("/c/a", b"again".to_vec(), None).await.unwrap();
    assert_eq!(next_batch(&mut watch).await, [put_event("/c/a", b"again", r6, r6)]);

    // Compacting again at or below the compaction is fine; beyond the present is not.
    store.compact(r3).await.unwrap();
    store.compact(r6).await.unwrap();
    store.compact(r1).await.unwrap();
    assert_eq!(
        store.compact(r6 + 100).await,
        Err(StoreError::FutureRevision { revision: r6 + 100, current: r6 })
    );
}

#[tokio::test]
async fn lease_keys_vanish_when_the_lease_expires() {
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;

    let lease = store.grant(Duration::from_millis(1)).await.unwrap();
    let at = store.put("/l/a", b"here".to_vec(), Some(lease)).await.unwrap();
    assert_eq!(store.get("/l/a").await.unwrap().0.unwrap().lease, Some(lease));
    let mut watch = store.watch("/l/", at).await.unwrap();

    // No keep-alive: the key goes (TTL rounded up to 1 s) with a delete event.
    let started = Instant::now();
    let batch = match tokio::time::timeout(Duration::from_secs(4), watch.next()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("expected the key's deletion within 4 s, got {other:?}"),
    };
    assert!(
        matches!(&batch[..], [Event::Delete { key, revision }] if key == "/l/a" && *revision > at),
        "{batch:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "the key lived {:?}", started.elapsed());
    assert_eq!(store.get("/l/a").await.unwrap().0, None);
    assert_eq!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(lease.0)));
    assert_eq!(store.put("/l/b", Vec::new(), Some(lease)).await, Err(StoreError::LeaseNotFound(lease.0)));
    store.revoke(lease).await.expect("revoking a lease that is gone is fine");

    // Kept alive, a lease outlives its TTL; revoked, it is gone at once.
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
    store.put("/l/c", Vec::new(), Some(lease)).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        store.keep_alive(lease).await.unwrap();
    }
    assert!(store.get("/l/c").await.unwrap().0.is_some(), "kept alive for 1.6 s");
    store.revoke(lease).await.unwrap();
    assert_eq!(store.get("/l/c").await.unwrap().0, None);
    assert_eq!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(lease.0)));
    assert_eq!(store.keep_alive(LeaseId(12345)).await, Err(StoreError::LeaseNotFound(12345)));
}

/// etcd killed: the watch ends with `Unavailable`, requests fail with it quickly; etcd
/// back on the same data: the same store works again and the data is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_then_back() {
    let mut etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let at = store.put("/d/a", b"kept".to_vec(), None).await.unwrap();
    let mut watch = store.watch("/d/", at).await.unwrap();

    etcd.stop();
    let error = watch_error(&mut watch, Duration::from_secs(20)).await;
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    let started = Instant::now();
    let error = store.get("/d/a").await.unwrap_err();
    assert!(
        matches!(&error, StoreError::Unavailable { endpoints, .. } if *endpoints == etcd.endpoint()),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(6), "failing took {:?}", started.elapsed());

    etcd.restart();
    let (kv, _) = store.get("/d/a").await.expect("the same store after etcd came back");
    assert_eq!(kv.unwrap().value, b"kept");
    let at = store.put("/d/b", b"new".to_vec(), None).await.unwrap();
    let mut watch = store.watch("/d/", at - 1).await.unwrap();
    assert_eq!(next_batch(&mut watch).await, [put_event("/d/b", b"new", at, at)]);
}

#[tokio::test]
async fn connecting_to_nothing_fails_fast_naming_the_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let error = Store::etcd(std::slice::from_ref(&url)).await.err().expect("nothing listens there");
    assert!(matches!(&error, StoreError::Unavailable { endpoints, .. } if *endpoints == url), "{error}");
    assert!(error.to_string().contains(&url), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "failing took {:?}", started.elapsed());

    let error = Store::etcd(&["not a url".to_owned()]).await.err().expect("not a URL");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    let error = Store::etcd(&[]).await.err().expect("no endpoints");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
}
