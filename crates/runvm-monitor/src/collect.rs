//! One scrape's look at the sandboxes: their records in the state roots (read without taking
//! any lock: the store replaces records atomically), the cost of their host processes from
//! `/proc`, and the guest's own view from every agent at once, each within a short timeout.
//! Agent connections are kept between scrapes and dropped when a call fails or the sandbox
//! goes. Nothing here boots, stops or changes a sandbox.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use runvm_sandbox::agent::{Agent, AgentConnector, AgentError, GuestMetrics};
use runvm_sandbox::factory::{self, FactoryStatus};
use runvm_sandbox::state::{SandboxRecord, State};
use runvm_sandbox::store::Store;
use runvm_sandbox::{timeline, SandboxId};

use crate::procfs::{ProcError, ProcFs, ProcessUsage, PssCache};

/// The CRI annotations that name a sandbox's pod, with the label each becomes.
pub const POD_ANNOTATIONS: [(&str, &str); 3] = [
    ("io.kubernetes.cri.sandbox-name", "pod_name"),
    ("io.kubernetes.cri.sandbox-namespace", "pod_namespace"),
    ("io.kubernetes.cri.sandbox-uid", "pod_uid"),
];

/// The phase that ends a boot: the host's first answer from the agent.
pub const BOOT_END: &str = "agent-ready";

/// The phase the host marks when QEMU runs (before the agent answers).
const VM_STARTED: &str = "vm-started";

/// Label pairs of a series.
pub type Labels = Vec<(&'static str, String)>;

/// One sandbox's identity across scrapes: a sandbox re-created under the same id is another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SandboxKey {
    /// Its state root.
    pub root: PathBuf,
    /// Its id.
    pub id: SandboxId,
    /// When it was created, ns since the Unix epoch.
    pub created_at: u64,
}

/// A sandbox as one scrape saw it.
#[derive(Debug, Clone)]
pub struct SandboxSample {
    /// Who it is.
    pub key: SandboxKey,
    /// `sandbox_id` and, where CRI annotated it, `pod_name`, `pod_namespace`, `pod_uid`.
    pub labels: Labels,
    /// Its lifecycle state.
    pub state: State,
    /// Its containers.
    pub containers: usize,
    /// The boot's phases (name, seconds since the phase before), up to [`BOOT_END`]; empty
    /// while the sandbox has not booted.
    pub boot_phases: Vec<(String, f64)>,
    /// From the first phase to [`BOOT_END`], seconds.
    pub boot_seconds: Option<f64>,
    /// Each live host process of the VM, by role (`qemu`, `virtiofsd`, ...).
    pub processes: Vec<(String, ProcessUsage)>,
    /// The guest's view; `None` when its agent was not asked (VM paused or stopped) or did not
    /// answer.
    pub guest: Option<GuestMetrics>,
    /// Whether the agent answered; `None` when it was not asked.
    pub agent_up: Option<bool>,
    /// How long its answer took (the request on an open connection), seconds.
    pub agent_seconds: Option<f64>,
}

/// Where a scrape failed; counted by the monitor, never fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Listing a state root or reading a record.
    Record,
    /// Reading a host process of a VM (other than its being gone).
    Process,
    /// The agent did not answer in time, or refused.
    Agent,
    /// A root's VM factory did not answer its status in time, or broke the protocol.
    Factory,
}

impl Stage {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Record => "record",
            Stage::Process => "process",
            Stage::Agent => "agent",
            Stage::Factory => "factory",
        }
    }
}

/// A root's VM factory ([`runvm_sandbox::factory`]) as one scrape saw it.
#[derive(Debug, Clone)]
pub struct FactorySample {
    /// The state root it serves.
    pub root: PathBuf,
    /// Its daemon's status; `None` when no daemon answers.
    pub status: Option<FactoryStatus>,
}

/// What one scrape found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The sandboxes, by root then id.
    pub sandboxes: Vec<SandboxSample>,
    /// The roots that have a factory folder (a factory was started there and not destroyed).
    pub factories: Vec<FactorySample>,
    /// What failed, with why.
    pub errors: Vec<(Stage, String)>,
}

