//! Compiles the push protocol (`proto/ballast/v1/discovery.proto`) with tonic.
//!
//! protoc: `PROTOC` when set (the workspace's `.cargo/config.toml` points it at
//! `scripts/protoc`), else the binary the `protoc-bin-vendored` crate carries, so a build
//! never needs a system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: the build script is single-threaded; nothing reads the environment
        // concurrently. prost-build reads `PROTOC` from it.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    // No transport helpers (`connect`): they would pull tonic's channel into every crate
    // that depends on the api, the sidecar among them (DESIGN §1: the sidecar stays small).
    tonic_prost_build::configure().build_transport(false).compile_protos(
        &["proto/ballast/v1/discovery.proto", "proto/ballast/v1/identity.proto"],
        &["proto"],
    )?;
    Ok(())
}
