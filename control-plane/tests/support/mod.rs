//! Helpers shared by the control plane's integration tests. Each test binary uses a
//! subset of them.
#![allow(dead_code)]

pub mod etcd;
pub mod fake_api;
