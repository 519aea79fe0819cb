//! The store on an etcd cluster (`--etcd http://host:2379,...`), through `etcd-client`.
//!
//! This is a thin mapping of the [`Store`](super::Store) operations onto etcd's v3 API;
//! revisions, watches, compaction and leases are etcd's own, so the semantics in the
//! parent module hold by construction. What is decided here, and why:
//!
//! * **Every call has a deadline.** `etcd-client` always sends through a load-balanced
//!   channel that can wait for a usable endpoint instead of failing, so each request runs
//!   under [`REQUEST_TIMEOUT`] and a missing answer becomes [`StoreError::Unavailable`].
//!   [`EtcdStore::connect`] asks for the server's status before returning, so a wrong URL
//!   or a stopped etcd fails at start-up with the endpoints named, not at the first use.
//! * **Watch streams are kept honest by HTTP/2 pings** every [`KEEPALIVE_INTERVAL`], so a
//!   watch on a vanished host ends with an error instead of waiting forever. Pings are
//!   sent only while a stream is open: etcd (`--grpc-keepalive-min-time`, no pings
//!   without streams) answers pings on an idle connection with a GOAWAY.
//! * **One batch per revision.** A watch response may carry several revisions when etcd
//!   replays history (up to 1000 in one message), while all events of one revision (a
//!   transaction, or every key of a revoked lease) always arrive in one response unless
//!   fragmentation is asked for, which it is not. Consumers apply a batch atomically and
//!   report its revision as the configuration version, so a response is split at revision
//!   boundaries and never merged across them.
//! * **A watch never skips.** It asks etcd for the revisions from `after` itself (not
//!   `after + 1`) and drops the events of `after`: etcd then reports a compaction exactly
//!   when a revision the watcher needs is gone (`after` below the compaction revision,
//!   the embedded store's rule), and a watch never starts *at* the compaction revision,
//!   where etcd releases without the fix of etcd-io/etcd#18089 (2024; Debian's 3.4.23
//!   among them) have already dropped a deletion made at that revision. The start is at
//!   least 1: etcd reads 0 as
//!   "from now", which would skip history. A compacted start arrives as a response with
//!   `compact_revision` set and `canceled`, which ends the watch with
//!   [`StoreError::Compacted`]. Any other cancellation, a broken stream, or a stream that
//!   etcd closes ends it with an error too: once a watch has ended, the watcher re-reads
//!   and watches again, exactly as after a compaction. Empty responses (the creation
//!   notice, progress notifications) yield no batch.
//! * **Lists are paged** ([`LIST_PAGE`] keys per request) at the revision of the first
//!   page, so a large prefix is neither truncated nor torn between revisions; if that
//!   revision is compacted between pages, the list starts again. Messages may be up to
//!   [`MAX_MESSAGE`]; a page that still does not fit is halved and asked again.
//! * **Leases.** etcd grants in whole seconds and raises a TTL below its minimum
//!   (1.5 election timeouts: 2 s with etcd's default `--election-timeout` of 1 s) to that
//!   minimum. [`EtcdStore::keep_alive`] is a single renewal on a short-lived keep-alive
//!   stream: the caller owns the schedule, as with the embedded store.
//! * **Keys are UTF-8** because Ballast writes only `&str` keys; a key under a watched
//!   prefix that is not (written by something else) is converted lossily rather than
//!   ending every watch on it.

use ballast_api::errors::with_sources;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Error as EtcdError, EventType, GetOptions, PutOptions, Txn,
    TxnOp, WatchOptions, WatchResponse,
};
use tokio::sync::mpsc;
use tonic::Code;

use super::{Event, Guarded, KeyValue, LeaseId, Revision, StoreError, Watch};

/// How long opening a connection to an etcd endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long any single request (or the opening of a watch) may wait for etcd's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval on connections with open streams (watches).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per request when listing a prefix.
pub const LIST_PAGE: i64 = 500;
/// Largest response message accepted (a list page, or one watch response).
pub const MAX_MESSAGE: usize = 256 << 20;
/// Batches a watch buffers before its forwarding task waits for the consumer.
const WATCH_BUFFER: usize = 64;
/// How often a list restarts when its revision keeps being compacted under it.
const LIST_ATTEMPTS: usize = 5;

