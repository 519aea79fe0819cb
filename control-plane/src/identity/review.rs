//! Kubernetes service-account tokens, checked by the API server (a TokenReview).
//!
//! The injector mounts a projected token with the audience `ballast`
//! ([`ballast_api::identity::TOKEN_AUDIENCE`]) into every proxy. The control plane does
//! not verify the JWT itself: the API server knows its own signing keys, whether the
//! pod and the service account still exist, and whether the token was revoked, and a
//! TokenReview asks it all of that in one call. The review names the audience, and the
//! answer must list it among the token's audiences (an answer without audiences means
//! the API server's own), so a token minted for another system (or the pod's default
//! API token) is refused; and the answer must be a service account:
//! `system:serviceaccount:<ns>:<sa>`.
//!
//! RBAC: `create` on `tokenreviews.authentication.k8s.io` (the `system:auth-delegator`
//! ClusterRole grants it).

use ballast_api::identity::TOKEN_AUDIENCE;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

/// The service account a token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token is not valid for Ballast (gRPC Unauthenticated).
    #[error("the Kubernetes API server did not authenticate the token{}: mount a projected service-account token with audience \"ballast\"", .0.as_deref().map(|e| format!(" ({e})")).unwrap_or_default())]
    NotAuthenticated(Option<String>),
    #[error("the token authenticates {0:?}, not a service account (system:serviceaccount:NAMESPACE:NAME)")]
    NotServiceAccount(String),
    #[error(
        "the token's audiences {0:?} do not include \"ballast\"; mount a projected token with audience \"ballast\""
    )]
    Audience(Vec<String>),
    /// The control plane may not ask (gRPC Unavailable: the operator must fix RBAC).
    #[error(
        "the Kubernetes API server refused the control plane's TokenReview ({0}); grant its service account create on tokenreviews.authentication.k8s.io (ClusterRole system:auth-delegator)"
    )]
    Forbidden(String),
    /// The API server is unreachable or failed (gRPC Unavailable).
    #[error("cannot ask the Kubernetes API server to review the token: {0}")]
    Unavailable(String),
}

/// Asks the API server who `token` is, for the audience `ballast`.
pub async fn review(client: &kube::Client, token: &str) -> Result<ServiceAccount, ReviewError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
        },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = match api.create(&PostParams::default(), &request).await {
        Ok(a) => a,
        Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => {
            return Err(ReviewError::Forbidden(status.message.clone()));
        }
        Err(e) => return Err(ReviewError::Unavailable(ballast_api::errors::chain(&e))),
    };
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::NotAuthenticated(status.error.filter(|e| !e.is_empty())));
    }
    // An answer without audiences means the token is valid for the API server's own
    // audience, not for Ballast's: only an explicit "ballast" will do.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(ReviewError::Audience(audiences));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    service_account(&username).ok_or(ReviewError::NotServiceAccount(username))
}

/// `system:serviceaccount:<ns>:<sa>` → the service account.
fn service_account(username: &str) -> Option<ServiceAccount> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some(ServiceAccount { namespace: namespace.to_owned(), name: name.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_of_service_accounts_only() {
        assert_eq!(
            service_account("system:serviceaccount:shop:payments"),
            Some(ServiceAccount { namespace: "shop".into(), name: "payments".into() })
        );
        for bad in ["alice", "system:serviceaccount:shop", "system:serviceaccount::x", "system:node:n1"] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
    }
}
