//! `[tracing]`: OpenTelemetry traces (docs/observability.md). Off by default.

use serde::{Deserialize, Serialize};

/// `[tracing]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Where spans go: an OTLP/gRPC collector, `http://HOST:PORT` (e.g. an OpenTelemetry
    /// Collector or Jaeger on port 4317); empty: no traces.
    pub otlp_endpoint: String,
}

impl TracingConfig {
    /// What `tracing.otlp_endpoint` may be.
    pub const VALID_ENDPOINT: &'static str =
        "valid: \"\" (no traces) or an OTLP/gRPC URL http://HOST:PORT (no TLS: https:// is refused)";

    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    /// Whether `otlp_endpoint` is a valid value.
    pub fn endpoint_is_valid(&self) -> bool {
        runvm_telemetry::validate_endpoint(&self.otlp_endpoint).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn tracing_is_off_by_default_and_a_bad_endpoint_is_named_with_what_is_valid() {
        let c = Config::default();
        assert!(!c.tracing.enabled());
        let c =
            Config::from_toml("[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n").unwrap();
        c.validate().unwrap();
        assert!(c.tracing.enabled());
        let c = Config::from_toml("[tracing]\notlp_endpoint = \"127.0.0.1:4317\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tracing.otlp_endpoint"), "{err}");
        assert!(
            err.contains("\"127.0.0.1:4317\"") && err.contains("http://HOST:PORT"),
            "{err}"
        );
        let err = Config::from_toml("[tracing]\nendpoint = \"x\"\n").unwrap_err();
        assert!(err.contains("endpoint"), "{err}");
    }
}
