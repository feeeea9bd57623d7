//! Host side: a process's OTLP/gRPC export of its own spans and of the guest's relayed spans.
//!
//! Everything that talks to the network runs on a small tokio runtime on a dedicated thread
//! (the CLI's own runtimes come and go per command). That thread has no `tracing` subscriber, so
//! the gRPC client's own spans and events (h2, hyper, tonic) are never exported: no feedback loop.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter, Tracer,
};
use opentelemetry_sdk::Resource;
use tokio::runtime::Handle;
use tonic::transport::{Channel, Endpoint};

use crate::{validate_endpoint, TelemetryError, MAX_GUEST_REQUEST_BYTES};

/// How long one export (a batch of the process's spans, or one relayed guest request) may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to the endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Guest requests being decoded or sent at once; more are dropped (the endpoint is slow or
/// unreachable). Small because a decoded request can be much larger than its (guest-made,
/// at most 4 MiB) encoding.
const MAX_FORWARDS_IN_FLIGHT: usize = 4;
/// How long dropping a running `Telemetry` (not shut down) waits for its flush.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);

/// Reports export failures once per process, then never again.
#[derive(Debug)]
struct SayOnce {
    endpoint: String,
    said: AtomicBool,
    guest_refused: AtomicBool,
}

impl SayOnce {
    fn export_failed(&self, error: &dyn fmt::Display) {
        if !self.said.swap(true, Ordering::AcqRel) {
            let endpoint = self.endpoint.clone();
            let message = error.to_string();
            warn_outside(move || {
                tracing::warn!(
                    "cannot export traces to {endpoint}: {message}; tracing goes on without them"
                );
            });
        }
    }

    fn guest_refused(&self, reason: String) {
        if !self.guest_refused.swap(true, Ordering::AcqRel) {
            warn_outside(move || {
                tracing::warn!("guest spans refused (said once): {reason}");
            });
        }
    }

    /// No more reports (after shutdown).
    fn silence(&self) {
        self.said.store(true, Ordering::Release);
        self.guest_refused.store(true, Ordering::Release);
    }
}

/// Runs `emit` on a fresh thread, which sees the process's global subscriber (the telemetry
/// runtime's threads have none) and no current span (so the event lands in no exported span).
fn warn_outside(emit: impl FnOnce() + Send + 'static) {
    if let Ok(thread) = std::thread::Builder::new()
        .name("runvm-telemetry-warn".into())
        .spawn(emit)
    {
        let _ = thread.join();
    }
}

/// The OTLP exporter, run on the telemetry runtime, its failures said once.
#[derive(Debug)]
struct OnceWarningExporter {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: Handle,
    say: Arc<SayOnce>,
}

