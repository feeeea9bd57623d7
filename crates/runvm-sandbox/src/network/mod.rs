//! Pod networking on the host: the VM joins the pod's network namespace, where containerd and
//! CNI made its devices. In the `tcfilter` model (Kata's default) each ethernet-like device of
//! the namespace gets a tap; tc ingress qdiscs with mirred filters pass every frame from one to
//! the other, and QEMU gets the tap as a virtio-net card with the device's MAC. The guest then
//! configures the card as the device is: name, MTU, addresses, routes, neighbours.
//!
//! What runvm makes is recorded ([`NetworkRecord`], in the sandbox record) so that any process
//! can remove exactly that, and nothing else, when the sandbox goes.

pub mod host;
pub mod portfwd;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::{Interface, IpNet, Neighbor, Route};
use crate::error::ErrorKind;
use host::{in_netns, DeviceScan};

/// How the VM is joined to the pod's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkModel {
    /// A tap per device, joined to it by tc mirred redirects.
    #[default]
    Tcfilter,
    /// A passthru macvtap on each device, passed to QEMU as an open descriptor.
    Macvtap,
    /// No network card: the VM is not connected.
    None,
}

impl NetworkModel {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkModel::Tcfilter => "tcfilter",
            NetworkModel::Macvtap => "macvtap",
            NetworkModel::None => "none",
        }
    }
}

/// Errors of pod networking. Messages name the device, address or namespace at fault.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace file cannot be opened or joined.
    #[error("cannot join network namespace {}", path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("cannot {action}: {reason}")]
    Netlink {
        /// What was being done.
        action: String,
        /// What the kernel said.
        reason: String,
    },
    /// A tap could not be made.
    #[error("cannot create tap {name}")]
    Tap {
        /// Its name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No such device in the pod's namespace.
    #[error("the pod's network namespace has no device named {device:?}")]
    NoSuchDevice {
        /// The name looked for.
        device: String,
    },
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// Port forwarding's listener or iptables rule could not be made or removed.
    #[error("cannot {action}: {reason}")]
    PortForward {
        /// What was being done.
        action: String,
        /// Why.
        reason: String,
    },
}

impl NetworkError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NetworkError::NoSuchDevice { .. } => ErrorKind::NotFound,
            NetworkError::Invalid(_) => ErrorKind::InvalidArgument,
            NetworkError::Netns { .. }
            | NetworkError::Netlink { .. }
            | NetworkError::Tap { .. }
            | NetworkError::PortForward { .. } => ErrorKind::Internal,
        }
    }
}

/// One device of the pod joined to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The VM's netdev id (`net0`, ...).
    pub id: String,
    /// The device in the pod's namespace.
    pub device: String,
    /// The tap runvm made for it.
    pub tap: String,
    /// Whether runvm added the ingress qdisc of `device` (removed with it at teardown).
    pub device_qdisc: bool,
    /// In the macvtap model: the macvtap's character device (`tap` is then its name).
    #[serde(default)]
    pub macvtap: Option<PathBuf>,
    /// How the guest configures its card.
    pub interface: Interface,
    /// Its routes, as found in the namespace.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Its permanent neighbours.
    #[serde(default)]
    pub neighbors: Vec<Neighbor>,
}

/// What runvm made in the pod's namespace, kept in the sandbox record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The namespace (as the OCI spec named it).
    pub netns: PathBuf,
    /// The model used.
    pub model: NetworkModel,
    /// The devices joined, in order.
    pub endpoints: Vec<Endpoint>,
    /// The port-forward rule made in the namespace (while a forwarder serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_forward: Option<portfwd::PortForwardRule>,
}

/// What to hot-add: a device of the pod's namespace, optionally configured otherwise in the
/// guest than it is on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddInterface {
    /// The device in the pod's network namespace.
    pub device: String,
    /// The guest's name for it (default: the device's name).
    #[serde(default)]
    pub name: Option<String>,
    /// The guest's addresses (default: the device's).
    #[serde(default)]
    pub addresses: Option<Vec<IpNet>>,
    /// The guest's MTU (default: the device's).
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// The id and tap name of endpoint number `n`.
fn names(n: usize) -> (String, String) {
    (format!("net{n}"), format!("tap{n}_runvm"))
}

