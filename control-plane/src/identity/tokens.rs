//! Bootstrap tokens: proof of a service account for a sidecar that has no Kubernetes
//! service-account token to show (on a laptop, in the demo, on a VM joining the mesh).
//!
//! * **Stored hashed.** A token is 32 random bytes written as 64 hex characters; the
//!   store holds only its SHA-256, under `<prefix>/identity/tokens/<sha256-hex>`, as
//!   JSON `{namespace, serviceAccount, expiresAt, createdAt}`. Whoever reads the store
//!   (an etcd backup, `etcdctl get`) learns which identities have tokens, not the tokens.
//!   A 256-bit random secret needs no salt or slow hash: there is nothing to guess.
//! * **Expiry twice.** The key lives under a lease of the token's TTL, so expired
//!   tokens leave the store by themselves; `expiresAt` is checked as well, because a
//!   lease may outlive its TTL a little (etcd extends leases across a leader change).
//! * **Reusable until expiry**, like a kubeadm bootstrap token: a sidecar renews its
//!   certificate with the same token, so the TTL bounds how long it can stay in the mesh
//!   without a new one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::ca::now_unix;
use crate::keys::Keys;
use crate::store::{Store, StoreError};

/// A bootstrap token's TTL when none is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest bootstrap token TTL.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Length of a token's text: 32 bytes in hex.
pub const TOKEN_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("namespace {0:?} is not a DNS label (lowercase letters, digits and '-')")]
    Namespace(String),
    #[error(
        "serviceAccount {0:?} is not a service account name (a DNS subdomain: lowercase letters, digits, '-' and '.')"
    )]
    ServiceAccount(String),
    #[error("ttl {0:?}: must be between 1s and 365 days")]
    Ttl(Duration),
    #[error("the system's random source failed; cannot make a token")]
    Random,
    #[error("cannot store the token: {0}")]
    Store(#[from] StoreError),
}

/// A bootstrap token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredToken {
    pub namespace: String,
    pub service_account: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub created_at: i64,
}

/// A token just created: its text (shown once) and its expiry.
#[derive(Debug, Clone)]
pub struct BootstrapToken {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Whether `token` has the form of a bootstrap token (64 lowercase hex characters); a
/// Kubernetes token (a JWT, with dots) never does.
pub fn is_bootstrap_token(token: &str) -> bool {
    token.len() == TOKEN_LEN && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 random bytes from the system's source, in hex: a bootstrap token, or the admin
/// token when none is configured. `None` when the random source fails.
pub fn random_secret() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(hex(&bytes))
}

/// The hex SHA-256 of a token's text: its key in the store.
fn hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Creates a bootstrap token for `namespace`/`service_account`, valid for `ttl`, and
/// returns its text. What `POST /api/v1/tokens` and `ballastctl token create` do; tests
/// and embedding callers (the demo) call it directly.
pub async fn create_bootstrap_token(
    store: &Store,
    keys: &Keys,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
) -> Result<String, TokenError> {
    issue(store, keys, namespace, service_account, ttl).await.map(|t| t.token)
}

/// [`create_bootstrap_token`], with the expiry.
pub async fn issue(
    store: &Store,
    keys: &Keys,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
) -> Result<BootstrapToken, TokenError> {
    if !ballast_api::policy::dns_label(namespace) {
        return Err(TokenError::Namespace(namespace.to_owned()));
    }
    if !ballast_api::identity::dns_subdomain(service_account) {
        return Err(TokenError::ServiceAccount(service_account.to_owned()));
    }
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(TokenError::Ttl(ttl));
    }
    let token = random_secret().ok_or(TokenError::Random)?;
    let created_at = now_unix();
    let ttl_secs = ttl.as_secs().max(1);
    let stored = StoredToken {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        expires_at: created_at + i64::try_from(ttl_secs).unwrap_or(i64::MAX),
        created_at,
    };
    // Whole seconds, rounded up, so the key never leaves before the token expires.
    let lease = store.grant(Duration::from_secs(ttl_secs + 1)).await?;
    let value = serde_json::to_vec(&stored).unwrap_or_default();
    store.put(&keys.identity_token(&hash(&token)), value, Some(lease)).await?;
    Ok(BootstrapToken { token, expires_at: stored.expires_at })
}

/// The stored record of `token`, if the store has it (expired or not: the caller says
/// which, to give the right message).
pub async fn lookup(store: &Store, keys: &Keys, token: &str) -> Result<Option<StoredToken>, StoreError> {
    let (kv, _) = store.get(&keys.identity_token(&hash(token))).await?;
    Ok(kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_are_stored_hashed_and_found() {
        let store = Store::memory();
        let keys = Keys::default();
        let t =
            create_bootstrap_token(&store, &keys, "shop", "payments", Duration::from_secs(60)).await.unwrap();
        assert!(is_bootstrap_token(&t), "{t}");
        let (all, _) = store.list("/ballast/identity/tokens/").await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(!all[0].key.contains(&t) && !String::from_utf8_lossy(&all[0].value).contains(&t));
        let found = lookup(&store, &keys, &t).await.unwrap().unwrap();
        assert_eq!((found.namespace.as_str(), found.service_account.as_str()), ("shop", "payments"));
        assert!(found.expires_at >= found.created_at + 60);
        assert_eq!(lookup(&store, &keys, &"0".repeat(64)).await.unwrap(), None);
        assert!(matches!(
            create_bootstrap_token(&store, &keys, "Shop", "x", Duration::from_secs(60)).await,
            Err(TokenError::Namespace(_))
        ));
        assert!(matches!(
            create_bootstrap_token(&store, &keys, "shop", "x", Duration::ZERO).await,
            Err(TokenError::Ttl(_))
        ));
        assert!(!is_bootstrap_token("eyJhbGciOi.x.y"));
    }
}
