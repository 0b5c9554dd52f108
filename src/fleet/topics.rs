//! Topic names: a device's own under `<prefix>/<device_id>/`, and the command topics of the
//! groups it belongs to, `<prefix>/group/<group>/cmd/<name>`. README.md, "MQTT topics and
//! payloads", documents each one and its payload.

/// The group every device belongs to: a command on `<prefix>/group/all/cmd/<name>` reaches
/// the whole fleet under the prefix.
pub const ALL: &str = "all";
/// The topic level that holds the groups; no device may take it as its id.
pub const GROUP_LEVEL: &str = "group";

/// Every topic of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
    prefix: String,
    /// The groups whose commands the device obeys, [`ALL`] first.
    groups: Vec<String>,
}

/// Whom a command was published to, as its signature must name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed<'a> {
    pub name: &'a str,
    /// The device id, or `<prefix>/group/<group>` ([`group_target`]); device ids hold no
    /// `/`, so a signature for a group never verifies for a device or the other way round.
    pub target: String,
    /// The group, for a group command.
    pub group: Option<String>,
}

/// What a group command's signature names: `<prefix>/group/<group>`, so it is valid for one
/// group of one fleet.
pub fn group_target(prefix: &str, group: &str) -> String {
    format!("{prefix}/{GROUP_LEVEL}/{group}")
}

/// Where a command to every member of `group` is published.
pub fn group_command(prefix: &str, group: &str, name: &str) -> String {
    format!("{prefix}/{GROUP_LEVEL}/{group}/cmd/{name}")
}

/// Where a command to one device is published.
pub fn device_command(prefix: &str, device_id: &str, name: &str) -> String {
    format!("{prefix}/{device_id}/cmd/{name}")
}

impl Topics {
    /// `groups` are the device's own (from `fleet.groups`); [`ALL`] is added.
    pub fn new(prefix: &str, device_id: &str, groups: &[String]) -> Topics {
        let mut all = vec![ALL.to_string()];
        all.extend(groups.iter().filter(|g| g.as_str() != ALL).cloned());
        Topics { base: format!("{prefix}/{device_id}"), prefix: prefix.to_string(), groups: all }
    }

    /// The groups whose commands this device obeys, [`ALL`] first.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// Retained online/offline state: the birth message, the Last Will, the goodbye.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `health`, `drift` or `events`.
    pub fn channel(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }

    /// The subscriptions for commands: the device's own `cmd/+`, then each group's.
    pub fn commands(&self) -> Vec<String> {
        let mut filters = vec![format!("{}/cmd/+", self.base)];
        filters.extend(self.groups.iter().map(|g| group_command(&self.prefix, g, "+")));
        filters
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

    /// The command name and target of a topic matched by [`Topics::commands`]; `None` for
    /// any other topic, a group this device is not in included.
    pub fn addressed<'a>(&self, topic: &'a str) -> Option<Addressed<'a>> {
        let valid = |n: &&str| !n.is_empty() && !n.contains('/');
        if let Some(name) = topic.strip_prefix(self.base.as_str()).and_then(|r| r.strip_prefix("/cmd/")).filter(valid) {
            let device = &self.base[self.prefix.len() + 1..];
            return Some(Addressed { name, target: device.to_string(), group: None });
        }
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?.strip_prefix(GROUP_LEVEL)?.strip_prefix('/')?;
        let (group, name) = rest.split_once("/cmd/")?;
        let name = Some(name).filter(valid)?;
        let group = self.groups.iter().find(|g| g.as_str() == group)?;
        Some(Addressed { name, target: group_target(&self.prefix, group), group: Some(group.clone()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_devices_own_reply_namespace_takes_replies() {
        let t = Topics::new("fleet/eu", "dev-1", &[]);
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
        let t = Topics::new("fleet/eu", "dev-1", &[]);
        assert_eq!(t.status(), "fleet/eu/dev-1/status");
        assert_eq!(t.channel("health"), "fleet/eu/dev-1/health");
        assert_eq!(t.commands(), vec!["fleet/eu/dev-1/cmd/+", "fleet/eu/group/all/cmd/+"]);
        assert_eq!(t.reply("pin"), "fleet/eu/dev-1/cmd/pin/reply");
        let own = t.addressed("fleet/eu/dev-1/cmd/pin").unwrap();
        assert_eq!((own.name, own.target.as_str(), own.group), ("pin", "dev-1", None));
        for other in ["fleet/eu/dev-1/cmd/pin/reply", "fleet/eu/dev-2/cmd/pin", "fleet/eu/dev-1/cmd/", "fleet/eu/dev-1/status"] {
            assert_eq!(t.addressed(other), None, "{other}");
        }
    }

    #[test]
    fn group_commands_name_their_group_as_target() {
        let t = Topics::new("fleet/eu", "dev-1", &["canary".to_string(), "all".to_string()]);
        assert_eq!(t.groups(), ["all", "canary"], "`all` once, first");
        assert_eq!(t.commands(), vec!["fleet/eu/dev-1/cmd/+", "fleet/eu/group/all/cmd/+", "fleet/eu/group/canary/cmd/+"]);
        let g = t.addressed("fleet/eu/group/canary/cmd/sync").unwrap();
        assert_eq!((g.name, g.target.as_str(), g.group.as_deref()), ("sync", "fleet/eu/group/canary", Some("canary")));
        assert_eq!(g.target, group_target("fleet/eu", "canary"));
        let topic = group_command("fleet/eu", "all", "report");
        let all = t.addressed(&topic).unwrap();
        assert_eq!((all.name, all.group.as_deref()), ("report", Some("all")));
        for other in [
            "fleet/eu/group/beta/cmd/sync",
            "fleet/eu/group/canary/cmd/",
            "fleet/eu/group/canary/cmd/sync/reply",
            "fleet/us/group/canary/cmd/sync",
            "fleet/eu/group/canary/sync",
            "fleet/eugroup/canary/cmd/sync",
        ] {
            assert_eq!(t.addressed(other), None, "{other}");
        }
        assert_eq!(device_command("fleet/eu", "dev-1", "pin"), "fleet/eu/dev-1/cmd/pin");
    }
}
