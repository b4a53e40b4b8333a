//! One request at a time on a client connection: the stream the front and Pingora read a
//! connection through, which never hands out a byte past the end of the request being served
//! (its head, then its body by `Content-Length` or chunked framing). Bytes a client sent
//! ahead (pipelined requests) wait here for the next head, in order, instead of being read
//! into the current request's buffers and lost when the connection is reused.
//!
//! After a request's body, reads wait (and keep what the client sends) until the next head
//! is asked for; an end of stream is still passed on, so a client that leaves is noticed.

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `AsyncWrite` for a wrapper whose writes all go to its `inner` stream as they are (vectored
/// writes included): `write_through!(impl[S: AsyncWrite + Unpin] Wrapper<S>)`.
macro_rules! write_through {
    (impl[$($g:tt)*] $ty:ty) => {
        impl<$($g)*> tokio::io::AsyncWrite for $ty {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.inner), cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(&mut self.inner), cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                tokio::io::AsyncWrite::is_write_vectored(&self.inner)
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.inner), cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.inner), cx)
            }
        }
    };
}
pub(crate) use write_through;

/// Most bytes kept ahead of the request being served; past it, nothing more is read from the
/// client until a head is asked for (its sending is held back by TCP).
const MAX_AHEAD: usize = 1024 * 1024;

/// How the body of the request being served ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// No body (or it is over).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything that follows (an upgrade, a tunnel, or a head being read).
    Open,
}

/// Where reading stands.
#[derive(Debug)]
enum Limit {
    Open,
    Left(u64),
    Chunked(Chunks),
    /// The body is over: reads wait for the next head.
    Done,
}

/// A client connection read one request at a time. The front owns it between requests (to
/// say what the next reads may return) and lends it to Pingora, boxed, for each request.
pub struct OneAtATime {
    inner: Stream,
    /// Bytes read from the client and not handed out yet.
    ahead: BytesMut,
    limit: Limit,
    /// The client closed its side after the bytes in `ahead`.
    eof: bool,
    /// Small writes gathered until a flush (none between requests).
    out: Vec<u8>,
}

impl OneAtATime {
    pub fn new(inner: Stream) -> OneAtATime {
        OneAtATime {
            inner,
            ahead: BytesMut::new(),
            limit: Limit::Open,
            eof: false,
            out: Vec::new(),
        }
    }

    /// A head is to be read: everything may be returned (the front finds its end itself).
    pub fn head(&mut self) {
        self.limit = Limit::Open;
    }

    /// A head was read: `rest`, what was read after it, goes back ahead of the stream, and
    /// from now on reads return only this request's `body`.
    pub fn serve(&mut self, rest: BytesMut, body: Body) {
        if !rest.is_empty() {
            let mut ahead = rest;
            ahead.extend_from_slice(&self.ahead);
            self.ahead = ahead;
        }
        self.limit = match body {
            Body::None | Body::Length(0) => Limit::Done,
            Body::Length(n) => Limit::Left(n),
            Body::Chunked => Limit::Chunked(Chunks::default()),
            Body::Open => Limit::Open,
        };
    }

    /// The connection Pingora gives back after a request, as this type again (`None` if it
    /// is some other stream, which never happens: it is the box lent to it).
    pub fn take_back(stream: Stream) -> Option<Box<OneAtATime>> {
        stream.into_any().downcast::<OneAtATime>().ok()
    }
}

impl std::fmt::Debug for OneAtATime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneAtATime")
            .field("inner", &self.inner)
            .finish()
    }
}

