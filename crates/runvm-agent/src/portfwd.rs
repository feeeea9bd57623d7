//! The guest end of port forwarding (`kubectl port-forward`): on vsock port
//! [`PORT_FORWARD_VSOCK_PORT`] the host's forwarder opens one stream per forwarded TCP
//! connection, names a port in a [`Request`], and the agent connects to that port on the
//! guest's loopback — the VM's network namespace is the pod's, shared by its containers —, tells
//! the outcome in a [`Reply`] and splices the connection to the stream (framed, so half-closes
//! cross both vsock backends; see `runvm_protocol::portfwd`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use runvm_protocol::portfwd::{
    read_header, splice, Reply, Request, Status, PORT_FORWARD_VSOCK_PORT,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the host has to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a loopback port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves port-forward streams on vsock until the agent ends. A listener that cannot be made
/// is logged: the agent serves without port forwarding.
pub async fn serve_vsock() {
    accept_vsock(PORT_FORWARD_VSOCK_PORT, "port forwarding", |stream| {
        tokio::spawn(handle(stream));
    })
    .await;
}

/// Accepts connections on vsock `port` until the agent ends, giving each to `serve`. A
/// listener that cannot be made is logged (`what` names the feature lost); a failed accept is
/// retried after 100 ms.
pub async fn accept_vsock(port: u32, what: &str, mut serve: impl FnMut(tokio_vsock::VsockStream)) {
    let addr = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, port);
    let listener = match tokio_vsock::VsockListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port, error = %e, "no {what}: cannot listen on vsock");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => serve(stream),
            Err(e) => {
                tracing::warn!(port, error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connects to `port` on 127.0.0.1, else on ::1 (a server may listen on one family only, as
/// containerd's own forwarder allows for).
async fn connect_loopback(port: u16) -> Result<TcpStream, std::io::Error> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let timed = |addr| async move {
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    };
    match timed(v4).await {
        Ok(s) => Ok(s),
        Err(e4) => match timed(v6).await {
            Ok(s) => Ok(s),
            // The IPv4 error is the telling one (::1 may just not exist).
            Err(_) => Err(e4),
        },
    }
}

/// The reply for a failed connect.
fn failure_reply(e: &std::io::Error) -> Reply {
    let errno = e.raw_os_error().unwrap_or(0);
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        Reply::refused(errno)
    } else {
        Reply {
            status: Status::Failed,
            errno: u16::try_from(errno).unwrap_or(u16::MAX),
        }
    }
}

/// One forwarded connection: request, connect, reply, splice.
pub async fn handle<S>(mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let header = match tokio::time::timeout(REQUEST_TIMEOUT, read_header(&mut stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "port-forward stream closed before its request");
            return;
        }
        Err(_) => {
            tracing::debug!("port-forward stream sent no request in time");
            return;
        }
    };
    let request = match Request::decode(&header) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "bad port-forward request");
            let reply = Reply {
                status: Status::BadRequest,
                errno: 0,
            };
            let _ = stream.write_all(&reply.encode()).await;
            return;
        }
    };
    let tcp = match connect_loopback(request.port).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(port = request.port, error = %e, "port-forward: cannot connect");
            let _ = stream.write_all(&failure_reply(&e).encode()).await;
            return;
        }
    };
    if let Err(e) = stream.write_all(&Reply::connected().encode()).await {
        tracing::debug!(error = %e, "port-forward: the host went away");
        return;
    }
    tracing::debug!(port = request.port, "port-forward connected");
    let mut tcp = tcp;
    match splice(&mut tcp, stream).await {
        Ok(n) => tracing::debug!(
            port = request.port,
            sent = n.sent,
            received = n.received,
            "port-forward done"
        ),
        Err(e) => {
            // The host side aborted (or the local peer did): reset the local connection, so
            // its peer sees an abort rather than a clean end.
            let _ = tcp.set_zero_linger();
            tracing::debug!(port = request.port, error = %e, "port-forward aborted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    #[tokio::test]
    async fn connects_to_a_loopback_port_and_splices_with_half_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&[b"echo:".as_slice(), &got].concat())
                .await
                .unwrap();
        });
        let (agent_end, mut host) = duplex(1 << 16);
        let agent = tokio::spawn(handle(agent_end));
        host.write_all(&Request { port }.encode()).await.unwrap();
        let reply = Reply::decode(&read_header(&mut host).await.unwrap()).unwrap();
        assert_eq!(reply, Reply::connected());
        host.write_all(&[0, 0, 0, 2, b'h', b'i', 0, 0, 0, 0])
            .await
            .unwrap();
        let mut back = Vec::new();
        host.read_to_end(&mut back).await.unwrap();
        // "echo:hi" in one or more frames, then the end frame.
        assert_eq!(
            back,
            [&[0, 0, 0, 7][..], b"echo:hi", &[0, 0, 0, 0]].concat()
        );
        server.await.unwrap();
        agent.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_by_name() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let (agent_end, mut host) = duplex(1024);
        let agent = tokio::spawn(handle(agent_end));
        host.write_all(&Request { port }.encode()).await.unwrap();
        let reply = Reply::decode(&read_header(&mut host).await.unwrap()).unwrap();
        assert_eq!(reply.status, Status::Refused);
        assert_eq!(i32::from(reply.errno), libc::ECONNREFUSED);
        agent.await.unwrap();
    }

    #[tokio::test]
    async fn a_bad_request_is_answered_as_such() {
        let (agent_end, mut host) = duplex(1024);
        let agent = tokio::spawn(handle(agent_end));
        host.write_all(b"GET / HT").await.unwrap();
        let reply = Reply::decode(&read_header(&mut host).await.unwrap()).unwrap();
        assert_eq!(reply.status, Status::BadRequest);
        agent.await.unwrap();
    }
}