/// A connected etcd client; clones share the connections.
#[derive(Clone)]
pub struct EtcdStore {
    /// Behind an `Arc`: etcd-client's `Client` is several KiB (one gRPC client per
    /// service), which would make every `Store` that large.
    client: Arc<Client>,
    /// The endpoints as given, comma-joined, for messages and [`Self::endpoints`].
    endpoints: Arc<str>,
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:2379`) and checks that it
    /// answers. (`https://` endpoints would need a CA and client certificate, which are not
    /// configurable yet.)
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let urls: Vec<&str> = endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
        let joined: Arc<str> = urls.join(",").into();
        let unavailable =
            |message: String| StoreError::Unavailable { endpoints: joined.to_string(), message };
        if urls.is_empty() {
            return Err(StoreError::Unavailable {
                endpoints: "(none)".into(),
                message: "no etcd endpoint was given (expected --etcd http://host:2379,...)".into(),
            });
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false);
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&urls, Some(options))).await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e @ (EtcdError::InvalidUri(_) | EtcdError::InvalidArgs(_)))) => {
                return Err(unavailable(format!(
                    "{}; endpoints are URLs like http://127.0.0.1:2379",
                    chain(&e)
                )));
            }
            Ok(Err(e)) => return Err(unavailable(chain(&e))),
            Err(_) => {
                return Err(unavailable(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())));
            }
        };
        let store = Self { client: Arc::new(client), endpoints: joined.clone() };
        // The client connects lazily: ask for something cheap so that a wrong URL or a
        // stopped etcd is reported now.
        let mut maintenance = store.client.maintenance_client();
        match tokio::time::timeout(CONNECT_TIMEOUT, maintenance.status()).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(EtcdError::GRpcStatus(s))) if matches!(s.code(), Code::Unimplemented | Code::Internal) => {
                Err(unavailable(format!(
                    "the server does not speak etcd's v3 gRPC API ({}); is this the etcd client URL (port 2379)?",
                    describe_status(&s)
                )))
            }
            Ok(Err(e)) => Err(unavailable(format!("asking for etcd's status: {}", chain(&e)))),
            Err(_) => Err(unavailable(format!(
                "no answer to a status request within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The endpoints, comma-joined.
    pub fn endpoints(&self) -> String {
        self.endpoints.to_string()
    }

    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let options = lease.map(|l| PutOptions::new().with_lease(l.0));
        let mut kv = self.client.kv_client();
        match self.timed("writing a key", kv.put(key, value, options)).await? {
            Ok(resp) => self.revision_of(resp.header()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease.map_or(0, |l| l.0))),
            Err(e) => Err(self.error("writing a key", e)),
        }
    }

    pub async fn put_many(
        &self,
        writes: Vec<(String, Vec<u8>, Option<LeaseId>)>,
    ) -> Result<Revision, StoreError> {
        let lease = writes.iter().find_map(|w| w.2).map_or(0, |l| l.0);
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(key, value, lease)| {
                TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l.0)))
            })
            .collect();
        let mut kv = self.client.kv_client();
        match self.timed("writing keys", kv.txn(Txn::new().and_then(ops))).await? {
            Ok(resp) => self.revision_of(resp.header()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(self.error("writing keys", e)),
        }
    }

    /// One transaction: a compare of each key's mod revision (etcd compares a missing key
    /// as revision 0), then every put and delete.
    pub async fn write_if(&self, writes: Vec<Guarded>) -> Result<Option<Revision>, StoreError> {
        let compares: Vec<Compare> = writes
            .iter()
            .map(|w| Compare::mod_revision(w.key.as_str(), CompareOp::Equal, w.expect))
            .collect();
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|w| match w.value {
                Some(value) => TxnOp::put(w.key, value, None),
                None => TxnOp::delete(w.key, None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        match self.timed("writing keys if unchanged", kv.txn(Txn::new().when(compares).and_then(ops))).await?
        {
            Ok(resp) if resp.succeeded() => self.revision_of(resp.header()).map(Some),
            Ok(_) => Ok(None),
            Err(e) => Err(self.error("writing keys if unchanged", e)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision), StoreError> {
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let mut resp = match self.timed("reading a key", kv.get(key, None)).await? {
            Ok(resp) => resp,
            Err(e) => return Err(self.error("reading a key", e)),
        };
        let revision = self.revision_of(resp.header())?;
        Ok((resp.take_kvs().into_iter().next().map(convert_kv), revision))
    }

    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let (first, end) = prefix_range(prefix);
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let mut page = LIST_PAGE;
        let mut attempts = 0;
        'list: loop {
            attempts += 1;
            let mut out = Vec::new();
            let mut revision: Revision = 0;
            let mut from = first.clone();
            loop {
                let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let mut resp = match self.timed("listing keys", kv.get(from.clone(), Some(options))).await? {
                    Ok(resp) => resp,
                    Err(e) if is_compacted(&e) && revision > 0 && attempts < LIST_ATTEMPTS => continue 'list,
                    Err(e) if is_too_large(&e) && page > 1 => {
                        page = (page / 2).max(1);
                        continue;
                    }
                    Err(e) => return Err(self.error("listing keys", e)),
                };
                if revision == 0 {
                    revision = self.revision_of(resp.header())?;
                }
                let more = resp.more();
                let kvs = resp.take_kvs();
                match kvs.last() {
                    Some(last) if more => {
                        // The next page starts just after the last key of this one.
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    // `more` with an empty page cannot happen; stop rather than loop.
                    _ => {
                        out.extend(kvs.into_iter().map(convert_kv));
                        return Ok((out, revision));
                    }
                }
                out.extend(kvs.into_iter().map(convert_kv));
            }
        }
    }

    pub async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        let mut kv = self.client.kv_client();
        match self.timed("deleting a key", kv.delete(key, None)).await? {
            Ok(resp) if resp.deleted() > 0 => self.revision_of(resp.header()).map(Some),
            Ok(_) => Ok(None),
            Err(e) => Err(self.error("deleting a key", e)),
        }
    }

    pub async fn delete_if(&self, key: &str, mod_revision: Revision) -> Result<Option<Revision>, StoreError> {
        let mut kv = self.client.kv_client();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        match self.timed("deleting a key if unchanged", kv.txn(txn)).await? {
            Ok(resp) if resp.succeeded() => self.revision_of(resp.header()).map(Some),
            Ok(_) => Ok(None),
            Err(e) => Err(self.error("deleting a key if unchanged", e)),
        }
    }

    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0)).max(1);
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        let mut lease = self.client.lease_client();
        match self.timed("granting a lease", lease.grant(secs, None)).await? {
            Ok(resp) if !resp.error().is_empty() => {
                Err(StoreError::Backend(format!("granting a lease: {}", resp.error())))
            }
            Ok(resp) => Ok(LeaseId(resp.id())),
            Err(e) => Err(self.error("granting a lease", e)),
        }
    }

    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        // Opening the keep-alive stream sends one renewal and reads its answer (a TTL of 0
        // means the lease is gone); dropping the stream then closes it.
        match self.timed("renewing a lease", client.keep_alive(lease.0)).await? {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease.0)),
            Err(e) => Err(self.error("renewing a lease", e)),
        }
    }

    pub async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        match self.timed("revoking a lease", client.revoke(lease.0)).await? {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(self.error("revoking a lease", e)),
        }
    }

    pub async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let (key, end) = prefix_range(prefix);
        // From `after` itself, whose events `forward` drops: see the module docs.
        let start = after.max(1);
        let options = WatchOptions::new().with_range(end).with_start_revision(start);
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let opening = async {
            let mut stream = client.watch(key, Some(options)).await?;
            let first = stream.message().await?;
            Ok::<_, EtcdError>((stream, first))
        };
        let (stream, first) = match self.timed("opening a watch", opening).await? {
            Ok((stream, Some(first))) => (stream, first),
            Ok((_, None)) => {
                return Err(
                    self.unavailable("opening a watch: etcd closed the stream before answering".into())
                );
            }
            Err(e) => return Err(self.error("opening a watch", e)),
        };
        // A refused creation (not a compaction, which comes as its own response and goes
        // down the channel like any later end of the watch) fails the call itself.
        if first.created() && first.canceled() && first.compact_revision() == 0 {
            return Err(StoreError::Backend(format!(
                "etcd refused to create a watch on {prefix:?} from revision {start}: {}",
                first.cancel_reason()
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let task = tokio::spawn(forward(stream, first, after, tx, self.endpoints.clone()));
        Ok(Watch::fed_by(rx, task.abort_handle()))
    }

    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        match self.timed("compacting", kv.compact(revision, None)).await? {
            Ok(_) => Ok(()),
            // At or below the current compaction: nothing left to do.
            Err(e) if is_compacted(&e) => Ok(()),
            Err(e) if is_future_revision(&e) => {
                Err(StoreError::FutureRevision { revision, current: self.current_revision().await? })
            }
            Err(e) => Err(self.error("compacting", e)),
        }
    }

    /// The store's current revision (the header of a cheap read).
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.client.kv_client();
        let options = GetOptions::new().with_count_only();
        match self.timed("reading the revision", kv.get("\0", Some(options))).await? {
            Ok(resp) => self.revision_of(resp.header()),
            Err(e) => Err(self.error("reading the revision", e)),
        }
    }

    /// Runs one request under [`REQUEST_TIMEOUT`]; the outer error is the timeout, the
    /// inner one etcd's answer, for the caller to interpret.
    async fn timed<T>(
        &self,
        doing: &str,
        request: impl Future<Output = Result<T, EtcdError>>,
    ) -> Result<Result<T, EtcdError>, StoreError> {
        tokio::time::timeout(REQUEST_TIMEOUT, request).await.map_err(|_| {
            self.unavailable(format!("{doing}: no answer within {}s", REQUEST_TIMEOUT.as_secs()))
        })
    }

    fn revision_of(&self, header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
        header
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Backend("etcd answered without a response header".into()))
    }

    fn unavailable(&self, message: String) -> StoreError {
        StoreError::Unavailable { endpoints: self.endpoints.to_string(), message }
    }

    fn error(&self, doing: &str, e: EtcdError) -> StoreError {
        map_error(&self.endpoints, doing, &e)
    }
}

