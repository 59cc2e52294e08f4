//! Choosing the agent for a ticket.
//!
//! An agent is eligible when it is online with spare capacity, has every required skill at the
//! minimum level or above, and serves the ticket's language (when both sides state one). Agents
//! who declined or let the ticket's offer expire are passed over while anyone else is eligible.
//! Eligible agents are ranked by the queue's strategy:
//! - least loaded: best skill match (sum of levels in the required skills), then most spare
//!   capacity, then longest idle;
//! - round robin: longest idle first.
//!
//! Ties end on the agent id, so the choice is deterministic.

use chrono::{DateTime, Utc};
use std::cmp::Ordering;

use super::agent::{Skill, SkillRequirement};
use super::queue::Strategy;

/// An agent as the selector sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Agent id.
    pub id: String,
    /// Skills.
    pub skills: Vec<Skill>,
    /// Languages served.
    pub languages: Vec<i32>,
    /// Capacity.
    pub capacity: i32,
    /// Units in use.
    pub load: i32,
    /// Last assignment; `None` = never, the longest idle of all.
    pub last_assigned_at: Option<DateTime<Utc>>,
}

/// What a ticket needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Need<'a> {
    /// Required skills.
    pub skills: &'a [SkillRequirement],
    /// Language (protobuf number); 0 = any.
    pub language: i32,
    /// Agents who turned this ticket down.
    pub declined: &'a [String],
    /// Only this agent may take it (a transfer to a named agent).
    pub only_agent: Option<&'a str>,
    /// Agents who may not take it (the agent transferring it away).
    pub excluded: Option<&'a str>,
}

/// Returns whether `agent` can take a ticket with `need`, ignoring earlier declines.
pub fn is_eligible(agent: &Candidate, need: &Need<'_>) -> bool {
    if agent.load >= agent.capacity {
        return false;
    }
    if need.only_agent.is_some_and(|only| only != agent.id) {
        return false;
    }
    if need.excluded == Some(agent.id.as_str()) {
        return false;
    }
    if need.language > 0 && !agent.languages.is_empty() && !agent.languages.contains(&need.language)
    {
        return false;
    }
    need.skills.iter().all(|req| {
        agent
            .skills
            .iter()
            .any(|s| s.name == req.name && s.level >= req.min_level)
    })
}

fn skill_score(agent: &Candidate, need: &Need<'_>) -> i32 {
    need.skills
        .iter()
        .filter_map(|req| agent.skills.iter().find(|s| s.name == req.name))
        .map(|s| s.level)
        .sum()
}

fn idle_order(a: &Candidate, b: &Candidate) -> Ordering {
    // None (never assigned) is the longest idle.
    match (a.last_assigned_at, b.last_assigned_at) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(x), Some(y)) => x.cmp(&y),
    }
}

/// Returns the eligible candidates, best first. Agents in `need.declined` come only when no
/// one else is eligible.
pub fn rank<'c>(
    candidates: &'c [Candidate],
    need: &Need<'_>,
    strategy: Strategy,
) -> Vec<&'c Candidate> {
    rank_salted(candidates, need, strategy, None)
}

