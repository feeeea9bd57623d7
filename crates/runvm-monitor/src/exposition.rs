//! The metrics of a scrape, in a `prometheus-client` registry: per-sandbox families refilled
//! from each [`Scan`] (so a deleted sandbox's series disappear with it), histograms and
//! counters that live as long as the monitor, and the text encodings.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use runvm_sandbox::state::State;

use crate::collect::{Labels, SandboxKey, Scan, Stage};

type IntGauge = Family<Labels, Gauge>;
type FloatGauge = Family<Labels, Gauge<f64, AtomicU64>>;
type FloatCounter = Family<Labels, Counter<f64, AtomicU64>>;
type IntCounter = Family<Labels, Counter>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Boot phases and boots: 1 ms to about 33 s.
fn boot_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Agent requests: 100 µs to about 3 s, as scrapes.
fn request_histogram() -> Histogram {
    scrape_histogram()
}

/// Scrapes: 100 µs to about 3 s.
fn scrape_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// The output format, from the scraper's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4 (what `promtool check metrics` reads).
    Prometheus,
    /// OpenMetrics text 1.0.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `accept` names it, else Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Per-sandbox families: cleared and refilled at every scrape.
#[derive(Debug, Default)]
struct SandboxFamilies {
    state: IntGauge,
    containers: IntGauge,
    boot_seconds: FloatGauge,
    agent_up: IntGauge,
    agent_latency: FloatGauge,
    process_cpu: FloatCounter,
    process_rss: IntGauge,
    process_pss: IntGauge,
    process_threads: IntGauge,
    process_fds: IntGauge,
    guest_mem_total: IntGauge,
    guest_mem_available: IntGauge,
    guest_cpu: FloatCounter,
    guest_load1: FloatGauge,
    guest_load5: FloatGauge,
    guest_load15: FloatGauge,
    container_memory: IntGauge,
    container_cpu: FloatCounter,
    net_rx_bytes: IntCounter,
    net_tx_bytes: IntCounter,
    net_rx_packets: IntCounter,
    net_tx_packets: IntCounter,
}

impl SandboxFamilies {
    fn register(&self, r: &mut Registry) {
        register(
            r,
            "runvm_sandbox_state",
            "The sandbox's lifecycle state: 1 for the current one",
            &self.state,
        );
        register(
            r,
            "runvm_sandbox_containers",
            "Containers in the sandbox",
            &self.containers,
        );
        register(
            r,
            "runvm_sandbox_boot_seconds",
            "From the sandbox's creation to its agent's first answer",
            &self.boot_seconds,
        );
        register(
            r,
            "runvm_sandbox_agent_up",
            "1 when the sandbox's agent answered this scrape, 0 when it was asked and did not",
            &self.agent_up,
        );
        register(
            r,
            "runvm_sandbox_agent_request_seconds",
            "How long the sandbox's agent took to answer this scrape's GetGuestMetrics",
            &self.agent_latency,
        );
        register(
            r,
            "runvm_sandbox_process_cpu_seconds",
            "User and system CPU time of a host process of the VM",
            &self.process_cpu,
        );
        register(
            r,
            "runvm_sandbox_process_resident_memory_bytes",
            "Resident set size of a host process of the VM",
            &self.process_rss,
        );
        register(r, "runvm_sandbox_process_pss_bytes", "Proportional set size of a host process of the VM (shared pages divided among their users)", &self.process_pss);
        register(
            r,
            "runvm_sandbox_process_threads",
            "Threads of a host process of the VM",
            &self.process_threads,
        );
        register(
            r,
            "runvm_sandbox_process_open_fds",
            "Open file descriptors of a host process of the VM",
            &self.process_fds,
        );
        register(
            r,
            "runvm_guest_memory_total_bytes",
            "The guest's MemTotal",
            &self.guest_mem_total,
        );
        register(
            r,
            "runvm_guest_memory_available_bytes",
            "The guest's MemAvailable",
            &self.guest_mem_available,
        );
        register(
            r,
            "runvm_guest_cpu_seconds",
            "CPU time of all the guest's CPUs, by mode",
            &self.guest_cpu,
        );
        register(
            r,
            "runvm_guest_load1",
            "The guest's 1-minute load average",
            &self.guest_load1,
        );
        register(
            r,
            "runvm_guest_load5",
            "The guest's 5-minute load average",
            &self.guest_load5,
        );
        register(
            r,
            "runvm_guest_load15",
            "The guest's 15-minute load average",
            &self.guest_load15,
        );
        register(
            r,
            "runvm_guest_container_memory_bytes",
            "A container's memory.current in the guest",
            &self.container_memory,
        );
        register(
            r,
            "runvm_guest_container_cpu_seconds",
            "A container's CPU time in the guest (cpu.stat usage_usec)",
            &self.container_cpu,
        );
        register(
            r,
            "runvm_guest_network_receive_bytes",
            "Bytes received by a guest interface",
            &self.net_rx_bytes,
        );
        register(
            r,
            "runvm_guest_network_transmit_bytes",
            "Bytes sent by a guest interface",
            &self.net_tx_bytes,
        );
        register(
            r,
            "runvm_guest_network_receive_packets",
            "Packets received by a guest interface",
            &self.net_rx_packets,
        );
        register(
            r,
            "runvm_guest_network_transmit_packets",
            "Packets sent by a guest interface",
            &self.net_tx_packets,
        );
    }

