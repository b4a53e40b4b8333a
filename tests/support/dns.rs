//! A small DNS server on a free UDP port of 127.0.0.1, so that sluice never asks the
//! machine's nameserver in a test: `A` answers for the names it is given (with their TTL),
//! `NXDOMAIN` with an SOA (negative TTL 30 s) for the rest, no answer at all for names
//! starting with `slow`, and answers after 300 ms for names starting with `delay`. It counts
//! the questions it gets, and stops with the process.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct DnsServer {
    pub port: u16,
    questions: Arc<Mutex<Vec<(String, u16)>>>,
}

impl DnsServer {
    pub fn start(records: &[(&str, Ipv4Addr, u32)]) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        let port = socket.local_addr().expect("addr").port();
        let records: HashMap<String, (Ipv4Addr, u32)> = records
            .iter()
            .map(|(n, ip, ttl)| (n.to_ascii_lowercase(), (*ip, *ttl)))
            .collect();
        let questions = Arc::new(Mutex::new(Vec::new()));
        let seen = questions.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    return;
                };
                let Some((name, qtype, qend)) = question(&buf[..n]) else {
                    continue;
                };
                seen.lock().expect("questions").push((name.clone(), qtype));
                if name.starts_with("slow") {
                    continue;
                }
                let answer = answer(&buf[..n], qend, records.get(&name), qtype);
                let socket = socket.try_clone().expect("clone");
                if name.starts_with("delay") {
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(300));
                        let _ = socket.send_to(&answer, from);
                    });
                } else {
                    let _ = socket.send_to(&answer, from);
                }
            }
        });
        DnsServer { port, questions }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `A` questions asked for `name` so far.
    pub fn asked(&self, name: &str) -> usize {
        self.questions
            .lock()
            .expect("questions")
            .iter()
            .filter(|(n, t)| n == name && *t == 1)
            .count()
    }

    /// Questions of any type asked for `name` so far.
    pub fn asked_any(&self, name: &str) -> usize {
        self.questions
            .lock()
            .expect("questions")
            .iter()
            .filter(|(n, _)| n == name)
            .count()
    }
}

/// The question's name (lowercase, no trailing dot), type, and where the question ends.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn answer(query: &[u8], qend: usize, record: Option<&(Ipv4Addr, u32)>, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&query[..2]);
    let (rcode, a) = match record {
        Some(r) if qtype == 1 => (0u8, Some(*r)),
        Some(_) => (0, None),
        None => (3, None),
    };
    out.extend_from_slice(&[0x81, 0x80 | rcode]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(a.is_some()).to_be_bytes());
    out.extend_from_slice(&u16::from(a.is_none()).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&query[12..qend]);
    match a {
        Some((ip, ttl)) => {
            out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        None => {
            // SOA: negative answers are kept for 30 s.
            out.extend_from_slice(&[0xc0, 0x0c, 0, 6, 0, 1]);
            out.extend_from_slice(&30u32.to_be_bytes());
            out.extend_from_slice(&22u16.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            for v in [1u32, 3600, 600, 86400, 30] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
    out
}
