//! The HTTP side: the listen address, checked and bound with errors that say what is wrong and
//! what is valid, and a small hyper server answering `GET /metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::exposition::Format;
use crate::{Monitor, MonitorError};

/// What a listen address may look like, for error messages.
pub const VALID_ADDRESSES: &str = "IP:PORT, [IPv6]:PORT, localhost:PORT or :PORT (every \
    interface), e.g. 127.0.0.1:9464; port 0 picks a free one";

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a listen address: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT` or `:PORT` (every
/// IPv4 interface).
pub fn parse_listen(address: &str) -> Result<SocketAddr, MonitorError> {
    let bad = |reason: &str| MonitorError::BadAddress {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
    let ip = match host {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => {
            let h = h
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h);
            h.parse()
                .map_err(|_| bad("the host is not an IP address"))?
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// Binds the listen address (see [`parse_listen`]); non-blocking, for [`serve`].
pub fn bind(address: &str) -> Result<std::net::TcpListener, MonitorError> {
    let at = parse_listen(address)?;
    let listener = std::net::TcpListener::bind(at).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => MonitorError::AddressInUse { address: at },
        _ => MonitorError::Listen {
            address: at,
            source,
        },
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MonitorError::Listen {
            address: at,
            source,
        })?;
    Ok(listener)
}

/// Serves `monitor` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: std::net::TcpListener,
    monitor: Arc<Monitor>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MonitorError> {
    let address = listener.local_addr().map_err(MonitorError::Serve)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(MonitorError::Serve)?;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, a connection reset before accept: not fatal.
                tracing::warn!(%address, error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let monitor = Arc::clone(&monitor);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let monitor = Arc::clone(&monitor);
                async move { Ok::<_, Infallible>(respond(&monitor, &request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to one request.
pub async fn respond<B>(monitor: &Monitor, request: &Request<B>) -> Response<Full<Bytes>> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match request.uri().path() {
        "/metrics" => {
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            match monitor.scrape(format).await {
                Ok(body) => {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(format.content_type()),
                    );
                    r
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scrape failed");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n")
                }
            }
        }
        "/" => text(
            StatusCode::OK,
            "runvm monitor: Prometheus metrics at /metrics\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_in_every_documented_form() {
        let ok = |a: &str| parse_listen(a).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:9464"), "127.0.0.1:9464");
        assert_eq!(ok("[::1]:9464"), "[::1]:9464");
        assert_eq!(ok("localhost:80"), "127.0.0.1:80");
        assert_eq!(ok(":9464"), "0.0.0.0:9464");
        assert_eq!(ok("0.0.0.0:0"), "0.0.0.0:0");
    }

    #[test]
    fn a_malformed_address_is_refused_with_what_is_valid() {
        for (address, why) in [
            ("9464", "no port"),
            ("127.0.0.1:http", "the port is not a number"),
            ("127.0.0.1:70000", "the port is not a number"),
            ("example.org:9464", "the host is not an IP address"),
            ("[::1:9464", "the host is not an IP address"),
        ] {
            let err = parse_listen(address).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{address:?}")) && err.contains(why),
                "{address}: {err}"
            );
            assert!(err.contains("IP:PORT") && err.contains(":PORT"), "{err}");
        }
    }

    #[test]
    fn an_address_in_use_is_refused_by_name() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let err = bind(&address).unwrap_err();
        assert!(matches!(err, MonitorError::AddressInUse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&address) && text.contains("in use"), "{text}");
    }
}
