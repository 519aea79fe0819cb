//! `ballastctl demo` end to end: the real binary with its control plane, sample services
//! and sidecar processes, run for 12 s as a user would (stdin closed).

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Generous: the run is 12 s, start-up and shutdown take about a second.
const WITHIN: Duration = Duration::from_secs(90);

/// The success rate (percent) of one row of the final table, e.g. `payments mesh`.
fn final_success(out: &str, service: &str, path: &str) -> f64 {
    let table = out.split("== final").nth(1).unwrap_or_else(|| panic!("no final table:\n{out}"));
    let row = table
        .lines()
        .find(|l| {
            let mut cells = l.split_whitespace();
            cells.next() == Some(service) && cells.next() == Some(path)
        })
        .unwrap_or_else(|| panic!("no {service} {path} row in the final table:\n{out}"));
    row.split_whitespace()
        .nth(3)
        .and_then(|c| c.strip_suffix('%'))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no success rate in {row:?}"))
}

/// Whether `pid` is still a ballast-sidecar (a reused pid running something else is not).
fn is_sidecar(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ballast-sidecar")
}

#[test]
fn demo_shows_the_control_plane_retries_and_a_circuit_opening_and_closing() {
    let mut child = Command::new(binary("ballastctl"))
        .args(["demo", "--duration", "12s", "--report-every", "4"])
        .arg("--sidecar-bin")
        .arg(binary("ballast-sidecar"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ballastctl demo");
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut child = ChildGuard(child);
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WITHIN;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for the demo") {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not exit within {WITHIN:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let all = format!("{out}\n--- stderr ---\n{err}");

    // No sidecar outlives the demo: every pid it printed is gone (they are cleaned up
    // here before failing, so a failure leaves nothing running either).
    let pids: Vec<i32> = out
        .lines()
        .filter_map(|l| l.split("sidecar pid ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 5, "the demo prints its 5 sidecars' pids:\n{all}");
    let alive: Vec<i32> = pids.iter().copied().filter(|&p| is_sidecar(p)).collect();
    for &p in &alive {
        // SAFETY: kill(2) on a pid that is a ballast-sidecar this test started.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
    assert!(alive.is_empty(), "sidecars still running after the demo exited: {alive:?}\n{all}");
    assert!(status.success(), "the demo failed ({status}):\n{all}");
    assert!(out.contains("Stopped 5 sidecars (SIGTERM"), "each sidecar stopped on SIGTERM:\n{all}");

    // The control plane's view once at the start: every sidecar connected and synced.
    let synced: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("demo ") && l.contains(" SYNCED "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    for pod in ["catalog-1", "catalog-2", "client", "payments-1", "payments-2"] {
        assert!(synced.contains(&pod), "{pod} is SYNCED in the proxies table:\n{all}");
    }
    assert!(out.contains("acked by 5 sidecar(s)"), "the policies reached every sidecar:\n{all}");

    // The side-by-side table, and what the mesh changes for the flaky service.
    for (service, path) in
        [("catalog", "direct"), ("catalog", "mesh"), ("payments", "direct"), ("payments", "mesh")]
    {
        final_success(&out, service, path);
    }
    let (direct, mesh) = (final_success(&out, "payments", "direct"), final_success(&out, "payments", "mesh"));
    assert!(
        mesh > direct,
        "retries and the per-try timeout help payments: mesh {mesh}% vs direct {direct}%\n{all}"
    );

    // The outage: the breaker for catalog opens, rejects, and closes after it.
    let line = |what: &str| out.lines().position(|l| l.contains(what));
    let outage = line("OUTAGE").unwrap_or_else(|| panic!("no outage:\n{all}"));
    let opened = line("circuit catalog.demo: closed -> OPEN").unwrap_or_else(|| panic!("no opening:\n{all}"));
    let rejected = out
        .lines()
        .position(|l| l.contains("circuit catalog.demo:") && l.contains("rejected while it was open"))
        .unwrap_or_else(|| panic!("no rejections:\n{all}"));
    let closed = out
        .lines()
        .position(|l| l.contains("circuit catalog.demo:") && l.contains("-> closed"))
        .unwrap_or_else(|| panic!("the circuit never closed:\n{all}"));
    assert!(outage < opened && opened < closed && closed < rejected, "in order:\n{all}");
    assert!(line("catalog is back").is_some_and(|back| back > outage), "the outage ends:\n{all}");
}
