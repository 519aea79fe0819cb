//! Tracing and access-log settings for the injected proxies: the OpenTelemetry
//! collector they export spans to (`--trace-collector`, or `ballast.io/trace-collector`
//! per pod), its OTLP transport, the share of new traces sampled, and the share of
//! requests written to the access log.
//!
//! The injector turns them into the standard variables the sidecar reads
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`) and `BALLAST_ACCESS_LOG_SAMPLING`. Decisions:
//! * **No collector, no `OTEL_*`**: without one the sidecar records nothing, and a
//!   sampling setting alone changes nothing.
//! * **Checked here, not in the pod**: every value the sidecar would refuse at start is
//!   refused by the injector instead (at its own start for a flag, as a refused pod for
//!   an annotation), so a typo never becomes a crash-looping proxy. In particular an
//!   `https://` collector: the sidecar's exporter speaks plain HTTP only; traces go to a
//!   collector in the cluster (a node agent or a Service), which forwards with TLS.
//! * **gRPC by default** (`--trace-collector-protocol`): collectors in clusters listen
//!   for OTLP/gRPC on 4317, and Istio's and Linkerd's OpenTelemetry exporters speak gRPC.
//!   The sidecar's own default, `http/protobuf`, is always overridden, so the protocol a
//!   proxy uses is the injector's, visible in the pod.
//! * **Sampling in percent**, as Istio's `sampling` and the policy's
//!   `telemetry.tracingSamplingPercent` are: 1 (Istio's default) becomes
//!   `OTEL_TRACES_SAMPLER_ARG=0.01` with `parentbased_traceidratio`, so a caller's decision
//!   is followed and a trace is recorded whole or not at all. The ratio is written with
//!   decimal arithmetic (`12.5` → `0.125`), never a float's rounding noise.

use std::fmt;

/// The OTLP transport the proxies use (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC, the collector's port 4317.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies, the collector's port 4318; the proxy posts to
    /// the URL's path plus `/v1/traces`.
    HttpProtobuf,
}

impl Protocol {
    /// The value of `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }

    /// `grpc` or `http/protobuf` (the flag's value parser).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            _ => Err("is not an OTLP protocol the proxy speaks: use grpc or http/protobuf".into()),
        }
    }

    /// The collector's conventional port for the other protocol, which a URL for this one
    /// most likely should not name.
    fn other_port(self) -> u16 {
        match self {
            Protocol::Grpc => 4318,
            Protocol::HttpProtobuf => 4317,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A percentage from 0 to 100 as a decimal text (`1`, `0.5`, `12.5`, `100`): kept as
/// text so that `OTEL_TRACES_SAMPLER_ARG` is its exact hundredth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Percent(String);

impl Percent {
    /// `0` to `100`, with decimals if needed and an optional `%` (`0.5`, `5%`); no sign, no
    /// exponent. Written back without the `%`, leading zeros or trailing decimal zeros.
    pub fn parse(s: &str) -> Result<Self, String> {
        let problem = || "is not a percentage from 0 to 100 (such as 1, 0.5 or 100)".to_owned();
        let t = s.trim();
        let t = t.strip_suffix('%').map_or(t, str::trim_end);
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if int.len() + frac.len() == 0 || !digits(int) || !digits(frac) || t.ends_with('.') {
            return Err(problem());
        }
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        // 100 at most: three integer digits, and 100 only without a fraction.
        if int.len() > 3 || (int.len() == 3 && (int != "100" || !frac.is_empty())) {
            return Err(problem());
        }
        let int = if int.is_empty() { "0" } else { int };
        Ok(Percent(if frac.is_empty() { int.to_owned() } else { format!("{int}.{frac}") }))
    }

    /// The percentage divided by 100, as a decimal text (`1` → `0.01`, `100` → `1`).
    pub fn ratio(&self) -> String {
        let (int, frac) = self.0.split_once('.').unwrap_or((&self.0, ""));
        // Two digits move from the integer part to the fraction.
        let padded = format!("{int:0>3}");
        let (whole, moved) = padded.split_at(padded.len() - 2);
        let whole = whole.trim_start_matches('0');
        let fraction = format!("{moved}{frac}");
        let fraction = fraction.trim_end_matches('0');
        match (whole.is_empty(), fraction.is_empty()) {
            (true, true) => "0".into(),
            (false, true) => whole.into(),
            (true, false) => format!("0.{fraction}"),
            (false, false) => format!("{whole}.{fraction}"),
        }
    }
}

impl Default for Percent {
    /// 1%, Istio's default and the sidecar's own (`OTEL_TRACES_SAMPLER_ARG=0.01`).
    fn default() -> Self {
        Percent("1".into())
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a pod's (or every pod's) spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collector {
    /// `none` or empty: no tracing.
    Disabled,
    /// An `http://` OTLP endpoint (checked by [`collector_url`]).
    Url(String),
}

impl Collector {
    /// `none` or empty: [`Collector::Disabled`]; else a URL [`collector_url`] accepts.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "none" => Ok(Collector::Disabled),
            url => collector_url(url).map(Collector::Url),
        }
    }

    pub fn url(&self) -> Option<&str> {
        match self {
            Collector::Disabled => None,
            Collector::Url(u) => Some(u),
        }
    }
}

/// Checks an OTLP collector URL the proxies can export to: `http://HOST[:PORT][/PATH]`,
/// without user info, query or fragment. `https://` is refused: the sidecar's exporter
/// speaks plain HTTP only (it would refuse to start). A path ending in `/v1/traces` is
/// refused too: with `http/protobuf` the exporter adds it to the URL itself.
pub fn collector_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    if url.contains(['#', '?']) {
        return Err("is not a collector URL: it has a query or fragment; give http://HOST:PORT".into());
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "is not a URL: give the collector as http://HOST:PORT, e.g. http://otel-collector.observability.svc:4317".to_owned())?;
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "uses https, and the proxy exports spans over plain http only: send them to an OpenTelemetry Collector in the cluster (a node agent or a Service, http://HOST:4317), which forwards them with TLS".into(),
            );
        }
        _ => return Err("must start with http:// (e.g. http://otel-collector.observability.svc:4317)".into()),
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if authority.contains('@') {
        return Err("carries user info, which OTLP does not use: give http://HOST:PORT".into());
    }
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err("names no host".into());
    }
    // What follows the host: nothing, or a port (http::Uri leaves the port unchecked).
    let port = authority.get(host.len()..).unwrap_or_default();
    let number = port.strip_prefix(':').filter(|p| p.bytes().all(|b| b.is_ascii_digit()));
    if !port.is_empty() && number.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
        return Err(format!(
            "has no valid port ({port:?}): give http://HOST:PORT with a port from 1 to 65535"
        ));
    }
    if uri.path().trim_end_matches('/').ends_with("/v1/traces") {
        return Err(
            "ends with /v1/traces, which the proxy adds itself with http/protobuf: give the collector's base URL, e.g. http://otel-collector:4318".into(),
        );
    }
    Ok(url.to_owned())
}

