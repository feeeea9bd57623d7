//! A place in a process's `tracing` subscriber for the OpenTelemetry layer: the subscriber is
//! set up first (logging starts before anything else), the configuration that says where
//! traces go is read later, and then the layer is put in.

use tracing_subscriber::{reload, Layer, Registry};

use crate::{install_global, Telemetry};

/// The layer, once there is one.
pub type TraceLayer = Option<Box<dyn Layer<Registry> + Send + Sync>>;

/// The handle to fill the slot with.
pub struct TraceSlot(reload::Handle<TraceLayer, Registry>);

impl std::fmt::Debug for TraceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceSlot").finish_non_exhaustive()
    }
}

/// An empty slot: add the layer to the registry first (`registry().with(layer)`), keep the
/// handle.
pub fn trace_slot() -> (reload::Layer<TraceLayer, Registry>, TraceSlot) {
    let (layer, handle) = reload::Layer::new(None);
    (layer, TraceSlot(handle))
}

impl TraceSlot {
    /// Starts exporting to `endpoint` as `service` (the process-wide [`Telemetry`]) and puts
    /// its layer in the slot: this process's spans are exported from then on. A failure is
    /// logged and the process goes on without traces.
    pub fn start(&self, endpoint: &str, service: &'static str) {
        match Telemetry::start(endpoint, service) {
            Ok(telemetry) => {
                let telemetry = install_global(telemetry);
                let layer: Box<dyn Layer<Registry> + Send + Sync> =
                    Box::new(telemetry.layer::<Registry>());
                if let Err(e) = self.0.modify(|slot| *slot = Some(layer)) {
                    tracing::warn!(error = %e, "traces are not exported: the log is gone");
                }
            }
            Err(e) => tracing::warn!(error = %e, "traces are not exported"),
        }
    }
}
