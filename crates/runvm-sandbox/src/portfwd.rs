//! Port forwarding into the VM (`kubectl port-forward`, CRI `PortForward`).
//!
//! containerd forwards a pod's port by entering the pod's network namespace on the host and
//! dialling `localhost:PORT` there; with runvm nothing of the pod listens in that namespace (its
//! processes run in the VM). The [`PortForwarder`] closes the gap: an iptables rule in the
//! namespace sends every loopback TCP connection made there to the forwarder's listener
//! (`network::portfwd`); for each connection the forwarder reads the port asked for
//! (`SO_ORIGINAL_DST`), opens a vsock stream to the agent's port-forward port
//! ([`PORT_FORWARD_VSOCK_PORT`], hybrid vsock or kernel vsock), names the port, and on the
//! agent's `Connected` splices the connection to the stream; the agent connects to the port on
//! the guest's loopback. Half-closes travel as end frames (`runvm_protocol::portfwd`). A port
//! nothing listens on in the guest resets the host connection.
//!
//! The forwarder lives in the process that serves the pod (the shim) and runs until it is
//! dropped; the rule is removed with the pod's network (`Sandbox::stop`, `delete`, `purge`).

use std::time::Duration;

use runvm_hypervisor::AgentAddress;
use runvm_protocol::portfwd::{
    read_header, splice, Reply, Request, Spliced, Status, PORT_FORWARD_VSOCK_PORT,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::agent::open_vsock_stream;

/// How long opening the stream to the agent and its reply may take.
const GUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why one forwarded connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The port asked for cannot be read from the connection.
    #[error("cannot read the original destination of the connection")]
    OriginalDestination(#[source] nix::Error),
    /// The agent's port-forward port cannot be reached.
    #[error("cannot open a stream to the guest ({address}): {reason}")]
    Guest {
        /// The address tried.
        address: String,
        /// Why.
        reason: String,
    },
    /// The guest did not answer in time.
    #[error("the guest did not answer the port-forward request within {} s", GUEST_TIMEOUT.as_secs())]
    Timeout,
    /// The guest could not connect to the port.
    #[error("the guest cannot connect to port {port} on its loopback: {status:?} (errno {errno})")]
    Refused {
        /// The port.
        port: u16,
        /// The guest's answer.
        status: Status,
        /// The guest's errno.
        errno: u16,
    },
    /// The stream broke (or the guest broke the format).
    #[error("port-forward stream")]
    Io(#[from] std::io::Error),
}

/// Forwards the loopback TCP connections of a pod's network namespace into its VM.
#[derive(Debug)]
pub struct PortForwarder {
    listener: TcpListener,
    target: AgentAddress,
    sandbox: String,
}

/// The agent's port-forward address: the agent's address with the port-forward port.
pub fn port_forward_address(agent: &AgentAddress) -> AgentAddress {
    match agent {
        AgentAddress::Vsock { cid, .. } => AgentAddress::Vsock {
            cid: *cid,
            port: PORT_FORWARD_VSOCK_PORT,
        },
        AgentAddress::HybridVsock { uds_path, .. } => AgentAddress::HybridVsock {
            uds_path: uds_path.clone(),
            port: PORT_FORWARD_VSOCK_PORT,
        },
    }
}

impl PortForwarder {
    /// A forwarder taking connections from `listener` (non-blocking, made in the pod's
    /// namespace) to the guest at `target` (the agent's port-forward address).
    pub fn new(
        listener: std::net::TcpListener,
        target: AgentAddress,
        sandbox: &str,
    ) -> std::io::Result<PortForwarder> {
        Ok(PortForwarder {
            listener: TcpListener::from_std(listener)?,
            target,
            sandbox: sandbox.to_string(),
        })
    }

    /// The listener's port (on the namespace's 127.0.0.1).
    pub fn port(&self) -> Option<u16> {
        self.listener.local_addr().ok().map(|a| a.port())
    }

    /// Serves until dropped (aborting the task running it ends every forwarded connection).
    pub async fn serve(self) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        let target = self.target.clone();
                        let sandbox = self.sandbox.clone();
                        connections.spawn(async move { forward_logged(tcp, target, &sandbox).await });
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %self.sandbox, error = %e, "port-forward accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

async fn forward_logged(mut tcp: TcpStream, target: AgentAddress, sandbox: &str) {
    match forward(&mut tcp, &target).await {
        Ok(n) => tracing::debug!(
            sandbox,
            sent = n.sent,
            received = n.received,
            "port-forward connection done"
        ),
        Err(e) => {
            // The client sees a reset, not a clean end: nothing was (fully) forwarded.
            let _ = tcp.set_zero_linger();
            tracing::info!(sandbox, error = %crate::ErrorChain(&e), "port-forward connection failed");
        }
    }
}

/// The port a redirected connection was made to.
fn original_port(tcp: &TcpStream) -> Result<u16, ForwardError> {
    let dst = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)
        .map_err(ForwardError::OriginalDestination)?;
    Ok(u16::from_be(dst.sin_port))
}

/// One connection: the port, a stream to the agent, request, reply, splice.
async fn forward(tcp: &mut TcpStream, target: &AgentAddress) -> Result<Spliced, ForwardError> {
    let port = original_port(tcp)?;
    forward_to(tcp, target, port).await
}

/// Forwards `tcp` to `port` in the guest at `target`.
pub async fn forward_to(
    tcp: &mut TcpStream,
    target: &AgentAddress,
    port: u16,
) -> Result<Spliced, ForwardError> {
    let describe = || crate::agent::describe_address(target);
    let opened = async {
        let mut stream = open_vsock_stream(target)
            .await
            .map_err(|reason| ForwardError::Guest {
                address: describe(),
                reason,
            })?;
        stream.write_all(&Request { port }.encode()).await?;
        let reply =
            Reply::decode(&read_header(&mut stream).await?).map_err(std::io::Error::from)?;
        Ok::<_, ForwardError>((stream, reply))
    };
    let (stream, reply) = tokio::time::timeout(GUEST_TIMEOUT, opened)
        .await
        .map_err(|_| ForwardError::Timeout)??;
    if reply.status != Status::Connected {
        return Err(ForwardError::Refused {
            port,
            status: reply.status,
            errno: reply.errno,
        });
    }
    Ok(splice(tcp, stream).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    #[test]
    fn the_forward_address_keeps_the_vm_and_changes_the_port() {
        let hv = AgentAddress::HybridVsock {
            uds_path: PathBuf::from("/run/x/vsock.hv"),
            port: 1024,
        };
        assert_eq!(
            port_forward_address(&hv),
            AgentAddress::HybridVsock {
                uds_path: PathBuf::from("/run/x/vsock.hv"),
                port: PORT_FORWARD_VSOCK_PORT,
            }
        );
        let v = AgentAddress::Vsock { cid: 7, port: 1024 };
        assert_eq!(
            port_forward_address(&v),
            AgentAddress::Vsock {
                cid: 7,
                port: PORT_FORWARD_VSOCK_PORT
            }
        );
    }

    /// A stand-in for vhost-device-vsock and the agent: accepts the hybrid handshake, then
    /// plays the agent's side with `agent`.
    async fn fake_guest<F, Fut>(dir: &std::path::Path, agent: F) -> AgentAddress
    where
        F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let path = dir.join("vsock.hv");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            loop {
                let b = s.read_u8().await.unwrap();
                if b == b'\n' {
                    break;
                }
                line.push(b);
            }
            assert_eq!(
                line,
                format!("CONNECT {PORT_FORWARD_VSOCK_PORT}").as_bytes()
            );
            s.write_all(b"OK 1026\n").await.unwrap();
            agent(s).await;
        });
        AgentAddress::HybridVsock {
            uds_path: path,
            port: PORT_FORWARD_VSOCK_PORT,
        }
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_connection_reaches_the_guest_port_both_ways_with_half_close() {
        let dir = tempfile::tempdir().unwrap();
        let target = fake_guest(dir.path(), |mut s| async move {
            let req = Request::decode(&read_header(&mut s).await.unwrap()).unwrap();
            assert_eq!(req.port, 8080);
            s.write_all(&Reply::connected().encode()).await.unwrap();
            // The client's bytes, then its half-close as the end frame.
            let mut got = Vec::new();
            s.read_to_end_frames(&mut got).await;
            assert_eq!(got, b"hello");
            // Data still flows back after the client's half-close.
            s.write_all(&[0, 0, 0, 3, b'b', b'y', b'e', 0, 0, 0, 0])
                .await
                .unwrap();
        })
        .await;
        let (mut client, mut server) = tcp_pair().await;
        let forwarding =
            tokio::spawn(async move { forward_to(&mut server, &target, 8080).await.unwrap() });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        assert_eq!(
            forwarding.await.unwrap(),
            Spliced {
                sent: 5,
                received: 3
            }
        );
    }

    #[tokio::test]
    async fn a_refusal_in_the_guest_is_an_error_naming_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let target = fake_guest(dir.path(), |mut s| async move {
            let _ = read_header(&mut s).await.unwrap();
            s.write_all(&Reply::refused(111).encode()).await.unwrap();
        })
        .await;
        let (_client, mut server) = tcp_pair().await;
        let err = forward_to(&mut server, &target, 9).await.unwrap_err();
        assert!(
            matches!(
                err,
                ForwardError::Refused {
                    port: 9,
                    status: Status::Refused,
                    errno: 111
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("port 9"), "{err}");
    }

    #[tokio::test]
    async fn a_guest_breaking_the_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = fake_guest(dir.path(), |mut s| async move {
            let _ = read_header(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 200").await.unwrap();
        })
        .await;
        let (_client, mut server) = tcp_pair().await;
        let err = forward_to(&mut server, &target, 80).await.unwrap_err();
        assert!(err_chain(&err).contains("RVPF"), "{}", err_chain(&err));
    }

    #[tokio::test]
    async fn no_guest_listening_is_an_error_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let target = AgentAddress::HybridVsock {
            uds_path: dir.path().join("absent.hv"),
            port: PORT_FORWARD_VSOCK_PORT,
        };
        let (_client, mut server) = tcp_pair().await;
        let err = forward_to(&mut server, &target, 80).await.unwrap_err();
        assert!(err.to_string().contains("absent.hv"), "{err}");
    }

    fn err_chain(e: &ForwardError) -> String {
        crate::ErrorChain(e).to_string()
    }

    /// Reads frames until the end frame.
    trait ReadFrames {
        async fn read_to_end_frames(&mut self, out: &mut Vec<u8>);
    }

    impl ReadFrames for tokio::net::UnixStream {
        async fn read_to_end_frames(&mut self, out: &mut Vec<u8>) {
            loop {
                let n = self.read_u32().await.unwrap() as usize;
                if n == 0 {
                    return;
                }
                let mut buf = vec![0u8; n];
                self.read_exact(&mut buf).await.unwrap();
                out.extend(buf);
            }
        }
    }
}