/// Forwards a watch stream's responses, less the events of revision `after` and before,
/// to its [`Watch`] until it ends or the consumer goes away.
async fn forward(
    mut stream: etcd_client::WatchStream,
    first: WatchResponse,
    after: Revision,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
    endpoints: Arc<str>,
) {
    let mut next = Some(first);
    loop {
        let resp = match next.take() {
            Some(resp) => resp,
            None => match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let message = "the watch stream ended (etcd closed it); re-read and watch again".into();
                    let _ = tx
                        .send(Err(StoreError::Unavailable { endpoints: endpoints.to_string(), message }))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(map_error(&endpoints, "the watch stream broke", &e))).await;
                    return;
                }
            },
        };
        let (batches, end) = split_response(&resp, after);
        for batch in batches {
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
        }
        if let Some(end) = end {
            let _ = tx.send(Err(end)).await;
            return;
        }
    }
}

/// A watch response as batches of one revision each, in order, without the revisions up
/// to `after`, and the error that ends the watch if the response ends it.
fn split_response(resp: &WatchResponse, after: Revision) -> (Vec<Vec<Event>>, Option<StoreError>) {
    let mut batches: Vec<Vec<Event>> = Vec::new();
    for ev in resp.events() {
        let Some(kv) = ev.kv() else {
            return (batches, Some(StoreError::Backend("etcd sent a watch event without a key".into())));
        };
        if kv.mod_revision() <= after {
            continue;
        }
        // `event_type` panics on a type it does not know rather than returning an error.
        let kind = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ev.event_type()));
        let event = match kind {
            Ok(EventType::Put) => Event::Put(convert_kv_ref(kv)),
            Ok(EventType::Delete) => {
                Event::Delete { key: key_string(kv.key().to_vec()), revision: kv.mod_revision() }
            }
            Err(_) => {
                let message = "etcd sent a watch event of an unknown type; is this etcd version supported?";
                return (batches, Some(StoreError::Backend(message.into())));
            }
        };
        match batches.last_mut() {
            Some(batch) if batch.first().map(Event::revision) == Some(event.revision()) => batch.push(event),
            _ => batches.push(vec![event]),
        }
    }
    let end = if resp.compact_revision() > 0 {
        Some(StoreError::Compacted { compact_revision: resp.compact_revision() })
    } else if resp.canceled() {
        let reason = resp.cancel_reason();
        let reason = if reason.is_empty() { "no reason given" } else { reason };
        Some(StoreError::Backend(format!("etcd canceled the watch ({reason}); re-read and watch again")))
    } else {
        None
    };
    (batches, end)
}

