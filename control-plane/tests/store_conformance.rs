//! One suite, two stores: every test here runs against the embedded store and against a
//! real etcd server (Debian's `etcd-server`, started per test on loopback with a
//! temporary data directory). What the control plane relies on must hold for both.

mod support;

use std::time::Duration;

use ballast_control_plane::store::{Event, Guarded, Revision, Store, StoreError, Watch};
use support::Backend;

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Backend::memory().await.store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = super::Backend::etcd().await;
                    super::$name(&backend.store).await;
                }
            )*
        }
    };
}

conformance!(
    put_get_delete_with_revisions,
    delete_if_leaves_a_newer_write,
    put_many_writes_at_one_revision_or_not_at_all,
    list_is_by_prefix_in_key_order,
    watch_replays_from_a_revision_then_follows,
    watch_sees_only_its_prefix,
    watch_from_compacted_history_is_an_error_not_silence,
    lease_expiry_deletes_its_keys_with_events,
    keep_alive_holds_a_lease_and_revoke_ends_it,
    put_under_a_missing_lease_fails,
    lock_is_exclusive_and_freed_by_unlock_or_lease_end,
    write_if_applies_everything_or_nothing,
);

/// The next batch, within `within`.
async fn next_batch(watch: &mut Watch, within: Duration) -> Result<Vec<Event>, StoreError> {
    tokio::time::timeout(within, watch.next())
        .await
        .expect("a watch event in time")
        .expect("the watch is still open")
}

/// Collects events until `n` have arrived.
async fn events(watch: &mut Watch, n: usize) -> Vec<Event> {
    let mut all = Vec::new();
    while all.len() < n {
        all.extend(next_batch(watch, Duration::from_secs(5)).await.expect("no watch error"));
    }
    all
}

fn put_of(e: &Event) -> (&str, &[u8]) {
    match e {
        Event::Put(kv) => (&kv.key, &kv.value),
        Event::Delete { key, .. } => panic!("expected a put, got the delete of {key}"),
    }
}

async fn put_get_delete_with_revisions(store: &Store) {
    let r1 = store.put("/t/a", b"one".to_vec(), None).await.expect("put");
    let r2 = store.put("/t/a", b"two".to_vec(), None).await.expect("put");
    assert_eq!(r2, r1 + 1, "each write is the next revision");
    let (kv, at) = store.get("/t/a").await.expect("get");
    let kv = kv.expect("the key exists");
    assert_eq!(kv.value, b"two");
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
    assert_eq!(at, r2);
    let r3 = store.delete("/t/a").await.expect("delete").expect("something was deleted");
    assert_eq!(r3, r2 + 1);
    assert_eq!(store.delete("/t/a").await.expect("delete"), None, "deleting nothing is no write");
    let (kv, at) = store.get("/t/a").await.expect("get");
    assert_eq!((kv, at), (None, r3));
    // Created again: a new create revision.
    let r4 = store.put("/t/a", b"three".to_vec(), None).await.expect("put");
    let kv = store.get("/t/a").await.expect("get").0.expect("exists");
    assert_eq!((kv.create_revision, kv.mod_revision), (r4, r4));
}

async fn delete_if_leaves_a_newer_write(store: &Store) {
    let r1 = store.put("/t/reg", b"old stream".to_vec(), None).await.expect("put");
    let r2 = store.put("/t/reg", b"new stream".to_vec(), None).await.expect("put");
    assert_eq!(store.delete_if("/t/reg", r1).await.expect("delete_if"), None, "written since r1");
    let kv = store.get("/t/reg").await.expect("get").0.expect("still there");
    assert_eq!(kv.value, b"new stream");
    let r3 = store.delete_if("/t/reg", r2).await.expect("delete_if").expect("deleted");
    assert!(r3 > r2);
    assert_eq!(store.get("/t/reg").await.expect("get").0, None);
    assert_eq!(store.delete_if("/t/reg", r2).await.expect("delete_if"), None, "already gone");
}

async fn put_many_writes_at_one_revision_or_not_at_all(store: &Store) {
    let lease = store.grant(Duration::from_secs(30)).await.expect("grant");
    let mut watch = store.watch("/t/", store.get("/t/x").await.expect("get").1).await.expect("watch");
    let writes =
        vec![("/t/m/a".to_owned(), b"1".to_vec(), Some(lease)), ("/t/m/b".to_owned(), b"2".to_vec(), None)];
    let r = store.put_many(writes).await.expect("put_many");
    let batch = next_batch(&mut watch, Duration::from_secs(5)).await.expect("one batch");
    assert_eq!(batch.len(), 2, "one revision, both events: {batch:?}");
    assert!(batch.iter().all(|e| e.revision() == r));
    let (kvs, _) = store.list("/t/m/").await.expect("list");
    assert_eq!(
        kvs.iter().map(|kv| (kv.mod_revision, kv.lease)).collect::<Vec<_>>(),
        [(r, Some(lease)), (r, None)]
    );
    // A missing lease fails the whole write.
    store.revoke(lease).await.expect("revoke");
    let writes =
        vec![("/t/m/c".to_owned(), b"3".to_vec(), None), ("/t/m/d".to_owned(), b"4".to_vec(), Some(lease))];
    assert!(matches!(store.put_many(writes).await, Err(StoreError::LeaseNotFound(_))));
    assert_eq!(store.get("/t/m/c").await.expect("get").0, None, "nothing written");
}

