//! `ballastctl demo` end to end: the real binary with its control plane, sample services
//! and sidecar processes, run as a user would (stdin closed): for 12 s with workload
//! identity and mutual TLS (the default), and briefly with `--no-mtls`.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Generous: the longest run is 12 s, start-up and shutdown take about a second.
const WITHIN: Duration = Duration::from_secs(90);

/// The part of the output from the final table on.
fn final_part(out: &str) -> &str {
    out.split("== final").nth(1).unwrap_or_else(|| panic!("no final table:\n{out}"))
}

/// The success rate (percent) of one row of the final table, e.g. `payments mesh`.
fn final_success(out: &str, service: &str, path: &str) -> f64 {
    let row = final_part(out)
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

/// The final share of the services' inbound requests that came over mutual TLS
/// (percent), and how many did.
fn final_mtls(out: &str) -> (f64, f64) {
    let line = final_part(out)
        .lines()
        .find(|l| l.starts_with("mTLS: "))
        .unwrap_or_else(|| panic!("no mTLS line after the final table:\n{out}"));
    let pct = line
        .strip_prefix("mTLS: ")
        .and_then(|r| r.split('%').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no share in {line:?}"));
    let n = line
        .split('(')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    (pct, n)
}

/// The requests of one row of the final "who called whom" table.
fn calls(out: &str, service: &str, caller: &str, over: &str) -> Option<f64> {
    let table = out.split("Who called whom").nth(1)?;
    table.lines().find_map(|l| {
        // service, the caller (which may contain spaces), over, requests.
        let cells: Vec<&str> = l.split_whitespace().collect();
        let [s, middle @ .., o, n] = &cells[..] else { return None };
        (*s == service && middle.join(" ") == caller && *o == over).then(|| n.parse().ok())?
    })
}

/// Whether `pid` is still a ballast-sidecar (a reused pid running something else is not).
fn is_sidecar(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ballast-sidecar")
}

/// Runs `ballastctl demo ARGS` to its end; its stdout, and stdout with stderr for
/// messages. Checks that it succeeded and that no sidecar outlives it.
fn run_demo(args: &[&str]) -> (String, String) {
    let mut child = Command::new(binary("ballastctl"))
        .arg("demo")
        .args(args)
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
    for (service, path) in
        [("catalog", "direct"), ("catalog", "mesh"), ("payments", "direct"), ("payments", "mesh")]
    {
        final_success(&out, service, path);
    }
    (out, all)
}

#[test]
fn demo_shows_the_control_plane_retries_a_circuit_and_mutual_tls() {
    let (out, all) = run_demo(&["--duration", "12s", "--report-every", "4"]);

    // Identity: the control plane recorded each sidecar's SPIFFE ID (from its client
    // certificate), and each sidecar holds a certificate.
    let td = "spiffe://cluster.local/ns/demo/sa";
    for (pod, account) in [
        ("catalog-1", "catalog"),
        ("catalog-2", "catalog"),
        ("client", "client"),
        ("payments-1", "payments"),
        ("payments-2", "payments"),
    ] {
        let id = format!("{td}/{account}");
        assert!(
            out.lines().any(|l| l.starts_with("demo ")
                && l.split_whitespace().nth(1) == Some(pod)
                && l.split_whitespace().any(|c| c == id)),
            "{pod} has identity {id} in the proxies table:\n{all}"
        );
    }
    assert!(out.contains("5 of 5 sidecars hold a certificate."), "{all}");
    // A retried request, as the client sidecar and both tries' sidecars logged it.
    let retried: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("A retried request in the access logs"))
        .skip(1)
        .take(3)
        .collect();
    assert!(retried.len() == 3 && retried[0].contains("attempts=2"), "{all}");
    let id = retried[0].split("request_id=").nth(1).and_then(|r| r.split(' ').next()).expect("request id");
    assert!(retried.iter().all(|l| l.contains(id)), "one request id across the tries:\n{all}");
    assert!(
        retried[1].contains("direction=\"inbound\"") && retried[2].contains("direction=\"inbound\""),
        "{all}"
    );

    // The side-by-side table, and what the mesh changes for the flaky service.
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

    // Mutual TLS: the services' sidecars saw the client's verified identity on (nearly)
    // every request; the only plain-text one is the lockdown's probe.
    let (pct, mtls) = final_mtls(&out);
    assert!(mtls > 0.0 && pct > 99.0, "requests over mutual TLS: {mtls} ({pct}%)\n{all}");
    for service in ["catalog", "payments"] {
        let n = calls(&out, service, &format!("{td}/client"), "mTLS").unwrap_or(0.0);
        assert!(n > 0.0, "the client called {service} over mTLS:\n{all}");
    }

    // The lockdown: a plain-text caller and a mesh workload outside the allow list get
    // 403 forbidden, while the client's traffic keeps going through.
    let lockdown = line("LOCKDOWN").unwrap_or_else(|| panic!("no lockdown:\n{all}"));
    assert!(lockdown > outage, "after the outage:\n{all}");
    let refused = |who: &str| {
        out.lines().position(|l| l.contains(who) && l.ends_with(": 403 (ballast-rejected: forbidden)"))
    };
    let plain = refused("a caller outside the mesh (plain text").unwrap_or_else(|| panic!("{all}"));
    let catalog = refused("catalog-1's sidecar (demo/catalog").unwrap_or_else(|| panic!("{all}"));
    assert!(lockdown < plain && lockdown < catalog, "{all}");
    assert!(out.contains("inbound.mtls: strict"), "the refusal says why:\n{all}");
    assert!(out.contains(&format!("{td}/catalog is not in this service's inbound.allow")), "{all}");
    assert!(calls(&out, "payments", "(none: plain text)", "plain").is_some_and(|n| n >= 1.0), "{all}");
    assert!(calls(&out, "payments", &format!("{td}/catalog"), "mTLS").is_some_and(|n| n >= 1.0), "{all}");
    // A lockdown that also refused the client would cost payments a quarter of the run.
    assert!(mesh >= 90.0, "the client still gets through after the lockdown: {mesh}%\n{all}");
}

#[test]
fn demo_without_mtls_runs_in_plain_text() {
    let (out, all) = run_demo(&["--duration", "5s", "--report-every", "2", "--no-mtls"]);
    assert!(out.contains("in plain text (--no-mtls)"), "{all}");
    assert!(out.contains("Workload identity is off (--no-mtls)"), "{all}");
    assert!(out.contains("push http://") && out.contains("admin API http://"), "{all}");
    assert!(!out.contains("spiffe://"), "no identities without mTLS:\n{all}");
    assert!(!out.contains("LOCKDOWN"), "no lockdown without mTLS:\n{all}");
    let (pct, mtls) = final_mtls(&out);
    assert_eq!((pct, mtls), (0.0, 0.0), "{all}");
    for service in ["catalog", "payments"] {
        let n = calls(&out, service, "(none: plain text)", "plain").unwrap_or(0.0);
        assert!(n > 0.0, "{service} was called in plain text:\n{all}");
    }
}
