//! The order in which the requests waiting at one host get its slots: by class first
//! (`high`, `normal`, `low`), with aging so that a waiting lower class is never starved
//! outright, then between callers of one class by weighted fair queueing, and FIFO within one
//! caller.
//!
//! Between callers it is self-clocked fair queueing (SCFQ): each caller's head request carries
//! a virtual finish tag, the smallest tag goes first, and a caller that starts waiting gets the
//! tag of the request served last plus its own step (`UNIT / weight`). So a caller's first
//! request waits about one slot however long another caller's backlog is, and under
//! saturation callers are served in proportion to their weights. It needs only a tag per
//! waiting caller and one addition per slot (no per-round state, unlike deficit round robin,
//! and no ordered structure over requests, unlike start-time fair queueing); callers are few
//! (bounded per host), so the smallest tag is found by a scan.
//!
//! Pure: no clock, no locks; the waiting room (`room.rs`) holds it under its mutex.

use crate::config::Priority;
use std::collections::VecDeque;
use std::sync::Arc;

/// Virtual time of one request at weight 1.
const UNIT: u64 = 1 << 20;

/// A waiting class passed over this many times in a row takes the next slot: each lower class
/// that waits gets at least one slot in every `AGE + 1` while higher classes keep arriving.
pub const AGE: u32 = 4;

struct Flow<T> {
    caller: Arc<str>,
    /// Virtual time one of its requests takes: `UNIT / weight`.
    step: u64,
    /// Virtual finish time of its head request.
    tag: u64,
    /// Order in which flows started waiting (breaks ties between equal tags).
    seq: u64,
    items: VecDeque<T>,
}

struct Class<T> {
    flows: Vec<Flow<T>>,
    /// The tag of the request this class served last.
    vtime: u64,
    /// Times this class waited and another took the slot, since it was last served.
    passed: u32,
}

impl<T> Default for Class<T> {
    fn default() -> Self {
        Class {
            flows: Vec::new(),
            vtime: 0,
            passed: 0,
        }
    }
}

/// What `pop` would serve: a class, a flow in it, and which classes had an eligible flow.
struct Choice {
    class: usize,
    flow: usize,
    waiting: [bool; 3],
}

/// The requests waiting at one host, in the order they are to be served.
pub struct Fair<T> {
    classes: [Class<T>; 3],
    seq: u64,
    len: usize,
}

impl<T> Default for Fair<T> {
    fn default() -> Self {
        Fair {
            classes: Default::default(),
            seq: 0,
            len: 0,
        }
    }
}

fn step_of(weight: u32) -> u64 {
    UNIT / u64::from(weight.max(1))
}

/// A flow's tag as it competes now. A flow left behind while it could not go (its caller at
/// its cap) competes as one that starts waiting now: what it missed is not made up for in a
/// burst ahead of the others.
fn tag_of<T>(f: &Flow<T>, vtime: u64) -> u64 {
    if f.tag < vtime {
        vtime.saturating_add(f.step)
    } else {
        f.tag
    }
}

