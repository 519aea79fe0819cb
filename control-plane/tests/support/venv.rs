//! The test tools outside cargo, shared by the test suites of every crate (the injector's
//! and the root's include this file by path): the test virtualenv's Python and kubectl.
//! Both fail the test loudly, with the command that installs them, when missing: a
//! skipped check would pass what nobody checked.

// Each including crate uses only some of these.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root: the nearest directory holding `Cargo.lock` above the including
/// crate's manifest (the root package's own, or a member's one level down).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().find(|d| d.join("Cargo.lock").is_file()).unwrap_or(manifest).to_path_buf()
}

/// The test virtualenv's Python (`target/venv`, from `tests/python/requirements.txt`:
/// PyYAML, jsonschema, kubernetes-validate, jsonpatch, grpcio, websockets).
pub fn python() -> PathBuf {
    let py = workspace_root().join("target/venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: create the test virtualenv with `bash scripts/test.sh`, or\n  \
         python3 -m venv target/venv && target/venv/bin/pip install -r tests/python/requirements.txt",
        py.display()
    );
    py
}

/// Runs `kubectl ARGS` offline (its kubeconfig a file that does not exist, so no cluster
/// is ever contacted) and returns its standard output; fails the test naming the command
/// when kubectl is missing or the command fails.
pub fn kubectl<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut cmd = Command::new("kubectl");
    cmd.args(args).env("KUBECONFIG", dir.path().join("none"));
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run kubectl ({e}): install kubectl with kustomize v5 \
             (apt-get install -y kubectl; scripts/test.sh does this)"
        )
    });
    assert!(
        out.status.success(),
        "{shown} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
