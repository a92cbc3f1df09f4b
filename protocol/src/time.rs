//! Time as the wire, the store and the API count it: milliseconds since the Unix epoch, in one
//! type instead of a conversion written out at every use. Conversions saturate: a clock before
//! 1970 reads as 0, one past what an `i64` holds as `i64::MAX`.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// The system clock now.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        UnixMillis(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0),
        )
    }

    /// As a `SystemTime` (a negative count is the epoch).
    pub fn to_system(self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(self.0).unwrap_or(0))
    }

    pub fn as_i64(self) -> i64 {
        self.0
    }

    /// Never negative, for fields counted in `u64`.
    pub fn as_u64(self) -> u64 {
        u64::try_from(self.0).unwrap_or(0)
    }

    /// Whole seconds since the epoch.
    pub fn as_secs(self) -> u64 {
        self.as_u64() / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_and_saturate() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_765_000_000_123);
        let m = UnixMillis::from_system(t);
        assert_eq!(m, UnixMillis(1_765_000_000_123));
        assert_eq!(m.to_system(), t);
        assert_eq!(m.as_secs(), 1_765_000_000);
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(UnixMillis::from_system(before), UnixMillis(0));
        assert_eq!(UnixMillis(-7).to_system(), SystemTime::UNIX_EPOCH);
        assert_eq!(UnixMillis(-7).as_u64(), 0);
        assert!(UnixMillis::now() > m);
    }
}
