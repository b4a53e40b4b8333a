//! The one proxy listener. Each connection's first bytes decide: `CONNECT ` goes to the tunnel,
//! anything else is HTTP/1 handed to the Pingora proxy; keep-alive connections are checked
//! again before each request, so a CONNECT may follow plain requests on one connection.

use crate::proxy::SluiceProxy;
use crate::state::Shared;
use crate::tunnel;
use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use std::sync::Arc;
use std::time::Duration;

const CONNECT_PREFIX: &[u8; 8] = b"CONNECT ";
/// Idle time allowed between requests on a kept-alive client connection.
const KEEPALIVE_SECS: u64 = 60;

pub struct Front {
    shared: Arc<Shared>,
    http: Arc<HttpProxy<SluiceProxy>>,
}

impl Front {
    pub fn new(shared: Arc<Shared>, http: HttpProxy<SluiceProxy>) -> Front {
        Front {
            shared,
            http: Arc::new(http),
        }
    }
}

/// What the first bytes of a request say it is.
enum Kind {
    Connect,
    Http,
    Gone,
}

async fn peek_kind(stream: &mut Stream, wait: Duration, shutdown: &ShutdownWatch) -> Kind {
    let mut first = [0u8; CONNECT_PREFIX.len()];
    let mut shutdown = shutdown.clone();
    tokio::select! {
        r = tokio::time::timeout(wait, stream.try_peek(&mut first)) => match r {
            Ok(Ok(true)) if &first == CONNECT_PREFIX => Kind::Connect,
            Ok(Ok(true)) => Kind::Http,
            // Streams that cannot peek go to HTTP, which reads them normally.
            Ok(Ok(false)) => Kind::Http,
            Ok(Err(_)) | Err(_) => Kind::Gone,
        },
        _ = shutdown.wait_for(|down| *down) => Kind::Gone,
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let first_wait = self
            .shared
            .generation()
            .config
            .server
            .header_read_timeout
            .get();
        let mut stream = stream;
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut wait = first_wait;
        loop {
            match peek_kind(&mut stream, wait, shutdown).await {
                Kind::Gone => return None,
                Kind::Connect => {
                    tunnel::serve(&self.shared, stream).await;
                    return None;
                }
                Kind::Http => {}
            }
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                None => session.set_keepalive(Some(KEEPALIVE_SECS)),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let reused = self.http.process_new_http(session, shutdown).await?;
            let (next, next_settings) = reused.consume();
            stream = next;
            settings = next_settings;
            wait = Duration::from_secs(KEEPALIVE_SECS);
        }
    }

    async fn cleanup(&self) {
        self.http.http_cleanup().await;
    }
}
