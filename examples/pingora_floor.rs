//! The CPU floor of Pingora itself, for `benches/load.sh`: `pingora_floor LISTEN UPSTREAM`
//! serves plain HTTP on LISTEN with one worker thread and forwards every request, unchanged,
//! to the one plain-HTTP UPSTREAM (both `ip:port`), keeping upstream connections alive in
//! Pingora's pool. It holds no sluice code: what sluice spends per request beyond this binary
//! is sluice's own work (target parsing, policy, admission, dispatch, metrics).

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::{ProxyHttp, Session};
use std::net::SocketAddr;

/// The same global allocator as sluice, so that sluice / floor compares like with like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forwards everything to one fixed upstream.
struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: pingora_floor LISTEN UPSTREAM   (both ip:port)");
        std::process::exit(2);
    }
    let upstream: SocketAddr = args[2].parse().expect("UPSTREAM is ip:port");
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let conf = server.configuration.clone();
    let mut proxy = pingora_proxy::http_proxy_service(&conf, Floor { upstream });
    proxy.add_tcp(&args[1]);
    server.add_service(proxy);
    server.run_forever();
}
