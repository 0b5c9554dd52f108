//! The spool: health, drift and event messages on disk (sled), in order, until the broker
//! has acknowledged them.
//!
//! Every outgoing report goes through here, online or not, so there is one path and one
//! order: the link publishes from the head and removes a message only when its PUBACK
//! arrives; after a reconnect it starts again from the first unacknowledged one. Delivery
//! is therefore at-least-once, in order; each message carries its `seq` so a console
//! drops the rare duplicate.
//!
//! The spool is bounded in bytes. When a new message would not fit, the oldest are dropped
//! and counted; the link reports the count in an event and in every health message.
//! sled's own background flusher is off (it would wake the process twice a second on an
//! idle device); the link flushes after writes, through `spawn_blocking`.

use std::path::{Path, PathBuf};

/// What a spooled message is; decides its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Health,
    Drift,
    Events,
}

impl Channel {
    fn tag(self) -> u8 {
        match self {
            Channel::Health => b'h',
            Channel::Drift => b'd',
            Channel::Events => b'e',
        }
    }

    fn from_tag(t: u8) -> Option<Channel> {
        match t {
            b'h' => Some(Channel::Health),
            b'd' => Some(Channel::Drift),
            b'e' => Some(Channel::Events),
            _ => None,
        }
    }

    pub fn topic_suffix(self) -> &'static str {
        match self {
            Channel::Health => "health",
            Channel::Drift => "drift",
            Channel::Events => "events",
        }
    }
}

/// One spooled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub channel: Channel,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("opening the spool in {}", .dir.display())]
    Open {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("writing to the spool")]
    Write(#[source] sled::Error),
    #[error("a {size}-byte message cannot fit in a spool of {max} bytes")]
    TooLarge { size: u64, max: u64 },
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    pub seq: u64,
    /// Oldest messages dropped to make room.
    pub dropped: u64,
}

pub struct Spool {
    db: sled::Db,
    outbox: sled::Tree,
    meta: sled::Tree,
    max_bytes: u64,
    bytes: u64,
    len: u64,
    next_seq: u64,
    dropped_total: u64,
    replay_floor: Option<u64>,
    recreated: Option<std::path::PathBuf>,
}

const NEXT_SEQ: &[u8] = b"next_seq";
const DROPPED: &[u8] = b"dropped";
/// Unix seconds when the spool was last recreated after damage (see [`Spool::replay_floor`]).
const REPLAY_FLOOR: &[u8] = b"replay_floor";
/// Fixed cost counted per record besides its payload (key and tag).
const OVERHEAD: u64 = 9;

