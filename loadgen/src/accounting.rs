//! Correctness accounting of the chat scenarios: every client (one user, whatever socket it
//! is on now) keeps, per session, the set of seqs it has seen (its own acks, deliveries,
//! sync pages). A seq pushed twice (two acks, two deliveries, or an ack and a delivery) is
//! a duplicate: the server sent it twice. A seq that came both pushed and in a catch-up
//! `sync` page is a resync overlap, not a duplicate: the sync asked for it (a message
//! stored while the client was away can be delivered to its new connection as well as
//! returned by the sync that follows the reconnect). At the end the
//! views are merged: an acked message that a member of its session never saw is lost, a
//! hole between the lowest and highest seq a client saw is a gap. Shard-local while the run
//! goes; merged once in the process that holds all members of each session.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// A set of seqs as a bitmap from the lowest seq seen (seqs of one session are dense).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqSet {
    base: u64,
    words: Vec<u64>,
    len: u64,
    max: u64,
}

impl SeqSet {
    /// Adds `seq`; `false` if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.len == 0 {
            self.base = seq & !63;
            self.words.clear();
        } else if seq < self.base {
            // Rebase downwards: shift the bitmap by whole words.
            let new_base = seq & !63;
            let shift_words = ((self.base - new_base) / 64) as usize;
            let mut words = vec![0u64; shift_words];
            words.append(&mut self.words);
            self.words = words;
            self.base = new_base;
        }
        let offset = seq - self.base;
        let word = (offset / 64) as usize;
        let bit = 1u64 << (offset % 64);
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & bit != 0 {
            return false;
        }
        self.words[word] |= bit;
        self.max = if self.len == 0 {
            seq
        } else {
            self.max.max(seq)
        };
        self.len += 1;
        true
    }

    pub fn contains(&self, seq: u64) -> bool {
        if self.len == 0 || seq < self.base {
            return false;
        }
        let offset = seq - self.base;
        self.words
            .get((offset / 64) as usize)
            .is_some_and(|word| word & (1u64 << (offset % 64)) != 0)
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn min(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        self.words
            .iter()
            .enumerate()
            .find(|(_, word)| **word != 0)
            .map(|(index, word)| self.base + index as u64 * 64 + u64::from(word.trailing_zeros()))
    }

    pub fn max(&self) -> Option<u64> {
        (self.len > 0).then_some(self.max)
    }

    /// Seqs missing between the lowest and the highest seen.
    pub fn holes(&self) -> u64 {
        match self.min() {
            Some(min) => self.max - min + 1 - self.len,
            None => 0,
        }
    }
}

/// What one client saw of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionView {
    /// Every seq seen, however it came.
    pub seen: SeqSet,
    /// Seqs the server pushed (acks and deliveries); a second push is a duplicate.
    pub pushed: SeqSet,
    /// Seqs that came in a `sync` page.
    pub synced: SeqSet,
    /// Seqs of this client's own acked messages.
    pub acked: Vec<u64>,
    pub duplicates: u64,
    /// Seqs that came both pushed and in a sync page (either order), once each.
    pub resync_overlap: u64,
}

impl SessionView {
    /// A pushed seq (ack or delivery); `false` when the server had pushed it before.
    fn on_pushed(&mut self, seq: u64) -> bool {
        if !self.pushed.insert(seq) {
            self.duplicates += 1;
            return false;
        }
        if self.synced.contains(seq) {
            self.resync_overlap += 1;
        }
        self.seen.insert(seq);
        true
    }
}

/// Everything one client saw, by session id. Lives with the client across reconnects.
#[derive(Debug, Clone, Default)]
pub struct ClientView {
    pub sessions: HashMap<String, SessionView>,
}

impl ClientView {
    fn session(&mut self, session_id: &str) -> &mut SessionView {
        if !self.sessions.contains_key(session_id) {
            self.sessions
                .insert(session_id.to_owned(), SessionView::default());
        }
        self.sessions
            .get_mut(session_id)
            .expect("inserted just above")
    }

    /// An `ack` of this client's own send.
    pub fn on_ack(&mut self, session_id: &str, seq: u64) {
        let view = self.session(session_id);
        if view.on_pushed(seq) {
            view.acked.push(seq);
        }
    }

    /// A `deliver`. `false` when it is a duplicate (pushed before).
    pub fn on_message(&mut self, session_id: &str, seq: u64) -> bool {
        self.session(session_id).on_pushed(seq)
    }

