//! An unreachable endpoint: nothing blocks or fails, shutdown is bounded, and the failure is
//! said once. (Its own test binary: it installs the process-wide subscriber, which is where the
//! warning goes.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runvm_telemetry::guest::SpanQueue;
use runvm_telemetry::{inject_current, Telemetry};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Counts warn events whose message starts "cannot export traces to ENDPOINT".
struct CountWarnings {
    prefix: String,
    count: Arc<AtomicUsize>,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for CountWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        if *event.metadata().level() == tracing::Level::WARN && message.0.starts_with(&self.prefix)
        {
            eprintln!("counted: {}", message.0);
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn unreachable_endpoint_is_said_once_and_shutdown_is_bounded() {
    // Port 1 on loopback: nothing listens (connection refused).
    let endpoint = "http://127.0.0.1:1";
    let count = Arc::new(AtomicUsize::new(0));
    let counter = CountWarnings {
        prefix: format!("cannot export traces to {endpoint}: "),
        count: Arc::clone(&count),
    };
    let started = Instant::now();
    let telemetry = Telemetry::start(endpoint, "runvm-test").expect("start does not connect");
    assert!(started.elapsed() < Duration::from_secs(1));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(counter)
            .with(telemetry.layer()),
    )
    .expect("the only global subscriber in this binary");

    let queue = SpanQueue::new();
    {
        let _entered = tracing::info_span!("host call").entered();
        assert!(!inject_current().is_empty());
        // Guest spans made under the host span, relayed several times.
        use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
        let provider = queue.tracer_provider();
        let tracer = provider.tracer("runvm-agent");
        let pairs = inject_current();
        let parent = runvm_telemetry::extract(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for _ in 0..3 {
            tracer.start_with_context("guest call", &parent).end();
            let (encoded, _) = queue.take(10);
            telemetry.forward_guest_spans(encoded.expect("queued"));
        }
    }
    // The host's own spans, whose batch export (at the latest at shutdown) fails too.
    for i in 0..3 {
        let _entered = tracing::info_span!("more", i).entered();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "said once by now");

    let stopping = Instant::now();
    telemetry.shutdown(Duration::from_secs(2));
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    // Nothing more is said afterwards either.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}