/// A stable pseudo-random key of an agent id under `salt` (FNV-1a, then a 64-bit finaliser).
fn tie_key(salt: u64, id: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64 ^ salt;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// Like [`rank`], but agents that are equally good by the strategy are ordered by a key drawn
/// from `salt` (then by id) instead of by id alone. Concurrent assigners (workers, replicas)
/// that use different salts then spread over equally good agents instead of all reaching for
/// the same one first and queueing on its row.
pub fn rank_salted<'c>(
    candidates: &'c [Candidate],
    need: &Need<'_>,
    strategy: Strategy,
    salt: Option<u64>,
) -> Vec<&'c Candidate> {
    let eligible: Vec<&Candidate> = candidates.iter().filter(|c| is_eligible(c, need)).collect();
    let fresh: Vec<&Candidate> = eligible
        .iter()
        .copied()
        .filter(|c| !need.declined.contains(&c.id))
        .collect();
    let mut ranked = if fresh.is_empty() { eligible } else { fresh };
    ranked.sort_by(|a, b| {
        let by_strategy = match strategy {
            Strategy::LeastLoaded => skill_score(b, need)
                .cmp(&skill_score(a, need))
                .then_with(|| (b.capacity - b.load).cmp(&(a.capacity - a.load)))
                .then_with(|| idle_order(a, b)),
            Strategy::RoundRobin => idle_order(a, b),
        };
        let by_salt = match salt {
            Some(salt) => tie_key(salt, &a.id).cmp(&tie_key(salt, &b.id)),
            None => Ordering::Equal,
        };
        by_strategy.then(by_salt).then_with(|| a.id.cmp(&b.id))
    });
    ranked
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn agent(id: &str, skills: &[(&str, i32)], capacity: i32, load: i32) -> Candidate {
        Candidate {
            id: id.into(),
            skills: skills
                .iter()
                .map(|(n, l)| Skill {
                    name: (*n).into(),
                    level: *l,
                })
                .collect(),
            languages: vec![1],
            capacity,
            load,
            last_assigned_at: None,
        }
    }

    fn req(name: &str, min_level: i32) -> SkillRequirement {
        SkillRequirement {
            name: name.into(),
            min_level,
        }
    }

    #[test]
    fn skills_levels_and_language_decide_eligibility() {
        let none: Vec<String> = Vec::new();
        let skills = [req("billing", 3)];
        let need = Need {
            skills: &skills,
            language: 1,
            declined: &none,
            ..Need::default()
        };
        assert!(is_eligible(&agent("a", &[("billing", 3)], 2, 0), &need));
        assert!(!is_eligible(&agent("b", &[("billing", 2)], 2, 0), &need));
        assert!(!is_eligible(&agent("c", &[("refunds", 9)], 2, 0), &need));
        assert!(
            !is_eligible(&agent("d", &[("billing", 5)], 2, 2), &need),
            "full"
        );
        let mut english = agent("e", &[("billing", 5)], 2, 0);
        english.languages = vec![2];
        assert!(!is_eligible(&english, &need));
    }

    #[test]
    fn least_loaded_prefers_skill_then_spare_capacity_then_idle() {
        let none: Vec<String> = Vec::new();
        let skills = [req("billing", 1)];
        let need = Need {
            skills: &skills,
            declined: &none,
            ..Need::default()
        };
        let mut busy_expert = agent("expert", &[("billing", 9)], 5, 4);
        busy_expert.last_assigned_at = Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        let mut idle = agent("idle", &[("billing", 2)], 5, 1);
        idle.last_assigned_at = Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        let mut recent = agent("recent", &[("billing", 2)], 5, 1);
        recent.last_assigned_at = Some(Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap());
        let loaded = agent("loaded", &[("billing", 2)], 5, 3);
        let all = [loaded, recent, idle, busy_expert];
        let order: Vec<&str> = rank(&all, &need, Strategy::LeastLoaded)
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(order, ["expert", "idle", "recent", "loaded"]);
        let order: Vec<&str> = rank(&all, &need, Strategy::RoundRobin)
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(order, ["loaded", "expert", "idle", "recent"]);
    }

    #[test]
    fn declined_agents_come_back_only_when_nobody_else_can() {
        let declined = vec!["a".to_owned()];
        let need = Need {
            declined: &declined,
            ..Need::default()
        };
        let both = [agent("a", &[], 1, 0), agent("b", &[], 1, 0)];
        let ids: Vec<&str> = rank(&both, &need, Strategy::LeastLoaded)
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["b"]);
        let only_a = [agent("a", &[], 1, 0), agent("b", &[], 1, 1)];
        let ids: Vec<&str> = rank(&only_a, &need, Strategy::LeastLoaded)
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["a"]);
    }

    #[test]
    fn salts_spread_ties_but_never_override_the_strategy() {
        let need = Need::default();
        let mut agents: Vec<Candidate> = (0..20)
            .map(|i| agent(&format!("a{i:02}"), &[], 5, 0))
            .collect();
        agents.push(agent("z-best", &[], 5, 0));
        agents.last_mut().unwrap().capacity = 9;
        let firsts: std::collections::HashSet<String> = (1..=16_u64)
            .map(|salt| {
                let ranked = rank_salted(&agents, &need, Strategy::LeastLoaded, Some(salt));
                assert_eq!(ranked[0].id, "z-best", "most spare capacity still wins");
                assert_eq!(ranked.len(), agents.len());
                ranked[1].id.clone()
            })
            .collect();
        assert!(firsts.len() > 4, "ties spread over agents: {firsts:?}");
        let same = |salt| {
            rank_salted(&agents, &need, Strategy::LeastLoaded, Some(salt))
                .iter()
                .map(|c| c.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(same(7), same(7), "a salt gives one order");
    }
}
