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

    /// The command name of a topic matched by [`Topics::commands`].
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.base.as_str())?.strip_prefix("/cmd/").filter(|n| !n.is_empty() && !n.contains('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
