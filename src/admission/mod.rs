//! Per-host admission: every destination host (`host:port`) is paced (GCRA with reservations,
//! so waiting is FIFO per host and no host waits behind another), and where needed has a
//! concurrency cap and pauses learned from 429s, `Retry-After` and rate-limit headers.
//!
//! One concept per file: `clock` (the admission clock), `rejection` (why it turned one away),
//! `table` (hosts: the compact table, full cells, promotion, eviction, status), `cell` and
//! `light` (a full cell and a compact slot), `wait` (permits, waiting, the send guard),
//! `room` and `fair` (a contended host's waiting room and its fair order between callers),
//! `tokens` (a host's token budgets), `learn` (what responses teach), `hints` (rate-limit
//! headers), `fleet` (the seam a fleet of nodes plugs into).

mod cell;
mod charge;
mod clock;
mod fair;
mod fleet;
pub mod hints;
mod learn;
mod light;
mod rejection;
mod room;
mod table;
mod tokens;
mod wait;

pub use cell::{interval_of, rps_of, Decision, HostCell, PauseOrigin, PauseSource};
pub use clock::Clock;
pub use fleet::{
    FleetEvent, FleetPlace, FleetSeam, FleetTokens, Paced, Placed, TokenChange, TokensTaken,
};
pub use learn::{clamp_learned_rps, Learned, LEARNED_RPS_MAX, LEARNED_RPS_MIN, MIN_429_PAUSE};
pub use rejection::{retry_after_secs, Rejection};
pub use room::{CallerLine, OTHER};
pub use table::Host;
pub use tokens::{
    model_id, Budget as TokenBudget, Cost as TokenCost, Limits as TokenLimits, Told as TokensTold,
    View as TokenView, MAX_PER_MINUTE as MAX_TOKENS_PER_MINUTE,
};
pub(crate) use wait::pace_cell;
pub use wait::{Ask, AtSend, Caller, Due, Permit};

// Every profile index (the defaults, then one per `[hosts]` entry) leaves a cell's
// `CONFIGURED` bit free.
const _: () = assert!(crate::config::MAX_HOST_ENTRIES < cell::CONFIGURED as usize);

