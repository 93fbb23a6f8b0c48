//! Open-loop rate control: every send has an intended time fixed in advance by the target
//! rate, whatever the server does; a sender that falls behind sends everything already due
//! at once (coalesced), and latency is measured from the intended time, so a slow server
//! shows up as latency, not as a lower offered rate (no coordinated omission). Also the
//! connect ramp. Pure arithmetic on nanoseconds since the run's origin.

/// The intended times of one sender: `first_ns + k * interval_ns` for k = 0, 1, ...
/// Shard-local (one per sending connection).
#[derive(Debug, Clone)]
pub struct Schedule {
    first_ns: u64,
    interval_ns: u64,
    /// Sends before this time are never due (the end of the load phase).
    end_ns: u64,
    next_k: u64,
}

impl Schedule {
    /// `senders` connections share `rate_per_second`; sender `index` is offset by its share
    /// of one interval, so the aggregate stream is evenly spaced rather than bursty.
    pub fn new(rate_per_second: f64, senders: u64, index: u64, start_ns: u64, end_ns: u64) -> Self {
        let per_sender = rate_per_second / senders.max(1) as f64;
        let interval_ns = if per_sender > 0.0 {
            ((1e9 / per_sender) as u64).max(1)
        } else {
            u64::MAX
        };
        let phase_ns =
            (interval_ns as f64 * (index % senders.max(1)) as f64 / senders.max(1) as f64) as u64;
        Self {
            first_ns: start_ns.saturating_add(phase_ns),
            interval_ns,
            end_ns,
            next_k: 0,
        }
    }

    #[cfg(test)]
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// Intended time of the next send, `None` once past the end.
    pub fn next_due_ns(&self) -> Option<u64> {
        let due = self
            .first_ns
            .saturating_add(self.next_k.saturating_mul(self.interval_ns));
        (due < self.end_ns && self.interval_ns != u64::MAX).then_some(due)
    }

    /// Takes every send due at `now_ns` (at most `max` of them), returning their intended
    /// times oldest first. The rest stay due and come out on the next call.
    pub fn take_due(&mut self, now_ns: u64, max: usize, into: &mut Vec<u64>) {
        while into.len() < max {
            match self.next_due_ns() {
                Some(due) if due <= now_ns => {
                    into.push(due);
                    self.next_k += 1;
                }
                _ => break,
            }
        }
    }

    /// Sends taken so far.
    #[cfg(test)]
    pub fn taken(&self) -> u64 {
        self.next_k
    }
}

/// When connection `index` (0-based, of this process) starts connecting: `rate` connections a
/// second, evenly spaced.
pub fn connect_at_ns(index: u64, connect_rate_per_second: f64) -> u64 {
    if connect_rate_per_second <= 0.0 || !connect_rate_per_second.is_finite() {
        return 0;
    }
    (index as f64 * 1e9 / connect_rate_per_second) as u64
}

/// How long the ramp of `connections` takes at `rate`.
pub fn ramp_ns(connections: u64, connect_rate_per_second: f64) -> u64 {
    connect_at_ns(connections, connect_rate_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_rate_is_split_evenly_and_phased() {
        // 1000/s over 10 senders: 100/s each, 10 ms apart, senders offset by 1 ms.
        let schedules: Vec<Schedule> = (0..10)
            .map(|i| Schedule::new(1000.0, 10, i, 0, 1_000_000_000))
            .collect();
        assert_eq!(schedules[0].interval_ns(), 10_000_000);
        assert_eq!(schedules[0].next_due_ns(), Some(0));
        assert_eq!(schedules[3].next_due_ns(), Some(3_000_000));
        let mut all = Vec::new();
        for mut schedule in schedules {
            schedule.take_due(u64::MAX, usize::MAX, &mut all);
        }
        // Exactly one second's worth, evenly spaced 1 ms apart.
        assert_eq!(all.len(), 1000);
        all.sort_unstable();
        for (k, due) in all.iter().enumerate() {
            assert_eq!(*due, k as u64 * 1_000_000);
        }
    }

    #[test]
    fn a_late_sender_gets_every_missed_send_with_its_intended_time() {
        let mut schedule = Schedule::new(100.0, 1, 0, 1_000, 10_000_000_000);
        let mut due = Vec::new();
        // 55 ms late: sends at 0, 10, 20, 30, 40, 50 ms (+1 µs start) are all due.
        schedule.take_due(1_000 + 55_000_000, usize::MAX, &mut due);
        assert_eq!(
            due,
            vec![
                1_000, 10_001_000, 20_001_000, 30_001_000, 40_001_000, 50_001_000
            ]
        );
        // Capped batches keep the rest due.
        let mut schedule = Schedule::new(100.0, 1, 0, 0, 10_000_000_000);
        let mut first = Vec::new();
        schedule.take_due(55_000_000, 4, &mut first);
        assert_eq!(first.len(), 4);
        let mut second = Vec::new();
        schedule.take_due(55_000_000, 4, &mut second);
        assert_eq!(second, vec![40_000_000, 50_000_000]);
        assert_eq!(schedule.taken(), 6);
    }

    #[test]
    fn nothing_is_due_after_the_end_or_at_zero_rate() {
        let mut schedule = Schedule::new(10.0, 1, 0, 0, 250_000_000);
        let mut due = Vec::new();
        schedule.take_due(u64::MAX, usize::MAX, &mut due);
        assert_eq!(due, vec![0, 100_000_000, 200_000_000]);
        assert_eq!(schedule.next_due_ns(), None);
        let idle = Schedule::new(0.0, 1, 0, 0, u64::MAX);
        assert_eq!(idle.next_due_ns(), None);
    }

    #[test]
    fn connect_ramp_spaces_connections() {
        assert_eq!(connect_at_ns(0, 500.0), 0);
        assert_eq!(connect_at_ns(5, 500.0), 10_000_000);
        assert_eq!(ramp_ns(1000, 500.0), 2_000_000_000);
        assert_eq!(connect_at_ns(7, 0.0), 0, "zero means all at once");
    }
}