/// A free endpoint number, given the endpoints there are.
fn free_number(endpoints: &[Endpoint]) -> usize {
    (0..)
        .find(|n| !endpoints.iter().any(|e| e.id == names(*n).0))
        .unwrap_or(0)
}

fn endpoint_from(scan: DeviceScan, n: usize, device_qdisc: bool) -> Endpoint {
    let (id, tap) = names(n);
    Endpoint {
        id,
        device: scan.link.name.clone(),
        tap,
        device_qdisc,
        macvtap: None,
        interface: Interface {
            name: scan.link.name.clone(),
            mac: host::format_mac(&scan.link.mac),
            mtu: scan.link.mtu,
            addresses: scan.addresses,
            up: true,
        },
        routes: scan.routes,
        neighbors: scan.neighbors,
    }
}

/// Joins one scanned device to a new tap (inside the namespace's thread). On error, nothing
/// made stays.
async fn join(h: &rtnetlink::Handle, scan: DeviceScan, n: usize) -> Result<Endpoint, NetworkError> {
    let (_, tap_name) = names(n);
    if host::has_ingress(h, scan.link.index).await? {
        return Err(NetworkError::Invalid(format!(
            "device {} has an ingress qdisc already (not runvm's); refusing to replace it",
            scan.link.name
        )));
    }
    let tap = host::create_tap(h, &tap_name, scan.link.mtu).await?;
    let joined = async {
        host::redirect(h, &scan.link, &tap).await?;
        host::redirect(h, &tap, &scan.link).await
    }
    .await;
    if let Err(e) = joined {
        let _ = host::delete_ingress(h, scan.link.index, &scan.link.name).await;
        let _ = host::delete_link(h, tap.index).await;
        return Err(e);
    }
    Ok(endpoint_from(scan, n, true))
}

/// Gives one scanned device to a passthru macvtap (inside the namespace's thread).
async fn join_macvtap(
    h: &rtnetlink::Handle,
    scan: DeviceScan,
    n: usize,
) -> Result<Endpoint, NetworkError> {
    let name = format!("mvt{n}_runvm");
    let node = host::create_macvtap(h, &name, &scan.link).await?;
    let mut e = endpoint_from(scan, n, false);
    e.tap = name;
    e.macvtap = Some(node);
    Ok(e)
}

/// Scans `netns` and joins every ethernet-like device to a tap (or macvtap) of its own.
pub async fn setup(netns: &Path, model: NetworkModel) -> Result<NetworkRecord, NetworkError> {
    let mut record = NetworkRecord {
        netns: netns.to_path_buf(),
        model,
        endpoints: Vec::new(),
        port_forward: None,
    };
    match model {
        NetworkModel::None => return Ok(record),
        NetworkModel::Macvtap | NetworkModel::Tcfilter => {}
    }
    let endpoints = in_netns(netns, move || async move {
        let h = host::connect()?;
        let mut made: Vec<Endpoint> = Vec::new();
        for link in host::links(&h).await? {
            if !link.ethernet || link.name.ends_with("_runvm") {
                continue;
            }
            let scan = host::scan_device(&h, link).await?;
            let joined = match model {
                NetworkModel::Macvtap => join_macvtap(&h, scan, made.len()).await,
                _ => join(&h, scan, made.len()).await,
            };
            match joined {
                Ok(e) => made.push(e),
                Err(e) => {
                    remove_endpoints(&h, &made).await;
                    return Err(e);
                }
            }
        }
        Ok(made)
    })
    .await?;
    tracing::info!(netns = %netns.display(), devices = endpoints.len(), "pod network joined");
    record.endpoints = endpoints;
    Ok(record)
}

