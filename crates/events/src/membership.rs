//! Who is alive in a group of replicas (the health monitors splitting the fleet): each
//! member refreshes its entry in a sorted set scored by its expiry, and reads the live
//! ones, in one atomic script timed by Redis' clock.

use common::config::RedisUrl;
use redis::aio::ConnectionManager;

use crate::{EventsError, REDIS_TIMEOUT, lazy_connection};

/// KEYS[1]: the group. ARGV[1]: this member, ARGV[2]: its time to live (ms).
/// Returns the live members, this one included.
pub const MEMBERSHIP_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// One member of a group; cheap to clone.
#[derive(Clone)]
pub struct Membership {
    connection: ConnectionManager,
    group: String,
    member: String,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("group", &self.group)
            .field("member", &self.member)
            .finish()
    }
}

impl Membership {
    pub fn new(url: &RedisUrl, group: &str, member: &str) -> Result<Self, EventsError> {
        Ok(Self {
            connection: lazy_connection(url)?,
            group: format!("concierge:members:{group}"),
            member: member.to_owned(),
        })
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    /// Refreshes this member for `ttl` and returns the live members, sorted.
    pub async fn beat(&self, ttl: std::time::Duration) -> Result<Vec<String>, EventsError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("EVAL");
        command
            .arg(MEMBERSHIP_SCRIPT)
            .arg(1)
            .arg(&self.group)
            .arg(&self.member)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let call = command.query_async::<Vec<String>>(&mut connection);
        let mut members = tokio::time::timeout(REDIS_TIMEOUT, call)
            .await
            .map_err(|_| EventsError::Script(format!("no answer within {REDIS_TIMEOUT:?}")))?
            .map_err(|e| EventsError::Script(e.to_string()))?;
        members.sort();
        Ok(members)
    }

    /// Leaves the group at once (on a clean shutdown), so that others take over sooner.
    pub async fn leave(&self) {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("ZREM");
        command.arg(&self.group).arg(&self.member);
        let call = command.query_async::<i64>(&mut connection);
        let _ = tokio::time::timeout(REDIS_TIMEOUT, call).await;
    }
}

/// The member that owns `key` among `members`: rendezvous hashing, so that when a member
/// leaves only its own keys move.
pub fn owner<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|member| {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in member.bytes().chain([0]).chain(key.bytes()) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // FNV's low bits mix poorly for short keys; finish with a multiply-xorshift.
            hash ^= hash >> 33;
            hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
            hash ^ (hash >> 33)
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_and_only_a_leavers_keys_move() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let keys: Vec<String> = (0..3000).map(|i| format!("instance-{i}")).collect();
        let mut counts = std::collections::HashMap::new();
        for key in &keys {
            *counts.entry(owner(&three, key).unwrap()).or_insert(0) += 1;
        }
        for member in ["a", "b", "c"] {
            assert!((800..1200).contains(&counts[member]), "{counts:?}");
        }
        let two: Vec<String> = ["a", "c"].map(String::from).to_vec();
        for key in &keys {
            let before = owner(&three, key).unwrap();
            if before != "b" {
                assert_eq!(owner(&two, key), Some(before), "{key} moved needlessly");
            }
        }
        assert_eq!(owner(&[], "x"), None);
    }
}
