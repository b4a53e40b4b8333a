//! From a destination host to socket addresses: IP literals as they are, `[resolve]` pins,
//! then asynchronous DNS with a timeout. Never blocks a worker thread.

use crate::config::Generation;
use crate::error::{error, Code};
use crate::target::ip_literal;
use pingora_error::Error;
use std::net::SocketAddr;
use std::time::Duration;

/// Addresses for `host:port`, in the order they should be tried.
pub async fn resolve(
    generation: &Generation,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, Box<Error>> {
    if let Some(ip) = ip_literal(host) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if !generation.resolve.is_empty() {
        if let Some(addrs) = generation.resolve.get(&format!("{host}:{port}")) {
            return Ok(addrs.clone());
        }
        if let Some(addrs) = generation.resolve.get(host) {
            return Ok(addrs.clone());
        }
    }
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(timeout, lookup).await {
        Err(_) => Err(error(
            Code::Dns,
            format!("DNS lookup of {host} timed out after {timeout:?}"),
        )),
        Ok(Err(e)) => Err(error(
            Code::Dns,
            format!("DNS lookup of {host} failed: {e}"),
        )),
        Ok(Ok(addrs)) => {
            let mut addrs: Vec<SocketAddr> = addrs.collect();
            // Prefer IPv4 first: many hosts publish AAAA records they do not serve well.
            addrs.sort_by_key(|a| a.is_ipv6());
            addrs.dedup();
            if addrs.is_empty() {
                Err(error(
                    Code::Dns,
                    format!("DNS lookup of {host} found no address"),
                ))
            } else {
                Ok(addrs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn generation(toml: &str) -> Generation {
        Generation::build(1, Config::parse(toml).expect("valid"))
    }

    #[tokio::test]
    async fn literals_and_pins_skip_dns() {
        let g = generation(
            "[resolve]\n\"api.test\" = [\"127.0.0.1:1000\"]\n\"api.test:8443\" = [\"127.0.0.2:2000\"]\n",
        );
        let t = Duration::from_secs(1);
        assert_eq!(
            resolve(&g, "::1", 80, t).await.expect("literal"),
            vec!["[::1]:80".parse().expect("addr")]
        );
        assert_eq!(
            resolve(&g, "api.test", 443, t).await.expect("pin"),
            vec!["127.0.0.1:1000".parse().expect("addr")]
        );
        assert_eq!(
            resolve(&g, "api.test", 8443, t).await.expect("pin"),
            vec!["127.0.0.2:2000".parse().expect("addr")]
        );
    }

    #[tokio::test]
    async fn unresolvable_names_are_dns_errors() {
        let g = generation("");
        let e = resolve(&g, "no-such-host.invalid", 80, Duration::from_secs(5))
            .await
            .expect_err("must fail");
        assert_eq!(Code::of(&e), Code::Dns);
    }
}
