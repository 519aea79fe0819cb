//! The gRPC protocols between sidecars and the control plane, generated from
//! `proto/ballast/v1/`: `discovery.proto`, the push stream (DESIGN §3), and
//! `identity.proto`, workload certificates. The .proto files document every message.

/// `ballast.v1`: the `Discovery` and `Identity` services, their clients and servers, and
/// their messages.
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
