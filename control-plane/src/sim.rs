//! A simulated sidecar: the push stream's client side and nothing else. The convergence
//! benchmark runs a thousand of these in one process, and the tests use them to watch
//! exactly what the control plane sends.

use std::time::Duration;

use ballast_api::proto::v1::{
    Ack, FromSidecar, Hello, Nack, ToSidecar, discovery_client::DiscoveryClient, from_sidecar,
};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

pub struct SimSidecar {
    tx: mpsc::Sender<FromSidecar>,
    rx: Streaming<ToSidecar>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the control plane ended the stream")]
    Ended,
    #[error("nothing received within {0:?}")]
    Timeout(Duration),
}

impl SimSidecar {
    /// Connects to `url` and says `hello`.
    pub async fn connect(url: &str, hello: Hello) -> Result<Self, SimError> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(SimError::Connect)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Self::on(channel, hello).await
    }

    /// Opens a stream on an existing channel (many simulated sidecars can share one
    /// HTTP/2 connection, as real ones would not, to spare file descriptors).
    pub async fn on(channel: Channel, hello: Hello) -> Result<Self, SimError> {
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, out) = mpsc::channel(8);
        tx.send(FromSidecar { message: Some(from_sidecar::Message::Hello(hello)) })
            .await
            .map_err(|_| SimError::Ended)?;
        let out = futures_util::stream::unfold(out, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let rx = client.stream(out).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// The next update, within `within`.
    pub async fn next(&mut self, within: Duration) -> Result<ToSidecar, SimError> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(SimError::Ended),
            Ok(Err(s)) => Err(SimError::Status(s)),
            Err(_) => Err(SimError::Timeout(within)),
        }
    }

    pub async fn ack(&self, version: u64) -> Result<(), SimError> {
        let m = FromSidecar { message: Some(from_sidecar::Message::Ack(Ack { version })) };
        self.tx.send(m).await.map_err(|_| SimError::Ended)
    }

    pub async fn nack(&self, version: u64, reason: &str) -> Result<(), SimError> {
        let m = FromSidecar {
            message: Some(from_sidecar::Message::Nack(Nack { version, reason: reason.into() })),
        };
        self.tx.send(m).await.map_err(|_| SimError::Ended)
    }

    /// The next update, acked.
    pub async fn next_acked(&mut self, within: Duration) -> Result<ToSidecar, SimError> {
        let m = self.next(within).await?;
        self.ack(m.version).await?;
        Ok(m)
    }
}

/// A Hello for a sidecar `pod` in `namespace`, fronting `service` at `address` if given.
pub fn hello(pod: &str, namespace: &str, service: Option<(&str, &str)>) -> Hello {
    Hello {
        pod: pod.into(),
        namespace: namespace.into(),
        service: service.map(|s| s.0.to_owned()).unwrap_or_default(),
        address: service.map(|s| s.1.to_owned()).unwrap_or_default(),
        proxy_version: "sim".into(),
        ..Default::default()
    }
}
