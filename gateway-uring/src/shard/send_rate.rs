//! The per-user send rate limit of this gateway node (crosses shards: one instance in
//! [`super::NodeShared`], reached from every shard). A GCRA limiter keyed by user id:
//! `CHATIFY_SEND_RATE_PER_SECOND` sustained, `CHATIFY_SEND_BURST` above it, shared by all of
//! a user's connections on this node. Across nodes the limit is per node.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// How often idle users are dropped from the limiter, in milliseconds. A user whose bucket
/// has refilled is indistinguishable from one never seen, so forgetting them changes no
/// outcome; between sweeps the table holds at most the users that sent in one interval.
pub const SEND_RATE_SWEEP_INTERVAL_MS: u64 = 10_000;

/// Keyed GCRA over `send` frames. `check` takes a read lock on one of the map's shards (a
/// striped lock, held for one compare-and-swap) and allocates only the first time a user is
/// seen since the last sweep.
pub struct SendRateLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<String, DashMapStateStore<String>, C, NoOpMiddleware<C::Instant>>,
}

impl<C: Clock> std::fmt::Debug for SendRateLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendRateLimiter")
            .field("users", &self.limiter.len())
            .finish()
    }
}

impl SendRateLimiter {
    /// `rate_per_second` sustained sends per user, `burst` allowed at once.
    pub fn new(rate_per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self::with_clock(rate_per_second, burst, DefaultClock::default())
    }
}

impl<C: Clock> SendRateLimiter<C> {
    pub fn with_clock(rate_per_second: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
        let quota = Quota::per_second(rate_per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock),
        }
    }

    /// Takes one send from `user_id`'s allowance; `false` means refuse it.
    #[allow(
        clippy::ptr_arg,
        reason = "governor looks keys up by `&K`, and K is `String`"
    )]
    pub fn check(&self, user_id: &String) -> bool {
        self.limiter.check_key(user_id).is_ok()
    }

    /// Forgets users whose allowance has refilled and returns the memory; returns how many
    /// users are still tracked.
    pub fn sweep(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter(rate: u32, burst: u32) -> (SendRateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limiter = SendRateLimiter::with_clock(
            NonZeroU32::new(rate).expect("positive"),
            NonZeroU32::new(burst).expect("positive"),
            clock.clone(),
        );
        (limiter, clock)
    }

    #[test]
    fn the_burst_is_per_user_then_the_rate_refills_it() {
        let (limiter, clock) = limiter(10, 3);
        let alice = "alice".to_owned();
        let bob = "bob".to_owned();
        assert!((0..3).all(|_| limiter.check(&alice)));
        assert!(!limiter.check(&alice));
        // Another user has an allowance of their own.
        assert!((0..3).all(|_| limiter.check(&bob)));
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check(&alice));
        assert!(!limiter.check(&alice));
    }

    #[test]
    fn a_sweep_forgets_idle_users_only() {
        let (limiter, clock) = limiter(10, 3);
        let idle = "idle".to_owned();
        let busy = "busy".to_owned();
        assert!(limiter.check(&idle));
        clock.advance(Duration::from_secs(1));
        assert!((0..3).all(|_| limiter.check(&busy)));
        assert_eq!(limiter.sweep(), 1, "only the user still refilling is kept");
        // The kept user's state survived the sweep.
        assert!(!limiter.check(&busy));
        clock.advance(Duration::from_secs(1));
        assert_eq!(limiter.sweep(), 0);
    }
}