async fn list_is_by_prefix_in_key_order(store: &Store) {
    for key in ["/t/b/2", "/t/a/1", "/t/b/1", "/t/bb", "/u/b/0"] {
        store.put(key, key.as_bytes().to_vec(), None).await.expect("put");
    }
    let last = store.put("/t/b/3", b"x".to_vec(), None).await.expect("put");
    let (kvs, at) = store.list("/t/b/").await.expect("list");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/b/1", "/t/b/2", "/t/b/3"]);
    assert_eq!(at, last);
    assert!(store.list("/none/").await.expect("list").0.is_empty());
}

async fn watch_replays_from_a_revision_then_follows(store: &Store) {
    let r1 = store.put("/w/k1", b"1".to_vec(), None).await.expect("put");
    let r2 = store.put("/w/k2", b"2".to_vec(), None).await.expect("put");
    let r3 = store.delete("/w/k1").await.expect("delete").expect("deleted");
    let mut watch = store.watch("/w/", r1).await.expect("watch");
    let replayed = events(&mut watch, 2).await;
    assert_eq!(put_of(&replayed[0]), ("/w/k2", &b"2"[..]));
    assert_eq!(replayed[0].revision(), r2);
    assert_eq!(replayed[1], Event::Delete { key: "/w/k1".into(), revision: r3 });
    // Then live changes, in order.
    let r4 = store.put("/w/k3", b"3".to_vec(), None).await.expect("put");
    let r5 = store.put("/w/k3", b"33".to_vec(), None).await.expect("put");
    let live = events(&mut watch, 2).await;
    assert_eq!(live.iter().map(Event::revision).collect::<Vec<Revision>>(), [r4, r5]);
    assert_eq!(put_of(&live[1]), ("/w/k3", &b"33"[..]));
}

async fn watch_sees_only_its_prefix(store: &Store) {
    let (_, now) = store.list("/").await.expect("list");
    let mut watch = store.watch("/mine/", now).await.expect("watch");
    store.put("/other/x", b"x".to_vec(), None).await.expect("put");
    store.put("/minefield", b"x".to_vec(), None).await.expect("put");
    let r = store.put("/mine/y", b"y".to_vec(), None).await.expect("put");
    let got = events(&mut watch, 1).await;
    assert_eq!(got.len(), 1, "only /mine/ keys: {got:?}");
    assert_eq!((got[0].key(), got[0].revision()), ("/mine/y", r));
}

async fn watch_from_compacted_history_is_an_error_not_silence(store: &Store) {
    let r1 = store.put("/c/a", b"1".to_vec(), None).await.expect("put");
    store.put("/c/a", b"2".to_vec(), None).await.expect("put");
    let r3 = store.put("/c/a", b"3".to_vec(), None).await.expect("put");
    store.compact(r3).await.expect("compact");
    let mut stale = store.watch("/c/", r1).await.expect("a watch is opened, then reports");
    match tokio::time::timeout(Duration::from_secs(5), stale.next()).await.expect("an answer in time") {
        Some(Err(StoreError::Compacted { compact_revision })) => assert_eq!(compact_revision, r3),
        other => panic!("expected Compacted, got {other:?}"),
    }
    // From the compaction point on, watching works.
    let mut fresh = store.watch("/c/", r3).await.expect("watch");
    let r4 = store.put("/c/a", b"4".to_vec(), None).await.expect("put");
    assert_eq!(events(&mut fresh, 1).await[0].revision(), r4);
    // Compacting the future is refused.
    assert!(matches!(store.compact(r4 + 100).await, Err(StoreError::FutureRevision { .. })));
}

async fn lease_expiry_deletes_its_keys_with_events(store: &Store) {
    let lease = store.grant(Duration::from_secs(1)).await.expect("grant");
    store.put("/l/a", b"a".to_vec(), Some(lease)).await.expect("put");
    store.put("/l/b", b"b".to_vec(), Some(lease)).await.expect("put");
    let r = store.put("/l/keep", b"k".to_vec(), None).await.expect("put");
    let mut watch = store.watch("/l/", r).await.expect("watch");
    // etcd checks leases on its own schedule; a 1 s lease is gone well within 5 s.
    let gone = events(&mut watch, 2).await;
    let mut keys: Vec<&str> = gone.iter().map(Event::key).collect();
    keys.sort();
    assert_eq!(keys, ["/l/a", "/l/b"]);
    assert!(gone.iter().all(|e| matches!(e, Event::Delete { .. })), "{gone:?}");
    let (kvs, _) = store.list("/l/").await.expect("list");
    assert_eq!(kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/l/keep"]);
    assert!(matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(_))));
}