impl SpanExporter for OnceWarningExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        // Called on the batch processor's own thread, outside any tokio runtime: the gRPC call
        // runs on the telemetry runtime and the answer comes back through a oneshot.
        let inner = Arc::clone(&self.inner);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let result = match tokio::time::timeout(EXPORT_TIMEOUT, inner.export(batch)).await {
                Ok(result) => result,
                Err(_) => Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)),
            };
            let _ = tx.send(result);
        });
        let result = rx.await.unwrap_or_else(|_| {
            Err(OTelSdkError::InternalFailure(
                "the telemetry runtime stopped".into(),
            ))
        });
        if let Err(error) = &result {
            self.say.export_failed(error);
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once when the provider is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// A process's trace export (CLI command, shim, monitor): its own spans through [`Self::layer`]
/// and the guest's through [`Self::forward_guest_spans`], over OTLP/gRPC to one endpoint.
pub struct Telemetry {
    endpoint: String,
    provider: SdkTracerProvider,
    tracer: Tracer,
    runtime: Handle,
    /// The connection guest batches are sent on (the exporter has its own clone).
    channel: Channel,
    say: Arc<SayOnce>,
    forwards_in_flight: Arc<AtomicUsize>,
    stopped: AtomicBool,
    /// Ends the telemetry runtime's thread.
    stop_runtime: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("endpoint", &self.endpoint)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts exporting to `endpoint` (an `http://HOST:PORT` OTLP/gRPC
    /// URL) as service `service_name` ("runvm", "containerd-shim-runvm-v2"), and sets the global
    /// text-map propagator to W3C trace context.
    ///
    /// Does not connect: an unreachable endpoint neither blocks nor fails this; export failures
    /// are reported once per process with a `tracing` warning.
    pub fn start(endpoint: &str, service_name: &'static str) -> Result<Telemetry, TelemetryError> {
        validate_endpoint(endpoint)?;
        if endpoint.is_empty() {
            return Err(TelemetryError::InvalidEndpoint {
                value: String::new(),
                reason: "\"\" means tracing is off; exporting needs http://HOST:PORT".into(),
            });
        }
        let (runtime, channel, stop_runtime) = spawn_runtime(endpoint)?;
        let say = Arc::new(SayOnce {
            endpoint: endpoint.to_owned(),
            said: AtomicBool::new(false),
            guest_refused: AtomicBool::new(false),
        });
        let otlp = {
            let _context = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(channel.clone())
                .build()
        }
        .map_err(|e| TelemetryError::Start {
            reason: format!("cannot build the OTLP span exporter: {e}"),
        })?;
        let exporter = OnceWarningExporter {
            inner: Arc::new(otlp),
            runtime: runtime.clone(),
            say: Arc::clone(&say),
        };
        let resource = Resource::builder()
            .with_service_name(service_name)
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("runvm");
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Telemetry {
            endpoint: endpoint.to_owned(),
            provider,
            tracer,
            runtime,
            channel,
            say,
            forwards_in_flight: Arc::new(AtomicUsize::new(0)),
            stopped: AtomicBool::new(false),
            stop_runtime: Mutex::new(Some(stop_runtime)),
        })
    }

    /// The endpoint spans are exported to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The `tracing` layer to add to the process's subscriber.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.tracer.clone())
    }

    /// Relays guest spans: `encoded` is a prost-encoded `ExportTraceServiceRequest` from the
    /// guest's [`crate::guest::SpanQueue::take`]. It is refused over
    /// [`MAX_GUEST_REQUEST_BYTES`], else sent as it is, never decoded here (the guest's
    /// resource kept; the collector refuses what does not decode), to the same endpoint, on
    /// the telemetry runtime: this does not block. Failures count toward the same said-once
    /// warning.
    pub fn forward_guest_spans(&self, encoded: Vec<u8>) {
        if !self.is_running() {
            return;
        }
        if encoded.len() > MAX_GUEST_REQUEST_BYTES {
            self.say.guest_refused(format!(
                "{} bytes, over the limit of {MAX_GUEST_REQUEST_BYTES}",
                encoded.len()
            ));
            return;
        }
        if self.forwards_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_FORWARDS_IN_FLIGHT {
            self.forwards_in_flight.fetch_sub(1, Ordering::AcqRel);
            self.say.export_failed(&format!(
                "{MAX_FORWARDS_IN_FLIGHT} guest span requests are still being sent"
            ));
            return;
        }
        let channel = self.channel.clone();
        let say = Arc::clone(&self.say);
        let in_flight = Arc::clone(&self.forwards_in_flight);
        self.runtime.spawn(async move {
            let sent = crate::forward::export_encoded(channel, encoded);
            match tokio::time::timeout(EXPORT_TIMEOUT, sent).await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => {
                    say.export_failed(&format_args!("{} ({})", status.message(), status.code()))
                }
                Err(_) => say.export_failed(&format_args!("no answer within {EXPORT_TIMEOUT:?}")),
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Flushes what is pending (the batch processor's spans and the guest spans being sent) and
    /// stops, waiting at most `timeout`: an unreachable endpoint does not make the caller hang
    /// longer. Nothing is reported after this returns.
    pub fn shutdown(self, timeout: Duration) {
        self.stop(timeout);
    }

    pub(crate) fn is_running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    /// [`Self::shutdown`] for a shared instance (the global one); only the first call acts.
    pub(crate) fn stop(&self, timeout: Duration) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + timeout;
        let provider = self.provider.clone();
        let in_flight = Arc::clone(&self.forwards_in_flight);
        let (done_tx, done_rx) = mpsc::channel();
        // The flush blocks (the batch processor waits for its thread), so it runs on a thread
        // of its own and the caller waits for it at most until the deadline.
        let flusher = std::thread::Builder::new()
            .name("runvm-telemetry-flush".into())
            .spawn(move || {
                let _ = provider.shutdown();
                while in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = done_tx.send(());
            });
        if flusher.is_ok() {
            let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        self.say.silence();
        let stop = self
            .stop_runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop(DROP_TIMEOUT);
    }
}

/// Starts the telemetry runtime on its own thread; gives its handle, the (lazily connecting)
/// gRPC channel to `endpoint`, and the sender that ends the thread.
fn spawn_runtime(
    endpoint: &str,
) -> Result<(Handle, Channel, tokio::sync::oneshot::Sender<()>), TelemetryError> {
    let start_error = |reason: String| TelemetryError::Start { reason };
    let endpoint = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| start_error(format!("invalid URI: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Blocking-pool threads (name resolution) stay quiet too.
        .on_thread_start(quiet_thread)
        .build()
        .map_err(|e| start_error(format!("cannot build the telemetry runtime: {e}")))?;
    let handle = runtime.handle().clone();
    let channel = {
        let _context = runtime.enter();
        endpoint.connect_lazy()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("runvm-telemetry".into())
        .spawn(move || {
            quiet_thread();
            runtime.block_on(async {
                let _ = stop_rx.await;
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        })
        .map_err(|e| start_error(format!("cannot start the telemetry thread: {e}")))?;
    Ok((handle, channel, stop_tx))
}

/// Gives the current thread a subscriber that records nothing, for good.
fn quiet_thread() {
    std::mem::forget(tracing::subscriber::set_default(
        tracing::subscriber::NoSubscriber::default(),
    ));
}
