//! Trace context on the wire: W3C Trace Context and B3, read and written.
//!
//! Written here rather than with `opentelemetry_sdk`'s `TraceContextPropagator`: that one
//! goes through an `opentelemetry::Context` (a map allocated per request) and knows
//! neither B3 nor which format a request came in, and the only B3 propagator lives in
//! `opentelemetry-zipkin`, which brings an HTTP client along. Parsing three headers is
//! small and, on the data path, cheaper done in place.
//!
//! Reading, in this order (the first valid one wins, as Envoy does):
//! 1. `traceparent` (W3C, any version but `ff`, with `tracestate` kept verbatim);
//! 2. `b3` (single header: `TRACEID-SPANID[-SAMPLED[-PARENT]]`, or just `0`/`1`/`d`);
//! 3. `x-b3-traceid` + `x-b3-spanid` (+ `x-b3-sampled`, `x-b3-flags`).
//!
//! A malformed header is ignored, as if absent (the spec's rule: a broken caller must not
//! break the request). 64-bit B3 trace ids are padded to 128 bits with zeros on the
//! left, as Zipkin does, so a trace keeps its id across formats.
//!
//! Writing: `traceparent` always, plus the B3 form(s) the request came with, so an app
//! that only understands B3 still finds its header. `tracestate` travels unchanged.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The formats a request carried, to answer in kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub b3_single: bool,
    pub b3_multi: bool,
}

/// The caller's span, from the request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

/// What the request headers said about its trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub parent: Option<Parent>,
    /// The caller's sampling decision, when it made one (B3 may carry a decision
    /// without ids: `b3: 0`).
    pub sampled: Option<bool>,
    pub tracestate: Option<HeaderValue>,
    pub formats: Formats,
}

/// Reads the trace context of a request (see the module docs for the order).
pub fn extract(headers: &HeaderMap) -> Extracted {
    let mut out = Extracted {
        formats: Formats { b3_single: headers.contains_key(B3), b3_multi: headers.contains_key(B3_TRACE_ID) },
        ..Default::default()
    };
    if let Some((parent, sampled)) = headers.get(TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes())) {
        out.parent = Some(parent);
        out.sampled = Some(sampled);
        out.tracestate = headers.get(TRACESTATE).cloned();
        return out;
    }
    if let Some(v) = headers.get(B3)
        && let Some((parent, sampled)) = parse_b3_single(v.as_bytes())
    {
        out.parent = parent;
        out.sampled = sampled;
        return out;
    }
    if let (Some(t), Some(s)) = (headers.get(B3_TRACE_ID), headers.get(B3_SPAN_ID))
        && let (Some(trace_id), Some(span_id)) = (trace_id(t.as_bytes()), span_id(s.as_bytes()))
    {
        out.parent = Some(Parent { trace_id, span_id });
        let debug = headers.get(B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
        out.sampled = match headers.get(B3_SAMPLED).map(|v| v.as_bytes()) {
            _ if debug => Some(true),
            Some(b"1" | b"true") => Some(true),
            Some(b"0" | b"false") => Some(false),
            _ => None,
        };
    }
    out
}

/// Writes the context of span `span_id` of trace `trace_id` for the next hop: see the
/// module docs. `tracestate` is written when given and removed otherwise.
pub fn inject(
    headers: &mut HeaderMap,
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    formats: Formats,
    tracestate: Option<&HeaderValue>,
) {
    let flag = if sampled { "01" } else { "00" };
    headers.insert(TRACEPARENT, header(format!("00-{trace_id}-{span_id}-{flag}")));
    match tracestate {
        Some(ts) => headers.insert(TRACESTATE, ts.clone()),
        None => headers.remove(TRACESTATE),
    };
    let s = if sampled { "1" } else { "0" };
    if formats.b3_single {
        headers.insert(B3, header(format!("{trace_id}-{span_id}-{s}")));
    }
    if formats.b3_multi {
        headers.insert(B3_TRACE_ID, header(trace_id.to_string()));
        headers.insert(B3_SPAN_ID, header(span_id.to_string()));
        headers.insert(B3_SAMPLED, HeaderValue::from_static(if sampled { "1" } else { "0" }));
        // The caller's parent is not ours: the new parent is the span we name here.
        headers.remove(B3_PARENT_SPAN_ID);
        headers.remove(B3_FLAGS);
    }
}

