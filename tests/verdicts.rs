//! The core's pure verdicts from fixtures in tests/fixtures/verdicts: drift, and writes the
//! backend refused.

use std::path::Path;

use appconn::backend::Remote;
use appconn::crd::Reason;
use appconn::reconcile::verdict::{Drift, RefusedWrites, drift};

fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/verdicts")
        .join(name);
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DriftCase {
    name: String,
    recorded: Option<String>,
    remote_hash: Option<String>,
    content_differs: Option<bool>,
    rotates_itself: bool,
    expect: String,
}

#[test]
fn drift_verdicts() {
    let cases: Vec<DriftCase> = fixture("drift.yaml");
    assert!(cases.len() >= 8);
    for case in cases {
        let remote = Remote {
            id: "id".into(),
            connection_name: "c".into(),
            credentials_hash: case.remote_hash.clone(),
            rotation: None,
            content: None,
        };
        let got = drift(
            case.recorded.as_deref(),
            &remote,
            case.content_differs,
            case.rotates_itself,
        );
        let expected = match case.expect.as_str() {
            "InSync" => Drift::InSync,
            "ChangedOutside" => Drift::ChangedOutside,
            "RotatedByBackend" => Drift::RotatedByBackend,
            other => panic!("{}: unknown verdict {other}", case.name),
        };
        assert_eq!(got, expected, "{}", case.name);
    }
}

#[derive(serde::Deserialize)]
struct RefusedCase {
    name: String,
    steps: Vec<Step>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Step {
    generation: i64,
    hash: String,
    refused_before: bool,
    ended: String,
}

#[test]
fn refused_write_verdicts() {
    let cases: Vec<RefusedCase> = fixture("refused-writes.yaml");
    assert!(cases.len() >= 5);
    for case in cases {
        let mut refused = RefusedWrites::default();
        for (i, step) in case.steps.iter().enumerate() {
            let attempt = (Some(step.generation), step.hash.clone());
            assert_eq!(
                refused.refused_before("uid-1", &attempt),
                step.refused_before,
                "{}: step {}",
                case.name,
                i + 1
            );
            assert!(
                !refused.refused_before("uid-2", &attempt),
                "{}: another object is never refused for this one",
                case.name
            );
            let failed = match step.ended.as_str() {
                "ok" => None,
                reason => Some(
                    Reason::parse(reason)
                        .unwrap_or_else(|| panic!("{}: unknown reason {reason}", case.name)),
                ),
            };
            refused.record("uid-1", attempt, failed);
        }
    }
}
