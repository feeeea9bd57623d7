//! What the host's stdio relays share: the first-output timer and the relay error
//! ([`crate::process`] does the relaying).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use tokio::sync::oneshot;

use crate::agent::AgentError;

/// When the first byte of output passed: the host's monotonic clock and ns since the Unix epoch.
pub type FirstOutput = (Instant, u64);

/// A writer that records when the first byte passes through it, and tells a waiting party.
pub struct FirstWrite<W> {
    inner: W,
    first: Arc<OnceLock<FirstOutput>>,
    tell: Option<oneshot::Sender<FirstOutput>>,
}

impl<W> FirstWrite<W> {
    /// Wraps `inner`; the time of the first byte is kept in the returned cell and sent on the
    /// returned channel.
    pub fn new(
        inner: W,
    ) -> (
        Self,
        Arc<OnceLock<FirstOutput>>,
        oneshot::Receiver<FirstOutput>,
    ) {
        let first = Arc::new(OnceLock::new());
        let (tell, told) = oneshot::channel();
        let writer = FirstWrite {
            inner,
            first: Arc::clone(&first),
            tell: Some(tell),
        };
        (writer, first, told)
    }
}

impl<W> std::fmt::Debug for FirstWrite<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstWrite")
            .field("first", &self.first.get())
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FirstWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !buf.is_empty() && self.first.get().is_none() {
            let at = *self
                .first
                .get_or_init(|| (Instant::now(), crate::state::unix_now_ns()));
            if let Some(tell) = self.tell.take() {
                let _ = tell.send(at);
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Errors relaying stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The host side failed. The message holds the I/O error, which is therefore not also
    /// its `source`.
    #[error("host stream: {0}")]
    Host(std::io::Error),
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::Host(e)
    }
}
