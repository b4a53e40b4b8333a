//! DNS through hickory against a DNS server this test starts on 127.0.0.1 (never the
//! machine's nameserver): answers cached for their TTL, a missing name remembered for its
//! negative TTL, one lookup for many waiting requests, `/etc/hosts` first, and a flood of
//! names that never resolve neither pins threads nor keeps a cached name from working.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use support::dns::DnsServer;
use support::*;

fn sluice_with(dns: &DnsServer, server_extra: &str) -> Sluice {
    Sluice::start(
        &format!("dns_servers = [\"{}\"]\n{server_extra}", dns.addr()),
        "[defaults]\nrps = 0.0\n",
    )
}

/// One GET through sluice to `http://{name}:{port}/x`: (status, Sluice-Error, body).
fn get(sluice: &Sluice, name: &str, port: u16) -> (u16, String, String) {
    let raw = raw_exchange(
        sluice.proxy,
        format!(
            "GET /x HTTP/1.1\r\nHost: s\r\nSluice-Target: http://{name}:{port}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("answer");
    let (status, head, body) = split_response(&raw);
    (
        status,
        header_of(&head, "sluice-error").unwrap_or_default(),
        body,
    )
}

#[test]
fn answers_are_cached_for_their_ttl_and_missing_names_for_their_negative_ttl() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "resolved"))
        .start();
    let dns = DnsServer::start(&[("api.dns.test", Ipv4Addr::LOCALHOST, 60)]);
    let sluice = sluice_with(&dns, "");
    for _ in 0..5 {
        assert_eq!(get(&sluice, "api.dns.test", up.port()).0, 200);
    }
    assert_eq!(
        dns.asked("api.dns.test"),
        1,
        "one question for five requests"
    );
    assert_eq!(sluice.metric("sluice_dns_cache_total{result=\"hit\"}"), 4.0);
    for _ in 0..5 {
        let (status, code, body) = get(&sluice, "nope.dns.test", up.port());
        assert_eq!((status, code.as_str()), (502, "dns"));
        assert!(body.contains("NXDOMAIN"), "{body}");
    }
    let asked = dns.asked_any("nope.dns.test");
    assert!(
        (1..=2).contains(&asked),
        "one lookup (A, maybe AAAA): {asked}"
    );
    assert_eq!(
        sluice.metric("sluice_dns_cache_total{result=\"negative_hit\"}"),
        4.0
    );
    assert_eq!(up.count(), 5);
}

#[test]
fn one_lookup_serves_every_request_waiting_for_the_name() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "resolved"))
        .start();
    // Answered after 300 ms: twenty requests arrive while the lookup is in flight.
    let dns = DnsServer::start(&[("delay.dns.test", Ipv4Addr::LOCALHOST, 60)]);
    let sluice = sluice_with(&dns, "");
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let proxy = sluice.proxy;
            let port = up.port();
            std::thread::spawn(move || {
                let raw = raw_exchange(
                    proxy,
                    format!(
                        "GET /x HTTP/1.1\r\nHost: s\r\nSluice-Target: http://delay.dns.test:{port}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .expect("answer");
                split_response(&raw).0
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread"), 200);
    }
    assert_eq!(
        dns.asked("delay.dns.test"),
        1,
        "one question for twenty requests"
    );
    assert!(sluice.metric("sluice_dns_cache_total{result=\"coalesced\"}") >= 1.0);
}

#[test]
fn the_hosts_file_comes_first() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "local"))
        .start();
    let dns = DnsServer::start(&[]);
    let sluice = sluice_with(&dns, "");
    assert_eq!(get(&sluice, "localhost", up.port()).0, 200);
    assert_eq!(dns.asked_any("localhost"), 0, "localhost is in /etc/hosts");
}

#[test]
fn a_flood_of_unanswered_names_pins_no_thread_and_starves_no_cached_name() {
    let up = FakeUpstream::builder()
        .route("/", Reply::text(200, "resolved"))
        .start();
    let dns = DnsServer::start(&[("api.dns.test", Ipv4Addr::LOCALHOST, 600)]);
    let sluice = sluice_with(&dns, "dns_max_in_flight = 32\ndns_timeout = \"3s\"\n");
    assert_eq!(get(&sluice, "api.dns.test", up.port()).0, 200);
    // 200 requests for names the server never answers, at once.
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let proxy = sluice.proxy;
            std::thread::spawn(move || {
                let raw = raw_exchange(
                    proxy,
                    format!(
                        "GET /x HTTP/1.1\r\nHost: s\r\nSluice-Target: http://slow{i}.dns.test\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                raw.map(|r| split_response(&r).0).unwrap_or(0)
            })
        })
        .collect();
    assert_eventually!(
        sluice.metric("sluice_dns_lookups_total{result=\"refused\"}") >= 100.0,
        "lookups over the bound are refused at once"
    );
    // During the flood: the cached name still works, at once.
    let started = Instant::now();
    assert_eq!(get(&sluice, "api.dns.test", up.port()).0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // No thread per lookup: the process keeps its few threads.
    let status = std::fs::read_to_string(format!("/proc/{}/status", sluice.pid())).expect("status");
    let threads: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("threads");
    assert!(threads < 40, "{threads} threads during the flood");
    let statuses: Vec<u16> = flood
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");
    // The bound held: never more lookups in flight than allowed.
    assert!(sluice.metric("sluice_dns_lookups_total{result=\"error\"}") <= 32.0);
}