/// Joins the device `request.device` of `record`'s namespace to a new tap; the endpoint is
/// not added to `record` (the caller does that once the VM has its card).
pub async fn add(record: &NetworkRecord, request: &AddInterface) -> Result<Endpoint, NetworkError> {
    if record.model == NetworkModel::None {
        return Err(NetworkError::Invalid(
            "interfaces cannot be added in the network model \"none\"".into(),
        ));
    }
    if record.endpoints.iter().any(|e| e.device == request.device) {
        return Err(NetworkError::Invalid(format!(
            "device {} is joined to the VM already",
            request.device
        )));
    }
    let n = free_number(&record.endpoints);
    let device = request.device.clone();
    let model = record.model;
    let mut endpoint = in_netns(&record.netns, move || async move {
        let h = host::connect()?;
        let link = host::link_by_name(&h, &device).await?;
        if !link.ethernet {
            return Err(NetworkError::Invalid(format!(
                "device {device} is not ethernet-like"
            )));
        }
        let scan = host::scan_device(&h, link).await?;
        match model {
            NetworkModel::Macvtap => join_macvtap(&h, scan, n).await,
            _ => join(&h, scan, n).await,
        }
    })
    .await?;
    if let Some(name) = &request.name {
        for r in &mut endpoint.routes {
            r.device = name.clone();
        }
        for nb in &mut endpoint.neighbors {
            nb.device = name.clone();
        }
        endpoint.interface.name = name.clone();
    }
    if let Some(addresses) = &request.addresses {
        endpoint.interface.addresses = addresses.clone();
    }
    if let Some(mtu) = request.mtu {
        endpoint.interface.mtu = mtu;
    }
    Ok(endpoint)
}

async fn remove_endpoints(h: &rtnetlink::Handle, endpoints: &[Endpoint]) -> Vec<String> {
    let mut problems = Vec::new();
    for e in endpoints {
        match host::link_by_name(h, &e.tap).await {
            Ok(tap) => {
                if let Err(err) = host::delete_link(h, tap.index).await {
                    problems.push(err.to_string());
                }
            }
            Err(NetworkError::NoSuchDevice { .. }) => {}
            Err(err) => problems.push(err.to_string()),
        }
        if e.device_qdisc {
            match host::link_by_name(h, &e.device).await {
                Ok(dev) => {
                    if host::has_ingress(h, dev.index).await.unwrap_or(false) {
                        if let Err(err) = host::delete_ingress(h, dev.index, &dev.name).await {
                            problems.push(err.to_string());
                        }
                    }
                }
                // The device went with its namespace or was deleted: so did its qdisc.
                Err(NetworkError::NoSuchDevice { .. }) => {}
                Err(err) => problems.push(err.to_string()),
            }
        }
    }
    problems
}

/// Removes the taps, qdiscs and filters of `endpoints` (only those) from `netns`. A namespace
/// that is gone took them with it.
pub async fn teardown(netns: &Path, endpoints: &[Endpoint]) -> Result<(), NetworkError> {
    if endpoints.is_empty() {
        return Ok(());
    }
    if !netns.exists() {
        tracing::debug!(netns = %netns.display(), "namespace gone; nothing to remove");
        return Ok(());
    }
    let endpoints = endpoints.to_vec();
    let problems = in_netns(netns, move || async move {
        let h = host::connect()?;
        Ok(remove_endpoints(&h, &endpoints).await)
    })
    .await?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(NetworkError::Invalid(format!(
            "network teardown in {}: {}",
            netns.display(),
            problems.join("; ")
        )))
    }
}

/// The routes of every endpoint, in order (the guest's whole table).
pub fn all_routes(endpoints: &[Endpoint]) -> Vec<Route> {
    endpoints.iter().flat_map(|e| e.routes.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_spell_as_in_the_config() {
        for m in [
            NetworkModel::Tcfilter,
            NetworkModel::Macvtap,
            NetworkModel::None,
        ] {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
        }
    }

    #[test]
    fn endpoint_numbers_are_reused_once_free() {
        let e = |n| Endpoint {
            id: names(n).0,
            device: format!("d{n}"),
            tap: names(n).1,
            device_qdisc: true,
            macvtap: None,
            interface: Interface {
                name: "x".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: 1500,
                addresses: vec![],
                up: true,
            },
            routes: vec![],
            neighbors: vec![],
        };
        assert_eq!(free_number(&[]), 0);
        assert_eq!(free_number(&[e(0), e(2)]), 1);
        assert_eq!(names(1), ("net1".into(), "tap1_runvm".into()));
        assert!(names(99).1.len() <= 15);
    }

    #[test]
    fn add_requests_refuse_unknown_keys() {
        let r: AddInterface =
            serde_json::from_str(r#"{"device":"veth1","addresses":["10.1.0.2/24"]}"#).unwrap();
        assert_eq!(r.addresses.unwrap()[0].to_string(), "10.1.0.2/24");
        assert!(serde_json::from_str::<AddInterface>(r#"{"dev":"veth1"}"#).is_err());
    }
}
