//! Topic names under `<prefix>/<device_id>/`. README.md, "MQTT topics and payloads",
//! documents each one and its payload.

/// Every topic of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, device_id: &str) -> Topics {
        Topics { base: format!("{prefix}/{device_id}") }
    }

    /// Retained online/offline state: the birth message, the Last Will, the goodbye.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `health`, `drift` or `events`.
    pub fn channel(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }

    /// The subscription for commands: `cmd/<name>`.
    pub fn commands(&self) -> String {
        format!("{}/cmd/+", self.base)
    }

    /// Where replies go when the command names no MQTT 5 response topic.
    pub fn reply(&self, name: &str) -> String {
        format!("{}/cmd/{name}/reply", self.base)
    }

    /// Whether an MQTT 5 response topic lies in this device's reply namespace: its default
    /// reply topics (`cmd/<name>/reply`) or anything under `reply/` (a console picks its own
    /// level there, e.g. `reply/<console-id>`). Anything else (another device's topics, this
    /// device's `status` or `cmd/<name>`, a topic outside the prefix) is not ours to publish on.
    pub fn is_reply(&self, topic: &str) -> bool {
        let Some(rest) = topic.strip_prefix(self.base.as_str()).and_then(|r| r.strip_prefix('/')) else { return false };
        if topic.len() > 512 || topic.contains(['+', '#', '\0']) || rest.split('/').any(str::is_empty) {
            return false;
        }
        match rest.split_once('/') {
            Some(("reply", _)) => true,
            Some(("cmd", tail)) => tail.split_once('/').is_some_and(|(name, r)| !name.is_empty() && r == "reply"),
            _ => false,
        }
    }

    /// The command name of a topic matched by [`Topics::commands`].
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.base.as_str())?.strip_prefix("/cmd/").filter(|n| !n.is_empty() && !n.contains('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_devices_own_reply_namespace_takes_replies() {
        let t = Topics::new("fleet/eu", "dev-1");
        for ok in ["fleet/eu/dev-1/reply/console-7", "fleet/eu/dev-1/reply/a/b", "fleet/eu/dev-1/cmd/pin/reply"] {
            assert!(t.is_reply(ok), "{ok}");
        }
        for bad in [
            "fleet/eu/dev-2/reply/console-7",
            "fleet/eu/dev-1/status",
            "fleet/eu/dev-1/health",
            "fleet/eu/dev-1/cmd/rollback",
            "fleet/eu/dev-1/cmd//reply",
            "fleet/eu/dev-1/reply",
            "fleet/eu/dev-1/reply/",
            "fleet/eu/dev-1/reply//x",
            "fleet/eu/dev-10/reply/x",
            "console/replies/dev-1",
            "fleet/eu/dev-1/reply/+",
        ] {
            assert!(!t.is_reply(bad), "{bad}");
        }
    }

    #[test]
    fn topics_are_under_the_prefix_and_device() {
        let t = Topics::new("fleet/eu", "dev-1");
        assert_eq!(t.status(), "fleet/eu/dev-1/status");
        assert_eq!(t.channel("health"), "fleet/eu/dev-1/health");
        assert_eq!(t.commands(), "fleet/eu/dev-1/cmd/+");
        assert_eq!(t.reply("pin"), "fleet/eu/dev-1/cmd/pin/reply");
        assert_eq!(t.command_name("fleet/eu/dev-1/cmd/pin"), Some("pin"));
        assert_eq!(t.command_name("fleet/eu/dev-1/cmd/pin/reply"), None);
        assert_eq!(t.command_name("fleet/eu/dev-2/cmd/pin"), None);
        assert_eq!(t.command_name("fleet/eu/dev-1/cmd/"), None);
    }
}
