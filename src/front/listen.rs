//! The proxy listener's accept loop, as a Pingora service of sluice's own.
//!
//! Pingora's listening service wraps each connection's task around a TLS handshake future and
//! its timer, which stay in the task (about 9 KiB) for as long as the connection lives, even
//! on a plain listener; and it gives each stream a read and a write buffer for life. Here a
//! connection's task is the front's own future, and its stream has no buffer of its own
//! ([`OneAtATime`](crate::framing::OneAtATime) holds bytes only while a request needs them),
//! so an idle kept-alive connection holds what waiting for its next byte takes.
//!
//! The listening socket is shared with Pingora's graceful upgrade as its own listeners are:
//! taken from the table of sockets handed over by the process being replaced, or bound and
//! added to that table for the next one.

use super::Front;
use async_trait::async_trait;
use pingora_core::protocols::l4::listener::Listener;
use pingora_core::server::{ListenFds, ShutdownWatch};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// Connections waiting to be accepted (Pingora's own listeners use the same).
const BACKLOG: u32 = 65535;
/// How long accepting pauses when the process is out of file descriptors.
const OUT_OF_FDS_PAUSE: Duration = Duration::from_secs(1);
/// Too many open files, in the process (`EMFILE`) or the system (`ENFILE`).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// The proxy listener: accepts client connections on `addr` and serves each on its own task.
pub struct ProxyListener {
    front: Arc<Front>,
    addr: String,
    name: String,
}

impl ProxyListener {
    pub fn new(name: &str, front: Front, addr: &str) -> ProxyListener {
        ProxyListener {
            front: Arc::new(front),
            addr: addr.to_string(),
            name: name.to_string(),
        }
    }
}

#[async_trait]
impl pingora_core::services::Service for ProxyListener {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let listener = match listen(&self.addr, fds) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                // Checked before the server starts (app.rs); this is a socket handed over by
                // an upgrade that cannot be used, or an address taken in between.
                tracing::error!(addr = %self.addr, error = %e, "cannot listen: exiting");
                std::process::exit(1);
            }
        };
        let loops: Vec<_> = (0..listeners_per_fd.max(1))
            .map(|_| {
                let (front, listener) = (self.front.clone(), listener.clone());
                tokio::spawn(accept_loop(front, listener, shutdown.clone()))
            })
            .collect();
        for accepting in loops {
            if let Err(e) = accepting.await {
                tracing::error!(error = %e, "the proxy listener's accept loop ended abnormally");
            }
        }
        self.front.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![self.addr.clone()])
    }
}

/// The listening socket for `addr`: the one handed over by an upgrade, or a new one (added to
/// the table for the next upgrade).
fn listen(addr: &str, fds: Option<ListenFds>) -> std::io::Result<Listener> {
    if let Some(fd) = fds.as_ref().and_then(|t| t.lock().get(addr).copied()) {
        return inherited(fd);
    }
    let at = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr}: no address")))?;
    let socket = match at {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(at)?;
    let listener = socket.listen(BACKLOG)?;
    if let Some(table) = fds {
        table.lock().add(addr.to_string(), listener.as_raw_fd());
    }
    Ok(listener.into())
}

/// A listening socket handed over by the process being upgraded.
#[allow(unsafe_code)]
fn inherited(fd: std::os::fd::RawFd) -> std::io::Result<Listener> {
    // SAFETY: `fd` comes from Pingora's table of listening sockets received over the upgrade
    // socket: an open listening socket that this process owns, keyed by this listener's
    // address, which only this service takes.
    let std_listener =
        unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std_listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(std_listener)?.into())
}

/// Accept connections until shutdown, each served on its own task.
async fn accept_loop(front: Arc<Front>, listener: Arc<Listener>, mut shutdown: ShutdownWatch) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = shutdown.changed() => match changed {
                Ok(()) if *shutdown.borrow() => return,
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        match accepted {
            Ok(mut stream) => {
                if let Err(e) = stream.set_nodelay() {
                    tracing::debug!(error = %e, "TCP_NODELAY on a client connection");
                }
                let (front, shutdown) = (front.clone(), shutdown.clone());
                // On this service's runtime: one thread, or several that steal work from each
                // other (app.rs turns stealing on whenever there is more than one).
                // Boxed before the task is made, so that the task holds a pointer to it.
                let stream: pingora_core::protocols::Stream = Box::new(stream);
                tokio::spawn(async move { front.serve_client(stream, &shutdown).await });
            }
            Err(e) => {
                if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) {
                    // Accepting again would fail at once: let connections close first.
                    tracing::warn!(error = %e, "out of file descriptors: not accepting for 1 s");
                    tokio::time::sleep(OUT_OF_FDS_PAUSE).await;
                } else {
                    tracing::warn!(error = %e, "accepting a client connection failed");
                }
            }
        }
    }
}