impl Spool {
    /// Opens (or creates) the spool in `dir`, holding at most `max_bytes` of messages.
    ///
    /// # Errors
    /// [`SpoolError::Open`] when the folder cannot be created or is locked by another process.
    ///
    /// A damaged database (sled reports corruption, or fails while reading it) is moved aside
    /// to `<dir>.corrupt-<unix>` and a fresh one created: the spool holds only telemetry and
    /// the command table, and a device that cannot start is worse than one that lost them.
    /// [`Spool::recreated`] tells where the old one went; [`Spool::replay_floor`] when.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        match Spool::open_once(dir, max_bytes) {
            Err(SpoolError::Open { source, .. }) if crate::cache::is_damaged(&source) => {
                let to = crate::cache::quarantine(dir).map_err(|e| SpoolError::Open { dir: dir.to_path_buf(), source: sled::Error::Io(e) })?;
                tracing::error!(spool = %dir.display(), moved_to = %to.display(), error = %source, "the fleet spool is damaged; moved aside and recreated (queued telemetry and the command table are lost)");
                let mut spool = Spool::open_once(dir, max_bytes)?;
                let now = crate::util::unix_now();
                spool.meta.insert(REPLAY_FLOOR, &now.to_be_bytes()).and_then(|_| spool.db.flush()).map_err(SpoolError::Write)?;
                spool.replay_floor = Some(now);
                spool.recreated = Some(to);
                Ok(spool)
            }
            other => other,
        }
    }

    fn open_once(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let open = || -> Result<Spool, sled::Error> {
            std::fs::create_dir_all(dir)?;
            let db = crate::cache::open_sled(&sled::Config::new().path(dir).cache_capacity(1 << 20).flush_every_ms(None))?;
            let outbox = db.open_tree("outbox")?;
            let meta = db.open_tree("meta")?;
            let mut bytes = 0;
            let mut len = 0;
            let mut last = 0;
            for item in outbox.iter() {
                let (k, v) = item?;
                bytes += OVERHEAD + v.len() as u64 - 1;
                len += 1;
                last = key_seq(&k).unwrap_or(last);
            }
            let stored = meta.get(NEXT_SEQ)?.and_then(|v| key_seq(&v)).unwrap_or(1);
            let dropped_total = meta.get(DROPPED)?.and_then(|v| key_seq(&v)).unwrap_or(0);
            let replay_floor = meta.get(REPLAY_FLOOR)?.and_then(|v| key_seq(&v));
            Ok(Spool { db, outbox, meta, max_bytes, bytes, len, next_seq: stored.max(last + 1), dropped_total, replay_floor, recreated: None })
        };
        open().map_err(|source| SpoolError::Open { dir: dir.to_path_buf(), source })
    }

    /// Where a damaged spool was moved when this one was created in its place.
    pub fn recreated(&self) -> Option<&Path> {
        self.recreated.as_deref()
    }

    /// Unix seconds when the spool (and with it the table of recent command ids) was last
    /// recreated after damage: a signed command issued before then may already have run, and
    /// nothing remembers it, so it is refused.
    pub fn replay_floor(&self) -> Option<u64> {
        self.replay_floor
    }

    /// Appends a message; `payload` gets the sequence number it will carry. Drops the
    /// oldest messages when the new one would not fit.
    ///
    /// # Errors
    /// [`SpoolError::TooLarge`] for a message larger than the whole spool, or a write error.
    pub fn push(&mut self, channel: Channel, payload: impl FnOnce(u64) -> Vec<u8>) -> Result<Pushed, SpoolError> {
        let seq = self.next_seq;
        let body = payload(seq);
        let size = OVERHEAD + body.len() as u64;
        if size > self.max_bytes {
            self.count_dropped(1)?;
            return Err(SpoolError::TooLarge { size, max: self.max_bytes });
        }
        let mut dropped = 0;
        while self.bytes + size > self.max_bytes {
            match self.outbox.pop_min().map_err(SpoolError::Write)? {
                Some((_, v)) => {
                    self.bytes = self.bytes.saturating_sub(OVERHEAD + v.len() as u64 - 1);
                    self.len = self.len.saturating_sub(1);
                    dropped += 1;
                }
                None => break,
            }
        }
        let mut value = Vec::with_capacity(body.len() + 1);
        value.push(channel.tag());
        value.extend_from_slice(&body);
        self.outbox.insert(seq.to_be_bytes(), value).map_err(SpoolError::Write)?;
        self.next_seq = seq + 1;
        self.meta.insert(NEXT_SEQ, &self.next_seq.to_be_bytes()).map_err(SpoolError::Write)?;
        self.bytes += size;
        self.len += 1;
        if dropped > 0 {
            self.count_dropped(dropped)?;
        }
        Ok(Pushed { seq, dropped })
    }

    fn count_dropped(&mut self, n: u64) -> Result<(), SpoolError> {
        self.dropped_total += n;
        self.meta.insert(DROPPED, &self.dropped_total.to_be_bytes()).map_err(SpoolError::Write)?;
        Ok(())
    }

    /// Up to `limit` messages after `after` (from the head when `None`), in order.
    /// Unreadable records are skipped (and logged) rather than blocking the queue.
    pub fn after(&self, after: Option<u64>, limit: usize) -> Vec<Record> {
        let start = after.map_or(0, |s| s.saturating_add(1));
        let mut out = Vec::new();
        for item in self.outbox.range(start.to_be_bytes()..) {
            if out.len() >= limit {
                break;
            }
            match item {
                Ok((k, v)) => match (key_seq(&k), v.first().and_then(|t| Channel::from_tag(*t))) {
                    (Some(seq), Some(channel)) => out.push(Record { seq, channel, payload: v[1..].to_vec() }),
                    _ => tracing::warn!(key = ?k, "skipping an unreadable spool record"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "reading the spool failed");
                    break;
                }
            }
        }
        out
    }

    /// Forgets an acknowledged message.
    ///
    /// # Errors
    /// A write error.
    pub fn remove(&mut self, seq: u64) -> Result<bool, SpoolError> {
        match self.outbox.remove(seq.to_be_bytes()).map_err(SpoolError::Write)? {
            Some(v) => {
                self.bytes = self.bytes.saturating_sub(OVERHEAD + v.len() as u64 - 1);
                self.len = self.len.saturating_sub(1);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes counted against the cap.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Messages dropped to the cap since the spool was created.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// The sequence number the next message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The database, for flushing on a blocking thread and for the command table.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

fn key_seq(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seq: u64, size: usize) -> Vec<u8> {
        let mut v = format!("{seq}:").into_bytes();
        v.resize(size, b'x');
        v
    }

    /// Issue 14 item 10: a garbled spool is moved aside and recreated, not a start-up failure.
    #[test]
    fn a_damaged_spool_is_moved_aside_and_recreated_with_a_replay_floor() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fleet-spool");
        {
            let mut s = Spool::open(&dir, 1 << 20).unwrap();
            s.push(Channel::Health, |seq| body(seq, 20)).unwrap();
            s.db().flush().unwrap();
            assert_eq!((s.recreated(), s.replay_floor()), (None, None));
        }
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::write(&p, vec![0x5A; 8192]).unwrap();
            }
        }
        let s = Spool::open(&dir, 1 << 20).expect("a damaged spool does not stop the daemon");
        let moved = s.recreated().expect("moved aside").to_path_buf();
        assert!(moved.is_dir() && moved.file_name().unwrap().to_string_lossy().starts_with("fleet-spool.corrupt-"), "{}", moved.display());
        assert!(s.is_empty());
        let floor = s.replay_floor().expect("a replay floor");
        drop(s);
        let again = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!((again.recreated(), again.replay_floor()), (None, Some(floor)), "the floor outlives a restart");
    }

    #[test]
    fn messages_come_back_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
            for i in 0..5 {
                let ch = if i % 2 == 0 { Channel::Health } else { Channel::Events };
                assert_eq!(s.push(ch, |seq| body(seq, 20)).unwrap(), Pushed { seq: i + 1, dropped: 0 });
            }
            assert!(s.remove(1).unwrap());
            assert!(!s.remove(1).unwrap(), "removing twice is harmless");
            s.db().flush().unwrap();
        }
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.len(), 4);
        let all = s.after(None, 100);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
        assert_eq!(all[0].channel, Channel::Events);
        assert_eq!(all[0].payload, body(2, 20));
        assert_eq!(s.after(Some(3), 1).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4]);
        // Sequence numbers never go back, even once the spool is empty.
        for seq in 2..=5 {
            s.remove(seq).unwrap();
        }
        assert_eq!(s.push(Channel::Drift, |seq| body(seq, 10)).unwrap().seq, 6);
    }

    #[test]
    fn the_cap_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1000).unwrap();
        let mut dropped = 0;
        for _ in 0..30 {
            dropped += s.push(Channel::Health, |seq| body(seq, 91)).unwrap().dropped;
        }
        // 100 bytes a record: ten fit.
        assert_eq!(s.len(), 10);
        assert!(s.bytes() <= 1000);
        assert_eq!(dropped, 20);
        assert_eq!(s.dropped_total(), 20);
        assert_eq!(s.after(None, 100).iter().map(|r| r.seq).collect::<Vec<_>>(), (21..=30).collect::<Vec<_>>());
        assert!(matches!(s.push(Channel::Health, |seq| body(seq, 5000)), Err(SpoolError::TooLarge { .. })));
        assert_eq!(s.dropped_total(), 21);
        drop(s);
        assert_eq!(Spool::open(dir.path(), 1000).unwrap().dropped_total(), 21, "the count is kept on disk");
    }
}