/// What the collector reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The state roots, each a store of sandboxes.
    pub stores: Vec<Store>,
    /// The host's `/proc`.
    pub procfs: ProcFs,
    /// Opens agent connections.
    pub connector: Arc<dyn AgentConnector>,
    /// The longest an agent may take to connect and answer.
    pub agent_timeout: Duration,
    /// How long a process's PSS reading is reused (zero: read at every scrape).
    pub pss_max_age: Duration,
}

/// Collects [`Scan`]s, keeping agent connections between them.
#[derive(Debug)]
pub struct Collector {
    sources: Sources,
    agents: HashMap<SandboxKey, Arc<dyn Agent>>,
    pss: PssCache,
}

impl Collector {
    /// A collector over `sources`.
    pub fn new(sources: Sources) -> Collector {
        Collector {
            pss: PssCache::new(sources.pss_max_age),
            sources,
            agents: HashMap::new(),
        }
    }

    /// Agent connections kept open.
    pub fn open_connections(&self) -> usize {
        self.agents.len()
    }

    /// Looks at every sandbox once.
    pub async fn collect(&mut self) -> Scan {
        let mut scan = Scan::default();
        let mut seen_ids = HashSet::new();
        let mut asks = Vec::new();
        let mut live_processes = HashSet::new();
        let stores = self.sources.stores.clone();
        for store in &stores {
            let ids = match store.list_sandboxes() {
                Ok(ids) => ids,
                // A root not made yet holds no sandbox.
                Err(_) if !store.root().exists() => continue,
                Err(e) => {
                    scan.errors.push((Stage::Record, e.to_string()));
                    continue;
                }
            };
            for id in ids {
                let record = match store.load_sandbox(&id) {
                    Ok(r) => r,
                    // Deleted between the listing and the read.
                    Err(_) if !store.sandbox_dir(&id).exists() => continue,
                    Err(e) => {
                        scan.errors.push((Stage::Record, e.to_string()));
                        continue;
                    }
                };
                if !seen_ids.insert(id.clone()) {
                    tracing::debug!(sandbox = %id, root = %store.root().display(),
                        "sandbox id also in an earlier root: skipped");
                    continue;
                }
                let sample = self.sample(store, &record, &mut scan.errors);
                live_processes.extend(record.vm.processes.iter().map(|p| (p.pid, p.start_time)));
                if guest_answers(&record) {
                    if let Some(address) = record.agent_address.clone() {
                        asks.push((scan.sandboxes.len(), address));
                    }
                }
                scan.sandboxes.push(sample);
            }
        }
        self.pss.retain(&live_processes);
        let timeout = self.sources.agent_timeout;
        let factories = stores
            .iter()
            .map(|s| s.root().to_path_buf())
            .filter(|root| factory::factory_dir(root).is_dir())
            .map(|root| async move {
                let status = tokio::time::timeout(timeout, factory::client::status(&root))
                    .await
                    .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))
                    .and_then(|r| r.map_err(|e| e.to_string()));
                (root, status)
            });
        let (_, factories) = futures_util::future::join(
            self.ask_agents(&mut scan, asks),
            futures_util::future::join_all(factories),
        )
        .await;
        for (root, status) in factories {
            let status = status.unwrap_or_else(|reason| {
                scan.errors.push((
                    Stage::Factory,
                    format!("the factory of {}: {reason}", root.display()),
                ));
                None
            });
            scan.factories.push(FactorySample { root, status });
        }
        scan
    }

    fn sample(
        &mut self,
        store: &Store,
        record: &SandboxRecord,
        errors: &mut Vec<(Stage, String)>,
    ) -> SandboxSample {
        let mut processes = Vec::new();
        if record.state != State::Stopped {
            for p in &record.vm.processes {
                let procfs = &self.sources.procfs;
                let mut usage = match procfs.usage(p.pid, p.start_time) {
                    Ok(usage) => usage,
                    Err(ProcError::Gone { .. }) => continue,
                    Err(e) => {
                        errors.push((Stage::Process, format!("{}: {e}", record.id)));
                        continue;
                    }
                };
                match self.pss.get(procfs, p.pid, p.start_time) {
                    Ok(pss) => usage.pss_bytes = Some(pss),
                    Err(ProcError::Gone { .. }) => continue,
                    Err(e) => errors.push((Stage::Process, format!("{}: {e}", record.id))),
                }
                processes.push((p.name.clone(), usage));
            }
        }
        let (boot_phases, boot_seconds) = boot_phases(&record.timeline);
        SandboxSample {
            key: SandboxKey {
                root: store.root().to_path_buf(),
                id: record.id.clone(),
                created_at: record.created_at,
            },
            labels: sandbox_labels(&record.id, &record.annotations),
            state: record.state,
            containers: record.containers.len(),
            boot_phases,
            boot_seconds,
            processes,
            guest: None,
            agent_up: None,
            agent_seconds: None,
        }
    }

    /// Asks the agents of `asks` (sample index, address) at once; fills in their answers.
    async fn ask_agents(
        &mut self,
        scan: &mut Scan,
        asks: Vec<(usize, runvm_hypervisor::AgentAddress)>,
    ) {
        let timeout = self.sources.agent_timeout;
        let calls = asks.into_iter().map(|(index, address)| {
            let key = scan.sandboxes[index].key.clone();
            let cached = self.agents.get(&key).cloned();
            let connector = Arc::clone(&self.sources.connector);
            async move {
                let asked = tokio::time::timeout(timeout, async {
                    let agent = match cached {
                        Some(a) => a,
                        None => Arc::from(connector.connect(&address, timeout).await?),
                    };
                    // The request alone: a new connection's handshake is not the agent's latency.
                    let asked = std::time::Instant::now();
                    let metrics = agent.guest_metrics().await?;
                    Ok::<_, AgentError>((agent, metrics, asked.elapsed().as_secs_f64()))
                })
                .await
                .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))
                .and_then(|r| r.map_err(|e| e.to_string()));
                (index, key, asked)
            }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut live = HashSet::new();
        for (index, key, asked) in answers {
            match asked {
                Ok((agent, metrics, seconds)) => {
                    self.agents.insert(key.clone(), agent);
                    scan.sandboxes[index].guest = Some(metrics);
                    scan.sandboxes[index].agent_seconds = Some(seconds);
                    scan.sandboxes[index].agent_up = Some(true);
                    live.insert(key);
                }
                Err(reason) => {
                    scan.sandboxes[index].agent_up = Some(false);
                    self.agents.remove(&key);
                    scan.errors
                        .push((Stage::Agent, format!("sandbox {}: {reason}", key.id)));
                }
            }
        }
        // Connections of sandboxes gone, stopped or paused are closed.
        self.agents.retain(|key, _| live.contains(key));
    }
}

