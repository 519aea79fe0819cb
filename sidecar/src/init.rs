//! `ballast-sidecar init`: the iptables rules that send a pod's TCP traffic through the
//! sidecar (DESIGN §2), as the init container installs them.
//!
//! The rules live in two chains of the `nat` table, `BALLAST_INBOUND` (jumped to from
//! `PREROUTING`) and `BALLAST_OUTPUT` (from `OUTPUT`). They are written with one
//! `iptables-restore --noflush` call, which replaces our chains atomically and leaves
//! everybody else's rules alone; the jumps are added only when missing. Running init
//! twice therefore leaves exactly the same rules, which matters because an init container
//! reruns when a pod's sandbox is recreated.
//!
//! Not redirected: the proxy's own traffic (by UID, so its upstream connections do not
//! loop back into it), anything leaving through loopback or addressed to 127.0.0.1 (the
//! inbound side's forward to the app, an app's local sidecars), the sidecar's own inbound
//! and admin ports (probes and scrapes reach it directly), and the ports and CIDRs given.
//! IPv6 rules (ip6tables) are not installed yet.

use std::io::Write;
use std::process::{Command, Stdio};

pub const INBOUND_CHAIN: &str = "BALLAST_INBOUND";
pub const OUTPUT_CHAIN: &str = "BALLAST_OUTPUT";

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub skip_inbound_ports: Vec<String>,
    pub skip_outbound_ports: Vec<String>,
    pub skip_outbound_cidrs: Vec<String>,
    /// The iptables command (`iptables`, `iptables-nft`, `iptables-legacy`).
    pub iptables: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid {flag} value {value:?}: {reason}")]
    BadValue { flag: &'static str, value: String, reason: &'static str },
    #[error(
        "cannot run {command}: {source} (is iptables installed, and does this container have NET_ADMIN?)"
    )]
    Spawn { command: String, source: std::io::Error },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// A port (`8080`) or range (`9000:9100`, `9000-9100`), normalised to iptables' form.
fn port_spec(flag: &'static str, s: &str) -> Result<String, InitError> {
    let bad = |reason| InitError::BadValue { flag, value: s.to_owned(), reason };
    let s = s.trim();
    let (lo, hi) = match s.split_once([':', '-']) {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let lo: u16 = lo.parse().map_err(|_| bad("expected a port or a range such as 9000:9100"))?;
    if lo == 0 {
        return Err(bad("port 0 is not a port"));
    }
    match hi {
        None => Ok(lo.to_string()),
        Some(hi) => {
            let hi: u16 = hi.parse().map_err(|_| bad("expected a port or a range such as 9000:9100"))?;
            if hi < lo {
                return Err(bad("range ends before it starts"));
            }
            Ok(format!("{lo}:{hi}"))
        }
    }
}

/// An IPv4 CIDR (`10.0.0.0/8`) or address.
fn cidr_spec(s: &str) -> Result<String, InitError> {
    let bad = |reason| InitError::BadValue { flag: "--skip-outbound-cidrs", value: s.to_owned(), reason };
    let s = s.trim();
    let (ip, len) = s.split_once('/').map_or((s, None), |(a, b)| (a, Some(b)));
    ip.parse::<std::net::Ipv4Addr>().map_err(|_| bad("expected an IPv4 CIDR such as 10.0.0.0/8"))?;
    let len: u8 = match len {
        Some(l) => l.parse().map_err(|_| bad("prefix length must be 0-32"))?,
        None => 32,
    };
    if len > 32 {
        return Err(bad("prefix length must be 0-32"));
    }
    Ok(format!("{ip}/{len}"))
}

/// The `iptables-restore` input that defines both chains.
pub fn ruleset(o: &InitOptions) -> Result<String, InitError> {
    let mut r = String::new();
    let mut line = |s: String| {
        r.push_str(&s);
        r.push('\n');
    };
    line("*nat".into());
    line(format!(":{INBOUND_CHAIN} - [0:0]"));
    line(format!(":{OUTPUT_CHAIN} - [0:0]"));
    // Our own ports are never redirected inbound. The outbound port above all: redirected,
    // a connection to podIP:4140 would reach the outbound proxy through the inbound
    // forward and use the pod as an open proxy.
    let mut skip_in = vec![o.inbound_port.to_string(), o.outbound_port.to_string(), o.admin_port.to_string()];
    for p in &o.skip_inbound_ports {
        skip_in.push(port_spec("--skip-inbound-ports", p)?);
    }
    for p in skip_in {
        line(format!("-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p} -j RETURN"));
    }
    line(format!("-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}", o.inbound_port));
    line(format!("-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN", o.proxy_uid));
    line(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    line(format!("-A {OUTPUT_CHAIN} -d 127.0.0.1/32 -j RETURN"));
    for p in &o.skip_outbound_ports {
        line(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {} -j RETURN",
            port_spec("--skip-outbound-ports", p)?
        ));
    }
    for c in &o.skip_outbound_cidrs {
        line(format!("-A {OUTPUT_CHAIN} -d {} -j RETURN", cidr_spec(c)?));
    }
    line(format!("-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}", o.outbound_port));
    line("COMMIT".into());
    Ok(r)
}

/// The jumps into our chains: (chain, rule).
fn jumps() -> [(&'static str, [&'static str; 4]); 2] {
    [("PREROUTING", ["-p", "tcp", "-j", INBOUND_CHAIN]), ("OUTPUT", ["-p", "tcp", "-j", OUTPUT_CHAIN])]
}

