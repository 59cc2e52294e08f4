//! Settings of the routing service, under `[service]` (env `TANDEM_ROUTING__SERVICE__…`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_platform::config::{ConfigError, Validate, join};

use crate::domain::queue::check_queue_id;
use crate::store::{EtaSettings, PositionUpdates};

/// The most waiting tickets per queue a position round checks.
const MAX_POSITION_SCAN: usize = 10_000;

/// Routing settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Queue of handoffs that name none and whose scenario has none; created on first use.
    pub default_queue: String,
    /// How often offers are expired, overflow applied and queues drained.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How often desk sessions should send heartbeats (told to the client).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals without a heartbeat after which an open session is lost (AWAY).
    pub heartbeats_missed: u32,
    /// How long after its session ended an agent goes OFFLINE, unless a session reopens.
    #[serde(with = "humantime_serde")]
    pub session_grace: Duration,
    /// Consecutive expired offers after which an agent is set AWAY; 0 never.
    pub missed_offers_before_away: u32,
    /// Sliding window of the service rate used for ETAs.
    #[serde(with = "humantime_serde")]
    pub eta_window: Duration,
    /// Seconds per position assumed without history.
    pub default_seconds_per_position: u64,
    /// Minimum time between two statistics reports of one queue.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// How often a desk session reads its offers without being woken (the fallback for a
    /// wake-up lost between replicas).
    #[serde(with = "humantime_serde")]
    pub session_poll_interval: Duration,
    /// Waiting tickets one assignment transaction claims and offers (1 to 256).
    pub offer_batch: usize,
    /// Minimum time between two `HandoffPositionUpdated` of one waiting ticket.
    #[serde(with = "humantime_serde")]
    pub position_update_interval: Duration,
    /// ETA change that is published even when the position stayed the same.
    #[serde(with = "humantime_serde")]
    pub position_eta_delta: Duration,
    /// Waiting tickets per queue (nearest to service first) whose position is checked per round
    /// (1 to 10,000).
    pub position_scan_limit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_queue: "default".into(),
            sweep_interval: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(10),
            heartbeats_missed: 3,
            session_grace: Duration::from_secs(30),
            missed_offers_before_away: 3,
            eta_window: Duration::from_secs(15 * 60),
            default_seconds_per_position: 60,
            stats_interval: Duration::from_secs(5),
            session_poll_interval: Duration::from_secs(2),
            offer_batch: 32,
            position_update_interval: Duration::from_secs(5),
            position_eta_delta: Duration::from_secs(15),
            position_scan_limit: 200,
        }
    }
}

impl Settings {
    /// The ETA part.
    pub fn eta(&self) -> EtaSettings {
        EtaSettings {
            window: self.eta_window,
            default_seconds_per_position: self.default_seconds_per_position,
        }
    }

    /// The position-update part.
    pub fn position_updates(&self) -> PositionUpdates {
        PositionUpdates {
            interval: self.position_update_interval,
            eta_delta: self.position_eta_delta,
            scan_limit: self.position_scan_limit,
        }
    }

    /// How long an open session may stay silent.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.heartbeats_missed.max(1))
    }
}

impl Validate for Settings {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if let Err(error) = check_queue_id("default_queue", &self.default_queue) {
            errors.push(ConfigError::new(
                join(path, "default_queue"),
                error.to_string(),
            ));
        }
        for (key, value) in [
            ("sweep_interval", self.sweep_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("eta_window", self.eta_window),
            ("stats_interval", self.stats_interval),
            ("session_poll_interval", self.session_poll_interval),
            ("position_update_interval", self.position_update_interval),
        ] {
            if value.is_zero() {
                errors.push(ConfigError::new(join(path, key), "must be positive"));
            }
        }
        if self.heartbeats_missed == 0 {
            errors.push(ConfigError::new(
                join(path, "heartbeats_missed"),
                "must be at least 1",
            ));
        }
        if !(1..=crate::store::MAX_OFFER_BATCH).contains(&self.offer_batch) {
            errors.push(ConfigError::new(
                join(path, "offer_batch"),
                format!("must be 1 to {}", crate::store::MAX_OFFER_BATCH),
            ));
        }
        if !(1..=MAX_POSITION_SCAN).contains(&self.position_scan_limit) {
            errors.push(ConfigError::new(
                join(path, "position_scan_limit"),
                format!("must be 1 to {MAX_POSITION_SCAN}"),
            ));
        }
        if self.default_seconds_per_position == 0 {
            errors.push(ConfigError::new(
                join(path, "default_seconds_per_position"),
                "must be positive",
            ));
        }
    }
}