async fn keep_alive_holds_a_lease_and_revoke_ends_it(store: &Store) {
    let lease = store.grant(Duration::from_secs(1)).await.expect("grant");
    let r = store.put("/k/a", b"a".to_vec(), Some(lease)).await.expect("put");
    assert_eq!(store.get("/k/a").await.expect("get").0.and_then(|kv| kv.lease), Some(lease));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        store.keep_alive(lease).await.expect("keep-alive of a live lease");
    }
    assert!(store.get("/k/a").await.expect("get").0.is_some(), "kept alive for 2.5 s past a 1 s TTL");
    let mut watch = store.watch("/k/", r).await.expect("watch");
    store.revoke(lease).await.expect("revoke");
    let gone = events(&mut watch, 1).await;
    assert!(matches!(&gone[0], Event::Delete { key, .. } if key == "/k/a"), "{gone:?}");
    store.revoke(lease).await.expect("revoking again is fine");
}

async fn put_under_a_missing_lease_fails(store: &Store) {
    let lease = store.grant(Duration::from_secs(5)).await.expect("grant");
    store.revoke(lease).await.expect("revoke");
    match store.put("/m/a", b"a".to_vec(), Some(lease)).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease.0),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    assert!(store.get("/m/a").await.expect("get").0.is_none());
}

async fn lock_is_exclusive_and_freed_by_unlock_or_lease_end(store: &Store) {
    let a = store.grant(Duration::from_secs(30)).await.expect("grant");
    let b = store.grant(Duration::from_secs(30)).await.expect("grant");
    let c = store.grant(Duration::from_secs(30)).await.expect("grant");
    let held = store.lock("/locks/sync", a).await.expect("the free lock");
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.lock("/locks/sync", b).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second contender waits while the lock is held");
    store.unlock(&held).await.expect("unlock");
    let held_b = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets the lock after unlock")
        .expect("task")
        .expect("lock");
    // A holder that goes away (its lease ends) frees the lock too.
    let third = {
        let store = store.clone();
        tokio::spawn(async move { store.lock("/locks/sync", c).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished());
    store.revoke(b).await.expect("revoke the holder's lease");
    let held_c = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the lock is freed with its holder's lease")
        .expect("task")
        .expect("lock");
    assert_ne!(held_b, held_c);
}

async fn write_if_applies_everything_or_nothing(store: &Store) {
    let put = |key: &str, value: &str, expect: Revision| Guarded {
        key: key.to_owned(),
        value: Some(value.as_bytes().to_vec()),
        expect,
    };
    let lease = store.grant(Duration::from_secs(30)).await.expect("grant");
    let r1 = store.put("/t/g/leased", b"registered".to_vec(), Some(lease)).await.expect("put");
    let mut watch = store.watch("/t/", r1).await.expect("watch");
    // Absent keys are expected at 0.
    let r2 = store
        .write_if(vec![put("/t/g/a", "1", 0), put("/t/g/b", "2", 0)])
        .await
        .expect("write_if")
        .expect("conditions hold");
    let batch = next_batch(&mut watch, Duration::from_secs(5)).await.expect("one batch");
    assert_eq!(batch.len(), 2, "one revision: {batch:?}");
    // One stale condition (a was written since r2) fails the whole write.
    let r3 = store.put("/t/g/a", b"someone else".to_vec(), None).await.expect("put");
    let refused = store
        .write_if(vec![put("/t/g/b", "3", r2), Guarded { key: "/t/g/a".into(), value: None, expect: r2 }])
        .await
        .expect("write_if");
    assert_eq!(refused, None);
    assert_eq!(store.get("/t/g/b").await.expect("get").0.expect("kept").value, b"2");
    assert_eq!(store.get("/t/g/a").await.expect("get").0.expect("kept").value, b"someone else");
    // A key that exists is not created over.
    assert_eq!(store.write_if(vec![put("/t/g/leased", "mine", 0)]).await.expect("write_if"), None);
    // Puts and deletes together, at one revision; a put takes a key off its lease.
    let r4 = store
        .write_if(vec![
            Guarded { key: "/t/g/a".into(), value: None, expect: r3 },
            put("/t/g/b", "4", r2),
            put("/t/g/leased", "taken over", r1),
        ])
        .await
        .expect("write_if")
        .expect("conditions hold");
    let (kvs, _) = store.list("/t/g/").await.expect("list");
    assert_eq!(
        kvs.iter().map(|kv| (kv.key.as_str(), kv.mod_revision, kv.lease)).collect::<Vec<_>>(),
        [("/t/g/b", r4, None), ("/t/g/leased", r4, None)]
    );
    store.revoke(lease).await.expect("revoke");
    assert!(store.get("/t/g/leased").await.expect("get").0.is_some(), "no longer under the lease");
}
