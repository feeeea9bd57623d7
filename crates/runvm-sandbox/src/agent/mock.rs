//! A scriptable in-memory agent for unit tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::AgentAddress;

use super::{Agent, AgentConnector, AgentError, AgentVersion, GuestDetails};

/// What the mock agent saw and how it behaves; shared between the connector, its agents and
/// the test.
#[derive(Debug)]
pub struct MockAgentState {
    /// Connection attempts that fail before one succeeds (a guest still booting).
    pub refuse_connects: u32,
    /// Never accept a connection (an agent that never comes up).
    pub never_answer: bool,
    /// The version reported.
    pub version: AgentVersion,
    /// Requests received, in order.
    pub calls: Vec<String>,
    /// Connection attempts made.
    pub connects: u32,
}

impl Default for MockAgentState {
    fn default() -> Self {
        MockAgentState {
            refuse_connects: 0,
            never_answer: false,
            version: AgentVersion {
                agent_version: "0.0.0-mock".into(),
                kernel_release: "6.1.0-mock".into(),
                api_version: runvm_protocol::API_VERSION,
            },
            calls: Vec::new(),
            connects: 0,
        }
    }
}

/// Connects to [`MockAgent`]s sharing one [`MockAgentState`].
#[derive(Debug, Default, Clone)]
pub struct MockAgentConnector {
    state: Arc<Mutex<MockAgentState>>,
}

impl MockAgentConnector {
    /// A connector with default state.
    pub fn new() -> Self {
        Self::default()
    }
    /// The shared state, to script and inspect.
    pub fn state(&self) -> Arc<Mutex<MockAgentState>> {
        Arc::clone(&self.state)
    }
}

#[async_trait]
impl AgentConnector for MockAgentConnector {
    async fn connect(
        &self,
        address: &AgentAddress,
        _timeout: Duration,
    ) -> Result<Box<dyn Agent>, AgentError> {
        let mut s = self.state.lock().expect("mock agent lock");
        s.connects += 1;
        if s.never_answer || s.refuse_connects > 0 {
            s.refuse_connects = s.refuse_connects.saturating_sub(1);
            return Err(AgentError::Connect {
                address: format!("{address:?}"),
                reason: "connection refused (mock)".into(),
            });
        }
        Ok(Box::new(MockAgent {
            state: Arc::clone(&self.state),
        }))
    }
}

/// An agent answering from [`MockAgentState`].
#[derive(Debug)]
pub struct MockAgent {
    state: Arc<Mutex<MockAgentState>>,
}

impl MockAgent {
    fn record(&self, call: &str) -> std::sync::MutexGuard<'_, MockAgentState> {
        let mut s = self.state.lock().expect("mock agent lock");
        s.calls.push(call.to_string());
        s
    }
}

#[async_trait]
impl Agent for MockAgent {
    async fn check(&self) -> Result<(), AgentError> {
        drop(self.record("check"));
        Ok(())
    }

    async fn version(&self) -> Result<AgentVersion, AgentError> {
        Ok(self.record("version").version.clone())
    }

    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        drop(self.record("guest_details"));
        Ok(GuestDetails {
            cpu_count: 1,
            mem_total_bytes: 512 << 20,
            ..Default::default()
        })
    }

    async fn shutdown(&self) -> Result<(), AgentError> {
        drop(self.record("shutdown"));
        Ok(())
    }
}
