//! Reference documentation generated from the contracts themselves — the compiled descriptor
//! set (with its comments) and the event catalogue — so it cannot drift from them:
//!
//! - `asyncapi`: an AsyncAPI 3.0 document of every subject, its payload and its guarantees;
//! - `events`: the same as Markdown, with every payload's fields;
//! - `grpc`: every gRPC service and method.
//!
//! `make reference` writes them under `docs/reference/`; a test fails when they are stale.

use std::fmt::Write as _;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use tandem_proto::events::{CATALOGUE, EventSpec, STREAMS};
use tandem_proto::headers;

/// Which document to print.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    /// AsyncAPI 3.0 (YAML) of the event streams.
    Asyncapi,
    /// Markdown reference of the events.
    Events,
    /// Markdown reference of the gRPC APIs.
    Grpc,
}

/// Renders one document.
pub fn render(kind: Kind) -> anyhow::Result<String> {
    let contracts = Contracts::load()?;
    Ok(match kind {
        Kind::Asyncapi => contracts.asyncapi(),
        Kind::Events => contracts.events_markdown(),
        Kind::Grpc => contracts.grpc_markdown(),
    })
}

const DELIVERY: &str = "At-least-once delivery from a transactional outbox: an event is published only after the \
state change that caused it committed, and is re-sent after a crash until the broker stored it. \
JetStream drops a re-sent event with the same Nats-Msg-Id within the stream's duplicate window \
(default 2 minutes); Tandem's own consumers also record every handled event id with their \
effect (inbox), so effects happen exactly once. Events of one Tandem-Ordering-Key (a \
conversation) are published in commit order.";

/// The envelope headers every event carries, with what they mean.
const ENVELOPE: [(&str, &str); 6] = [
    (
        headers::MSG_ID,
        "The event's unique id (UUIDv7), the de-duplication key.",
    ),
    (
        headers::EVENT_TYPE,
        "The payload's fully qualified protobuf message name.",
    ),
    (
        headers::TENANT,
        "The tenant; also the subject's last token.",
    ),
    (
        headers::OCCURRED_AT,
        "When the fact happened, RFC 3339 with microseconds.",
    ),
    (
        headers::ORDERING_KEY,
        "The key whose order is kept (usually the conversation id).",
    ),
    (
        headers::TRACEPARENT,
        "W3C trace context of the operation that caused the event.",
    ),
];

struct Contracts {
    files: Vec<FileDescriptorProto>,
}