    fn clear(&self) {
        self.state.clear();
        self.containers.clear();
        self.boot_seconds.clear();
        self.agent_up.clear();
        self.agent_latency.clear();
        self.process_cpu.clear();
        self.process_rss.clear();
        self.process_pss.clear();
        self.process_threads.clear();
        self.process_fds.clear();
        self.guest_mem_total.clear();
        self.guest_mem_available.clear();
        self.guest_cpu.clear();
        self.guest_load1.clear();
        self.guest_load5.clear();
        self.guest_load15.clear();
        self.container_memory.clear();
        self.container_cpu.clear();
        self.net_rx_bytes.clear();
        self.net_tx_bytes.clear();
        self.net_rx_packets.clear();
        self.net_tx_packets.clear();
    }
}

/// The factory families (label `root`): cleared and refilled at every scrape.
#[derive(Debug, Default)]
struct FactoryFamilies {
    up: IntGauge,
    configured: IntGauge,
    ready: IntGauge,
    booting: IntGauge,
    handouts: IntCounter,
    misses: IntCounter,
    boot_failures: IntCounter,
    last_boot: FloatGauge,
    last_refill: FloatGauge,
}

impl FactoryFamilies {
    fn register(&self, r: &mut Registry) {
        register(
            r,
            "runvm_factory_up",
            "1 when the root's VM factory answered, 0 when its folder exists but no daemon answers",
            &self.up,
        );
        register(
            r,
            "runvm_factory_vms_configured",
            "VMs the factory keeps ready (factory.cache)",
            &self.configured,
        );
        register(
            r,
            "runvm_factory_vms_ready",
            "VMs ready in the factory's pool",
            &self.ready,
        );
        register(
            r,
            "runvm_factory_vm_booting",
            "1 while the factory boots a pool VM",
            &self.booting,
        );
        register(
            r,
            "runvm_factory_handouts",
            "VMs the factory handed to sandboxes",
            &self.handouts,
        );
        register(
            r,
            "runvm_factory_misses",
            "Requests the factory answered without a VM",
            &self.misses,
        );
        register(
            r,
            "runvm_factory_boot_failures",
            "Pool boots that failed",
            &self.boot_failures,
        );
        register(
            r,
            "runvm_factory_last_boot_seconds",
            "How long the factory's last pool boot took",
            &self.last_boot,
        );
        register(
            r,
            "runvm_factory_last_refill_seconds",
            "From the factory's last hand-out until its pool was full again",
            &self.last_refill,
        );
    }

    fn clear(&self) {
        for f in [&self.up, &self.configured, &self.ready, &self.booting] {
            f.clear();
        }
        for f in [&self.handouts, &self.misses, &self.boot_failures] {
            f.clear();
        }
        self.last_boot.clear();
        self.last_refill.clear();
    }

