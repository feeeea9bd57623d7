//! Port forwarding for the sandbox's pod network namespace (see `crate::portfwd`).

use super::Sandbox;
use crate::error::SandboxError;
use crate::network::portfwd::{self as rule, PortForwardRule};
use crate::portfwd::{port_forward_address, PortForwarder};

impl Sandbox {
    /// Makes loopback TCP connections made inside the pod's network namespace reach the same
    /// port on the guest's loopback: binds the forwarder's listener in the namespace, records
    /// the iptables rule, then makes it. Returns the forwarder to serve (`PortForwarder::serve`)
    /// for as long as the pod lives; `None` when the sandbox has no network namespace. The rule
    /// is removed with the pod network (stop, delete, purge); on error nothing stays.
    pub async fn start_port_forward(&mut self) -> Result<Option<PortForwarder>, SandboxError> {
        let Some(network) = self.record.network.clone() else {
            return Ok(None);
        };
        let agent = match &self.record.agent_address {
            Some(a) => a.clone(),
            None => self.hypervisor.agent_address()?,
        };
        if let Some(old) = &network.port_forward {
            // A forwarder that served before (a restarted server): its rule goes first.
            rule::remove_rule(&network.netns, old).await?;
            self.set_port_forward_rule(None)?;
        }
        let iptables = rule::find_iptables()?;
        let listener = rule::bind_listener(&network.netns).await?;
        let port = listener
            .local_addr()
            .map_err(|e| crate::network::NetworkError::PortForward {
                action: "read the port-forward listener's port".into(),
                reason: e.to_string(),
            })?
            .port();
        let made = PortForwardRule::new(iptables, self.id().as_str(), port);
        self.set_port_forward_rule(Some(made.clone()))?;
        if let Err(e) = rule::add_rule(&network.netns, &made).await {
            self.set_port_forward_rule(None)?;
            return Err(e.into());
        }
        let forwarder =
            match PortForwarder::new(listener, port_forward_address(&agent), self.id().as_str()) {
                Ok(f) => f,
                Err(e) => {
                    let _ = rule::remove_rule(&network.netns, &made).await;
                    self.set_port_forward_rule(None)?;
                    return Err(crate::network::NetworkError::PortForward {
                        action: "serve the port-forward listener".into(),
                        reason: e.to_string(),
                    }
                    .into());
                }
            };
        tracing::info!(sandbox = %self.id(), listen_port = port, "port forwarding ready");
        Ok(Some(forwarder))
    }

    fn set_port_forward_rule(&mut self, rule: Option<PortForwardRule>) -> Result<(), SandboxError> {
        self.update(|r| {
            if let Some(n) = r.network.as_mut() {
                n.port_forward = rule;
            }
            Ok(())
        })
    }

    /// Removes the recorded port-forward rule, if any (part of the network teardown; a caller
    /// that stops the VM in the background removes it first, while the pod's namespace is
    /// still reachable by its path).
    pub async fn remove_port_forward_rule(&mut self) -> Result<(), SandboxError> {
        let Some(network) = self.record.network.clone() else {
            return Ok(());
        };
        let Some(made) = &network.port_forward else {
            return Ok(());
        };
        rule::remove_rule(&network.netns, made).await?;
        self.set_port_forward_rule(None)
    }
}
