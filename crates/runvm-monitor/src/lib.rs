//! `runvm monitor`: one node process serving Prometheus metrics of every sandbox under the
//! state roots — what each VM's host processes cost (CPU, RSS, PSS, threads, file
//! descriptors), the guest's own view through the agent (memory, CPU, load, containers'
//! cgroups, network), boot phase durations, and the monitor's own cost. See
//! docs/observability.md for the metric names.
//!
//! A scrape reads records and `/proc` without taking any sandbox lock and asks every agent at
//! once with a short timeout ([`collect`]); the registry is `prometheus-client`'s
//! ([`exposition`]); [`server`] is a small hyper server.
//!
//! ```no_run
//! # async fn demo(sources: runvm_monitor::collect::Sources) -> Result<(), runvm_monitor::MonitorError> {
//! use std::sync::Arc;
//! let listener = runvm_monitor::server::bind("127.0.0.1:9464")?;
//! let monitor = Arc::new(runvm_monitor::Monitor::new(sources));
//! runvm_monitor::server::serve(listener, monitor, std::future::pending()).await
//! # }
//! ```

pub mod collect;
pub mod exposition;
pub mod procfs;
pub mod server;

use std::net::SocketAddr;
use std::time::Instant;

use collect::{Collector, Sources};
use exposition::{Format, Metrics};
use procfs::ProcFs;

/// Errors of the monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The listen address does not parse.
    #[error(
        "invalid listen address {address:?}: {reason}; expected {}",
        server::VALID_ADDRESSES
    )]
    BadAddress {
        /// As given.
        address: String,
        /// What is wrong.
        reason: String,
    },
    /// Another socket is bound to the address.
    #[error(
        "cannot listen on {address}: the address is in use (another process listens there: \
         stop it or pick another port)"
    )]
    AddressInUse {
        /// The address.
        address: SocketAddr,
    },
    /// Binding failed otherwise (an address not on this host, a privileged port).
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The listening socket failed.
    #[error("serving metrics: {0}")]
    Serve(#[source] std::io::Error),
    /// The registry could not be written out.
    #[error("cannot encode the metrics")]
    Encode,
}

/// The collector and the registry; scrapes run one at a time.
#[derive(Debug)]
pub struct Monitor {
    state: tokio::sync::Mutex<(Collector, Metrics)>,
    procfs: ProcFs,
}

impl Monitor {
    /// A monitor of `sources`.
    pub fn new(sources: Sources) -> Monitor {
        let procfs = sources.procfs.clone();
        Monitor {
            state: tokio::sync::Mutex::new((Collector::new(sources), Metrics::new())),
            procfs,
        }
    }

    /// Collects every sandbox and returns the metrics in `format`.
    pub async fn scrape(&self, format: Format) -> Result<String, MonitorError> {
        let mut guard = self.state.lock().await;
        let (collector, metrics) = &mut *guard;
        let started = Instant::now();
        let scan = collector.collect().await;
        for (stage, reason) in &scan.errors {
            tracing::debug!(stage = stage.as_str(), "scrape: {reason}");
        }
        metrics.update(&scan, collector.open_connections());
        metrics.observe_scrape(
            started.elapsed().as_secs_f64(),
            ProcFs::own_cpu_seconds(&self.procfs),
        );
        metrics.encode(format).map_err(|_| MonitorError::Encode)
    }
}

#[cfg(test)]
mod tests;
