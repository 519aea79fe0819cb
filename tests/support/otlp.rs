//! A real OpenTelemetry OTLP trace receiver for the end-to-end tests:
//! `tests/python/otlp_receiver.py`, built from the published OpenTelemetry protobuf
//! definitions (the `opentelemetry-proto` package in the test virtualenv), serving
//! OTLP/gRPC and OTLP/HTTP (protobuf) on 127.0.0.1. Every span it receives is one JSON
//! line in a file of its own temporary directory; [`OtlpReceiver::spans`] reads them back.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{ChildGuard, python, repo_root};

/// How long the receiver may take to print its `READY` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `otlp_receiver.py`, killed (and its directory removed) when dropped.
pub struct OtlpReceiver {
    /// OTLP/gRPC (`TraceService/Export`).
    pub grpc: SocketAddr,
    /// OTLP/HTTP (`POST /v1/traces`, `application/x-protobuf`).
    pub http: SocketAddr,
    out: PathBuf,
    // Declared before `_dir`: the process dies before its output file is removed.
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl OtlpReceiver {
    /// A receiver that accepts every export request.
    pub fn start() -> Self {
        Self::start_failing(0)
    }

    /// A receiver that fails its first `fail_first` export requests, over either
    /// transport (gRPC `UNAVAILABLE`, HTTP 503), without recording their spans.
    pub fn start_failing(fail_first: u32) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for the OTLP receiver");
        let out = dir.path().join("spans.jsonl");
        let script = repo_root().join("tests/python/otlp_receiver.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(["--grpc-port", "0", "--http-port", "0", "--fail-first", &fail_first.to_string()])
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("the receiver's piped stdout");
        let mut child = ChildGuard(child);

        // The READY line, read on a thread so that a receiver that hangs cannot hang the
        // test; the thread then drains stdout until the receiver exits.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => panic!("reading the OTLP receiver's stdout: {e}"),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.0.wait();
                panic!(
                    "the OTLP receiver exited before it was ready ({status:?}); its stderr is \
                     above. Is opentelemetry-proto in the test virtualenv? Rebuild it with \
                     `bash scripts/test.sh`, or target/venv/bin/pip install -r \
                     tests/python/requirements.txt"
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the OTLP receiver printed no READY line within {READY_TIMEOUT:?}")
            }
        };
        let (grpc, http) = parse_ready(&line).unwrap_or_else(|| {
            panic!("the OTLP receiver's first line is not `READY grpc=P http=P`: {line:?}")
        });
        OtlpReceiver {
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            out,
            child,
            _dir: dir,
        }
    }

    /// The OTLP/gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The OTLP/HTTP base endpoint, `http://127.0.0.1:PORT` (traces go to `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<Span> {
        let text = match std::fs::read_to_string(&self.out) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading {}: {e}", self.out.display()),
        };
        // Only whole lines: the receiver may be writing the last one right now.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        whole
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("bad span line from the OTLP receiver: {e}: {l}"))
            })
            .collect()
    }

    /// Polls [`spans`](Self::spans) every 50 ms until `cond` holds for them and returns
    /// them; panics naming `what`, with the spans received, after `timeout`.
    pub fn wait_for_spans(&self, what: &str, timeout: Duration, cond: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if cond(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; the OTLP receiver \
                     (grpc {}, http {}) got {} span(s):\n{spans:#?}",
                    self.grpc,
                    self.http,
                    spans.len()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `READY grpc=P http=Q` → `(P, Q)`.
fn parse_ready(line: &str) -> Option<(u16, u16)> {
    let mut words = line.trim().split(' ');
    if words.next()? != "READY" {
        return None;
    }
    let grpc = words.next()?.strip_prefix("grpc=")?.parse().ok()?;
    let http = words.next()?.strip_prefix("http=")?.parse().ok()?;
    words.next().is_none().then_some((grpc, http))
}

/// One span as the receiver wrote it (see the docstring of `otlp_receiver.py`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Span {
    /// `"grpc"` or `"http"`: the transport it arrived over.
    pub transport: String,
    /// The 1-based ordinal of the export request that carried it, counted over both
    /// transports and including the requests failed by `start_failing`.
    pub request: u64,
    pub resource: HashMap<String, serde_json::Value>,
    /// The instrumentation scope's name.
    pub scope: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits, or empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `SERVER`, `CLIENT`, `INTERNAL`, `PRODUCER`, `CONSUMER` or `UNSPECIFIED`.
    pub kind: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Strings, bools, ints and doubles as JSON scalars, arrays as lists, bytes as hex.
    pub attributes: HashMap<String, serde_json::Value>,
    pub status: SpanStatus,
    /// `{"name": ..., "attributes": {...}}` each.
    pub events: Vec<serde_json::Value>,
    pub flags: u32,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct SpanStatus {
    /// `UNSET`, `OK` or `ERROR`.
    pub code: String,
    pub message: String,
}

impl Span {
    /// A string attribute.
    pub fn attr_str(&self, k: &str) -> Option<&str> {
        self.attributes.get(k)?.as_str()
    }

    /// An integer attribute.
    pub fn attr_i64(&self, k: &str) -> Option<i64> {
        self.attributes.get(k)?.as_i64()
    }

    /// A string attribute of the span's resource (such as `service.name`).
    pub fn resource_str(&self, k: &str) -> Option<&str> {
        self.resource.get(k)?.as_str()
    }
}
