//! The reference documents in `docs/reference/` are generated from the contracts; this fails
//! when a contract changed and they were not regenerated (`make reference`).

use std::path::Path;
use std::process::Command;

fn assert_fresh(kind: &str, file: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["reference", kind])
        .output()
        .expect("tandem runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generated = String::from_utf8(output.stdout).expect("utf-8");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/reference")
        .join(file);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated == committed,
        "{} is stale: run `make reference` and commit the result",
        path.display()
    );
}

#[test]
fn asyncapi_document_matches_the_contracts() {
    assert_fresh("asyncapi", "asyncapi.yaml");
}

#[test]
fn events_reference_matches_the_contracts() {
    assert_fresh("events", "events.md");
}

#[test]
fn grpc_reference_matches_the_contracts() {
    assert_fresh("grpc", "grpc.md");
}

#[test]
fn asyncapi_document_names_every_catalogued_subject() {
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/reference/asyncapi.yaml"),
    )
    .expect("asyncapi.yaml exists");
    for spec in tandem_proto::events::CATALOGUE {
        let address = format!("address: \"{}.{{tenant}}\"", spec.subject);
        assert!(committed.contains(&address), "{} missing", spec.subject);
    }
}
