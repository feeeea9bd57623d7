//! Guest side: the agent (PID 1 in the VM, no network out) queues its finished spans in memory
//! and the host takes them over the agent channel.

use std::collections::VecDeque;
use std::future::{ready, Future};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use opentelemetry::KeyValue;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use prost::Message;

use crate::MAX_GUEST_REQUEST_BYTES;

/// How many finished spans the queue holds; more are counted as dropped.
pub const QUEUE_CAPACITY: usize = 2048;

/// The guest's `service.name`.
pub const SERVICE_NAME: &str = "runvm-agent";

/// A bounded queue of finished spans (at most [`QUEUE_CAPACITY`]; more are counted as dropped):
/// the exporter of the agent's tracer provider. Clones share the queue.
#[derive(Debug, Clone, Default)]
pub struct SpanQueue {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    spans: VecDeque<SpanData>,
    dropped: u64,
    /// Set by the tracer provider when it is built.
    resource: Option<Resource>,
}

impl SpanQueue {
    /// An empty queue.
    pub fn new() -> SpanQueue {
        SpanQueue::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A tracer provider for the agent: `service.name` "runvm-agent", sampler
    /// `ParentBased(AlwaysOff)` so that only spans whose parent came from the host are recorded
    /// (an agent call without trace context costs nothing), exporting into this queue through a
    /// simple (synchronous) span processor.
    pub fn tracer_provider(&self) -> SdkTracerProvider {
        let resource = Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .with_id_generator(crate::guest_ids::GuestIds::new())
            .with_resource(resource)
            .with_simple_exporter(self.clone())
            .build()
    }

    /// How many spans are queued.
    pub fn len(&self) -> usize {
        self.lock().spans.len()
    }

    /// Whether no span is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the queued spans (at most `max` of them, and fewer if they would encode to more
    /// than [`MAX_GUEST_REQUEST_BYTES`]), encoded as a prost `ExportTraceServiceRequest`, and
    /// how many spans were dropped since the last take. `None` when nothing is queued.
    pub fn take(&self, max: usize) -> (Option<Vec<u8>>, u64) {
        let mut state = self.lock();
        let resource = state
            .resource
            .as_ref()
            .map(ResourceAttributesWithSchema::from)
            .unwrap_or_default();
        let mut encoded = None;
        while encoded.is_none() && !state.spans.is_empty() && max > 0 {
            let n = max.min(state.spans.len());
            let mut batch: Vec<SpanData> = state.spans.drain(..n).collect();
            loop {
                let request = ExportTraceServiceRequest {
                    resource_spans: group_spans_by_resource_and_scope(batch.clone(), &resource),
                };
                let bytes = request.encode_to_vec();
                if bytes.len() <= MAX_GUEST_REQUEST_BYTES {
                    encoded = Some(bytes);
                    break;
                }
                if batch.len() == 1 {
                    // One span too big to send: it is dropped.
                    state.dropped += 1;
                    break;
                }
                // Too big: put the second half back (in order) for the next take.
                let rest = batch.split_off(batch.len() / 2);
                for span in rest.into_iter().rev() {
                    state.spans.push_front(span);
                }
            }
        }
        (encoded, std::mem::take(&mut state.dropped))
    }

    fn push(&self, batch: Vec<SpanData>) {
        let mut state = self.lock();
        for span in batch {
            if state.spans.len() < QUEUE_CAPACITY {
                state.spans.push_back(span);
            } else {
                state.dropped += 1;
            }
        }
    }
}

impl SpanExporter for SpanQueue {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.push(batch);
        ready(Ok(()))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.lock().resource = Some(resource.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span, Tracer, TracerProvider};

    fn decode(bytes: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(bytes).expect("decodes")
    }

    fn span_names(request: &ExportTraceServiceRequest) -> Vec<String> {
        request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(|s| s.name.clone())
            .collect()
    }

    fn remote_parent() -> opentelemetry::Context {
        crate::extract([(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )])
    }

    #[test]
    fn span_without_host_parent_is_not_recorded() {
        let queue = SpanQueue::new();
        let provider = queue.tracer_provider();
        let tracer = provider.tracer("test");
        tracer.in_span("root in the guest", |_| {});
        assert_eq!(queue.take(100), (None, 0));
    }

    #[test]
    fn span_with_host_parent_is_taken_encoded_with_the_agent_resource() {
        let queue = SpanQueue::new();
        let provider = queue.tracer_provider();
        let tracer = provider.tracer("test");
        let parent = remote_parent();
        record(&tracer, "child", &parent);
        let (bytes, dropped) = queue.take(100);
        assert_eq!(dropped, 0);
        let request = decode(&bytes.expect("one span queued"));
        assert_eq!(span_names(&request), ["child"]);
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            span.parent_span_id,
            [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]
        );
        let resource = request.resource_spans[0]
            .resource
            .as_ref()
            .expect("resource");
        let service = resource
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref());
        assert_eq!(
            service,
            Some(
                &opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                    SERVICE_NAME.to_owned()
                )
            )
        );
        assert_eq!(queue.take(100), (None, 0));
    }

    #[test]
    fn take_gives_at_most_max_spans_in_order() {
        let queue = SpanQueue::new();
        let provider = queue.tracer_provider();
        let tracer = provider.tracer("test");
        let parent = remote_parent();
        for i in 0..5 {
            record(&tracer, format!("s{i}"), &parent);
        }
        let first = decode(&queue.take(3).0.expect("three"));
        assert_eq!(span_names(&first), ["s0", "s1", "s2"]);
        let rest = decode(&queue.take(3).0.expect("two"));
        assert_eq!(span_names(&rest), ["s3", "s4"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn spans_over_the_capacity_are_counted_as_dropped() {
        let queue = SpanQueue::new();
        let provider = queue.tracer_provider();
        let tracer = provider.tracer("test");
        let parent = remote_parent();
        for _ in 0..QUEUE_CAPACITY + 7 {
            record(&tracer, "s", &parent);
        }
        assert_eq!(queue.len(), QUEUE_CAPACITY);
        let (bytes, dropped) = queue.take(QUEUE_CAPACITY);
        assert_eq!(dropped, 7);
        assert_eq!(
            span_names(&decode(&bytes.expect("spans"))).len(),
            QUEUE_CAPACITY
        );
        // The count is reset by the take.
        assert_eq!(queue.take(10), (None, 0));
    }

    /// Records one finished span named `name` under `parent`, through the OTel API.
    fn record(
        tracer: &impl Tracer,
        name: impl Into<std::borrow::Cow<'static, str>>,
        parent: &opentelemetry::Context,
    ) {
        tracer.start_with_context(name, parent).end();
    }
}
