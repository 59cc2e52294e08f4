//! Scenario documents: the YAML and JSON formats of `ImportScenarios` and `ExportScenarios`.
//!
//! Both are the protobuf JSON mapping of `Scenario` under a top-level `scenarios` list; parsing
//! accepts the proto field names (`min_intent_confidence`) and their lowerCamelCase JSON names,
//! enum value names and `"300s"` durations, as the mapping specifies. Export writes proto field
//! names and leaves out fields the server owns (version, pin and timestamps), so an export of one
//! tenant imports cleanly into another. Each scenario is parsed on its own, so one document
//! reports every malformed scenario at once.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tandem_policy_client::violation;
use tandem_proto::pb::common::v1::ValidationError;
use tandem_proto::pb::policy::v1 as pb;

/// Largest document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Most scenarios in one document.
pub const MAX_DOCUMENT_SCENARIOS: usize = 500;

static SCENARIO: LazyLock<Option<MessageDescriptor>> = LazyLock::new(|| {
    DescriptorPool::decode(tandem_proto::FILE_DESCRIPTOR_SET)
        .ok()?
        .get_message_by_name("tandem.policy.v1.Scenario")
});

fn descriptor() -> Result<&'static MessageDescriptor, ValidationError> {
    SCENARIO
        .as_ref()
        .ok_or_else(|| violation("format", "the scenario schema is not available"))
}

/// A document format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

impl Format {
    /// Converts the wire format; `None` for unspecified or unknown values.
    pub fn from_wire(value: i32) -> Option<Self> {
        match pb::ScenarioFormat::try_from(value).ok()? {
            pb::ScenarioFormat::Yaml => Some(Self::Yaml),
            pb::ScenarioFormat::Json => Some(Self::Json),
            pb::ScenarioFormat::Unspecified => None,
        }
    }
}

/// Parses a document into scenarios, reporting every problem found.
pub fn parse(format: Format, content: &str) -> Result<Vec<pb::Scenario>, Vec<ValidationError>> {
    if content.len() > MAX_DOCUMENT_BYTES {
        return Err(vec![violation(
            "content",
            format!("is {} bytes, more than {MAX_DOCUMENT_BYTES}", content.len()),
        )]);
    }
    let value: serde_json::Value = match format {
        Format::Json => serde_json::from_str(content)
            .map_err(|e| vec![violation("content", format!("is not valid JSON: {e}"))])?,
        Format::Yaml => serde_yaml_ng::from_str(content)
            .map_err(|e| vec![violation("content", format!("is not valid YAML: {e}"))])?,
    };
    let serde_json::Value::Object(mut top) = value else {
        return Err(vec![violation(
            "content",
            "must be a mapping with a `scenarios` list",
        )]);
    };
    let mut errors = Vec::new();
    for key in top.keys() {
        if key != "scenarios" {
            errors.push(violation(
                key.clone(),
                "unknown top-level field; expected `scenarios`",
            ));
        }
    }
    let items = match top.remove("scenarios") {
        Some(serde_json::Value::Array(items)) => items,
        Some(_) => {
            errors.push(violation("scenarios", "must be a list"));
            Vec::new()
        }
        None => {
            errors.push(violation("scenarios", "is missing"));
            Vec::new()
        }
    };
    if items.len() > MAX_DOCUMENT_SCENARIOS {
        errors.push(violation(
            "scenarios",
            format!(
                "has {} entries, more than {MAX_DOCUMENT_SCENARIOS}",
                items.len()
            ),
        ));
        return Err(errors);
    }
    let desc = descriptor().map_err(|e| vec![e])?;
    let mut scenarios = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match DynamicMessage::deserialize(desc.clone(), item) {
            Ok(message) => match message.transcode_to::<pb::Scenario>() {
                Ok(s) => scenarios.push(strip_server_fields(s)),
                Err(e) => errors.push(violation(format!("scenarios[{i}]"), e.to_string())),
            },
            Err(e) => errors.push(violation(format!("scenarios[{i}]"), e.to_string())),
        }
    }
    if errors.is_empty() {
        Ok(scenarios)
    } else {
        Err(errors)
    }
}

/// Clears the fields the server owns.
pub fn strip_server_fields(mut s: pb::Scenario) -> pb::Scenario {
    s.version = 0;
    s.pinned = false;
    s.pinned_by.clear();
    s.pinned_reason.clear();
    s.created_at = None;
    s.updated_at = None;
    s
}

/// Renders scenarios as a document.
pub fn render(format: Format, scenarios: &[pb::Scenario]) -> Result<String, String> {
    let desc = descriptor().map_err(|e| e.message)?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    let mut items = Vec::with_capacity(scenarios.len());
    for s in scenarios {
        let mut message = DynamicMessage::new(desc.clone());
        message
            .transcode_from(&strip_server_fields(s.clone()))
            .map_err(|e| e.to_string())?;
        let value = message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| e.to_string())?;
        items.push(value);
    }
    let doc = serde_json::json!({ "scenarios": items });
    match format {
        Format::Json => serde_json::to_string_pretty(&doc).map_err(|e| e.to_string()),
        Format::Yaml => serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const YAML: &str = r#"
scenarios:
  - id: refund
    names: { zh: 退款, en: Refund }
    intents: [refund_request]
    tier: TIER_SEMI_COMPLEX
    strategy: STRATEGY_BOT_FIRST
    thresholds:
      min_intent_confidence: 0.7
      maxQueueWait: 120s
    routing:
      queue_id: refunds
      skills: [{ name: refunds, min_level: 2 }]
"#;

    #[test]
    fn parses_yaml_with_proto_and_json_names() {
        let s = parse(Format::Yaml, YAML).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].names["zh"], "退款");
        assert_eq!(s[0].tier, pb::Tier::SemiComplex as i32);
        let t = s[0].thresholds.as_ref().unwrap();
        assert_eq!(t.min_intent_confidence, Some(0.7));
        assert_eq!(t.max_queue_wait.as_ref().unwrap().seconds, 120);
    }

    #[test]
    fn round_trips_through_both_formats() {
        let s = parse(Format::Yaml, YAML).unwrap();
        for format in [Format::Yaml, Format::Json] {
            let doc = render(format, &s).unwrap();
            assert_eq!(parse(format, &doc).unwrap(), s, "{doc}");
        }
    }

    #[test]
    fn reports_every_malformed_scenario() {
        let doc = r#"{"scenarios": [{"id": "a", "tier": "TIER_NOPE"}, {"id": "b"},
            {"id": "c", "thresholds": {"max_fallbacks": "many"}}], "extra": 1}"#;
        let errors = parse(Format::Json, doc).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["extra", "scenarios[0]", "scenarios[2]"],
            "{errors:?}"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            parse(Format::Yaml, "- 1\n- 2").unwrap_err()[0].path,
            "content"
        );
        assert_eq!(parse(Format::Json, "{").unwrap_err()[0].path, "content");
    }
}