/// A warning when `url` names the collector's conventional port for the other protocol
/// (4318 with gRPC, 4317 with HTTP): the proxy would fail every export.
pub fn port_mismatch(url: &str, protocol: Protocol) -> Option<String> {
    let port = url.parse::<http::Uri>().ok()?.port_u16()?;
    (port == protocol.other_port()).then(|| {
        format!(
            "the trace collector {url} names port {port}, OTLP/{}'s conventional port, but the proxies export with {protocol} (--trace-collector-protocol)",
            if port == 4317 { "gRPC" } else { "HTTP" }
        )
    })
}

/// The tracing settings of the injector's flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// `--trace-collector`: `None` without (no tracing unless a pod names a collector).
    pub collector: Option<String>,
    /// `--trace-collector-protocol`, for every proxy, also with a pod's own collector.
    pub protocol: Protocol,
    /// `--trace-sampling`, unless the pod says `ballast.io/trace-sampling`.
    pub sampling: Percent,
}

/// The proxy's `OTEL_*` variables for a pod whose annotations say `collector` (`None`:
/// not said) and `sampling`; empty when there is no collector.
pub fn otel_env(
    config: &TraceConfig,
    collector: Option<&Collector>,
    sampling: Option<&Percent>,
) -> Vec<(&'static str, String)> {
    let url = match collector {
        Some(c) => c.url(),
        None => config.collector.as_deref(),
    };
    let Some(url) = url else { return Vec::new() };
    let sampling = sampling.unwrap_or(&config.sampling);
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", url.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", config.protocol.as_str().to_owned()),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
        ("OTEL_TRACES_SAMPLER_ARG", sampling.ratio()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(s: &str) -> String {
        Percent::parse(s).unwrap_or_else(|e| panic!("{s:?} {e}")).to_string()
    }

    fn ratio(s: &str) -> String {
        Percent::parse(s).unwrap_or_else(|e| panic!("{s:?} {e}")).ratio()
    }

    #[test]
    fn percentages_parse_and_normalise() {
        assert_eq!(pct("1"), "1");
        assert_eq!(pct(" 5% "), "5");
        assert_eq!(pct("5 %"), "5");
        assert_eq!(pct("007.50"), "7.5");
        assert_eq!(pct("0"), "0");
        assert_eq!(pct("0.0"), "0");
        assert_eq!(pct(".5"), "0.5");
        assert_eq!(pct("100"), "100");
        assert_eq!(pct("100.000"), "100");
        assert_eq!(pct("0100"), "100");
        for bad in
            ["", "%", ".", "5.", "-1", "+1", "100.5", "101", "1000", "1e2", "ten", "1,5", "1 5", "NaN", "inf"]
        {
            assert!(Percent::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Percent::parse("101").unwrap_err().contains("0 to 100"));
    }

    #[test]
    fn ratios_are_exact_hundredths() {
        for (p, r) in [
            ("1", "0.01"),
            ("0", "0"),
            ("100", "1"),
            ("50", "0.5"),
            ("10", "0.1"),
            ("12.5", "0.125"),
            ("33.3", "0.333"),
            ("0.5", "0.005"),
            ("0.01", "0.0001"),
            ("99.99", "0.9999"),
            ("5", "0.05"),
        ] {
            assert_eq!(ratio(p), r, "{p}%");
        }
        assert_eq!(Percent::default().ratio(), "0.01");
    }

    #[test]
    fn protocols() {
        assert_eq!(Protocol::parse("grpc"), Ok(Protocol::Grpc));
        assert_eq!(Protocol::parse("http/protobuf"), Ok(Protocol::HttpProtobuf));
        assert!(Protocol::parse("http/json").unwrap_err().contains("grpc or http/protobuf"));
        assert!(Protocol::parse("http").is_err());
        assert_eq!(Protocol::default(), Protocol::Grpc);
    }

    #[test]
    fn collector_urls() {
        for ok in [
            "http://otel-collector.observability.svc:4317",
            "http://otel-collector:4318",
            "http://10.0.0.7:4317",
            "http://[fd00::7]:4317",
            "HTTP://collector:4317",
            "http://collector",
            "http://collector:4318/otlp",
            " http://collector:4317 ",
        ] {
            assert_eq!(collector_url(ok).as_deref(), Ok(ok.trim()), "{ok}");
        }
        let problem = |url: &str| collector_url(url).expect_err(url);
        assert!(problem("https://collector:4317").contains("plain http"));
        assert!(problem("HTTPS://collector:4317").contains("plain http"));
        assert!(problem("collector:4317").contains("http://"));
        assert!(problem("otel-collector").contains("http://"));
        assert!(problem("grpc://collector:4317").contains("http://"));
        assert!(problem("http://").contains("URL") || problem("http://").contains("host"));
        assert!(problem("http://collector:port").contains("port"));
        assert!(problem("http://collector:65536").contains("port"));
        assert!(problem("http://collector:4317 extra").contains("URL"));
        assert!(problem("http://user:pw@collector:4317").contains("user info"));
        assert!(problem("http://collector:4317?x=1").contains("query"));
        assert!(problem("http://collector:4317#x").contains("fragment"));
        assert!(problem("http://collector:0").contains("port"));
        assert!(problem("http://collector:").contains("port"));
        assert!(problem("http://collector:4318/v1/traces").contains("/v1/traces"));
        assert!(problem("").contains("URL") || problem("").contains("http://"));
    }

    #[test]
    fn collector_none_or_empty_disables() {
        assert_eq!(Collector::parse("none"), Ok(Collector::Disabled));
        assert_eq!(Collector::parse(" "), Ok(Collector::Disabled));
        assert_eq!(Collector::parse("http://c:4317"), Ok(Collector::Url("http://c:4317".into())));
        assert!(Collector::parse("https://c:4317").is_err());
        assert!(Collector::parse("None").is_err());
    }

    #[test]
    fn port_mismatches_are_noticed() {
        assert!(port_mismatch("http://c:4318", Protocol::Grpc).is_some_and(|w| w.contains("4318")));
        let w = port_mismatch("http://c:4317", Protocol::HttpProtobuf);
        assert!(w.is_some_and(|w| w.contains("OTLP/gRPC") && w.contains("http/protobuf")));
        assert_eq!(port_mismatch("http://c:4317", Protocol::Grpc), None);
        assert_eq!(port_mismatch("http://c:4318", Protocol::HttpProtobuf), None);
        assert_eq!(port_mismatch("http://c", Protocol::Grpc), None);
        assert_eq!(port_mismatch("http://c:9411", Protocol::Grpc), None);
    }

    #[test]
    fn otel_env_only_with_a_collector() {
        let off = TraceConfig::default();
        let one = Percent::parse("10").expect("valid");
        assert!(otel_env(&off, None, None).is_empty());
        assert!(otel_env(&off, None, Some(&one)).is_empty(), "sampling alone adds nothing");
        let on = TraceConfig { collector: Some("http://c:4317".into()), ..TraceConfig::default() };
        assert_eq!(
            otel_env(&on, None, None),
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317".to_owned()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
                ("OTEL_TRACES_SAMPLER_ARG", "0.01".to_owned()),
            ]
        );
        assert!(otel_env(&on, Some(&Collector::Disabled), None).is_empty(), "the pod says none");
        let own = Collector::Url("http://pod-collector:4317".into());
        let env = otel_env(&on, Some(&own), Some(&one));
        assert_eq!(env[0].1, "http://pod-collector:4317");
        assert_eq!(env[3].1, "0.1");
        // A pod's own collector works without the flag, with the flag's protocol.
        let http = TraceConfig { protocol: Protocol::HttpProtobuf, ..TraceConfig::default() };
        let env = otel_env(&http, Some(&own), None);
        assert_eq!((env[1].1.as_str(), env[3].1.as_str()), ("http/protobuf", "0.01"));
    }
}