/// What `--dry-run` prints: the restore input and the jump commands.
pub fn plan(o: &InitOptions) -> Result<String, InitError> {
    let mut s = format!("# {}-restore --noflush <<EOF\n{}EOF\n", o.iptables, ruleset(o)?);
    for (chain, rule) in jumps() {
        s.push_str(&format!("# if missing:\n{} -t nat -A {chain} {}\n", o.iptables, rule.join(" ")));
    }
    Ok(s)
}

pub fn install(o: &InitOptions) -> Result<(), InitError> {
    let rules = ruleset(o)?;
    let restore = format!("{}-restore", o.iptables);
    let mut child = Command::new(&restore)
        .args(["--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::Spawn { command: restore.clone(), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|source| InitError::Spawn { command: restore.clone(), source })?;
    }
    let out =
        child.wait_with_output().map_err(|source| InitError::Spawn { command: restore.clone(), source })?;
    if !out.status.success() {
        return Err(InitError::Failed {
            command: restore,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    for (chain, rule) in jumps() {
        let exists = Command::new(&o.iptables)
            .args(["-t", "nat", "-C", chain])
            .args(rule)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| InitError::Spawn { command: o.iptables.clone(), source })?
            .success();
        if !exists {
            let command = format!("{} -t nat -A {chain} {}", o.iptables, rule.join(" "));
            let out = Command::new(&o.iptables)
                .args(["-t", "nat", "-A", chain])
                .args(rule)
                .output()
                .map_err(|source| InitError::Spawn { command: command.clone(), source })?;
            if !out.status.success() {
                return Err(InitError::Failed {
                    command,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> InitOptions {
        InitOptions {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            skip_inbound_ports: vec!["22".into()],
            skip_outbound_ports: vec!["5432".into(), "9000-9100".into()],
            skip_outbound_cidrs: vec!["169.254.169.254".into(), "10.0.0.0/8".into()],
            iptables: "iptables".into(),
        }
    }

    #[test]
    fn ruleset_excludes_proxy_uid_loopback_and_skips() {
        let r = ruleset(&opts()).unwrap();
        assert!(r.contains("-A BALLAST_OUTPUT -m owner --uid-owner 2102 -j RETURN"));
        assert!(r.contains("-A BALLAST_OUTPUT -o lo -j RETURN"));
        assert!(r.contains("--dport 9000:9100 -j RETURN"));
        assert!(r.contains("-A BALLAST_OUTPUT -d 169.254.169.254/32 -j RETURN"));
        assert!(r.contains("-A BALLAST_INBOUND -p tcp -m tcp --dport 22 -j RETURN"));
        assert!(r.contains("-A BALLAST_INBOUND -p tcp -m tcp --dport 4191 -j RETURN"));
        assert!(
            r.contains("-A BALLAST_INBOUND -p tcp -m tcp --dport 4140 -j RETURN"),
            "no open proxy via podIP:4140"
        );
        // The redirects come last, after every exclusion.
        let lines: Vec<&str> = r.lines().collect();
        let redirect_out = lines.iter().position(|l| l.contains("REDIRECT --to-ports 4140")).unwrap();
        assert!(lines[..redirect_out].iter().any(|l| l.contains("uid-owner")));
        assert_eq!(lines[redirect_out + 1], "COMMIT");
    }

    #[test]
    fn bad_values_are_named() {
        let mut o = opts();
        o.skip_outbound_ports = vec!["http".into()];
        let e = ruleset(&o).unwrap_err().to_string();
        assert!(e.contains("--skip-outbound-ports") && e.contains("\"http\""), "{e}");
        let mut o = opts();
        o.skip_outbound_cidrs = vec!["10.0.0.0/40".into()];
        assert!(ruleset(&o).unwrap_err().to_string().contains("prefix length"));
    }
}
