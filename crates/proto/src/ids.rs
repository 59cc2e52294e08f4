//! Identifier newtypes shared across services.

use std::fmt;
use std::str::FromStr;

/// A tenant: one customer organisation using Tandem.
///
/// Tenants appear as the last token of every event subject, so the id is restricted to what a
/// NATS subject token can carry safely: 1 to 63 characters of lowercase ASCII letters, digits,
/// `-` and `_`, starting with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

/// Why a string is not a valid [`TenantId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant id {value:?}: {reason}")]
pub struct InvalidTenantId {
    value: String,
    reason: &'static str,
}

impl TenantId {
    /// The longest tenant id accepted.
    pub const MAX_LEN: usize = 63;

    /// Validates and wraps a tenant id.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidTenantId> {
        let value = value.into();
        let reason = if value.is_empty() {
            Some("must not be empty")
        } else if value.len() > Self::MAX_LEN {
            Some("must be at most 63 characters")
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            Some("may contain only lowercase letters, digits, '-' and '_'")
        } else if !value.as_bytes()[0].is_ascii_alphanumeric() {
            Some("must start with a letter or digit")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidTenantId { value, reason }),
            None => Ok(Self(value)),
        }
    }

    /// Returns the id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TenantId {
    type Err = InvalidTenantId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::new(raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_ids() {
        for ok in ["acme", "a", "tenant-1", "t_2", "0abc"] {
            assert!(TenantId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_ids_that_would_break_a_subject() {
        for bad in [
            "",
            "Acme",
            "a.b",
            "a*",
            "a>",
            "a b",
            "-x",
            "_x",
            "租户",
            &"x".repeat(64),
        ] {
            assert!(TenantId::new(bad).is_err(), "{bad}");
        }
    }
}