    fn fill(&self, factories: &[crate::collect::FactorySample]) {
        self.clear();
        for f in factories {
            let l = vec![("root", f.root.display().to_string())];
            self.up.get_or_create(&l).set(i64::from(f.status.is_some()));
            let Some(s) = &f.status else { continue };
            self.configured.get_or_create(&l).set(i64::from(s.cache));
            self.ready.get_or_create(&l).set(i64::from(s.ready));
            self.booting.get_or_create(&l).set(i64::from(s.booting));
            self.handouts.get_or_create(&l).inc_by(s.hits);
            self.misses.get_or_create(&l).inc_by(s.misses);
            self.boot_failures.get_or_create(&l).inc_by(s.boot_failures);
            if let Some(ms) = s.last_boot_ms {
                self.last_boot.get_or_create(&l).set(ms as f64 / 1e3);
            }
            if let Some(ms) = s.last_refill_ms {
                self.last_refill.get_or_create(&l).set(ms as f64 / 1e3);
            }
        }
    }
}

/// Registers `family` (the registry keeps a clone sharing its values).
fn register<M>(r: &mut Registry, name: &str, help: &str, family: &Family<Labels, M>)
where
    Family<Labels, M>: prometheus_client::registry::Metric + Clone,
{
    r.register(name, help, family.clone());
}