impl<T> Fair<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue `item` for `caller` (its weight as configured now) in `class`.
    pub fn push(&mut self, caller: &Arc<str>, weight: u32, class: Priority, item: T) {
        let step = step_of(weight);
        let c = &mut self.classes[class as usize];
        self.len += 1;
        if let Some(f) = c.flows.iter_mut().find(|f| f.caller == *caller) {
            f.step = step;
            f.items.push_back(item);
            return;
        }
        self.seq += 1;
        c.flows.push(Flow {
            caller: caller.clone(),
            step,
            tag: c.vtime.saturating_add(step),
            seq: self.seq,
            items: VecDeque::from([item]),
        });
    }

    /// The class and flow to serve next among those `eligible` says may go, and the classes
    /// that have an eligible flow.
    fn choose(&self, eligible: impl Fn(&Arc<str>, &T) -> bool) -> Option<Choice> {
        // The best eligible flow of each class.
        let mut best: [Option<usize>; 3] = [None; 3];
        for (ci, c) in self.classes.iter().enumerate() {
            best[ci] = c
                .flows
                .iter()
                .enumerate()
                .filter(|(_, f)| f.items.front().is_some_and(|i| eligible(&f.caller, i)))
                .min_by_key(|(_, f)| (tag_of(f, c.vtime), f.seq))
                .map(|(i, _)| i);
        }
        let first = (0..3).find(|&ci| best[ci].is_some())?;
        // A lower class passed over `AGE` times goes now (the highest such first).
        let chosen = (0..3)
            .find(|&ci| ci != first && best[ci].is_some() && self.classes[ci].passed >= AGE)
            .unwrap_or(first);
        Some(Choice {
            class: chosen,
            flow: best[chosen]?,
            waiting: best.map(|b| b.is_some()),
        })
    }

    /// The request `pop` would serve next, left in place.
    pub fn peek(&self, eligible: impl Fn(&Arc<str>, &T) -> bool) -> Option<&T> {
        let c = self.choose(eligible)?;
        self.classes[c.class].flows[c.flow].items.front()
    }

    /// The next request to serve among those `eligible` says may go (its caller, its head
    /// request): the class by priority and aging, then the smallest tag.
    pub fn pop(&mut self, eligible: impl Fn(&Arc<str>, &T) -> bool) -> Option<(Arc<str>, T)> {
        let choice = self.choose(eligible);
        for (ci, c) in self.classes.iter_mut().enumerate() {
            if c.flows.is_empty() {
                c.passed = 0;
            }
            if let Some(ch) = &choice {
                if ci > ch.class && ch.waiting[ci] {
                    c.passed = c.passed.saturating_add(1);
                }
            }
        }
        let Choice { class, flow, .. } = choice?;
        let c = &mut self.classes[class];
        c.passed = 0;
        let f = &mut c.flows[flow];
        let item = f.items.pop_front()?;
        let tag = tag_of(f, c.vtime);
        c.vtime = tag;
        f.tag = tag.saturating_add(f.step);
        let caller = f.caller.clone();
        if f.items.is_empty() {
            c.flows.swap_remove(flow);
        }
        self.len -= 1;
        Some((caller, item))
    }

    /// Remove the first request `matches` finds (one that stopped waiting); true if found.
    pub fn remove(
        &mut self,
        caller: &str,
        class: Priority,
        mut matches: impl FnMut(&T) -> bool,
    ) -> bool {
        let c = &mut self.classes[class as usize];
        let Some(fi) = c.flows.iter().position(|f| &*f.caller == caller) else {
            return false;
        };
        let f = &mut c.flows[fi];
        let Some(i) = f.items.iter().position(&mut matches) else {
            return false;
        };
        f.items.remove(i);
        if f.items.is_empty() {
            c.flows.swap_remove(fi);
        }
        self.len -= 1;
        true
    }

    /// About how many waiting requests would be served before one `caller` queued now in
    /// `class`: those of its class with a smaller tag, then as many of higher classes as
    /// aging lets go before them. `room(c)` is how many of caller `c`'s requests may go
    /// before any of its places comes free (`usize::MAX` without a cap).
    pub fn ahead(
        &self,
        caller: &str,
        weight: u32,
        class: Priority,
        room: impl Fn(&str) -> usize,
    ) -> usize {
        let ci = class as usize;
        let c = &self.classes[ci];
        let own = c.flows.iter().find(|f| &*f.caller == caller);
        let tag = match own {
            Some(f) => {
                tag_of(f, c.vtime).saturating_add(f.step.saturating_mul(f.items.len() as u64))
            }
            None => c.vtime.saturating_add(step_of(weight)),
        };
        let mut same = 0usize;
        for f in &c.flows {
            let head = tag_of(f, c.vtime);
            let n = if &*f.caller == caller {
                f.items.len()
            } else if tag >= head {
                let n = (tag - head) / f.step.max(1) + 1;
                usize::try_from(n).unwrap_or(usize::MAX).min(f.items.len())
            } else {
                0
            };
            same += n.min(room(&f.caller));
        }
        let higher: usize = self.classes[..ci]
            .iter()
            .flat_map(|c| &c.flows)
            .map(|f| f.items.len().min(room(&f.caller)))
            .sum();
        same + higher.min((AGE as usize).saturating_mul(same + 1))
    }

    /// Waiting requests by caller (each caller once, summed over classes).
    pub fn by_caller(&self) -> Vec<(Arc<str>, usize)> {
        let mut out: Vec<(Arc<str>, usize)> = Vec::new();
        for f in self.classes.iter().flat_map(|c| &c.flows) {
            match out.iter_mut().find(|(c, _)| *c == f.caller) {
                Some((_, n)) => *n += f.items.len(),
                None => out.push((f.caller.clone(), f.items.len())),
            }
        }
        out
    }

    /// The callers with a request waiting (a caller waiting in two classes twice).
    pub fn callers(&self) -> impl Iterator<Item = &str> {
        self.classes
            .iter()
            .flat_map(|c| &c.flows)
            .map(|f| &*f.caller)
    }

    /// Whether `caller` has a request waiting.
    pub fn has(&self, caller: &str) -> bool {
        self.classes
            .iter()
            .any(|c| c.flows.iter().any(|f| &*f.caller == caller))
    }

    /// Every waiting request.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &T)> {
        self.classes
            .iter()
            .flat_map(|c| &c.flows)
            .flat_map(|f| f.items.iter().map(move |i| (&f.caller, i)))
    }

    /// Take out every waiting request `doomed` picks.
    pub fn drain_where(&mut self, mut doomed: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for c in &mut self.classes {
            for f in &mut c.flows {
                let mut kept = VecDeque::with_capacity(f.items.len());
                for i in f.items.drain(..) {
                    if doomed(&i) {
                        out.push(i);
                    } else {
                        kept.push_back(i);
                    }
                }
                f.items = kept;
            }
            c.flows.retain(|f| !f.items.is_empty());
        }
        self.len -= out.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn order(q: &mut Fair<u32>, n: usize) -> Vec<String> {
        (0..n)
            .filter_map(|_| q.pop(|_, _| true))
            .map(|(c, i)| format!("{c}{i}"))
            .collect()
    }

    #[test]
    fn a_callers_first_request_does_not_wait_behind_anothers_backlog() {
        let mut q = Fair::default();
        let (a, b) = (name("a"), name("b"));
        for i in 0..30 {
            q.push(&a, 1, Priority::Normal, i);
        }
        assert_eq!(order(&mut q, 2), ["a0", "a1"]);
        assert_eq!(
            q.ahead("b", 1, Priority::Normal, |_| usize::MAX),
            1,
            "one of a's first"
        );
        // a at its cap with one place left: only that one may go before b.
        assert_eq!(
            q.ahead("b", 1, Priority::Normal, |c| usize::from(c == "a")),
            1
        );
        assert_eq!(q.ahead("b", 1, Priority::Normal, |_| 0), 0);
        q.push(&b, 1, Priority::Normal, 0);
        assert_eq!(order(&mut q, 3), ["a2", "b0", "a3"]);
        assert_eq!(q.len(), 26);
    }

    #[test]
    fn weights_share_slots_in_proportion_and_order_stays_fifo_per_caller() {
        let mut q = Fair::default();
        let (a, b) = (name("a"), name("b"));
        for i in 0..40 {
            q.push(&a, 3, Priority::Normal, i);
            q.push(&b, 1, Priority::Normal, i);
        }
        let served = order(&mut q, 40);
        let from_a: Vec<&String> = served.iter().filter(|s| s.starts_with('a')).collect();
        assert_eq!(from_a.len(), 30, "{served:?}");
        let expected: Vec<String> = (0..30).map(|i| format!("a{i}")).collect();
        assert_eq!(from_a, expected.iter().collect::<Vec<_>>(), "FIFO within a");
    }

    #[test]
    fn higher_classes_go_first_and_a_lower_one_is_never_starved() {
        let mut q = Fair::default();
        let (h, l) = (name("h"), name("l"));
        for i in 0..3 {
            q.push(&l, 1, Priority::Low, i);
        }
        let mut served = Vec::new();
        // High requests keep arriving: one more for each served.
        for i in 0..12 {
            q.push(&h, 1, Priority::High, i);
            served.push(order(&mut q, 1).remove(0));
        }
        assert_eq!(
            served,
            ["h0", "h1", "h2", "h3", "l0", "h4", "h5", "h6", "h7", "l1", "h8", "h9"],
        );
        // Left: h10, h11 and l2; l2 goes after both (it was passed over once since l1).
        assert_eq!(q.ahead("l", 1, Priority::Low, |_| usize::MAX), 3);
    }

    #[test]
    fn ineligible_callers_are_skipped_and_keep_their_place() {
        let mut q = Fair::default();
        let (a, b) = (name("a"), name("b"));
        for i in 0..3 {
            q.push(&a, 1, Priority::Normal, i);
            q.push(&b, 1, Priority::Normal, i);
        }
        let not_a = |c: &Arc<str>, _: &u32| &**c != "a";
        let served: Vec<String> = (0..2)
            .filter_map(|_| q.pop(not_a))
            .map(|(c, i)| format!("{c}{i}"))
            .collect();
        assert_eq!(served, ["b0", "b1"]);
        // Once eligible, a competes as a caller that starts waiting now: it alternates with
        // b rather than making up for what it missed in a burst.
        assert_eq!(order(&mut q, 4), ["a0", "b2", "a1", "a2"]);
    }

    #[test]
    fn removal_and_draining_keep_the_count() {
        let mut q = Fair::default();
        let a = name("a");
        for i in 0..5 {
            q.push(&a, 1, Priority::High, i);
        }
        assert!(q.remove("a", Priority::High, |i| *i == 2));
        assert!(!q.remove("a", Priority::Low, |i| *i == 3));
        assert_eq!(q.drain_where(|i| *i >= 3), vec![3, 4]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.by_caller(), vec![(a.clone(), 2)]);
        assert_eq!(order(&mut q, 5), ["a0", "a1"]);
        assert!(q.is_empty() && !q.has("a"));
    }
}
