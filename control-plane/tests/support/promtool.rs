//! `promtool check metrics` on an exposition, shared by the test suites of every crate
//! (the injector's and the root's include this file by path).

use std::io::Write as _;
use std::process::{Command, Stdio};

/// Fails the test on any complaint; fails loudly, naming the package, if promtool is
/// missing (`scripts/test.sh` installs it).
pub fn check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install -y prometheus, or scripts/test.sh)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && complaints.trim().is_empty(), "promtool: {complaints}\n{text}");
}
