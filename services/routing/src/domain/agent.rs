//! Agents: profile, skills with levels, languages, capacity and presence.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{check_id, check_len};
use crate::error::{RoutingError, invalid};

/// The most conversations one agent may hold at once.
pub const MAX_CAPACITY: i32 = 50;
/// Skill levels run from 1 to this.
pub const MAX_SKILL_LEVEL: i32 = 10;
/// The most skills one agent may list.
pub const MAX_SKILLS: usize = 50;

/// Whether an agent takes new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Receives offers.
    Online,
    /// Keeps current conversations, receives no offers.
    Away,
    /// Signed out.
    Offline,
}

impl Presence {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Away => "away",
            Presence::Offline => "offline",
        }
    }

    /// Parses the stored form.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "online" => Some(Presence::Online),
            "away" => Some(Presence::Away),
            "offline" => Some(Presence::Offline),
            _ => None,
        }
    }
}

/// A named proficiency (`billing:3`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skill {
    /// Lower-case name, at most 64 characters.
    pub name: String,
    /// 1..=10.
    pub level: i32,
}

/// A skill a ticket needs, with the minimum level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillRequirement {
    /// Skill name.
    pub name: String,
    /// Minimum level, 1..=10.
    pub min_level: i32,
}

/// What a supervisor sets about an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentProfile {
    /// The agent's token subject.
    pub id: String,
    /// Shown to customers and colleagues.
    pub display_name: String,
    /// Team name, may be empty.
    pub team: String,
    /// Skills with levels.
    pub skills: Vec<Skill>,
    /// Languages served (protobuf `Language` numbers).
    pub languages: Vec<i32>,
    /// Maximum concurrent conversations, 1..=50.
    pub capacity: i32,
}

/// An agent as routing keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    /// The profile.
    pub profile: AgentProfile,
    /// Current presence.
    pub presence: Presence,
    /// Capacity units in use: pending offers plus active assignments.
    pub load: i32,
    /// Active assignments.
    pub assigned: i32,
    /// Last assignment.
    pub last_assigned_at: Option<DateTime<Utc>>,
    /// Last heartbeat of the desk session.
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Registration.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Checks a skill or requirement name: lower case, 1 to 64 characters, no spaces.
pub fn check_skill_name(field: &str, name: &str) -> Result<(), RoutingError> {
    if name.is_empty() {
        return Err(invalid(format!("{field} is empty")));
    }
    check_len(field, name, 64)?;
    if name
        .chars()
        .any(|c| c.is_uppercase() || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "{field} {name:?} must be lower case without spaces"
        )));
    }
    Ok(())
}

/// Checks a skill level or minimum level.
pub fn check_level(field: &str, level: i32) -> Result<(), RoutingError> {
    if !(1..=MAX_SKILL_LEVEL).contains(&level) {
        return Err(invalid(format!(
            "{field} is {level}, must be 1..={MAX_SKILL_LEVEL}"
        )));
    }
    Ok(())
}

/// Checks a capacity.
pub fn check_capacity(capacity: i32) -> Result<(), RoutingError> {
    if !(1..=MAX_CAPACITY).contains(&capacity) {
        return Err(invalid(format!(
            "agent.max_concurrent is {capacity}, must be 1..={MAX_CAPACITY}"
        )));
    }
    Ok(())
}

impl AgentProfile {
    /// Checks every field; the first problem is reported.
    pub fn validate(&self) -> Result<(), RoutingError> {
        check_id("agent.id", &self.id)?;
        check_len("agent.display_name", &self.display_name, 200)?;
        check_len("agent.team", &self.team, 64)?;
        if self.skills.len() > MAX_SKILLS {
            return Err(invalid(format!(
                "agent.skills has {} entries, at most {MAX_SKILLS}",
                self.skills.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, skill) in self.skills.iter().enumerate() {
            check_skill_name(&format!("agent.skills[{i}].name"), &skill.name)?;
            check_level(&format!("agent.skills[{i}].level"), skill.level)?;
            if !seen.insert(skill.name.as_str()) {
                return Err(invalid(format!(
                    "agent.skills lists {:?} twice",
                    skill.name
                )));
            }
        }
        for (i, language) in self.languages.iter().enumerate() {
            if *language <= 0 {
                return Err(invalid(format!("agent.languages[{i}] is unspecified")));
            }
        }
        check_capacity(self.capacity)
    }

    /// Returns the agent's level in `skill`, if it has it.
    pub fn level(&self, skill: &str) -> Option<i32> {
        self.skills
            .iter()
            .find(|s| s.name == skill)
            .map(|s| s.level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> AgentProfile {
        AgentProfile {
            id: "a1".into(),
            display_name: "Ann".into(),
            team: "billing".into(),
            skills: vec![Skill {
                name: "billing".into(),
                level: 3,
            }],
            languages: vec![1],
            capacity: 3,
        }
    }

    #[test]
    fn accepts_a_sound_profile() {
        assert!(profile().validate().is_ok());
        assert_eq!(profile().level("billing"), Some(3));
        assert_eq!(profile().level("refunds"), None);
    }

    #[test]
    fn rejects_capacity_and_levels_out_of_range() {
        for capacity in [0, 51, -1] {
            let p = AgentProfile {
                capacity,
                ..profile()
            };
            assert!(matches!(
                p.validate(),
                Err(RoutingError::InvalidArgument(_))
            ));
        }
        for level in [0, 11] {
            let mut p = profile();
            p.skills[0].level = level;
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains("level"), "{err}");
        }
        let mut p = profile();
        p.skills.push(p.skills[0].clone());
        assert!(p.validate().is_err(), "duplicate skill");
        let mut p = profile();
        p.skills[0].name = "Billing".into();
        assert!(p.validate().is_err(), "upper case");
        assert!(
            AgentProfile {
                id: String::new(),
                ..profile()
            }
            .validate()
            .is_err()
        );
    }
}
