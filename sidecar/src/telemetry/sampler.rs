//! Which traces are recorded: the OpenTelemetry samplers, read from the standard
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` variables.
//!
//! Default: `parentbased_traceidratio` at 0.01. Parent-based, as the issue and every mesh
//! do: a caller's decision (the sampled flag of `traceparent`, or B3's) is followed, so a
//! trace is recorded by every hop or by none. For new traces, 1% of them, Istio's
//! default (`meshConfig.defaultConfig.tracing.sampling: 1.0`): tracing every request of a
//! busy mesh costs the collector more than it tells anyone. Tests and debugging set
//! `OTEL_TRACES_SAMPLER_ARG=1`. A policy's `telemetry.tracingSamplingPercent` overrides
//! the ratio for new traces of its service.
//!
//! The ratio decision reads the trace id (the spec's `TraceIdRatioBased`: the low 63
//! bits against ratio·2⁶³), so every sidecar deciding on the same new trace agrees.
//!
//! A value the sidecar does not know is an error at start, naming the variable: sampling
//! at some other rate than the operator asked would go unnoticed until the bill or the
//! missing traces.

use opentelemetry::trace::TraceId;

/// Ratio of new traces sampled when `OTEL_TRACES_SAMPLER_ARG` is not set.
pub const DEFAULT_RATIO: f64 = 0.01;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Follow the caller's decision when there is one.
    pub parent_based: bool,
    /// Share of the other traces sampled, 0-1.
    pub ratio: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error(
        "OTEL_TRACES_SAMPLER={0:?} is not a sampler Ballast knows: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Unknown(String),
    #[error(
        "OTEL_TRACES_SAMPLER_ARG={0:?} is not a ratio: give a number from 0 to 1 (0.01 samples 1% of new traces)"
    )]
    BadRatio(String),
}

impl Default for Sampler {
    fn default() -> Self {
        Self { parent_based: true, ratio: DEFAULT_RATIO }
    }
}

impl Sampler {
    /// The sampler that `OTEL_TRACES_SAMPLER` (`name`) and `OTEL_TRACES_SAMPLER_ARG`
    /// (`arg`) describe; `None`s give the default.
    pub fn from_env_values(name: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let ratio = || -> Result<f64, SamplerError> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(DEFAULT_RATIO),
                Some(a) => match a.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(SamplerError::BadRatio(a.to_owned())),
                },
            }
        };
        Ok(match name.map(str::trim).filter(|n| !n.is_empty()) {
            None | Some("parentbased_traceidratio") => Self { parent_based: true, ratio: ratio()? },
            Some("always_on") => Self { parent_based: false, ratio: 1.0 },
            Some("always_off") => Self { parent_based: false, ratio: 0.0 },
            Some("traceidratio") => Self { parent_based: false, ratio: ratio()? },
            Some("parentbased_always_on") => Self { parent_based: true, ratio: 1.0 },
            Some("parentbased_always_off") => Self { parent_based: true, ratio: 0.0 },
            Some(other) => return Err(SamplerError::Unknown(other.to_owned())),
        })
    }

    pub fn from_env() -> Result<Self, SamplerError> {
        let var = |k| std::env::var(k).ok();
        Self::from_env_values(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
    }

    /// Whether to record trace `trace_id`, whose caller decided `parent` (if it did);
    /// `ratio` overrides this sampler's for a new trace (a policy's setting).
    pub fn decide(&self, trace_id: TraceId, parent: Option<bool>, ratio: Option<f64>) -> bool {
        match parent {
            Some(decision) if self.parent_based => decision,
            _ => ratio_decides(trace_id, ratio.unwrap_or(self.ratio)),
        }
    }
}

/// `TraceIdRatioBased`: the trace id's low 63 bits against `ratio`·2⁶³.
pub fn ratio_decides(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let bytes = trace_id.to_bytes();
    let mut low = [0; 8];
    low.copy_from_slice(&bytes[8..]);
    let x = u64::from_be_bytes(low) >> 1;
    x < (ratio * (1u64 << 63) as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_standard_variables() {
        let s = |n, a| Sampler::from_env_values(n, a);
        assert_eq!(s(None, None), Ok(Sampler { parent_based: true, ratio: 0.01 }));
        assert_eq!(
            s(Some("parentbased_traceidratio"), Some("0.5")),
            Ok(Sampler { parent_based: true, ratio: 0.5 })
        );
        assert_eq!(s(Some("always_on"), Some("0.5")), Ok(Sampler { parent_based: false, ratio: 1.0 }));
        assert_eq!(s(Some("traceidratio"), Some("1")), Ok(Sampler { parent_based: false, ratio: 1.0 }));
        assert_eq!(s(Some("parentbased_always_off"), None), Ok(Sampler { parent_based: true, ratio: 0.0 }));
        assert_eq!(s(Some("jaeger_remote"), None), Err(SamplerError::Unknown("jaeger_remote".into())));
        assert_eq!(s(None, Some("2")), Err(SamplerError::BadRatio("2".into())));
        assert_eq!(s(None, Some("ten")), Err(SamplerError::BadRatio("ten".into())));
    }

    #[test]
    fn parent_decision_wins_only_when_parent_based() {
        let id = TraceId::from_bytes([0xff; 16]);
        let pb = Sampler { parent_based: true, ratio: 0.0 };
        assert!(pb.decide(id, Some(true), None));
        assert!(!pb.decide(id, None, None));
        assert!(pb.decide(id, None, Some(1.0)), "a policy's ratio decides new traces");
        assert!(!pb.decide(id, Some(false), Some(1.0)), "but never overrules the caller");
        let on = Sampler { parent_based: false, ratio: 1.0 };
        assert!(on.decide(id, Some(false), None));
    }

    #[test]
    fn ratio_samples_about_its_share_and_agrees_on_the_same_id() {
        let mut hits = 0;
        for i in 0..10_000u128 {
            // Spread ids over the space like random ones would be.
            let id = TraceId::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            if ratio_decides(id, 0.1) {
                hits += 1;
            }
            assert_eq!(ratio_decides(id, 0.1), ratio_decides(id, 0.1));
        }
        assert!((800..1200).contains(&hits), "{hits} of 10000 at 10%");
    }
}