/// `labels` plus one more.
fn with(labels: &Labels, key: &'static str, value: impl Into<String>) -> Labels {
    let mut l = labels.clone();
    l.push((key, value.into()));
    l
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The monitor's registry and what it remembers between scrapes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sandbox: SandboxFamilies,
    factory: FactoryFamilies,
    boot_phase: Histograms,
    boot: Histogram,
    scrape_duration: Histogram,
    agent_requests: Histograms,
    scrape_errors: IntCounter,
    sandboxes: Gauge,
    connections: Gauge,
    own_cpu: Counter<f64, AtomicU64>,
    own_cpu_last: f64,
    /// Sandboxes whose boot is in the histograms already.
    observed: HashSet<SandboxKey>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with every family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let sandbox = SandboxFamilies::default();
        sandbox.register(&mut registry);
        let factory = FactoryFamilies::default();
        factory.register(&mut registry);
        let boot_phase = Histograms::new_with_constructor(boot_histogram as fn() -> Histogram);
        let boot = boot_histogram();
        let scrape_duration = scrape_histogram();
        let agent_requests =
            Histograms::new_with_constructor(request_histogram as fn() -> Histogram);
        let scrape_errors = IntCounter::default();
        let sandboxes = Gauge::default();
        let connections = Gauge::default();
        let own_cpu = Counter::<f64, AtomicU64>::default();
        registry.register(
            "runvm_boot_phase_duration_seconds",
            "Time each boot phase took (from the phase before it), each sandbox observed once",
            boot_phase.clone(),
        );
        registry.register(
            "runvm_boot_duration_seconds",
            "From a sandbox's creation to its agent's first answer, each sandbox observed once",
            boot.clone(),
        );
        registry.register(
            "runvm_monitor_scrape_duration_seconds",
            "Time the monitor took to collect a scrape",
            scrape_duration.clone(),
        );
        registry.register(
            "runvm_agent_request_duration_seconds",
            "Agent requests the monitor made, by method, on open connections",
            agent_requests.clone(),
        );
        registry.register(
            "runvm_monitor_scrape_errors",
            "Failures while collecting, by stage (record, process, agent); the sandbox is skipped or shown in part",
            scrape_errors.clone(),
        );
        registry.register(
            "runvm_monitor_sandboxes",
            "Sandboxes found in the state roots at the last scrape",
            sandboxes.clone(),
        );
        registry.register(
            "runvm_monitor_agent_connections",
            "Agent connections the monitor keeps open",
            connections.clone(),
        );
        registry.register(
            "runvm_monitor_cpu_seconds",
            "CPU time the monitor process used",
            own_cpu.clone(),
        );
        Metrics {
            registry,
            sandbox,
            factory,
            boot_phase,
            boot,
            scrape_duration,
            agent_requests,
            scrape_errors,
            sandboxes,
            connections,
            own_cpu,
            own_cpu_last: 0.0,
            observed: HashSet::new(),
        }
    }

    /// Refills the per-sandbox families from `scan`; observes the boots not seen before.
    pub fn update(&mut self, scan: &Scan, connections: usize) {
        let f = &self.sandbox;
        f.clear();
        for s in &scan.sandboxes {
            let l = &s.labels;
            for state in State::ALL {
                f.state
                    .get_or_create(&with(l, "state", state.as_str()))
                    .set(i64::from(state == s.state));
            }
            f.containers.get_or_create(l).set(int(s.containers as u64));
            if let Some(boot) = s.boot_seconds {
                f.boot_seconds.get_or_create(l).set(boot);
                if self.observed.insert(s.key.clone()) {
                    self.boot.observe(boot);
                    for (phase, seconds) in &s.boot_phases {
                        self.boot_phase
                            .get_or_create(&vec![("phase", phase.clone())])
                            .observe(*seconds);
                    }
                }
            }
            for (name, u) in &s.processes {
                let pl = with(l, "process", name.clone());
                f.process_cpu.get_or_create(&pl).inc_by(u.cpu_seconds);
                f.process_rss.get_or_create(&pl).set(int(u.rss_bytes));
                if let Some(pss) = u.pss_bytes {
                    f.process_pss.get_or_create(&pl).set(int(pss));
                }
                f.process_threads.get_or_create(&pl).set(int(u.threads));
                f.process_fds.get_or_create(&pl).set(int(u.open_fds));
            }
            self.guest(s.agent_up, l, s.guest.as_ref());
            if let Some(seconds) = s.agent_seconds {
                f.agent_latency.get_or_create(l).set(seconds);
                self.agent_requests
                    .get_or_create(&vec![("method", "GetGuestMetrics".to_string())])
                    .observe(seconds);
            }
        }
        self.factory.fill(&scan.factories);
        let live: HashSet<&SandboxKey> = scan.sandboxes.iter().map(|s| &s.key).collect();
        self.observed.retain(|k| live.contains(k));
        for (stage, _) in &scan.errors {
            self.scrape_errors
                .get_or_create(&vec![("stage", stage.as_str().to_string())])
                .inc();
        }
        self.sandboxes.set(int(scan.sandboxes.len() as u64));
        self.connections.set(int(connections as u64));
    }

    fn guest(
        &self,
        up: Option<bool>,
        l: &Labels,
        guest: Option<&runvm_sandbox::agent::GuestMetrics>,
    ) {
        let f = &self.sandbox;
        if let Some(up) = up {
            f.agent_up.get_or_create(l).set(i64::from(up));
        }
        let Some(g) = guest else { return };
        f.guest_mem_total
            .get_or_create(l)
            .set(int(g.mem_total_bytes));
        f.guest_mem_available
            .get_or_create(l)
            .set(int(g.mem_available_bytes));
        for (mode, ns) in g.cpu.modes() {
            f.guest_cpu
                .get_or_create(&with(l, "mode", mode))
                .inc_by(ns as f64 / 1e9);
        }
        f.guest_load1.get_or_create(l).set(g.load[0]);
        f.guest_load5.get_or_create(l).set(g.load[1]);
        f.guest_load15.get_or_create(l).set(g.load[2]);
        for c in &g.containers {
            let cl = with(l, "container_id", c.container_id.clone());
            f.container_memory
                .get_or_create(&cl)
                .set(int(c.memory_bytes));
            f.container_cpu
                .get_or_create(&cl)
                .inc_by(c.cpu_usage_ns as f64 / 1e9);
        }
        for n in &g.network {
            let nl = with(l, "interface", n.name.clone());
            f.net_rx_bytes.get_or_create(&nl).inc_by(n.rx_bytes);
            f.net_tx_bytes.get_or_create(&nl).inc_by(n.tx_bytes);
            f.net_rx_packets.get_or_create(&nl).inc_by(n.rx_packets);
            f.net_tx_packets.get_or_create(&nl).inc_by(n.tx_packets);
        }
    }

    /// Notes how long a scrape took to collect and the monitor's CPU time so far.
    pub fn observe_scrape(&mut self, seconds: f64, own_cpu_seconds: Option<f64>) {
        self.scrape_duration.observe(seconds);
        if let Some(cpu) = own_cpu_seconds.filter(|c| *c >= self.own_cpu_last) {
            self.own_cpu.inc_by(cpu - self.own_cpu_last);
            self.own_cpu_last = cpu;
        }
    }

    /// The registry in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }

    /// How many failures of `stage` were counted so far.
    pub fn errors_of(&self, stage: Stage) -> u64 {
        self.scrape_errors
            .get(&vec![("stage", stage.as_str().to_string())])
            .map_or(0, |c| c.get())
    }
}