/// A header from hex digits and dashes, which are always valid header bytes.
fn header(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `VERSION-TRACEID-SPANID-FLAGS` (W3C Trace Context §3.2).
fn parse_traceparent(v: &[u8]) -> Option<(Parent, bool)> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    // Version 00 is exactly 55 bytes; later versions may append fields after a dash.
    if version == 0xff || (version == 0 && v.len() != 55) || (version > 0 && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = hex_id::<16>(&v[3..35]).map(TraceId::from_bytes)?;
    let span_id = hex_id::<8>(&v[36..52]).map(SpanId::from_bytes)?;
    let flags = hex_u8(&v[53..55])?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some((Parent { trace_id, span_id }, flags & 1 == 1))
}

/// `b3: TRACEID-SPANID[-SAMPLING[-PARENT]]` or a bare sampling state.
fn parse_b3_single(v: &[u8]) -> Option<(Option<Parent>, Option<bool>)> {
    let state = |s: &[u8]| match s {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    };
    if v.len() == 1 {
        return state(v).map(|s| (None, Some(s)));
    }
    let mut parts = v.split(|b| *b == b'-');
    let (trace, span) = (trace_id(parts.next()?)?, span_id(parts.next()?)?);
    let sampled = match parts.next() {
        Some(s) => Some(state(s)?),
        None => None,
    };
    if let Some(p) = parts.next() {
        span_id(p)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((Some(Parent { trace_id: trace, span_id: span }), sampled))
}

/// A B3 trace id: 16 or 32 hex digits, not all zero.
fn trace_id(v: &[u8]) -> Option<TraceId> {
    let id = match v.len() {
        32 => hex_id::<16>(v)?,
        16 => {
            let low = hex_id::<8>(v)?;
            let mut b = [0; 16];
            b[8..].copy_from_slice(&low);
            b
        }
        _ => return None,
    };
    let id = TraceId::from_bytes(id);
    (id != TraceId::INVALID).then_some(id)
}

fn span_id(v: &[u8]) -> Option<SpanId> {
    if v.len() != 16 {
        return None;
    }
    let id = SpanId::from_bytes(hex_id::<8>(v)?);
    (id != SpanId::INVALID).then_some(id)
}

/// Lowercase hex only, as both specs require.
fn hex_id<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        out[i] = hex_u8(pair)?;
    }
    Some(out)
}

fn hex_u8(pair: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(pair[0])? << 4 | d(pair[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_w3c_with_tracestate() {
        let e = extract(&headers(&[("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")]));
        let p = e.parent.expect("parent");
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(e.sampled, Some(true));
        assert_eq!(e.tracestate.as_ref().map(|v| v.as_bytes()), Some(&b"congo=t61rcWkgMzE"[..]));
        assert_eq!(e.formats, Formats::default());
    }

    #[test]
    fn rejects_malformed_traceparent() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let h = HeaderMap::from_iter([(TRACEPARENT, HeaderValue::from_static(bad))]);
            assert_eq!(extract(&h).parent, None, "{bad}");
        }
        // A later version may append fields.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future";
        let h = HeaderMap::from_iter([(TRACEPARENT, HeaderValue::from_static(v1))]);
        assert_eq!(extract(&h).sampled, Some(false));
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let e = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        assert_eq!(e.parent.expect("parent").span_id.to_string(), "e457b5a2e4d86bd1");
        assert_eq!((e.sampled, e.formats.b3_single), (Some(true), true));
        let e = extract(&headers(&[("b3", "0")]));
        assert_eq!((e.parent, e.sampled), (None, Some(false)));
        // 64-bit trace ids are padded on the left.
        let e = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]));
        let p = e.parent.expect("parent");
        assert_eq!(p.trace_id.to_string(), "0000000000000000a3ce929d0e0e4736");
        assert_eq!((e.sampled, e.formats.b3_multi), (Some(false), true));
        let e = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(e.sampled, Some(true), "debug implies sampled");
    }

    #[test]
    fn w3c_wins_over_b3() {
        let e = extract(&headers(&[
            ("traceparent", TP),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        ]));
        assert_eq!(e.parent.expect("parent").span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(e.sampled, Some(true));
        assert!(e.formats.b3_single, "answered in B3 too");
    }

    #[test]
    fn writes_every_format_the_request_came_with() {
        let mut h = headers(&[("x-b3-parentspanid", "05e3ac9a4f6e3b90"), ("tracestate", "old=1")]);
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        let span_id = SpanId::from_hex("53995c3f42cd8ad8").expect("hex");
        let ts = HeaderValue::from_static("congo=1");
        inject(&mut h, trace_id, span_id, true, Formats { b3_single: true, b3_multi: true }, Some(&ts));
        assert_eq!(h[TRACEPARENT], "00-4bf92f3577b34da6a3ce929d0e0e4736-53995c3f42cd8ad8-01");
        assert_eq!(h[TRACESTATE], "congo=1");
        assert_eq!(h[B3], "4bf92f3577b34da6a3ce929d0e0e4736-53995c3f42cd8ad8-1");
        assert_eq!(h[B3_SPAN_ID], "53995c3f42cd8ad8");
        assert_eq!(h[B3_SAMPLED], "1");
        assert!(!h.contains_key(B3_PARENT_SPAN_ID));
        // Round trip.
        let e = extract(&h);
        assert_eq!(e.parent, Some(Parent { trace_id, span_id }));
        inject(&mut h, trace_id, span_id, false, Formats::default(), None);
        assert!(h[TRACEPARENT].as_bytes().ends_with(b"-00"));
        assert!(!h.contains_key(TRACESTATE));
    }
}