use light::Light;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use table::Map;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub struct Admission {
    cells: Map,
    /// Hosts at the default pace.
    light: Light,
    /// Whether new hosts at the defaults go to `light` (not with a fleet or a default
    /// concurrency cap, host's or caller's, which need full cells).
    light_on: AtomicBool,
    clock: Arc<Clock>,
    /// The fleet this node shares pace, pauses and learned limits with (`backend = "redis"`).
    fleet: Option<Arc<dyn FleetSeam>>,
    /// Tests see each cell at the moment its promotion makes it visible to other requests.
    #[cfg(test)]
    on_promote: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Admission {
    pub fn new(clock: Clock) -> Admission {
        Admission::with_fleet(Arc::new(clock), None)
    }

    /// Admission that consults `fleet` (which must run on the same `clock`).
    pub fn with_fleet(clock: Arc<Clock>, fleet: Option<Arc<dyn FleetSeam>>) -> Admission {
        Admission {
            // Blocking resizes: with incremental ones, a resize left unfinished (no writes
            // after it) makes every later read search two tables.
            cells: papaya::HashMap::builder()
                .resize_mode(papaya::ResizeMode::Blocking)
                .hasher(foldhash::fast::RandomState::default())
                .build(),
            light: Light::new(),
            light_on: AtomicBool::new(false),
            clock,
            fleet,
            #[cfg(test)]
            on_promote: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::table::host_of;
    use super::*;
    use crate::config::Config;
    use crate::generation::Generation;

    fn generation(toml: &str) -> Generation {
        let c = Config::parse(toml).expect("valid");
        c.validate().expect("valid");
        Generation::build(1, c)
    }

    fn admission(clock: Clock, g: &Generation) -> Arc<Admission> {
        let adm = Arc::new(Admission::new(clock));
        adm.configure(g);
        adm
    }

    fn host(adm: &Admission, key: &str, g: &Generation) -> Host {
        adm.host(key.to_string(), host_of(key), g)
    }

    fn caller(name: &str, weight: u32, cap: u32) -> Caller {
        Caller {
            name: Arc::from(name),
            weight,
            priority: crate::config::Priority::Normal,
            cap,
            hold: Duration::from_secs(600),
            max_per_host: 64,
            client: false,
        }
    }

    fn ask(c: &Caller, wait: Duration) -> Ask<'_> {
        Ask {
            caller: Some(c),
            max_wait: wait,
            due: None,
            cost: TokenCost::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_caller_does_not_wait_behind_another_callers_backlog() {
        let g = generation("[defaults]\nrps = 2.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        let wait = Duration::from_secs(60);
        let mut a = Vec::new();
        for _ in 0..10 {
            let (adm, h) = (adm.clone(), h.clone());
            a.push(tokio::spawn(async move {
                let c = caller("a", 1, 0);
                adm.acquire(&h, &ask(&c, wait)).await.map(|p| p.queued)
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = caller("b", 1, 0);
        let p = adm.acquire(&h, &ask(&b, wait)).await.expect("b");
        // The slot at 500 ms goes to a's second request (same tag, earlier), the next to b.
        assert_eq!(p.queued, Duration::from_millis(800));
        let mut queued = Vec::new();
        for t in a {
            queued.push(t.await.expect("task").expect("a").as_millis());
        }
        assert_eq!(
            queued,
            [0, 500, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 5000],
            "a's own order is kept, one slot later"
        );
    }

    fn costly(c: &Caller, wait: Duration, input: u64, output: u64) -> Ask<'_> {
        Ask {
            cost: TokenCost {
                input,
                output,
                model: 0,
            },
            ..ask(c, wait)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_their_tokens_in_fair_order() {
        // 600 tokens a minute is 10 a second; the pace of requests is not what binds.
        let g = generation("[defaults]\nrps = 100.0\nburst = 10\ntokens_per_minute = 600\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        assert!(adm.counts_tokens(&h));
        let wait = Duration::from_secs(600);
        // a spends the whole budget at once, then queues four more of 100 tokens.
        let c = caller("a", 1, 0);
        let mut first = adm
            .acquire(&h, &costly(&c, wait, 500, 100))
            .await
            .expect("the budget is full");
        assert_eq!(first.charged().of(TokenBudget::Tokens), 600);
        // Sent: the upstream counts its tokens (a permit dropped unsent gives them back).
        first.mark_sent();
        drop(first);
        let mut a = Vec::new();
        for _ in 0..4 {
            let (adm, h) = (adm.clone(), h.clone());
            a.push(tokio::spawn(async move {
                let c = caller("a", 1, 0);
                adm.acquire(&h, &costly(&c, wait, 60, 40))
                    .await
                    .map(|mut p| {
                        p.mark_sent();
                        p.queued
                    })
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // b comes later and goes after a's first waiting request, not after all four.
        let b = caller("b", 1, 0);
        let mut pb = adm.acquire(&h, &costly(&b, wait, 60, 40)).await.expect("b");
        pb.mark_sent();
        assert_eq!(pb.queued, Duration::from_secs(19));
        let mut queued = Vec::new();
        for t in a {
            queued.push(t.await.expect("task").expect("a").as_secs());
        }
        assert_eq!(queued, [10, 30, 40, 50]);
        // A request without tokens (a GET) does not wait for them.
        let free = adm.acquire(&h, &ask(&c, wait)).await.expect("free");
        assert_eq!(free.queued, Duration::ZERO);
        drop(pb);
        // A request admitted but never sent (a failed connect, a pause since, a client
        // gone) gives its tokens back: the next need not wait for them.
        tokio::time::sleep(Duration::from_secs(70)).await;
        let unsent = adm
            .acquire(&h, &costly(&c, wait, 500, 100))
            .await
            .expect("full");
        drop(unsent);
        let again = adm
            .acquire(&h, &costly(&c, wait, 500, 100))
            .await
            .expect("again");
        assert_eq!(again.queued, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_refuse_at_once_what_cannot_come_in_time_or_at_all() {
        let g = generation("[defaults]\nrps = 100.0\nburst = 10\ntokens_per_minute = 600\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        let c = caller("a", 1, 0);
        let wait = Duration::from_secs(5);
        // More than the whole budget: never.
        match adm.acquire(&h, &costly(&c, wait, 601, 0)).await {
            Err(Rejection::OverBudget {
                limit: 600,
                estimate: 601,
                ..
            }) => {}
            other => panic!("over the budget, not {:?}", other.map(|p| p.queued)),
        }
        let spent = adm
            .acquire(&h, &costly(&c, wait, 550, 0))
            .await
            .expect("fits");
        // 100 tokens are 5 s away (50 left): within 5 s it waits, within 4 s it is refused
        // at once, and with its deadline rule leaving 3 s, as the deadline's refusal.
        let before = tokio::time::Instant::now();
        let r = adm
            .acquire(&h, &costly(&c, Duration::from_secs(4), 100, 0))
            .await;
        assert!(
            matches!(r, Err(Rejection::Pace { .. })),
            "{:?}",
            r.map(|p| p.queued)
        );
        let tight = Ask {
            due: Some(&Duration::from_secs(3)),
            ..costly(&c, wait, 100, 0)
        };
        let r = adm.acquire(&h, &tight).await;
        assert!(
            matches!(r, Err(Rejection::Deadline { .. })),
            "{:?}",
            r.map(|p| p.queued)
        );
        assert_eq!(before.elapsed(), Duration::ZERO, "at once");
        // The answer used less than estimated: what it did not use comes back, and the
        // waiting request goes sooner.
        let waiting = {
            let (adm, h, c) = (adm.clone(), h.clone(), c.clone());
            tokio::spawn(async move {
                adm.acquire(&h, &costly(&c, wait, 100, 0))
                    .await
                    .map(|p| p.queued)
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut spent = spent;
        let charged = adm.settle(
            &mut spent,
            TokenCost {
                input: 350,
                ..TokenCost::default()
            },
        );
        assert_eq!(charged.input, 550);
        assert_eq!(
            waiting.await.expect("task").expect("admitted"),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_rule_refuses_at_once_a_slot_that_leaves_no_time() {
        let g = generation("[defaults]\nrps = 10.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        let c = caller("a", 1, 0);
        drop(adm.acquire(&h, &ask(&c, Duration::from_secs(1))).await);
        // The next slot is 100 ms away; the answer needs the deadline's last 60 ms of 150.
        let tight = Ask {
            due: Some(&Duration::from_millis(90)),
            ..ask(&c, Duration::from_millis(150))
        };
        let before = tokio::time::Instant::now();
        match adm.acquire(&h, &tight).await {
            Err(Rejection::Deadline { retry_after }) => {
                assert_eq!(retry_after, Duration::from_millis(100))
            }
            other => panic!(
                "refused by the deadline rule, not {:?}",
                other.map(|p| p.queued)
            ),
        }
        assert_eq!(before.elapsed(), Duration::ZERO, "at once");
        // A slot past the wait itself is the pace's refusal, as before.
        let beyond = Ask {
            due: Some(&Duration::from_millis(40)),
            ..ask(&c, Duration::from_millis(50))
        };
        assert!(matches!(
            adm.acquire(&h, &beyond).await,
            Err(Rejection::Pace { .. })
        ));
        let room = Ask {
            due: Some(&Duration::from_millis(110)),
            ..ask(&c, Duration::from_millis(150))
        };
        let p = adm.acquire(&h, &room).await.expect("its slot leaves time");
        assert_eq!(p.queued, Duration::from_millis(100));
        // A slot exactly at its bound is its own, even when the dispatcher's timer and its
        // own fire at the same instant.
        let exact = Ask {
            due: Some(&Duration::from_millis(100)),
            ..ask(&c, Duration::from_millis(150))
        };
        let p = adm
            .acquire(&h, &exact)
            .await
            .expect("a slot at the bound fits");
        assert_eq!(p.queued, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_cap_holds_its_requests_and_not_another_callers() {
        let g =
            generation("[defaults]\nrps = 1000.0\nburst = 100\nmax_concurrent_per_caller = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        assert!(matches!(h, Host::Cell(_)), "a cap needs a full cell");
        let (a, b) = (caller("a", 1, 1), caller("b", 1, 1));
        let wait = Duration::from_secs(5);
        let first = adm.acquire(&h, &ask(&a, wait)).await.expect("a's first");
        let second = {
            let (adm, h, a) = (adm.clone(), h.clone(), a.clone());
            tokio::spawn(async move { adm.acquire(&h, &ask(&a, wait)).await.map(|p| p.queued) })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "a is at its cap");
        let pb = adm.acquire(&h, &ask(&b, wait)).await.expect("b");
        assert_eq!(pb.queued, Duration::ZERO, "b is not held by a's cap");
        drop(first);
        let queued = second.await.expect("task").expect("a's second");
        assert_eq!(queued, Duration::from_millis(300));
        // The place is given back with the permit.
        let Host::Cell(cell) = h else { unreachable!() };
        drop(pb);
        assert!(cell.room().lines().iter().all(|l| l.caller.as_ref() != "b"));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_stop_waiting_leave_nothing_behind() {
        let g = generation("[defaults]\nrps = 2.0\nburst = 1\nmax_concurrent_per_caller = 2\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        let Host::Cell(cell) = h.clone() else {
            panic!("a cap needs a full cell")
        };
        let wait = Duration::from_secs(60);
        let first = {
            let c = caller("a", 1, 2);
            adm.acquire(&h, &ask(&c, wait)).await.expect("first")
        };
        // Waiting for a slot (b) and for a's place (a): dropped at their await points.
        let mut tasks = Vec::new();
        for name in ["a", "a", "a", "b", "b"] {
            let (adm, h) = (adm.clone(), h.clone());
            tasks.push(tokio::spawn(async move {
                let c = caller(name, 1, 2);
                adm.acquire(&h, &ask(&c, wait)).await.map(|p| p.queued)
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        drop(first);
        tokio::task::yield_now().await;
        let room = cell.room();
        assert!(room.lines().is_empty(), "{:?}", room.lines());
        assert!(room.is_empty());
        // And the next requests find every place and the pace as they should.
        let c = caller("a", 1, 2);
        let p1 = adm.acquire(&h, &ask(&c, wait)).await.expect("a again");
        let p2 = adm
            .acquire(&h, &ask(&c, wait))
            .await
            .expect("a's second place");
        assert!(p2.queued <= Duration::from_millis(500), "{:?}", p2.queued);
        drop((p1, p2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_past_every_wait_refuses_the_waiting_requests_at_once() {
        let g = generation("[defaults]\nrps = 10.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        let c = caller("a", 1, 0);
        drop(adm.acquire(&h, &ask(&c, Duration::from_secs(2))).await);
        let started = tokio::time::Instant::now();
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let (adm, h, c) = (adm.clone(), h.clone(), c.clone());
            waiting.push(tokio::spawn(async move {
                adm.acquire(&h, &ask(&c, Duration::from_secs(2)))
                    .await
                    .map(|p| p.queued)
            }));
            tokio::task::yield_now().await;
        }
        let hints = hints::Hints {
            retry_after: Some(Duration::from_secs(10)),
            ..hints::Hints::default()
        };
        adm.learn(&h, &g, 429, &hints);
        for w in waiting {
            assert!(matches!(
                w.await.expect("task"),
                Err(Rejection::Paused { .. })
            ));
        }
        assert!(
            started.elapsed() <= Duration::from_millis(100),
            "refused when the dispatcher saw the pause, not at their own deadline: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_pace_is_kept_when_slots_come_faster_than_the_timer() {
        // 5,000/s is one slot every 200 us; the timer wakes in steps of 1 ms.
        let g = generation("[defaults]\nrps = 5000.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let h = host(&adm, "a.test:443", &g);
        let mut tasks = Vec::new();
        for i in 0..51 {
            let (adm, h) = (adm.clone(), h.clone());
            tasks.push(tokio::spawn(async move {
                let c = caller(if i % 2 == 0 { "a" } else { "b" }, 1, 0);
                adm.acquire(&h, &ask(&c, Duration::from_secs(1)))
                    .await
                    .map(|p| p.queued)
            }));
        }
        let mut last = Duration::ZERO;
        for t in tasks {
            last = last.max(t.await.expect("task").expect("admitted"));
        }
        // 50 waiting requests at 200 us: 10 ms (taken one at a time, one slot or two per
        // timer step: 25 ms).
        assert!(
            last <= Duration::from_millis(11),
            "the last waited {last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waits_in_order_and_refuses_beyond_the_wait() {
        let g = generation("[defaults]\nrps = 10.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        assert!(matches!(a, Host::Light { .. }), "at the defaults: compact");
        let mut tasks = Vec::new();
        for i in 0..5u64 {
            let adm = adm.clone();
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let p = adm
                    .acquire(&a, &Ask::plain(Duration::from_secs(1)))
                    .await
                    .expect("admitted");
                (i, p.queued)
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            let (i, queued) = t.await.expect("task");
            assert_eq!(queued, Duration::from_millis(100 * i), "request {i}");
        }
        // The next slot is 100 ms away: with 50 ms allowed, refused at once without waiting.
        let before = tokio::time::Instant::now();
        let r = adm
            .acquire(&a, &Ask::plain(Duration::from_millis(50)))
            .await;
        assert!(matches!(r, Err(Rejection::Pace { .. })));
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!(adm.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_waiting_requests_and_other_hosts_do_not_wait() {
        let g = generation("[defaults]\nrps = 20.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        let b = host(&adm, "b.test:443", &g);
        let first = adm
            .acquire(&a, &Ask::plain(Duration::from_secs(30)))
            .await
            .expect("first");
        drop(first);
        // Reserved in the compact table, 50 ms ahead.
        let waiting = {
            let (adm, a) = (adm.clone(), a.clone());
            tokio::spawn(async move { adm.acquire(&a, &Ask::plain(Duration::from_secs(30))).await })
        };
        tokio::task::yield_now().await;
        // The first response was a 429 with Retry-After: 2: the host gets a full cell.
        let hints = hints::Hints {
            retry_after: Some(Duration::from_secs(2)),
            ..hints::Hints::default()
        };
        let learned = adm.learn(&a, &g, 429, &hints);
        assert!(matches!(learned.paused, Some((_, PauseSource::RetryAfter))));
        assert!(matches!(host(&adm, "a.test:443", &g), Host::Cell(_)));
        assert_eq!(
            adm.len(),
            1,
            "a promoted host is counted once (b from its first use)"
        );
        assert!(
            adm.paused_until(&a) > adm.now(),
            "seen through the old handle"
        );
        let pb = adm
            .acquire(&b, &Ask::plain(Duration::from_secs(30)))
            .await
            .expect("other host");
        assert_eq!(
            pb.queued,
            Duration::ZERO,
            "host b never waits behind host a"
        );
        let pa = waiting
            .await
            .expect("task")
            .expect("admitted after the pause");
        assert_eq!(pa.queued, Duration::from_secs(2));
        // After the pause, the pace (not a burst): the next slot is 50 ms later.
        let next = adm
            .acquire(&a, &Ask::plain(Duration::from_secs(30)))
            .await
            .expect("next");
        assert_eq!(next.queued, Duration::from_millis(50));
    }

    /// The race behind a once-flaky storm test: a compact host taught a 429 was promoted (its
    /// full cell made visible to every request, on any thread) before that cell was paused,
    /// so a request could take a slot in between. At the moment of promotion the cell must
    /// already carry the pause.
    #[tokio::test(start_paused = true)]
    async fn a_host_promoted_by_a_429_is_paused_when_it_becomes_visible() {
        let g = generation("[defaults]\nrps = 20.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        drop(
            adm.acquire(&a, &Ask::plain(Duration::from_secs(1)))
                .await
                .expect("first"),
        );
        let hints = hints::Hints {
            retry_after: Some(Duration::from_secs(2)),
            ..hints::Hints::default()
        };
        let before = adm.now();
        let learned = adm.learn(&a, &g, 429, &hints);
        let seen = adm.on_promote.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1, "one promotion");
        let paused_until = seen[0].1;
        assert!(
            paused_until >= before + 1_999_000_000,
            "paused for the 2 s at the moment of promotion: {paused_until} vs {before}"
        );
        // And the pause still counts as started by this response (metrics, the fleet).
        assert!(learned.paused.is_some());
        assert!(adm.paused_until(&a) >= paused_until);
    }

    /// The storm test's flake: under CPU starvation the first request of a storm reached the
    /// send 135 ms after its slot, and the second, admitted 50 ms after the first, was sent
    /// right behind it, before the first one's 429 came back. Sends are spaced too, and a
    /// pause learned before a request is sent holds it, whether the host is in the compact
    /// table or has a full cell.
    async fn late_sends_are_spaced_and_a_pause_holds_requests_admitted_before_it(toml: &str) {
        let g = Arc::new(generation(toml));
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        let wait = Duration::from_secs(30);
        let p0 = adm.acquire(&a, &Ask::plain(wait)).await.expect("first");
        let p1 = adm.acquire(&a, &Ask::plain(wait)).await.expect("second");
        assert_eq!(p1.queued, Duration::from_millis(50));
        // On time, the first would go at once and leave a compact host compact.
        // Late: it is sent at 135 ms, then the second may go only 50 ms after it.
        tokio::time::sleep(Duration::from_millis(85)).await;
        assert_eq!(adm.before_send(&a, &p0, &g).await, AtSend::Go);
        let t = tokio::time::Instant::now();
        assert_eq!(adm.before_send(&a, &p1, &g).await, AtSend::Go);
        assert_eq!(t.elapsed(), Duration::from_millis(50), "spaced at the pace");
        // A third, admitted before a 429 comes back and about to be sent after it: held.
        let p2 = adm.acquire(&a, &Ask::plain(wait)).await.expect("third");
        let sending = {
            let (adm, a, g) = (adm.clone(), a.clone(), g.clone());
            tokio::spawn(async move { adm.before_send(&a, &p2, &g).await })
        };
        tokio::task::yield_now().await;
        let hints = hints::Hints {
            retry_after: Some(Duration::from_secs(2)),
            ..hints::Hints::default()
        };
        adm.learn(&a, &g, 429, &hints);
        assert_eq!(sending.await.expect("task"), AtSend::Paused);
        // Admitted again, it waits out the pause.
        let again = adm
            .acquire(&a, &Ask::plain(wait))
            .await
            .expect("after the pause");
        assert!(
            again.queued >= Duration::from_millis(1_900),
            "{:?}",
            again.queued
        );
        assert_eq!(adm.before_send(&a, &again, &g).await, AtSend::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn late_sends_to_a_compact_host_are_spaced_and_held_by_a_pause() {
        late_sends_are_spaced_and_a_pause_holds_requests_admitted_before_it(
            "[defaults]\nrps = 20.0\nburst = 1\n",
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn late_sends_to_a_host_with_a_full_cell_are_spaced_and_held_by_a_pause() {
        late_sends_are_spaced_and_a_pause_holds_requests_admitted_before_it(
            "[hosts.\"a.test:443\"]\nrps = 20.0\nburst = 1\n",
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_compact_host_sent_on_time_stays_compact() {
        let g = generation("[defaults]\nrps = 20.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        for _ in 0..3 {
            let p = adm
                .acquire(&a, &Ask::plain(Duration::from_secs(1)))
                .await
                .expect("admitted");
            assert_eq!(p.queued, Duration::ZERO, "at the pace: no wait");
            // A few milliseconds late is within half an interval.
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(adm.before_send(&a, &p, &g).await, AtSend::Go);
            tokio::time::sleep(Duration::from_millis(45)).await;
        }
        assert!(matches!(host(&adm, "a.test:443", &g), Host::Light { .. }));
        // A request that has to wait makes the host contended: it gets a full cell, whose
        // waiting room orders the waiting requests.
        drop(adm.acquire(&a, &Ask::plain(Duration::from_secs(1))).await);
        let p = adm
            .acquire(&a, &Ask::plain(Duration::from_secs(1)))
            .await
            .expect("admitted");
        assert_eq!(p.queued, Duration::from_millis(50));
        assert!(matches!(host(&adm, "a.test:443", &g), Host::Cell(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_taken_before_a_pause_are_void_even_past_its_end() {
        let g = generation("[defaults]\nrps = 2.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        drop(
            adm.acquire(&a, &Ask::plain(Duration::from_secs(9)))
                .await
                .expect("first"),
        );
        // Four waiters hold compact slots at 0.5, 1, 1.5 and 2 s.
        let mut waiters = Vec::new();
        for _ in 0..4 {
            let (adm, a) = (adm.clone(), a.clone());
            waiters.push(tokio::spawn(async move {
                adm.acquire(&a, &Ask::plain(Duration::from_secs(9))).await
            }));
            tokio::task::yield_now().await;
        }
        // A 429 pauses the host for 1 s: the slots at 1.5 and 2 s lie past the pause, but the
        // pace restarts at its end, so they are void too; all four go at the pace after it.
        let hints = hints::Hints {
            retry_after: Some(Duration::from_secs(1)),
            ..hints::Hints::default()
        };
        adm.learn(&a, &g, 429, &hints);
        let mut queued = Vec::new();
        for w in waiters {
            queued.push(w.await.expect("task").expect("admitted").queued);
        }
        queued.sort();
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(queued, ms(&[1_000, 1_500, 2_000, 2_500]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_learned_pace_moves_the_host_with_its_position() {
        let g = generation("[defaults]\nrps = 1.0\nburst = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        drop(
            adm.acquire(&a, &Ask::plain(Duration::from_secs(5)))
                .await
                .expect("first"),
        );
        // Nothing to learn from a plain 200: still compact.
        adm.learn(&a, &g, 200, &hints::Hints::default());
        assert!(matches!(host(&adm, "a.test:443", &g), Host::Light { .. }));
        let hints = hints::Hints {
            rps: Some(4.0),
            ..hints::Hints::default()
        };
        assert_eq!(adm.learn(&a, &g, 200, &hints).rps, Some(4.0));
        let Host::Cell(cell) = host(&adm, "a.test:443", &g) else {
            panic!("promoted");
        };
        assert_eq!(cell.rps(), 4.0);
        // The slot taken in the compact table still counts: the first request's interval (at
        // the 1 s pace it went at) ends at 1 s; a fresh cell would have let this one go now.
        let p = adm
            .acquire(&a, &Ask::plain(Duration::from_secs(5)))
            .await
            .expect("next");
        assert_eq!(p.queued, Duration::from_secs(1));
        let p = adm
            .acquire(&a, &Ask::plain(Duration::from_secs(5)))
            .await
            .expect("next");
        assert_eq!(
            p.queued,
            Duration::from_millis(250),
            "then the learned pace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_cap_queues_and_times_out() {
        let g = generation("[defaults]\nrps = 0.0\nmax_concurrent = 1\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        let Host::Cell(cell) = a.clone() else {
            panic!("a default concurrency cap needs full cells");
        };
        let held = adm
            .acquire(&a, &Ask::plain(Duration::from_secs(1)))
            .await
            .expect("first");
        let refused = adm
            .acquire(&a, &Ask::plain(Duration::from_millis(200)))
            .await;
        assert!(matches!(refused, Err(Rejection::Concurrency { .. })));
        let waiter = {
            let (adm, a) = (adm.clone(), a.clone());
            tokio::spawn(async move { adm.acquire(&a, &Ask::plain(Duration::from_secs(5))).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        let p = waiter
            .await
            .expect("task")
            .expect("admitted when the first left");
        assert_eq!(p.queued, Duration::from_millis(300));
        assert_eq!(cell.in_flight(), 1);
    }

    #[test]
    fn a_learned_pace_is_held_between_one_an_hour_and_the_ceiling() {
        assert_eq!(clamp_learned_rps(1e-300, 0.0), LEARNED_RPS_MIN);
        assert_eq!(clamp_learned_rps(1e-10, 5.0), LEARNED_RPS_MIN);
        assert_eq!(clamp_learned_rps(1e6, 0.0), LEARNED_RPS_MAX);
        assert_eq!(clamp_learned_rps(1e6, 5.0), 5.0);
        assert_eq!(clamp_learned_rps(f64::INFINITY, 5.0), 5.0);
        assert_eq!(clamp_learned_rps(10.0, 0.0), 10.0);
        // The slowest pace is one interval of an hour, and reads as such.
        let cell = HostCell::new(LEARNED_RPS_MIN, 1, 0, 0, false);
        assert_eq!(cell.rps(), 0.000277778);
        assert_eq!(HostCell::new(2.0, 1, 0, 0, false).rps(), 2.0);
    }

    #[test]
    fn reload_applies_changed_limits_and_keeps_learned_ones() {
        let old = generation("[hosts.\"a.test\"]\nrps = 5.0\n[hosts.\"b.test\"]\nrps = 7.0\n");
        let new = generation("[hosts.\"a.test\"]\nrps = 9.0\n[hosts.\"b.test\"]\nrps = 7.0\n");
        let adm = Admission::new(Clock::quanta());
        adm.configure(&old);
        let a = adm.cell("a.test:443", "a.test", &old);
        let b = adm.cell("b.test:443", "b.test", &old);
        let c = adm.cell("[::1]:80", "::1", &old);
        b.set_rps(3.0); // learned from the upstream
        adm.apply_generation(&old, &new);
        assert_eq!(a.rps(), 9.0, "changed in config: applied");
        assert_eq!(b.rps(), 3.0, "unchanged in config: learned pace kept");
        assert!(a.configured() && b.configured() && !c.configured());
        let gone = generation("");
        adm.apply_generation(&new, &gone);
        assert!(!a.configured(), "removed from [hosts]: evictable again");
        assert_eq!(a.rps(), 2.0);
        assert_eq!(host_of("[::1]:80"), "::1");
        let client = adm.client_cell("billing", 5.0, 1);
        adm.apply_generation(&gone, &new);
        assert_eq!(client.rps(), 5.0, "a client's pace is not a host's");
        assert!(client.configured());
    }

    #[test]
    fn a_host_named_by_a_reload_leaves_the_compact_table_with_its_position() {
        let before = generation("[defaults]\nrps = 1.0\nburst = 1\n");
        let after =
            generation("[defaults]\nrps = 1.0\nburst = 1\n[hosts.\"*.a.test\"]\nrps = 0.5\n");
        let adm = admission(Clock::quanta(), &before);
        let now = adm.now();
        assert_eq!(adm.decide("x.a.test:443", now, 0), Decision::Now);
        adm.apply_generation(&before, &after);
        let Host::Cell(cell) = host(&adm, "x.a.test:443", &after) else {
            panic!("a wildcard entry: full cell");
        };
        assert!(cell.configured());
        assert_eq!(cell.rps(), 0.5);
        assert!(
            matches!(cell.reserve(now, 0), Decision::Refuse { .. }),
            "slot kept"
        );
        assert_eq!(adm.len(), 1);
    }

    /// A fleet that notes whether a cell was already visible to other requests when it was
    /// registered (then a request could find it untracked and go on this node's pace alone).
    #[derive(Default)]
    struct Watch {
        adm: std::sync::OnceLock<std::sync::Weak<Admission>>,
        registered_visible: std::sync::atomic::AtomicBool,
    }

    impl FleetSeam for Watch {
        fn register(&self, _cell: &Arc<HostCell>, key: &str) {
            let adm = self.adm.get().and_then(|a| a.upgrade()).expect("admission");
            if adm.get(key).is_some() {
                self.registered_visible
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        fn forget(&self, _cell: &HostCell) {}
        fn try_now(&self, _cell: &Arc<HostCell>) -> bool {
            true
        }
        fn pace<'a>(&'a self, _cell: &'a Arc<HostCell>, _deadline: u64, _demand: u32) -> Paced<'a> {
            Box::pin(async { Ok(()) })
        }
        fn place<'a>(
            &'a self,
            _cell: &'a Arc<HostCell>,
            _caller: &'a str,
            _cap: u32,
            _hold: Duration,
            _deadline: u64,
        ) -> Placed<'a> {
            Box::pin(async { Ok(None) })
        }
        fn take_tokens<'a>(
            &'a self,
            _cell: &'a Arc<HostCell>,
            _limits: TokenLimits,
            _cost: TokenCost,
            _reserve_within: Option<Duration>,
        ) -> TokensTaken<'a> {
            Box::pin(async { None })
        }
        fn tokens_changed(&self, _cell: &HostCell, _limits: TokenLimits, _change: TokenChange) {}
        fn paused(&self, _cell: &HostCell, _until: u64) {}
        fn publish(
            &self,
            _cell: &HostCell,
            _pause: Option<Duration>,
            _rps: Option<f64>,
            _max_concurrent: Option<u32>,
        ) {
        }
    }

    /// The fleet's once-flaky pause test: a second node sent its first request 8 ms after
    /// the first node's (whose answer was the 429), at a fleet pace of one per 100 ms. A
    /// request had found the host's new cell before the fleet tracked it, and went on its
    /// node's own pace. A cell is tracked by the fleet before any request can find it.
    #[test]
    fn a_new_cell_is_tracked_by_the_fleet_before_any_request_can_find_it() {
        let g = generation("[hosts.\"a.test\"]\nrps = 10.0\nburst = 1\n");
        let watch = Arc::new(Watch::default());
        let fleet: Arc<dyn FleetSeam> = watch.clone();
        let adm = Arc::new(Admission::with_fleet(
            Arc::new(Clock::quanta()),
            Some(fleet),
        ));
        adm.configure(&g);
        watch.adm.set(Arc::downgrade(&adm)).expect("set once");
        let _cell = adm.cell("a.test:443", "a.test", &g);
        assert!(
            !watch
                .registered_visible
                .load(std::sync::atomic::Ordering::SeqCst),
            "the cell was visible before the fleet tracked it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn learned_pace_ceiling_and_eviction() {
        let g = generation("[defaults]\nmax_rps = 10.0\n[hosts.\"kept.test\"]\nrps = 1.0\n");
        let adm = admission(Clock::tokio(), &g);
        let a = host(&adm, "a.test:443", &g);
        let hints = hints::Hints {
            rps: Some(50.0),
            ..hints::Hints::default()
        };
        assert_eq!(adm.learn(&a, &g, 200, &hints).rps, Some(10.0));
        let cell = adm.get("a.test:443").expect("promoted");
        assert_eq!(cell.rps(), 10.0);
        drop(cell);
        let kept = adm.cell("kept.test:443", "kept.test", &g);
        assert!(kept.configured());
        drop(kept);
        let now = adm.now();
        adm.decide("compact.test:443", now, 0);
        assert_eq!(adm.len(), 3);
        tokio::time::sleep(Duration::from_secs(700)).await;
        assert_eq!(adm.evict_idle(Duration::from_secs(600)), 2);
        assert!(adm.get("kept.test:443").is_some());
        assert!(adm.get("a.test:443").is_none());
        assert_eq!(adm.len(), 1);
        // The forgotten promoted host starts afresh in the compact table.
        assert!(matches!(host(&adm, "a.test:443", &g), Host::Light { .. }));
    }
}
