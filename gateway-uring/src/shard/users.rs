//! The shard's connections by user (shard-local), for pushes addressed to users. A set of
//! the table entry of one connection per user, looked up by that entry's identity's user id
//! (no copy of it): most users have one device online, so that is one pointer per user. The
//! ids of a user's other connections on this shard, when there are any, are in a side map
//! by the id of the user's entry in the set.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use super::{ConnectionTable, LiveConnection};

/// A user's entry, keyed by one of their live connections: hashes and compares as that
/// connection's user id, so the index is looked up by `&str`.
#[derive(Debug)]
struct UserKey(Rc<LiveConnection>);

impl UserKey {
    fn user_id(&self) -> &str {
        self.0.identity.user_id()
    }
}

impl Hash for UserKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Exactly as `str` hashes, as `Borrow<str>` requires.
        self.user_id().hash(state);
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.user_id() == other.user_id()
    }
}

impl Eq for UserKey {}

impl Borrow<str> for UserKey {
    fn borrow(&self) -> &str {
        self.user_id()
    }
}

/// Connections by user id. Every connection in it is also in the shard's table by id.
#[derive(Debug, Default)]
pub(crate) struct UsersIndex {
    /// One connection per user.
    users: HashSet<UserKey>,
    /// A user's other connections, by the id of the user's connection in `users`; only for
    /// users with more than one connection on this shard.
    others: HashMap<u64, Vec<u64>>,
}

impl UsersIndex {
    pub(crate) fn insert(&mut self, live: &Rc<LiveConnection>) {
        match self.users.get(live.identity.user_id()) {
            Some(key) => self
                .others
                .entry(key.0.connection_id)
                .or_default()
                .push(live.connection_id),
            None => {
                self.users.insert(UserKey(Rc::clone(live)));
            }
        }
    }

    /// Takes `live` out. When it was its user's connection in the set, another connection
    /// of the user (looked up in `connections`, the shard's table without `live`) takes
    /// its place.
    pub(crate) fn remove(&mut self, live: &LiveConnection, connections: &ConnectionTable) {
        let Some(key) = self.users.take(live.identity.user_id()) else {
            return;
        };
        let key_id = key.0.connection_id;
        if key_id != live.connection_id {
            self.users.insert(key);
            if let Some(ids) = self.others.get_mut(&key_id) {
                ids.retain(|id| *id != live.connection_id);
                if ids.is_empty() {
                    self.others.remove(&key_id);
                }
            }
            return;
        }
        drop(key);
        let Some(mut ids) = self.others.remove(&key_id) else {
            return;
        };
        while let Some(id) = ids.pop() {
            if let Some(next) = connections.get(&id) {
                self.users.insert(UserKey(Rc::clone(next)));
                if !ids.is_empty() {
                    self.others.insert(id, ids);
                }
                return;
            }
        }
    }

    /// Appends the ids of `user`'s connections on this shard to `targets`.
    pub(crate) fn connections_of(&self, user: &str, targets: &mut Vec<u64>) {
        if let Some(key) = self.users.get(user) {
            targets.push(key.0.connection_id);
            if let Some(ids) = self.others.get(&key.0.connection_id) {
                targets.extend_from_slice(ids);
            }
        }
    }

    #[cfg(test)]
    fn users(&self) -> usize {
        assert!(self.others.len() <= self.users.len());
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::auth::Identity;
    use crate::shard::writer::Framing;
    use crate::shard::{ConnectionIdentity, OutboundQueue};

    fn live(connection_id: u64, user: &str) -> Rc<LiveConnection> {
        Rc::new(LiveConnection {
            connection_id,
            queue: OutboundQueue::new(Framing::WebSocket, 8),
            identity: ConnectionIdentity::new(&Identity {
                user_id: user.to_owned(),
                device_id: format!("device-{connection_id}"),
                jti: format!("token-{connection_id}"),
                expires_at: 0,
            }),
            connected_at_ms: 0,
            push_binary: Cell::new(false),
            last_active_ms: Cell::new(0),
            heartbeat_expired: Cell::new(false),
            reader_in_flight: Cell::new(0),
        })
    }

    /// A shard table and its index, changed together as `Shard` does.
    #[derive(Default)]
    struct Tables {
        connections: ConnectionTable,
        users: UsersIndex,
    }

    impl Tables {
        fn add(&mut self, connection_id: u64, user: &str) {
            let live = live(connection_id, user);
            self.users.insert(&live);
            self.connections.insert(live);
        }

        fn drop_connection(&mut self, connection_id: u64) {
            let live = self.connections.remove(&connection_id).expect("live");
            self.users.remove(&live, &self.connections);
        }

        fn of(&self, user: &str) -> Vec<u64> {
            let mut ids = Vec::new();
            self.users.connections_of(user, &mut ids);
            ids.sort_unstable();
            ids
        }
    }

    #[test]
    fn a_user_is_found_by_id_through_any_of_their_connections() {
        let mut tables = Tables::default();
        tables.add(1, "alice");
        tables.add(2, "bob");
        tables.add(3, "alice");
        tables.add(4, "alice");
        assert_eq!(tables.of("alice"), [1, 3, 4]);
        assert_eq!(tables.of("bob"), [2]);
        assert_eq!(tables.of("carol"), Vec::<u64>::new());

        // The key's connection leaves: another of the user's connections becomes the key.
        tables.drop_connection(1);
        assert_eq!(tables.of("alice"), [3, 4]);
        tables.drop_connection(4);
        assert_eq!(tables.of("alice"), [3]);
        tables.add(5, "alice");
        assert_eq!(tables.of("alice"), [3, 5]);
        // A connection that is not the key leaves.
        tables.drop_connection(5);
        assert_eq!(tables.of("alice"), [3]);
        tables.drop_connection(3);
        assert_eq!(tables.of("alice"), Vec::<u64>::new());
        assert_eq!(tables.of("bob"), [2]);
        tables.drop_connection(2);
        assert_eq!(tables.users.users(), 0);
    }
}
