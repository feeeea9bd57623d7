//! End to end in one process: host spans and relayed guest spans reach an OTLP receiver as one
//! trace.

use std::time::{Duration, Instant};

use runvm_telemetry::guest::SpanQueue;
use runvm_telemetry::receiver::{ReceivedSpan, Receiver};
use runvm_telemetry::{inject_current, set_parent_from, Telemetry};
use tracing_subscriber::layer::SubscriberExt;

/// The agent's side: a span whose parent comes from `pairs` (as the agent reads them from the
/// ttrpc metadata), recorded through the guest provider's tracing layer.
fn guest_span(queue: &SpanQueue, pairs: &[(String, String)], name: &'static str) {
    use opentelemetry::trace::TracerProvider as _;
    let provider = queue.tracer_provider();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("runvm-agent")));
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("guest", otel.name = name);
        set_parent_from(&span, pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let _entered = span.enter();
        tracing::info!("in the guest");
    });
}

#[test]
fn host_and_guest_spans_reach_the_receiver_as_one_trace() {
    let receiver = Receiver::start().expect("receiver");
    let telemetry = Telemetry::start(&receiver.endpoint(), "runvm-test").expect("start");
    let queue = SpanQueue::new();
    let subscriber = tracing_subscriber::registry().with(telemetry.layer());
    let pairs = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("host call");
        let _entered = span.enter();
        let pairs = inject_current();
        guest_span(&queue, &pairs, "guest call");
        pairs
    });
    assert!(
        pairs.iter().any(|(k, _)| k == "traceparent"),
        "no traceparent in {pairs:?}"
    );

    let (encoded, dropped) = queue.take(100);
    assert_eq!(dropped, 0);
    telemetry.forward_guest_spans(encoded.expect("the guest span is queued"));
    let started = Instant::now();
    telemetry.shutdown(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(5));

    let spans = receiver.wait_for(Duration::from_secs(5), |s| s.len() >= 2);
    let find = |name: &str| -> ReceivedSpan {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name:?} in {spans:?}"))
            .clone()
    };
    let host = find("host call");
    let guest = find("guest call");
    assert_eq!(host.service, "runvm-test");
    assert_eq!(guest.service, "runvm-agent");
    assert_eq!(host.parent_span_id, "");
    assert_eq!(guest.trace_id, host.trace_id);
    assert_eq!(guest.parent_span_id, host.span_id);
    assert_eq!(host.trace_id.len(), 32);
    assert_eq!(spans.len(), 2, "{spans:?}");
}

#[test]
fn guest_span_without_host_context_is_not_recorded() {
    let queue = SpanQueue::new();
    // Outside any host span: no trace context to carry.
    let pairs = inject_current();
    assert!(pairs.is_empty());
    guest_span(&queue, &pairs, "guest call");
    assert_eq!(queue.take(100), (None, 0));
}

#[test]
fn forwarded_garbage_is_refused_without_disturbing_the_export() {
    let receiver = Receiver::start().expect("receiver");
    let telemetry = Telemetry::start(&receiver.endpoint(), "runvm-test").expect("start");
    telemetry.forward_guest_spans(vec![0xff; 64]);
    telemetry.forward_guest_spans(vec![0; runvm_telemetry::MAX_GUEST_REQUEST_BYTES + 1]);
    let subscriber = tracing_subscriber::registry().with(telemetry.layer());
    tracing::subscriber::with_default(subscriber, || {
        let _entered = tracing::info_span!("after garbage").entered();
    });
    telemetry.shutdown(Duration::from_secs(5));
    let spans = receiver.wait_for(Duration::from_secs(5), |s| !s.is_empty());
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["after garbage"]);
}

#[test]
fn shutdown_is_bounded_when_the_endpoint_never_answers() {
    // A listener nobody accepts on: the kernel completes the TCP handshake, then nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    let telemetry = Telemetry::start(&endpoint, "runvm-test").expect("start");
    let subscriber = tracing_subscriber::registry().with(telemetry.layer());
    tracing::subscriber::with_default(subscriber, || {
        let _entered = tracing::info_span!("never answered").entered();
    });
    let started = Instant::now();
    telemetry.shutdown(Duration::from_secs(1));
    let took = started.elapsed();
    // It waited for the flush (which hangs), but not past its bound.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "shutdown took {took:?}"
    );
}
