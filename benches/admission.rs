//! Cost of one pacing decision, sluice's admission map against the `governor` crate's keyed
//! limiter (DashMap, same foldhash hasher) and a `Mutex<HashMap>` GCRA, in the same run:
//! 1 and 2 threads, 1 / 1,000 / 1,000,000 hosts. With 2 threads the figure is wall time per
//! decision of both threads together (perfect scaling halves it). Also prints the memory each
//! structure holds per idle host (heap bytes, counted by a wrapping allocator).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use governor::{Quota, RateLimiter};
use sluice::admission::{Admission, Ask, Caller, Clock, Decision};
use sluice::config::Config;
use sluice::config::Priority;
use sluice::generation::Generation;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Governor = RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String, foldhash::fast::RandomState>,
    governor::clock::DefaultClock,
>;

/// A plain GCRA under one lock: the obvious alternative.
struct MutexMap {
    clock: quanta::Clock,
    start: quanta::Instant,
    map: Mutex<HashMap<String, u64, foldhash::fast::RandomState>>,
}

impl MutexMap {
    fn check(&self, key: &str) -> bool {
        let now = self.clock.now().duration_since(self.start).as_nanos() as u64;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let tat = match map.get_mut(key) {
            Some(t) => t,
            None => map.entry(key.to_string()).or_insert(0),
        };
        let new_tat = (*tat).max(now) + 1;
        if new_tat.saturating_sub(2) <= now {
            *tat = new_tat;
            true
        } else {
            false
        }
    }
}

/// Defaults that never refuse: 10^9 requests/s, burst 2 (the pace the others are given).
fn generation() -> Generation {
    let config = Config::parse("[defaults]\nrps = 1000000000.0\nburst = 2\n").expect("valid");
    Generation::build(1, config)
}

enum Subject {
    Sluice(Admission),
    Governor(Governor),
    Mutex(MutexMap),
}

impl Subject {
    #[inline]
    fn check(&self, key: &str, owned: &String) -> bool {
        match self {
            Subject::Sluice(a) => {
                let now = a.now();
                !matches!(a.decide(key, now, 0), Decision::Refuse { .. })
            }
            Subject::Governor(g) => g.check_key(owned).is_ok(),
            Subject::Mutex(m) => m.check(key),
        }
    }
}

fn make(name: &str) -> Subject {
    match name {
        "sluice" => {
            let a = Admission::new(Clock::quanta());
            a.configure(&generation());
            Subject::Sluice(a)
        }
        "governor" => Subject::Governor(RateLimiter::dashmap_with_hasher(
            Quota::per_second(NonZeroU32::MAX),
            foldhash::fast::RandomState::default(),
        )),
        _ => {
            let clock = quanta::Clock::new();
            let start = clock.now();
            Subject::Mutex(MutexMap {
                clock,
                start,
                map: Mutex::new(HashMap::with_hasher(foldhash::fast::RandomState::default())),
            })
        }
    }
}

/// Counts bytes held on the heap, so each structure's memory per host is exact.
struct Counting;

static HELD: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn held() -> i64 {
    HELD.load(Ordering::Relaxed)
}

fn run(subject: &Subject, keys: &[String], threads: usize, iters: u64) -> Duration {
    let per_thread = iters / threads as u64 + 1;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let n = keys.len();
                let mut i = (t * 7919) % n;
                for _ in 0..per_thread {
                    let k = &keys[i];
                    black_box(subject.check(k, k));
                    // A fixed odd stride walks every key without a predictable pattern.
                    i = (i + 40_503) % n;
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("admission_decision");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.sample_size(20);
    for hosts in [1usize, 1_000, 1_000_000] {
        let keys: Vec<String> = (0..hosts)
            .map(|i| format!("host{i}.example.com:443"))
            .collect();
        for name in ["sluice", "governor", "mutex_hashmap"] {
            let before = held();
            let subject = make(name);
            for k in &keys {
                subject.check(k, k);
            }
            if hosts == 1_000_000 {
                // The keys themselves are counted where a structure stores its own copy.
                let per = (held() - before) as f64 / hosts as f64;
                println!("memory: {name}: {per:.0} heap bytes per idle host ({hosts} hosts)");
            }
            for threads in [1usize, 2] {
                let id = BenchmarkId::new(format!("{name}/{threads}t"), hosts);
                g.bench_with_input(id, &threads, |b, &threads| {
                    b.iter_custom(|iters| run(&subject, &keys, threads, iters))
                });
            }
            drop(subject);
        }
    }
    // The same decision on a cell already held (what a request does after its one lookup).
    let adm = Admission::new(Clock::quanta());
    let held = adm.cell("held.example.com:443", "held.example.com", &generation());
    g.bench_function("sluice_held_cell/1t/1", |b| {
        b.iter(|| {
            let now = adm.now();
            black_box(!matches!(held.reserve(now, 0), Decision::Refuse { .. }))
        })
    });
    // The whole uncontended admission of a request (`Admission::acquire` with a caller, for
    // a host in the compact table): its future is ready at the first poll, so it is polled
    // once without a runtime. Compare with `sluice/1t/1`, the decision alone.
    let adm = Admission::new(Clock::quanta());
    adm.configure(&generation());
    let key = "one.example.com:443";
    let host = adm.host(key.to_string(), "one.example.com", &generation());
    let caller = Caller {
        name: std::sync::Arc::from("billing"),
        weight: 1,
        priority: Priority::Normal,
        cap: 0,
        hold: Duration::from_secs(600),
        max_per_host: 64,
        client: true,
    };
    let ask = Ask {
        caller: Some(&caller),
        max_wait: Duration::from_secs(30),
        due: Some(&Duration::from_secs(10)),
        cost: Default::default(),
    };
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    g.bench_function("sluice_acquire_uncontended/1t/1", |b| {
        b.iter(|| {
            let fut = std::pin::pin!(adm.acquire(&host, &ask));
            black_box(matches!(fut.poll(&mut cx), std::task::Poll::Ready(Ok(_))))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
