//! The client's side of a tunnel that sluice serves as HTTP: the bytes the client already
//! sent given back first (`Rewind`), and the stream handed to Pingora's HTTP session
//! (`Tunneled`), which says through its proxy digest which tunnel it is.

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Which tunnel a request came through: what `dispatch` reads to send it on as the client
/// meant it (way in `intercept`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    /// `https` (TLS terminated by sluice) or `http` (plain HTTP in the tunnel).
    pub scheme: &'static str,
    /// The CONNECT authority, as `host:port`.
    pub authority: String,
}

/// `inner`, after `prefix`: bytes already read from it are read again first.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S> std::fmt::Debug for Rewind<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewind")
            .field("prefix", &self.prefix.len())
            .finish()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::framing::write_through!(impl[S: AsyncWrite + Unpin] Rewind<S>);

/// A tunnel's inside as a Pingora stream: `inner` (TLS or plain) carries the bytes; the
/// connection's identity, timing and socket come from the client's TCP connection, and the
/// proxy digest says which tunnel this is.
pub struct Tunneled<S> {
    inner: S,
    id: UniqueIDType,
    timing: Vec<Option<TimingDigest>>,
    socket: Option<Arc<SocketDigest>>,
    tunnel: Arc<ProxyDigest>,
}

impl<S> Tunneled<S> {
    /// `inner`, for the tunnel `info` that the client connection `client` opened (the `200`
    /// it was answered is the proxy digest's response).
    pub fn new(
        inner: S,
        client: ClientSide,
        info: TunnelInfo,
    ) -> pingora_error::Result<Tunneled<S>> {
        let answer = Box::new(pingora_http::ResponseHeader::build(200, Some(0))?);
        Ok(Tunneled {
            inner,
            id: client.id,
            timing: client.timing,
            socket: client.socket,
            tunnel: Arc::new(ProxyDigest::new(answer, Some(Box::new(info)))),
        })
    }
}

/// What a client's TCP connection says of itself, kept before the stream is wrapped.
pub struct ClientSide {
    id: UniqueIDType,
    timing: Vec<Option<TimingDigest>>,
    socket: Option<Arc<SocketDigest>>,
}

impl ClientSide {
    pub fn of(stream: &pingora_core::protocols::Stream) -> ClientSide {
        ClientSide {
            id: stream.id(),
            timing: stream.get_timing_digest(),
            socket: stream.get_socket_digest(),
        }
    }
}

/// The tunnel a downstream stream came through, if any.
pub fn tunnel_of(digest: Option<&pingora_core::protocols::Digest>) -> Option<&TunnelInfo> {
    digest?
        .proxy_digest
        .as_ref()?
        .user_data
        .as_ref()?
        .downcast_ref::<TunnelInfo>()
}

impl<S> std::fmt::Debug for Tunneled<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunneled").field("id", &self.id).finish()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tunneled<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::framing::write_through!(impl[S: AsyncWrite + Unpin] Tunneled<S>);

#[async_trait]
impl<S: AsyncWrite + Unpin + Send> Shutdown for Tunneled<S> {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.inner).await {
            tracing::trace!(error = %e, "shutdown of a tunnel's inside");
        }
    }
}

impl<S> UniqueID for Tunneled<S> {
    fn id(&self) -> UniqueIDType {
        self.id
    }
}

impl<S> Ssl for Tunneled<S> {}

impl<S> GetTimingDigest for Tunneled<S> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.timing.clone()
    }
}

impl<S> GetProxyDigest for Tunneled<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        Some(self.tunnel.clone())
    }
}

impl<S> GetSocketDigest for Tunneled<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.socket.clone()
    }
}

#[async_trait]
impl<S: Send> Peek for Tunneled<S> {}