fn convert_kv(kv: etcd_client::KeyValue) -> KeyValue {
    let (create_revision, mod_revision, lease) = (kv.create_revision(), kv.mod_revision(), kv.lease());
    let (key, value) = kv.into_key_value();
    KeyValue { key: key_string(key), value, create_revision, mod_revision, lease: lease_of(lease) }
}

fn convert_kv_ref(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: key_string(kv.key().to_vec()),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: lease_of(kv.lease()),
    }
}

fn lease_of(id: i64) -> Option<LeaseId> {
    (id != 0).then_some(LeaseId(id))
}

fn key_string(key: Vec<u8>) -> String {
    String::from_utf8(key).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The key range `[start, end)` of every key starting with `prefix`, as etcd takes it
/// (`"\0"` as both ends means every key).
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.as_bytes().to_vec(), end);
        }
    }
    // An empty prefix (or only 0xff bytes, impossible in UTF-8): from the first key on.
    let start = if prefix.is_empty() { vec![0] } else { prefix.as_bytes().to_vec() };
    (start, vec![0])
}

fn status_of(e: &EtcdError) -> Option<&tonic::Status> {
    match e {
        EtcdError::GRpcStatus(s) => Some(s),
        _ => None,
    }
}

fn is_compacted(e: &EtcdError) -> bool {
    status_of(e).is_some_and(|s| s.code() == Code::OutOfRange && s.message().contains("compacted"))
}

