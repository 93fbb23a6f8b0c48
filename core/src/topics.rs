//! Kafka topic names, all under one configurable prefix (default `chatify`).

/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "chatify";

/// The topic names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Client commands; key = session id, so one session stays ordered.
    pub fn upstream(&self) -> String {
        format!("{}.upstream", self.prefix)
    }

    /// Upstream records the writer could not process, with the reason.
    pub fn upstream_dlq(&self) -> String {
        format!("{}.upstream.dlq", self.prefix)
    }

    /// Everything gateway `node_id` must push to its connections.
    pub fn push(&self, node_id: &str) -> String {
        format!("{}.push.{node_id}", self.prefix)
    }

    /// Online/offline events.
    pub fn user_events(&self) -> String {
        format!("{}.user-events", self.prefix)
    }

    /// Stored, read, recalled and deleted events.
    pub fn message_events(&self) -> String {
        format!("{}.message-events", self.prefix)
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec() {
        let topics = Topics::default();
        assert_eq!(topics.upstream(), "chatify.upstream");
        assert_eq!(topics.upstream_dlq(), "chatify.upstream.dlq");
        assert_eq!(topics.push("gw-1"), "chatify.push.gw-1");
        assert_eq!(topics.user_events(), "chatify.user-events");
        assert_eq!(
            Topics::new("staging").message_events(),
            "staging.message-events"
        );
    }
}
