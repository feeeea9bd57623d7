//! The sandbox's pod network: joined before the VM boots, configured in the guest once the
//! agent answers, changed while the pod runs, removed when the sandbox stops.

use runvm_hypervisor::NetDevice;

use super::Sandbox;
use crate::agent::{Agent, Interface, Route};
use crate::error::SandboxError;
use crate::network::{self, AddInterface, Endpoint, NetworkError, NetworkModel, NetworkRecord};
use crate::store::SandboxLock;

/// PCIe root ports left free for hot-added cards when the VM has a network.
const HOTPLUG_PORTS: u32 = 2;

fn net_device(e: &Endpoint) -> NetDevice {
    NetDevice {
        id: e.id.clone(),
        tap: e.tap.clone(),
        mac: e.interface.mac.clone(),
        macvtap: e.macvtap.clone(),
        hotplug_port: None,
    }
}

impl Sandbox {
    /// Before boot: joins the pod's namespace (taps, qdiscs, filters) and records what was made
    /// before QEMU starts, so a crash leaves a record to clean up from.
    pub(super) async fn setup_network(&mut self, lock: &SandboxLock) -> Result<(), SandboxError> {
        let Some((netns, model)) = self.netns.clone() else {
            return Ok(());
        };
        let record = network::setup(&netns, model).await?;
        let vm = &mut self.record.vm.config;
        vm.netns = Some(netns);
        vm.net_devices = record.endpoints.iter().map(net_device).collect();
        vm.hotplug_ports = if model == NetworkModel::None {
            0
        } else {
            HOTPLUG_PORTS
        };
        self.record.network = Some(record);
        self.store.save_sandbox(lock, &self.record)?;
        Ok(())
    }

    /// For an adopted factory VM (booted without a network): joins the pod's namespace as
    /// [`setup_network`](Self::setup_network) does, recorded first, then hot-adds a card per
    /// device (the taps opened in the namespace reach QEMU as descriptors).
    pub(super) async fn adopt_network(&mut self, lock: &SandboxLock) -> Result<(), SandboxError> {
        let Some((netns, model)) = self.netns.clone() else {
            return Ok(());
        };
        let record = network::setup(&netns, model).await?;
        self.record.network = Some(record.clone());
        self.store.save_sandbox(lock, &self.record)?;
        for e in &record.endpoints {
            self.hypervisor.add_net_device(&net_device(e)).await?;
        }
        self.record.vm = self.hypervisor.save()?;
        self.store.save_sandbox(lock, &self.record)?;
        Ok(())
    }

    /// After boot: the guest configures its cards as the pod's devices are.
    pub(super) async fn configure_guest_network(
        &mut self,
        agent: &dyn Agent,
    ) -> Result<(), SandboxError> {
        let Some(record) = &self.record.network else {
            return Ok(());
        };
        for e in &record.endpoints {
            agent.update_interface(&e.interface).await?;
        }
        if !record.endpoints.is_empty() {
            agent
                .update_routes(&network::all_routes(&record.endpoints))
                .await?;
            let neighbors: Vec<_> = record
                .endpoints
                .iter()
                .flat_map(|e| e.neighbors.clone())
                .collect();
            if !neighbors.is_empty() {
                agent.add_neighbors(&neighbors).await?;
            }
        }
        Ok(())
    }

    /// Removes what runvm made in the pod's namespace, per the in-memory record (after a failed
    /// boot, before the record is gone).
    pub(super) async fn teardown_network_now(&mut self) -> Result<(), NetworkError> {
        if let Some(record) = &self.record.network {
            if let Some(rule) = &record.port_forward {
                network::portfwd::remove_rule(&record.netns, rule).await?;
            }
            network::teardown(&record.netns, &record.endpoints).await?;
        }
        Ok(())
    }

    /// Removes what runvm made in the pod's namespace and forgets it. Idempotent.
    pub(super) async fn teardown_network(&mut self) -> Result<(), SandboxError> {
        self.remove_port_forward_rule().await?;
        let Some(record) = self.record.network.clone() else {
            return Ok(());
        };
        if record.endpoints.is_empty() {
            return Ok(());
        }
        network::teardown(&record.netns, &record.endpoints).await?;
        self.update(|r| {
            if let Some(n) = r.network.as_mut() {
                n.endpoints.clear();
            }
            Ok(())
        })
    }

    fn network_record(&self) -> Result<NetworkRecord, SandboxError> {
        self.record.network.clone().ok_or_else(|| {
            NetworkError::Invalid(format!("{} has no pod network namespace", self.what())).into()
        })
    }

