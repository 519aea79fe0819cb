//! Writing access-log lines.
//!
//! Why not `tracing::info!` and tracing-subscriber's formatter, which the rest of the
//! logs use: measured with callgrind, that formatter spent about 20,000 instructions on
//! one access line (every field through `fmt::Debug` with character-by-character
//! escaping, plus styling), which doubled what the sidecar spends proxying a request and
//! cost a quarter of its maximum throughput. Here a line is formatted by hand into a
//! reused buffer, in exactly the layout tracing-subscriber gives (text: `TIMESTAMP  INFO
//! ballast_sidecar::access: key=value ...` with strings quoted as `Debug` quotes them and
//! fields without a value left out; JSON: `{"timestamp", "level", "fields", "target"}`),
//! and written to stderr in one `write` like the other log lines, so nothing that reads
//! the logs can tell the difference. Whether lines are written at all is still the log
//! filter's decision (`BALLAST_LOG`, target [`ACCESS_LOG`](super::ACCESS_LOG)). Colours
//! are not used, even on a terminal.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static JSON: AtomicBool = AtomicBool::new(false);

/// Writes lines as JSON objects (`--log-format json`) rather than text.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// A field's value.
pub enum Value<'a> {
    /// Quoted in text.
    Str(&'a str),
    /// Not quoted in text (a protocol, an address); a string in JSON.
    Bare(&'a str),
    Int(i64),
    Float(f64),
    /// An address, not quoted in text.
    Addr(SocketAddr),
    /// An address, quoted in text.
    QuotedAddr(SocketAddr),
}

/// Writes one line with these fields, in this order; `None` values are left out.
pub fn write(fields: &[(&str, Option<Value<'_>>)]) {
    thread_local! {
        static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
    }
    let json = JSON.load(Ordering::Relaxed);
    LINE.with(|line| {
        let Ok(mut line) = line.try_borrow_mut() else { return };
        line.clear();
        format_line(&mut line, json, SystemTime::now(), fields);
        // One write per line, as the other log lines are written: lines never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    });
}

fn format_line(out: &mut String, json: bool, now: SystemTime, fields: &[(&str, Option<Value<'_>>)]) {
    if json {
        out.push_str("{\"timestamp\":\"");
        timestamp(out, now);
        out.push_str("\",\"level\":\"INFO\",\"fields\":{");
        let mut first = true;
        for (name, value) in fields {
            let Some(value) = value else { continue };
            if !first {
                out.push(',');
            }
            first = false;
            json_str(out, name);
            out.push(':');
            match value {
                Value::Str(s) | Value::Bare(s) => json_str(out, s),
                Value::Int(i) => push_int(out, *i),
                Value::Float(f) => {
                    let _ = write!(out, "{f:?}");
                }
                Value::Addr(a) | Value::QuotedAddr(a) => {
                    out.push('"');
                    push_addr(out, a);
                    out.push('"');
                }
            }
        }
        out.push_str("},\"target\":\"");
        out.push_str(super::ACCESS_LOG);
        out.push_str("\"}\n");
    } else {
        timestamp(out, now);
        out.push_str("  INFO ");
        out.push_str(super::ACCESS_LOG);
        out.push(':');
        for (name, value) in fields {
            let Some(value) = value else { continue };
            out.push(' ');
            out.push_str(name);
            out.push('=');
            match value {
                Value::Str(s) => debug_str(out, s),
                Value::Bare(s) => out.push_str(s),
                Value::Int(i) => push_int(out, *i),
                Value::Float(f) => {
                    let _ = write!(out, "{f:?}");
                }
                Value::Addr(a) => push_addr(out, a),
                Value::QuotedAddr(a) => {
                    out.push('"');
                    push_addr(out, a);
                    out.push('"');
                }
            }
        }
        out.push('\n');
    }
}

/// Digits by hand: `fmt` machinery costs several times more for the few numbers a line
/// has (an IPv4 address through `Display` alone cost 1,600 instructions).
fn push_uint(out: &mut String, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(buf.len().saturating_sub(width));
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&buf[start..]).unwrap_or("?"));
}

fn push_int(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    push_uint(out, n.unsigned_abs(), 1);
}

fn push_addr(out: &mut String, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_uint(out, u64::from(*octet), 1);
            }
            out.push(':');
            push_uint(out, u64::from(v4.port()), 1);
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Whether `s` can be written between quotes as it is, in `Debug` and in JSON alike.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `s` quoted as `{:?}` quotes it.
fn debug_str(out: &mut String, s: &str) {
    if plain(s) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

fn json_str(out: &mut String, s: &str) {
    if plain(s) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it.
fn timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    push_uint(out, y.max(0) as u64, 4);
    out.push('-');
    push_uint(out, u64::from(m), 2);
    out.push('-');
    push_uint(out, u64::from(d), 2);
    out.push('T');
    push_uint(out, rem / 3600, 2);
    out.push(':');
    push_uint(out, rem / 60 % 60, 2);
    out.push(':');
    push_uint(out, rem % 60, 2);
    out.push('.');
    push_uint(out, u64::from(since.subsec_micros()), 6);
    out.push('Z');
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fields() -> Vec<(&'static str, Option<Value<'static>>)> {
        vec![
            ("direction", Some(Value::Str("outbound"))),
            ("path", Some(Value::Str("/a \"b\"\\é\n"))),
            ("protocol", Some(Value::Bare("HTTP/1.1"))),
            ("status", Some(Value::Int(200))),
            ("grpc_status", None),
            ("duration_ms", Some(Value::Float(1.5))),
            ("whole_ms", Some(Value::Float(2.0))),
            ("upstream", Some(Value::QuotedAddr("10.0.0.255:8080".parse().expect("addr")))),
            ("client", Some(Value::Addr("[::1]:9".parse().expect("addr")))),
            ("delta", Some(Value::Int(-7))),
        ]
    }

    #[test]
    fn text_is_what_tracing_subscriber_writes() {
        let at = UNIX_EPOCH + Duration::from_micros(1_795_919_130_123_456);
        let mut out = String::new();
        format_line(&mut out, false, at, &fields());
        assert_eq!(
            out,
            "2026-11-29T02:25:30.123456Z  INFO ballast_sidecar::access: direction=\"outbound\" \
             path=\"/a \\\"b\\\"\\\\é\\n\" protocol=HTTP/1.1 status=200 duration_ms=1.5 whole_ms=2.0 \
             upstream=\"10.0.0.255:8080\" client=[::1]:9 delta=-7\n"
        );
    }

    #[test]
    fn json_is_one_object_with_the_fields() {
        let mut out = String::new();
        format_line(&mut out, true, UNIX_EPOCH, &fields());
        assert!(out.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "ballast_sidecar::access");
        let f = &v["fields"];
        assert_eq!(f["path"], "/a \"b\"\\é\n");
        assert_eq!(f["protocol"], "HTTP/1.1");
        assert_eq!(f["status"], 200);
        assert_eq!(f["duration_ms"], 1.5);
        assert_eq!(f["upstream"], "10.0.0.255:8080");
        assert_eq!(f["client"], "[::1]:9");
        assert_eq!(f["delta"], -7);
        assert!(f.get("grpc_status").is_none(), "a field without a value is left out");
    }

    #[test]
    fn dates_match_the_calendar() {
        for (days, date) in [
            (0, (1970, 1, 1)),
            (59, (1970, 3, 1)),
            (11_016, (2000, 2, 29)),
            (11_017, (2000, 3, 1)),
            (20_780, (2026, 11, 23)),
            (-1, (1969, 12, 31)),
        ] {
            assert_eq!(civil_from_days(days), date, "day {days}");
        }
    }
}