impl AsyncRead for OneAtATime {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let state = this;
        if matches!(state.limit, Limit::Done) {
            // Keep what the client sends ahead; pass on its leaving.
            while !state.eof && state.ahead.len() < MAX_AHEAD {
                // Not zeroed: the stream writes what it reads, and only that is looked at.
                let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
                let mut read = ReadBuf::uninit(&mut chunk);
                match Pin::new(&mut state.inner).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) if read.filled().is_empty() => state.eof = true,
                    Poll::Ready(Ok(())) => state.ahead.extend_from_slice(read.filled()),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // The end of the stream once nothing is left to serve; else wait for a head.
            return if state.eof && state.ahead.is_empty() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let room = match state.limit {
            Limit::Left(n) => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(buf.remaining()),
            _ => buf.remaining(),
        };
        let before = buf.filled().len();
        if !state.ahead.is_empty() {
            let n = state.ahead.len().min(room);
            buf.put_slice(&state.ahead[..n]);
            state.ahead.advance(n);
        } else if state.eof {
            return Poll::Ready(Ok(()));
        } else if room == buf.remaining() {
            // Straight into the caller's buffer, its room left as it is (not zeroed first).
            ready!(Pin::new(&mut state.inner).poll_read(cx, buf))?;
        } else {
            // At most `room` bytes (the rest of a body), read straight into the caller's
            // buffer; only those are zeroed first.
            let dst = buf.initialize_unfilled_to(room);
            let mut limited = ReadBuf::new(dst);
            match Pin::new(&mut state.inner).poll_read(cx, &mut limited) {
                Poll::Ready(Ok(())) => {
                    let n = limited.filled().len();
                    buf.advance(n);
                }
                other => return other,
            }
        }
        let got = buf.filled().len() - before;
        match &mut state.limit {
            Limit::Left(n) => {
                *n -= got as u64;
                if *n == 0 {
                    state.limit = Limit::Done;
                }
            }
            Limit::Chunked(chunks) => {
                let used = chunks.feed(&buf.filled()[before..]);
                if used < got {
                    // Past the body's end: back ahead, for the next head.
                    let mut ahead = BytesMut::from(&buf.filled()[before + used..]);
                    ahead.extend_from_slice(&state.ahead);
                    state.ahead = ahead;
                    buf.set_filled(before + used);
                }
                if chunks.done() {
                    state.limit = Limit::Done;
                }
            }
            Limit::Open | Limit::Done => {}
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes smaller than this are gathered (a response head and a small body go out in one
/// send, as through Pingora's own stream buffer); larger ones go straight to the socket.
const WRITE_GATHER: usize = 1460;

impl OneAtATime {
    /// Send what is gathered; the buffer is freed once it is empty, so that a connection
    /// between requests holds none.
    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        self.out = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Make room to gather `len` more bytes, sending what is gathered if they would not fit.
    /// `false`: they are too many to gather and go straight to the socket.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<std::io::Result<bool>> {
        if self.out.len() + len > WRITE_GATHER {
            ready!(self.poll_send_gathered(cx))?;
        }
        if len >= WRITE_GATHER {
            return Poll::Ready(Ok(false));
        }
        if self.out.capacity() == 0 {
            self.out.reserve_exact(WRITE_GATHER);
        }
        Poll::Ready(Ok(true))
    }
}

impl AsyncWrite for OneAtATime {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if !ready!(this.poll_room(cx, buf.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room(cx, total))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_gathered(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send_gathered(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for OneAtATime {
    async fn shutdown(&mut self) {
        // What is gathered goes out before the end of the stream.
        if let Err(e) = std::future::poll_fn(|cx| self.poll_send_gathered(cx)).await {
            tracing::debug!(error = %e, "sending the last writes before a shutdown");
        }
        self.inner.shutdown().await
    }
}

impl UniqueID for OneAtATime {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for OneAtATime {}

impl GetTimingDigest for OneAtATime {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for OneAtATime {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for OneAtATime {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

impl Peek for OneAtATime {}

/// Where a chunked body stands, fed its bytes as they come.
#[derive(Debug, Default)]
struct Chunks {
    at: ChunkAt,
    /// The chunk size being read (hex digits so far).
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkAt {
    /// The size line (digits, then extensions up to LF).
    #[default]
    Size,
    SizeExtension,
    /// So many data bytes left of this chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// A trailer line (or the empty line that ends the body): `true` once it has content.
    Trailer(bool),
    Done,
}

impl Chunks {
    fn done(&self) -> bool {
        self.at == ChunkAt::Done
    }

    /// Take in `bytes`; how many of them belong to the body (the rest follow it). A malformed
    /// body is taken whole: Pingora's own parser then refuses it.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match &mut self.at {
                ChunkAt::Done => return i,
                ChunkAt::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        if self.digits >= 16 {
                            return bytes.len();
                        }
                        self.size = self.size * 16 + d;
                        self.digits += 1;
                    }
                    b'\n' => self.end_size(),
                    _ => self.at = ChunkAt::SizeExtension,
                },
                ChunkAt::SizeExtension => {
                    if b == b'\n' {
                        self.end_size();
                    }
                }
                ChunkAt::Data(left) => {
                    let n = (bytes.len() - i).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    i += n;
                    if *left == 0 {
                        self.at = ChunkAt::DataEnd;
                    }
                    continue;
                }
                ChunkAt::DataEnd => {
                    if b == b'\n' {
                        self.at = ChunkAt::Size;
                        self.size = 0;
                        self.digits = 0;
                    }
                }
                ChunkAt::Trailer(content) => match b {
                    b'\n' if !*content => self.at = ChunkAt::Done,
                    b'\n' => *content = false,
                    b'\r' => {}
                    _ => *content = true,
                },
            }
            i += 1;
        }
        i
    }

    fn end_size(&mut self) {
        self.at = match self.size {
            0 => ChunkAt::Trailer(false),
            n => ChunkAt::Data(n),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let mut c = Chunks::default();
        let used = c.feed(body);
        assert!(c.done());
        assert_eq!(&body[used..], b"GET / HTTP/1.1\r\n");
        // Fed a byte at a time, the same end.
        let mut c = Chunks::default();
        let mut used = 0;
        for b in body.iter() {
            if c.done() {
                break;
            }
            used += c.feed(std::slice::from_ref(b));
        }
        assert_eq!(&body[used..], b"GET / HTTP/1.1\r\n");
        let mut c = Chunks::default();
        assert_eq!(c.feed(b"0\r\n\r\n"), 5);
        assert!(c.done());
        let mut c = Chunks::default();
        assert_eq!(c.feed(b"5\r\nhel"), 6);
        assert!(!c.done());
    }

    /// Bytes the peer of a duplex pipe can read at once, without waiting.
    fn readable_now(peer: &mut tokio::io::DuplexStream) -> Vec<u8> {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 16384];
        while let Some(Ok(n)) = peer.read(&mut buf).now_or_never() {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn small_writes_go_out_together_at_the_flush_and_leave_no_buffer() {
        use tokio::io::AsyncWriteExt;
        let (near, mut peer) = tokio::io::duplex(1 << 20);
        let mut stream = OneAtATime::new(Box::new(near));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        stream.write_all(head).await.expect("write");
        stream.write_all(b"hello").await.expect("write");
        assert!(readable_now(&mut peer).is_empty(), "sent before the flush");
        stream.flush().await.expect("flush");
        let mut want = head.to_vec();
        want.extend_from_slice(b"hello");
        assert_eq!(readable_now(&mut peer), want);
        assert_eq!(stream.out.capacity(), 0, "a buffer kept after the flush");

        // Vectored writes are gathered the same way.
        let parts = [
            std::io::IoSlice::new(b"5\r\n"),
            std::io::IoSlice::new(b"hello"),
        ];
        let n = stream.write_vectored(&parts).await.expect("write");
        assert_eq!(n, 8);
        assert!(readable_now(&mut peer).is_empty());
        stream.flush().await.expect("flush");
        assert_eq!(readable_now(&mut peer), b"5\r\nhello");
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_out_after_what_was_gathered() {
        use tokio::io::AsyncWriteExt;
        let (near, mut peer) = tokio::io::duplex(1 << 20);
        let mut stream = OneAtATime::new(Box::new(near));
        stream.write_all(b"head").await.expect("write");
        let large = vec![b'x'; 4 * WRITE_GATHER];
        stream.write_all(&large).await.expect("write");
        // In order, without a flush: the gathered bytes first, then the large write.
        let got = readable_now(&mut peer);
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &large[..]);
        // Gathered bytes that would overflow the buffer are sent first.
        let almost = vec![b'y'; WRITE_GATHER - 10];
        stream.write_all(&almost).await.expect("write");
        assert!(readable_now(&mut peer).is_empty());
        stream.write_all(b"0123456789abc").await.expect("write");
        assert_eq!(readable_now(&mut peer), almost);
        AsyncWriteExt::shutdown(&mut stream)
            .await
            .expect("shutdown");
        assert_eq!(readable_now(&mut peer), b"0123456789abc");
    }

    #[tokio::test]
    async fn gathered_and_large_writes_arrive_whole_and_in_order_through_a_narrow_pipe() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A 7-byte pipe: every send is partial and most wait for the reader.
        let (near, mut peer) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.map(|_| got)
        });
        let mut stream = OneAtATime::new(Box::new(near));
        let mut want = Vec::new();
        for i in 0..50u8 {
            let small = vec![i; usize::from(i) * 7 + 1];
            stream.write_all(&small).await.expect("write");
            want.extend_from_slice(&small);
            if i % 10 == 0 {
                let large = vec![255 - i; 3 * WRITE_GATHER + usize::from(i)];
                stream.write_all(&large).await.expect("write");
                want.extend_from_slice(&large);
            }
            if i % 7 == 0 {
                let body = [i; 2000];
                let parts = [std::io::IoSlice::new(b"vec"), std::io::IoSlice::new(&body)];
                // A vectored write may take part of its slices: the rest goes plainly.
                let n = stream.write_vectored(&parts).await.expect("write");
                let mut flat = b"vec".to_vec();
                flat.extend_from_slice(&[i; 2000]);
                stream.write_all(&flat[n..]).await.expect("write");
                want.extend_from_slice(&flat);
            }
        }
        // Pingora's own shutdown (not tokio's) sends what is gathered before the end.
        Shutdown::shutdown(&mut stream).await;
        drop(stream);
        let got = reader.await.expect("reader").expect("read");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes lost or out of order");
    }

    #[test]
    fn a_size_too_long_is_taken_whole_for_pingora_to_refuse() {
        let mut c = Chunks::default();
        let bad = b"11111111111111111\r\nx";
        assert_eq!(c.feed(bad), bad.len());
    }
}