fn is_future_revision(e: &EtcdError) -> bool {
    status_of(e).is_some_and(|s| s.code() == Code::OutOfRange && s.message().contains("future revision"))
}

fn is_too_large(e: &EtcdError) -> bool {
    status_of(e).is_some_and(|s| s.message().contains("message length too large"))
}

fn is_lease_not_found(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) => s.code() == Code::NotFound && s.message().contains("lease not found"),
        // etcd answers a renewal of an unknown lease with a TTL of 0, which etcd-client
        // reports this way.
        EtcdError::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// Maps an etcd-client error to a [`StoreError`]: transport trouble (etcd down, no
/// leader, overloaded) is `Unavailable`, the rest `Backend`, each with what to do.
fn map_error(endpoints: &str, doing: &str, e: &EtcdError) -> StoreError {
    let unavailable = |message: String| StoreError::Unavailable { endpoints: endpoints.to_string(), message };
    match e {
        EtcdError::TransportError(_) | EtcdError::IoError(_) => unavailable(format!("{doing}: {}", chain(e))),
        EtcdError::GRpcStatus(s) => {
            let message = s.message();
            let what = describe_status(s);
            if message.contains("no leader") || message.contains("leader changed") {
                unavailable(format!(
                    "{doing}: {what}; etcd has no leader: check that a majority of its members are up and reach each other"
                ))
            } else if message.contains("too many requests") {
                unavailable(format!("{doing}: {what}; etcd is overloaded, retry later"))
            } else if message.contains("database space exceeded") {
                StoreError::Backend(format!(
                    "{doing}: {what}; etcd's database is over its quota: compact and defragment etcd \
                     (etcdctl compact/defrag), then `etcdctl alarm disarm`, or raise --quota-backend-bytes"
                ))
            } else if message.contains("request is too large") {
                StoreError::Backend(format!(
                    "{doing}: {what}; the value is larger than etcd accepts (--max-request-bytes)"
                ))
            } else {
                match s.code() {
                    // Unknown carries transport failures that tonic could not classify
                    // (a connection reset in the middle of a stream, say).
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                        unavailable(format!("{doing}: {what}"))
                    }
                    Code::Unauthenticated | Code::PermissionDenied => StoreError::Backend(format!(
                        "{doing}: {what}; etcd has authentication enabled, and Ballast connects without \
                         credentials: give Ballast an etcd without auth, or one whose guest role may use its prefix"
                    )),
                    _ => StoreError::Backend(format!("{doing}: {what}")),
                }
            }
        }
        _ => StoreError::Backend(format!("{doing}: {}", chain(e))),
    }
}

/// A gRPC status for a message: its code, message, and the errors that caused it.
fn describe_status(s: &tonic::Status) -> String {
    with_sources(format!("{:?}: {}", s.code(), s.message()), s.source())
}

/// An etcd-client error with its causes (etcd-client's own error does not expose them).
fn chain(e: &EtcdError) -> String {
    match e {
        EtcdError::GRpcStatus(s) => describe_status(s),
        EtcdError::TransportError(t) => with_sources(t.to_string(), t.source()),
        EtcdError::IoError(io) => with_sources(io.to_string(), io.source()),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_range("/ballast/"), (b"/ballast/".to_vec(), b"/ballast0".to_vec()));
        assert_eq!(prefix_range(""), (vec![0], vec![0]));
        assert_eq!(prefix_range("a"), (b"a".to_vec(), b"b".to_vec()));
    }

    #[test]
    fn non_utf8_keys_are_converted_lossily() {
        assert_eq!(key_string(b"/a/\xff".to_vec()), "/a/\u{fffd}");
        assert_eq!(key_string(b"/a/b".to_vec()), "/a/b");
    }
}
