//! The admission clock (region state keeps time on one too): nanoseconds since it started,
//! from the TSC in service (cheap enough to read on every decision) or from tokio's clock in
//! tests (which pause and advance it).

/// Nanoseconds since the admission clock started.
pub enum Clock {
    /// The TSC-backed clock: cheap to read on every decision (raw reading at start).
    Quanta(quanta::Clock, u64),
    /// Tokio's clock, which tests can pause and advance.
    Tokio(tokio::time::Instant),
}

impl Clock {
    pub fn quanta() -> Clock {
        let c = quanta::Clock::new();
        let start = c.raw();
        Clock::Quanta(c, start)
    }

    pub fn tokio() -> Clock {
        Clock::Tokio(tokio::time::Instant::now())
    }

    #[inline]
    pub fn now(&self) -> u64 {
        match self {
            Clock::Quanta(c, start) => c.delta_as_nanos(*start, c.raw()),
            Clock::Tokio(start) => start.elapsed().as_nanos() as u64,
        }
    }
}