    /// Hot-adds device `request.device` of the pod's namespace: a tap joined to it, a card in
    /// the VM, configured by the guest with the device's addresses and routes (the guest's
    /// other routes stay). On error nothing of it stays and the guest network is as before.
    pub async fn add_interface(
        &mut self,
        request: &AddInterface,
    ) -> Result<Interface, SandboxError> {
        self.reload()?;
        self.require_running("add a network interface")?;
        let record = self.network_record()?;
        let endpoint = network::add(&record, request).await?;
        let undo_tap = |e: Endpoint| {
            let netns = record.netns.clone();
            async move {
                if let Err(err) = network::teardown(&netns, &[e]).await {
                    tracing::warn!(error = %err, "removing the tap of a failed hot-add");
                }
            }
        };
        if let Err(e) = self.hypervisor.add_net_device(&net_device(&endpoint)).await {
            undo_tap(endpoint).await;
            return Err(e.into());
        }
        let configured = async {
            let agent = self.agent().await?;
            let applied = agent.update_interface(&endpoint.interface).await?;
            let mut routes = agent.list_routes().await?;
            routes.retain(|r| r.device != endpoint.interface.name);
            routes.extend(endpoint.routes.iter().cloned());
            agent.update_routes(&routes).await?;
            if !endpoint.neighbors.is_empty() {
                agent.add_neighbors(&endpoint.neighbors).await?;
            }
            Ok::<Interface, SandboxError>(applied)
        }
        .await;
        let applied = match configured {
            Ok(a) => a,
            Err(e) => {
                if let Err(err) = self.hypervisor.remove_net_device(&endpoint.id).await {
                    tracing::warn!(error = %err, "removing the card of a failed hot-add");
                }
                undo_tap(endpoint).await;
                return Err(e);
            }
        };
        let vm = self.hypervisor.save()?;
        self.update(|r| {
            r.vm = vm;
            if let Some(n) = r.network.as_mut() {
                n.endpoints.push(endpoint);
            }
            Ok(())
        })?;
        Ok(applied)
    }

    /// Hot-removes the interface named `name` in the guest (or joined from device `name`):
    /// the card leaves the VM, its tap and qdiscs go.
    pub async fn remove_interface(&mut self, name: &str) -> Result<(), SandboxError> {
        self.reload()?;
        self.require_running("remove a network interface")?;
        let record = self.network_record()?;
        let endpoint = record
            .endpoints
            .iter()
            .find(|e| e.interface.name == name || e.device == name)
            .cloned()
            .ok_or_else(|| {
                NetworkError::Invalid(format!("{} has no interface named {name:?}", self.what()))
            })?;
        self.hypervisor.remove_net_device(&endpoint.id).await?;
        network::teardown(&record.netns, std::slice::from_ref(&endpoint)).await?;
        let vm = self.hypervisor.save()?;
        self.update(|r| {
            r.vm = vm;
            if let Some(n) = r.network.as_mut() {
                n.endpoints.retain(|e| e.id != endpoint.id);
            }
            Ok(())
        })
    }

    /// Reconfigures a guest interface (found by MAC). All or nothing.
    pub async fn update_interface(
        &mut self,
        interface: &Interface,
    ) -> Result<Interface, SandboxError> {
        self.reload()?;
        self.require_running("update a network interface")?;
        Ok(self.agent().await?.update_interface(interface).await?)
    }

    /// The guest's interfaces.
    pub async fn list_interfaces(&mut self) -> Result<Vec<Interface>, SandboxError> {
        self.reload()?;
        self.require_running("list network interfaces")?;
        Ok(self.agent().await?.list_interfaces().await?)
    }

    /// The guest's routes.
    pub async fn list_routes(&mut self) -> Result<Vec<Route>, SandboxError> {
        self.reload()?;
        self.require_running("list routes")?;
        Ok(self.agent().await?.list_routes().await?)
    }

    /// Replaces the guest's routing table. All or nothing.
    pub async fn update_routes(&mut self, routes: &[Route]) -> Result<Vec<Route>, SandboxError> {
        self.reload()?;
        self.require_running("update routes")?;
        Ok(self.agent().await?.update_routes(routes).await?)
    }

    fn require_running(&self, operation: &'static str) -> Result<(), SandboxError> {
        use crate::state::State;
        if matches!(self.record.state, State::Ready | State::Running) {
            Ok(())
        } else {
            Err(self.wrong_state(operation, " (it must be ready or running)"))
        }
    }
}
