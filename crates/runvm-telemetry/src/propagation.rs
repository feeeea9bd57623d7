//! W3C trace context (`traceparent`, `tracestate`) as (key, value) pairs, for ttrpc metadata.
//!
//! The [`TraceContextPropagator`] is used directly, not the global propagator, so this works
//! where no [`crate::Telemetry`] exists (the guest agent).

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct PairsInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for PairsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// Keys are lowercased: ttrpc and gRPC metadata keys are case-insensitive.
struct PairsExtractor(HashMap<String, String>);

impl Extractor for PairsExtractor {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C `traceparent` (and `tracestate`, when not empty) of the current `tracing` span, as
/// (key, value) pairs; empty when tracing is off (no OpenTelemetry layer) or the span has no
/// valid context. The agent client puts these in the ttrpc request metadata.
pub fn inject_current() -> Vec<(String, String)> {
    let cx = tracing::Span::current().context();
    let mut pairs = Vec::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut PairsInjector(&mut pairs));
    }
    pairs
}

/// The parent context carried by (key, value) pairs (a server reading ttrpc or gRPC metadata).
/// Without a valid `traceparent` the context holds no span.
pub fn extract<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Context {
    let map = pairs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    TraceContextPropagator::new().extract_with_context(&Context::new(), &PairsExtractor(map))
}

/// Sets `span`'s parent to the context carried by `pairs` if it holds a valid remote span
/// context; otherwise leaves `span` as it is.
pub fn set_parent_from<'a>(
    span: &tracing::Span,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    let cx = extract(pairs);
    let valid = {
        let remote = cx.span();
        let sc = remote.span_context();
        sc.is_valid() && sc.is_remote()
    };
    if valid {
        span.set_parent(cx);
    }
}

/// [`set_parent_from`] a request's ttrpc metadata (each key's first value): how the agent and
/// the shim join their caller's trace.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &HashMap<String, Vec<String>>) {
    set_parent_from(
        span,
        metadata
            .iter()
            .filter_map(|(k, v)| v.first().map(|v| (k.as_str(), v.as_str()))),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn extract_reads_traceparent_case_insensitively() {
        let cx = extract([("TraceParent", PARENT)]);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
    }

    #[test]
    fn extract_without_valid_traceparent_has_no_span() {
        for pairs in [
            vec![],
            vec![("traceparent", "garbage")],
            vec![("other", PARENT)],
        ] {
            let cx = extract(pairs);
            assert!(!cx.span().span_context().is_valid());
        }
    }

    #[test]
    fn inject_current_is_empty_without_an_opentelemetry_layer() {
        let span = tracing::info_span!("no layer");
        let _entered = span.enter();
        assert!(inject_current().is_empty());
    }
}