/// Whether the sandbox's agent can answer: its VM runs, is not paused, and its latest boot
/// ended (the host never connects to a guest still booting: connections tried before the
/// guest's vsock is up were seen to wedge vhost-device-vsock).
fn guest_answers(record: &SandboxRecord) -> bool {
    let last = |phase: &str| record.timeline.iter().rposition(|(p, _)| p == phase);
    let booted = match (last(BOOT_END), last(VM_STARTED)) {
        (Some(ready), Some(started)) => ready > started,
        (ready, None) => ready.is_some(),
        (None, Some(_)) => false,
    };
    matches!(record.state, State::Ready | State::Running) && !record.vm.paused && booted
}

/// `sandbox_id`, then the pod's name, namespace and uid where CRI's annotations give them.
pub fn sandbox_labels(id: &SandboxId, annotations: &BTreeMap<String, String>) -> Labels {
    let mut labels = vec![("sandbox_id", id.to_string())];
    for (annotation, label) in POD_ANNOTATIONS {
        if let Some(value) = annotations.get(annotation).filter(|v| !v.is_empty()) {
            labels.push((label, value.clone()));
        }
    }
    labels
}

/// The boot's phases from a recorded timeline: each phase up to [`BOOT_END`] with the
/// seconds since the phase before it (the first phase, which has none, left out), and the
/// whole boot's seconds. Nothing before the boot ended.
pub fn boot_phases(recorded: &[(String, u64)]) -> (Vec<(String, f64)>, Option<f64>) {
    let steps = timeline::steps(recorded);
    let Some(end) = steps.iter().position(|s| s.name == BOOT_END) else {
        return (Vec::new(), None);
    };
    let phases = steps[1..=end]
        .iter()
        .map(|s| (s.name.clone(), s.took_ms / 1e3))
        .collect();
    (phases, Some(steps[end].at_ms / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn boot_phases_run_up_to_agent_ready_and_skip_later_marks() {
        let recorded = vec![
            ("created".to_string(), 1_000 * MS),
            ("helpers-started".to_string(), 1_050 * MS),
            ("guest:kernel-started".to_string(), 1_200 * MS),
            (BOOT_END.to_string(), 3_000 * MS),
            ("running".to_string(), 9_000 * MS),
        ];
        let (phases, total) = boot_phases(&recorded);
        assert_eq!(
            phases,
            vec![
                ("helpers-started".to_string(), 0.05),
                ("guest:kernel-started".to_string(), 0.15),
                (BOOT_END.to_string(), 1.8),
            ]
        );
        assert_eq!(total, Some(2.0));
        assert_eq!(boot_phases(&recorded[..3]), (Vec::new(), None));
    }

    #[test]
    fn only_a_booted_running_guest_is_asked() {
        use runvm_hypervisor::{Accelerator, VmConfig, VsockBackend};
        let vm = VmConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_params: vec![],
            accelerator: Accelerator::Tcg,
            shared_dir: None,
            vsock: VsockBackend::VhostUser,
            run_dir: "/tmp/x".into(),
            netns: None,
            net_devices: Vec::new(),
            hotplug_ports: 0,
            vhost_net: false,
            tcg_tb_size_mib: 0,
            cgroup_procs: Vec::new(),
            max_vcpus: 0,
            max_memory_mib: 0,
            hotplugged: Default::default(),
        };
        let id = SandboxId::parse("s").unwrap();
        let mut r = SandboxRecord::new(id, vm, Default::default());
        let mark = |r: &mut SandboxRecord, p: &str| r.timeline.push((p.to_string(), 0));
        mark(&mut r, VM_STARTED);
        assert!(!guest_answers(&r), "booting");
        mark(&mut r, BOOT_END);
        assert!(guest_answers(&r));
        r.vm.paused = true;
        assert!(!guest_answers(&r), "paused");
        r.vm.paused = false;
        r.state = State::Stopped;
        assert!(!guest_answers(&r), "stopped");
        r.state = State::Running;
        mark(&mut r, VM_STARTED);
        assert!(!guest_answers(&r), "booting again after a stop");
    }

    #[test]
    fn pod_labels_come_from_cri_annotations_when_present() {
        let id = SandboxId::parse("abc").unwrap();
        let mut annotations = BTreeMap::new();
        assert_eq!(
            sandbox_labels(&id, &annotations),
            vec![("sandbox_id", "abc".to_string())]
        );
        annotations.insert(POD_ANNOTATIONS[0].0.to_string(), "web-0".to_string());
        annotations.insert(POD_ANNOTATIONS[1].0.to_string(), "shop".to_string());
        annotations.insert(POD_ANNOTATIONS[2].0.to_string(), String::new());
        assert_eq!(
            sandbox_labels(&id, &annotations),
            vec![
                ("sandbox_id", "abc".to_string()),
                ("pod_name", "web-0".to_string()),
                ("pod_namespace", "shop".to_string()),
            ]
        );
    }
}
