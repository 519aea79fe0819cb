//! The push protocol between sidecars and the control plane (DESIGN §3), generated from
//! `proto/ballast/v1/discovery.proto` (which documents every message).

/// `ballast.v1`: the `Discovery` service, its client and server, and its messages.
pub mod v1 {
    tonic::include_proto!("ballast.v1");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{FromSidecar, Hello, from_sidecar};

    #[test]
    fn a_hello_round_trips() {
        let hello = FromSidecar {
            message: Some(from_sidecar::Message::Hello(Hello {
                pod: "payments-7d9f".into(),
                namespace: "shop".into(),
                service: "payments".into(),
                address: "10.0.1.1:4143".into(),
                ports: vec![8080],
                calls: vec!["catalog.shop".into()],
                ..Default::default()
            })),
        };
        let bytes = hello.encode_to_vec();
        assert_eq!(FromSidecar::decode(bytes.as_slice()).expect("decodes"), hello);
    }
}