    /// A message of a `sync` page: asked for, so never a duplicate; one that was also
    /// pushed counts as a resync overlap.
    pub fn on_resync(&mut self, session_id: &str, seq: u64) {
        let view = self.session(session_id);
        if view.synced.insert(seq) && view.pushed.contains(seq) {
            view.resync_overlap += 1;
        }
        view.seen.insert(seq);
    }

    /// Highest seq seen in a session (the `after_seq` of a catch-up sync).
    pub fn last_seq(&self, session_id: &str) -> u64 {
        self.sessions
            .get(session_id)
            .and_then(|view| view.seen.max())
            .unwrap_or(0)
    }
}

/// The correctness verdict of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Messages acked to their senders.
    pub acked: u64,
    /// Deliveries expected: each acked message times the other members of its session.
    pub deliveries_expected: u64,
    /// (acked message, member) pairs the member never saw by the end of the grace period.
    pub lost: u64,
    /// Seqs the server pushed twice to a client (two deliveries, two acks, or both).
    pub duplicates: u64,
    /// Seqs a client got both pushed and in a catch-up `sync` page: expected around a
    /// reconnect, not a duplicate.
    #[serde(default)]
    pub resync_overlap: u64,
    /// Holes in the seqs a client saw of a session, summed over clients and sessions.
    pub seq_gaps: u64,
    /// Sessions with at least one lost message, up to a few, for a first look.
    pub lossy_sessions: Vec<String>,
}

/// Most session ids listed in [`Verdict::lossy_sessions`].
const LOSSY_SESSIONS_LISTED_MAX: usize = 10;