impl Contracts {
    fn load() -> anyhow::Result<Self> {
        let set = FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET)?;
        let files = set
            .file
            .into_iter()
            .filter(|f| f.package().starts_with("tandem."))
            .collect();
        Ok(Self { files })
    }

    fn comment(file: &FileDescriptorProto, path: &[i32]) -> String {
        let Some(info) = &file.source_code_info else {
            return String::new();
        };
        info.location
            .iter()
            .find(|l| l.path == path)
            .map(|l| {
                l.leading_comments()
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }

    fn message(&self, full_name: &str) -> Option<(&FileDescriptorProto, usize, &DescriptorProto)> {
        self.files.iter().find_map(|file| {
            let prefix = format!("{}.", file.package());
            let name = full_name.strip_prefix(&prefix)?;
            file.message_type
                .iter()
                .enumerate()
                .find(|(_, m)| m.name() == name)
                .map(|(i, m)| (file, i, m))
        })
    }

    fn summary(&self, full_name: &str) -> String {
        self.message(full_name)
            .map(|(file, index, _)| Self::comment(file, &[4, index as i32]))
            .unwrap_or_default()
    }

    fn type_name(field: &prost_types::FieldDescriptorProto) -> String {
        let base = match field.r#type() {
            Type::Message | Type::Enum | Type::Group => {
                field.type_name().trim_start_matches('.').to_owned()
            }
            Type::Double => "double".into(),
            Type::Float => "float".into(),
            Type::Int64 => "int64".into(),
            Type::Uint64 => "uint64".into(),
            Type::Int32 => "int32".into(),
            Type::Fixed64 => "fixed64".into(),
            Type::Fixed32 => "fixed32".into(),
            Type::Bool => "bool".into(),
            Type::String => "string".into(),
            Type::Bytes => "bytes".into(),
            Type::Uint32 => "uint32".into(),
            Type::Sfixed32 => "sfixed32".into(),
            Type::Sfixed64 => "sfixed64".into(),
            Type::Sint32 => "sint32".into(),
            Type::Sint64 => "sint64".into(),
        };
        if field.label() == Label::Repeated {
            format!("repeated {base}")
        } else {
            base
        }
    }

    fn channel_id(spec: &EventSpec) -> String {
        spec.subject
            .trim_start_matches("tandem.")
            .replace(".v1.", "_")
            .replace('.', "_")
    }

    fn asyncapi(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Generated by `tandem reference asyncapi` from the contracts; do not edit."
        );
        let _ = writeln!(out, "asyncapi: 3.0.0");
        let _ = writeln!(out, "info:");
        let _ = writeln!(out, "  title: Tandem events");
        let _ = writeln!(out, "  version: v1");
        let _ = writeln!(
            out,
            "  description: {}",
            q(&format!(
                "Facts published by Tandem's services on NATS JetStream, one stream per context. Payloads are the protobuf messages of the tandem.<context>.v1 packages in proto/; the envelope travels in headers. {DELIVERY}"
            ))
        );
        let _ = writeln!(out, "defaultContentType: application/x-protobuf");
        let _ = writeln!(out, "servers:");
        let _ = writeln!(out, "  production:");
        let _ = writeln!(out, "    host: nats:4222");
        let _ = writeln!(out, "    protocol: nats");
        let streams: Vec<String> = STREAMS
            .iter()
            .map(|s| format!("{} ({})", s.name, s.subjects))
            .collect();
        let _ = writeln!(
            out,
            "    description: {}",
            q(&format!("NATS JetStream. Streams: {}.", streams.join(", ")))
        );
        let _ = writeln!(out, "channels:");
        for spec in CATALOGUE {
            let id = Self::channel_id(spec);
            let name = spec.type_name.rsplit('.').next().unwrap_or(spec.type_name);
            let _ = writeln!(out, "  {id}:");
            let _ = writeln!(
                out,
                "    address: {}",
                q(&format!("{}.{{tenant}}", spec.subject))
            );
            let _ = writeln!(
                out,
                "    description: {}",
                q(&format!(
                    "{} Stream {}.",
                    self.summary(spec.type_name),
                    spec.stream.name
                ))
            );
            let _ = writeln!(out, "    parameters:");
            let _ = writeln!(out, "      tenant:");
            let _ = writeln!(
                out,
                "        description: The tenant id; subscribe with `*` for every tenant."
            );
            let _ = writeln!(out, "    messages:");
            let _ = writeln!(out, "      {name}:");
            let _ = writeln!(
                out,
                "        $ref: {}",
                q(&format!("#/components/messages/{}", spec.type_name))
            );
        }
        let _ = writeln!(out, "operations:");
        for spec in CATALOGUE {
            let id = Self::channel_id(spec);
            let name = spec.type_name.rsplit('.').next().unwrap_or(spec.type_name);
            let _ = writeln!(out, "  publish_{id}:");
            let _ = writeln!(out, "    action: send");
            let _ = writeln!(
                out,
                "    summary: {}",
                q(&format!(
                    "The {} service publishes {name}.",
                    spec.stream.context
                ))
            );
            let _ = writeln!(out, "    channel:");
            let _ = writeln!(out, "      $ref: {}", q(&format!("#/channels/{id}")));
        }
        let _ = writeln!(out, "components:");
        let _ = writeln!(out, "  messageTraits:");
        let _ = writeln!(out, "    envelope:");
        let _ = writeln!(out, "      headers:");
        let _ = writeln!(out, "        type: object");
        let _ = writeln!(
            out,
            "        required: [{}, {}, {}, {}]",
            q(headers::MSG_ID),
            q(headers::EVENT_TYPE),
            q(headers::TENANT),
            q(headers::OCCURRED_AT)
        );
        let _ = writeln!(out, "        properties:");
        for (header, description) in ENVELOPE {
            let _ = writeln!(out, "          {}:", q(header));
            let _ = writeln!(out, "            type: string");
            let _ = writeln!(out, "            description: {}", q(description));
        }
        let _ = writeln!(out, "  messages:");
        for spec in CATALOGUE {
            let name = spec.type_name.rsplit('.').next().unwrap_or(spec.type_name);
            let _ = writeln!(out, "    {}:", spec.type_name);
            let _ = writeln!(out, "      name: {name}");
            let _ = writeln!(out, "      title: {}", q(spec.type_name));
            let _ = writeln!(out, "      summary: {}", q(&self.summary(spec.type_name)));
            let _ = writeln!(out, "      contentType: application/x-protobuf");
            let _ = writeln!(out, "      traits:");
            let _ = writeln!(out, "        - $ref: '#/components/messageTraits/envelope'");
            let _ = writeln!(out, "      payload:");
            let _ = writeln!(
                out,
                "        schemaFormat: application/vnd.google.protobuf;version=3"
            );
            let _ = writeln!(
                out,
                "        schema: {}",
                q(&format!(
                    "{} (proto/{})",
                    spec.type_name,
                    self.message(spec.type_name)
                        .map_or("", |(f, _, _)| f.name())
                ))
            );
        }
        out
    }

    fn events_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<!-- Generated by `tandem reference events` from the contracts; do not edit. -->"
        );
        let _ = writeln!(out, "# Events\n");
        let _ = writeln!(out, "{DELIVERY}\n");
        let _ = writeln!(
            out,
            "Subjects are `tandem.<context>.v1.<entity>.<event>.<tenant>`. The body is the protobuf message; the envelope is in headers:\n"
        );
        let _ = writeln!(out, "| header | meaning |\n|---|---|");
        for (header, meaning) in ENVELOPE {
            let _ = writeln!(out, "| `{header}` | {meaning} |");
        }
        for stream in STREAMS {
            let _ = writeln!(
                out,
                "\n## {} — stream `{}` over `{}`\n",
                stream.context, stream.name, stream.subjects
            );
            let _ = writeln!(
                out,
                "| subject (+ `.<tenant>`) | message | meaning |\n|---|---|---|"
            );
            for spec in CATALOGUE.iter().filter(|s| s.stream == *stream) {
                let _ = writeln!(
                    out,
                    "| `{}` | [`{}`](#{}) | {} |",
                    spec.subject,
                    spec.type_name,
                    anchor(spec.type_name),
                    self.summary(spec.type_name)
                );
            }
            for spec in CATALOGUE.iter().filter(|s| s.stream == *stream) {
                let _ = writeln!(out, "\n### {}\n", spec.type_name);
                let Some((file, index, message)) = self.message(spec.type_name) else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "{}\n\nSubject `{}.<tenant>`, defined in `proto/{}`.\n",
                    Self::comment(file, &[4, index as i32]),
                    spec.subject,
                    file.name()
                );
                let _ = writeln!(out, "| # | field | type | meaning |\n|---|---|---|---|");
                for (f, field) in message.field.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "| {} | `{}` | `{}` | {} |",
                        field.number(),
                        field.name(),
                        Self::type_name(field),
                        Self::comment(file, &[4, index as i32, 2, f as i32]).replace('|', "\\|")
                    );
                }
            }
        }
        out
    }

    fn grpc_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<!-- Generated by `tandem reference grpc` from the contracts; do not edit. -->"
        );
        let _ = writeln!(out, "# gRPC APIs\n");
        let _ = writeln!(
            out,
            "Every business call needs `authorization: Bearer <JWT>`; the tenant comes from the token. Health (`grpc.health.v1.Health`) and reflection are open. Messages are described in `proto/`; reflection serves them too.\n"
        );
        for file in &self.files {
            for (s, service) in file.service.iter().enumerate() {
                let _ = writeln!(out, "## {}.{}\n", file.package(), service.name());
                let _ = writeln!(
                    out,
                    "{}\n\nDefined in `proto/{}`.\n",
                    Self::comment(file, &[6, s as i32]),
                    file.name()
                );
                let _ = writeln!(
                    out,
                    "| method | request → response | meaning |\n|---|---|---|"
                );
                for (m, method) in service.method.iter().enumerate() {
                    let stream = |yes: bool| if yes { "stream " } else { "" };
                    let _ = writeln!(
                        out,
                        "| `{}` | {}`{}` → {}`{}` | {} |",
                        method.name(),
                        stream(method.client_streaming()),
                        method.input_type().rsplit('.').next().unwrap_or_default(),
                        stream(method.server_streaming()),
                        method.output_type().rsplit('.').next().unwrap_or_default(),
                        Self::comment(file, &[6, s as i32, 2, m as i32]).replace('|', "\\|")
                    );
                }
                out.push('\n');
            }
        }
        out
    }
}

fn anchor(type_name: &str) -> String {
    type_name.to_lowercase().replace('.', "")
}