/// Merges the views of every client: `members` maps each session to the clients (indices
/// into `views`) that belong to it.
pub fn verdict(views: &[ClientView], members: &BTreeMap<String, Vec<usize>>) -> Verdict {
    let mut verdict = Verdict::default();
    for view in views {
        for session in view.sessions.values() {
            verdict.duplicates += session.duplicates;
            verdict.resync_overlap += session.resync_overlap;
            verdict.seq_gaps += session.seen.holes();
        }
    }
    for (session_id, member_indices) in members {
        let mut session_lost = 0;
        for &sender in member_indices {
            let Some(sent) = views
                .get(sender)
                .and_then(|view| view.sessions.get(session_id))
            else {
                continue;
            };
            verdict.acked += sent.acked.len() as u64;
            for &receiver in member_indices {
                if receiver == sender {
                    continue;
                }
                verdict.deliveries_expected += sent.acked.len() as u64;
                let seen = views
                    .get(receiver)
                    .and_then(|view| view.sessions.get(session_id));
                let missing = match seen {
                    Some(seen) => sent
                        .acked
                        .iter()
                        .filter(|&&seq| !seen.seen.contains(seq))
                        .count() as u64,
                    None => sent.acked.len() as u64,
                };
                session_lost += missing;
            }
        }
        if session_lost > 0 && verdict.lossy_sessions.len() < LOSSY_SESSIONS_LISTED_MAX {
            verdict.lossy_sessions.push(session_id.clone());
        }
        verdict.lost += session_lost;
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_set_tracks_membership_holes_and_rebases() {
        let mut set = SeqSet::default();
        assert!(set.insert(100));
        assert!(set.insert(103));
        assert!(!set.insert(100));
        assert_eq!(set.holes(), 2);
        assert!(set.insert(5));
        assert_eq!(set.min(), Some(5));
        assert_eq!(set.max(), Some(103));
        assert!(set.contains(5) && set.contains(103) && !set.contains(6));
        assert_eq!(set.holes(), 103 - 5 + 1 - 3);
        for seq in 5..=103 {
            set.insert(seq);
        }
        assert_eq!(set.holes(), 0);
        assert_eq!(set.len(), 99);
    }

    /// Two clients in p2p:a:b, each sending 3 messages: seqs 1..=6 interleaved.
    fn pair() -> (Vec<ClientView>, BTreeMap<String, Vec<usize>>) {
        let session = "p2p:a:b";
        let mut a = ClientView::default();
        let mut b = ClientView::default();
        for seq in 1..=6 {
            if seq % 2 == 1 {
                a.on_ack(session, seq);
                b.on_message(session, seq);
            } else {
                b.on_ack(session, seq);
                a.on_message(session, seq);
            }
        }
        let members = BTreeMap::from([(session.to_owned(), vec![0, 1])]);
        (vec![a, b], members)
    }

    #[test]
    fn a_clean_run_has_no_loss_duplicate_or_gap() {
        let (views, members) = pair();
        assert_eq!(
            verdict(&views, &members),
            Verdict {
                acked: 6,
                deliveries_expected: 6,
                ..Verdict::default()
            }
        );
    }

    #[test]
    fn an_acked_message_never_delivered_is_lost_and_leaves_a_gap() {
        let session = "p2p:a:b";
        let (mut views, members) = pair();
        // b never got a's seq 3: rebuild b's view without it.
        let mut b = ClientView::default();
        for seq in [1, 5] {
            b.on_message(session, seq);
        }
        for seq in [2, 4, 6] {
            b.on_ack(session, seq);
        }
        views[1] = b;
        let result = verdict(&views, &members);
        assert_eq!(result.lost, 1);
        assert_eq!(result.seq_gaps, 1);
        assert_eq!(result.duplicates, 0);
        assert_eq!(result.lossy_sessions, vec![session.to_owned()]);
    }

    #[test]
    fn a_second_delivery_is_a_duplicate_but_a_resync_is_not() {
        let session = "p2p:a:b";
        let (mut views, members) = pair();
        assert!(!views[1].on_message(session, 3));
        views[1].on_resync(session, 5);
        let result = verdict(&views, &members);
        assert_eq!(result.duplicates, 1);
        assert_eq!(result.resync_overlap, 1);
        assert_eq!(result.lost, 0);
    }

    #[test]
    fn a_delivery_after_the_sync_that_returned_it_is_an_overlap_not_a_duplicate() {
        let session = "p2p:a:b";
        let mut views = vec![ClientView::default(), ClientView::default()];
        for seq in 1..=4 {
            views[0].on_ack(session, seq);
        }
        // b saw 1 live, dropped, synced 2..=4 after reconnecting, then the live deliveries
        // of 3 and 4 reached its new connection as well.
        views[1].on_message(session, 1);
        for seq in 2..=4 {
            views[1].on_resync(session, seq);
        }
        assert!(views[1].on_message(session, 3));
        assert!(views[1].on_message(session, 4));
        let members = BTreeMap::from([(session.to_owned(), vec![0, 1])]);
        let result = verdict(&views, &members);
        assert_eq!(
            (result.duplicates, result.resync_overlap, result.lost),
            (0, 2, 0)
        );
        // A second push of 4 is still a duplicate.
        assert!(!views[1].on_message(session, 4));
        assert_eq!(verdict(&views, &members).duplicates, 1);
    }

    #[test]
    fn group_loss_counts_each_member_that_missed_a_message() {
        let session = "grp:g1";
        let mut views = vec![ClientView::default(); 4];
        // Member 0 sends seqs 1..=10; member 3 misses 4 and 9, member 2 has no view at all.
        for seq in 1..=10 {
            views[0].on_ack(session, seq);
            views[1].on_message(session, seq);
            if seq != 4 && seq != 9 {
                views[3].on_message(session, seq);
            }
        }
        let members = BTreeMap::from([(session.to_owned(), vec![0, 1, 2, 3])]);
        let result = verdict(&views, &members);
        assert_eq!(result.acked, 10);
        assert_eq!(result.deliveries_expected, 30);
        assert_eq!(result.lost, 10 + 2);
        assert_eq!(result.seq_gaps, 2);
    }

    #[test]
    fn catch_up_after_a_drop_fills_the_holes() {
        let session = "p2p:a:b";
        let mut a = ClientView::default();
        let mut b = ClientView::default();
        for seq in 1..=10 {
            a.on_ack(session, seq);
            // b is offline for 4..=7 and syncs from its last seq afterwards.
            if !(4..=7).contains(&seq) {
                b.on_message(session, seq);
            }
        }
        assert_eq!(b.last_seq(session), 10);
        let members = BTreeMap::from([(session.to_owned(), vec![0, 1])]);
        let views = vec![a.clone(), b.clone()];
        assert_eq!(verdict(&views, &members).lost, 4);
        for seq in 4..=10 {
            b.on_resync(session, seq);
        }
        let views = vec![a, b];
        let result = verdict(&views, &members);
        assert_eq!((result.lost, result.seq_gaps, result.duplicates), (0, 0, 0));
    }
}
