//! `arbiter serve` end to end: the real binary on loopback, a tonic client.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use arbiter::api::pb::v1::{self as pb, batch_result::Result as Item};
use common::{Sidecar, eventually, example, example_request};
use serde_json::Value;
use tonic::Code;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    request: String,
    expect: Value,
}

#[tokio::test]
async fn every_example_case_over_grpc() {
    let sidecar = Sidecar::start(&example("documents"), &[]);
    let mut client = sidecar.client().await;
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(example("documents/tests/cases.json")).unwrap(),
    )
    .unwrap();
    let mut ids = HashSet::new();
    for case in cases {
        let r = client
            .check(example_request(&case.request))
            .await
            .unwrap()
            .into_inner();
        let outcome = pb::Outcome::try_from(r.outcome).unwrap();
        let want = case.expect["outcome"].as_str().unwrap();
        assert_eq!(
            outcome.as_str_name(),
            format!("OUTCOME_{want}"),
            "{}",
            case.name
        );
        assert_eq!(r.decision, want == "ALLOW", "{}", case.name);
        let want_ids: Vec<String> =
            serde_json::from_value(case.expect["policy_ids"].clone()).unwrap();
        assert_eq!(r.policy_ids, want_ids, "{}", case.name);
        assert_eq!(
            (r.bundle.as_str(), r.revision.as_str()),
            ("documents", "2026-11-24.1")
        );
        let id = uuid::Uuid::parse_str(&r.decision_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert!(ids.insert(id), "decision ids are unique");
        match want {
            "STEP_UP" => {
                let s = r.step_up.expect("step-up details");
                assert_eq!(s.acr_values, ["aal2"]);
                assert_eq!(s.max_age, Some(600));
            }
            "APPROVAL_REQUIRED" => {
                assert_eq!(
                    r.approval.expect("approval details").approver_groups,
                    ["document-owners"]
                );
            }
            _ => assert!(r.step_up.is_none() && r.approval.is_none(), "{}", case.name),
        }
        let want_obligations = case.expect["obligations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(r.obligations.len(), want_obligations.len(), "{}", case.name);
        for (got, want) in r.obligations.iter().zip(&want_obligations) {
            assert_eq!(got.key, want["key"].as_str().unwrap());
            assert_eq!(got.value, want["value"].as_str().unwrap());
            assert_eq!(got.policy_id, want["policy_id"].as_str().unwrap());
        }
    }
}

#[tokio::test]
async fn batch_fills_defaults_and_isolates_item_errors() {
    let sidecar = Sidecar::start(
        &example("documents"),
        &["--config", &write_config("[limits]\nmax_batch_items = 4\n")],
    );
    let mut client = sidecar.client().await;
    let base = example_request("requests/allow-edit-department.json");
    let archived = example_request("requests/deny-edit-archived.json");
    let bad = pb::CheckRequest {
        action: Some(pb::Action {
            name: "fly".into(),
            properties: None,
        }),
        ..Default::default()
    };
    let batch = pb::CheckBatchRequest {
        subject: base.subject.clone(),
        action: base.action.clone(),
        resource: base.resource.clone(),
        context: base.context.clone(),
        evaluations: vec![
            pb::CheckRequest::default(),
            pb::CheckRequest {
                resource: archived.resource.clone(),
                ..Default::default()
            },
            bad.clone(),
            pb::CheckRequest {
                action: Some(pb::Action {
                    name: "view".into(),
                    properties: None,
                }),
                ..Default::default()
            },
        ],
        semantic: 0,
    };
    let results = client
        .check_batch(batch.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<String> = results
        .iter()
        .map(|r| match r.result.as_ref().unwrap() {
            Item::Decision(d) => pb::Outcome::try_from(d.outcome)
                .unwrap()
                .as_str_name()
                .to_owned(),
            Item::Error(e) => format!("{}: {}", e.code, e.message),
        })
        .collect();
    assert_eq!(outcomes[0], "OUTCOME_ALLOW");
    assert_eq!(outcomes[1], "OUTCOME_DENY");
    assert!(
        outcomes[2].starts_with("INVALID_ARGUMENT: unknown action `fly`"),
        "{}",
        outcomes[2]
    );
    assert_eq!(outcomes[3], "OUTCOME_ALLOW");
    // One revision decided the whole batch.
    let revisions: HashSet<&str> = results
        .iter()
        .filter_map(|r| match r.result.as_ref() {
            Some(Item::Decision(d)) => Some(d.revision.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(revisions.len(), 1);

    // deny_on_first_deny stops after the archived edit.
    let mut stop = batch.clone();
    stop.semantic = pb::EvaluationsSemantic::DenyOnFirstDeny as i32;
    assert_eq!(
        client
            .check_batch(stop)
            .await
            .unwrap()
            .into_inner()
            .results
            .len(),
        2
    );
    // permit_on_first_permit stops at once.
    let mut stop = batch.clone();
    stop.semantic = pb::EvaluationsSemantic::PermitOnFirstPermit as i32;
    assert_eq!(
        client
            .check_batch(stop)
            .await
            .unwrap()
            .into_inner()
            .results
            .len(),
        1
    );
    // No evaluations: the defaults are the one request.
    let mut only = batch.clone();
    only.evaluations.clear();
    assert_eq!(
        client
            .check_batch(only)
            .await
            .unwrap()
            .into_inner()
            .results
            .len(),
        1
    );
    // Over the limit: the whole call is refused.
    let mut big = batch;
    big.evaluations.push(pb::CheckRequest::default());
    let err = client.check_batch(big).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_batch_items"),
        "{}",
        err.message()
    );
}

fn write_config(text: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "arbiter-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("arbiter.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn entity_props(v: Value) -> Option<prost_types::Struct> {
    Some(arbiter::api::json::to_struct(v.as_object().unwrap()))
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_never_allow() {
    let sidecar = Sidecar::start(
        &example("documents"),
        &[
            "--config",
            &write_config("[limits]\nmax_request_bytes = 2048\nmax_depth = 8\n"),
        ],
    );
    let mut client = sidecar.client().await;
    let good = example_request("requests/allow-edit-department.json");
    let mut cases: Vec<(&str, pb::CheckRequest, &str)> = Vec::new();

    let mut r = good.clone();
    r.subject = None;
    cases.push(("missing subject", r, "`subject` is required"));
    let mut r = good.clone();
    r.action = None;
    cases.push(("missing action", r, "`action` is required"));
    let mut r = good.clone();
    r.resource = None;
    cases.push(("missing resource", r, "`resource` is required"));
    let mut r = good.clone();
    r.subject.as_mut().unwrap().r#type = "Robot".into();
    cases.push(("unknown entity type", r, "unknown entity type `Robot`"));
    let mut r = good.clone();
    r.action.as_mut().unwrap().name = "launch".into();
    cases.push(("unknown action", r, "unknown action `launch`"));
    let mut r = good.clone();
    r.subject.as_mut().unwrap().properties =
        entity_props(serde_json::json!({"department": 42, "roles": ["editor"]}));
    cases.push(("wrong attribute type", r, "subject.properties.department"));
    let mut r = good.clone();
    r.subject.as_mut().unwrap().properties = entity_props(serde_json::json!({"roles": ["editor"]}));
    cases.push((
        "missing required attribute",
        r,
        "required by the bundle schema",
    ));
    let mut r = good.clone();
    let mut deep = serde_json::json!(1);
    for _ in 0..12 {
        deep = serde_json::json!({ "a": deep });
    }
    r.context = entity_props(serde_json::json!({ "deep": deep }));
    cases.push(("deeply nested", r, "max_depth"));
    let mut r = good.clone();
    r.context = entity_props(serde_json::json!({ "blob": "x".repeat(4000) }));
    cases.push(("oversized", r, "max_request_bytes"));

    for (name, req, hint) in cases {
        let err = client.check(req).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(hint), "{name}: {}", err.message());
    }

    // A message that is not protobuf at all.
    let mut grpc = tonic::client::Grpc::new(sidecar.channel().await);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<Vec<u8>, Vec<u8>, RawCodec>(
            tonic::Request::new(vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
            "/arbiter.v1.Authorizer/Check".parse().unwrap(),
            RawCodec,
        )
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed"), "{}", err.message());

    // The sidecar is still healthy and still decides.
    let ok = client.check(good).await.unwrap().into_inner();
    assert!(ok.decision);
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(
        metrics.contains("arbiter_requests_rejected_total"),
        "{metrics}"
    );
}

/// Sends raw bytes as a gRPC message, to test malformed input.
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self {
        RawCodec
    }
    fn decoder(&mut self) -> Self {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test]
async fn health_reflection_metrics_and_readiness() {
    let sidecar = Sidecar::start(&example("documents"), &[]);
    let channel = sidecar.channel().await;

    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    // Health turns SERVING just after the listening line: allow it a moment.
    for service in ["", "arbiter.v1.Authorizer"] {
        eventually(service, Duration::from_secs(10), || {
            let mut health = health.clone();
            async move {
                let r = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }
        })
        .await;
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains("arbiter.v1.Authorizer") && names.contains("grpc.health.v1.Health"),
        "{names:?}"
    );

    let mut client = pb::authorizer_client::AuthorizerClient::new(channel);
    for _ in 0..3 {
        client
            .check(example_request("requests/allow-edit-department.json"))
            .await
            .unwrap();
    }
    client
        .check(example_request("requests/step-up-delete.json"))
        .await
        .unwrap();

    let (status, metrics) = sidecar.get("/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "arbiter_decisions_total{outcome=\"ALLOW\"} 3",
        "arbiter_decisions_total{outcome=\"STEP_UP\"} 1",
        "arbiter_decision_duration_seconds_count 4",
        "arbiter_decision_duration_seconds_bucket{le=",
        "arbiter_bundle_active{bundle=\"documents\",revision=\"2026-11-24.1\"} 1",
        "arbiter_bundle_policies 9",
        "arbiter_build_info{version=",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert_eq!(sidecar.get("/healthz").await.0, 200);
    let (status, body) = sidecar.get("/readyz").await;
    assert_eq!(status, 200);
    assert!(body.contains("2026-11-24.1"), "{body}");
}

#[tokio::test]
async fn decision_cache_answers_the_same_with_fresh_ids() {
    let sidecar = Sidecar::start(&example("documents"), &["--cache-entries", "100"]);
    let mut client = sidecar.client().await;
    let req = example_request("requests/approval-share-external.json");
    let a = client.check(req.clone()).await.unwrap().into_inner();
    let b = client.check(req).await.unwrap().into_inner();
    assert_ne!(a.decision_id, b.decision_id);
    assert_eq!(
        (a.outcome, &a.policy_ids, &a.approval),
        (b.outcome, &b.policy_ids, &b.approval)
    );
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(
        metrics.contains("arbiter_decision_cache_hits_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arbiter_decision_cache_misses_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_and_exits_cleanly() {
    let mut sidecar = Sidecar::start(&example("documents"), &[]);
    let channel = sidecar.channel().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = pb::authorizer_client::AuthorizerClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u32, 0u32);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                match client
                    .check(example_request("requests/allow-edit-department.json"))
                    .await
                {
                    Ok(r) => {
                        assert!(
                            r.into_inner().decision,
                            "a call answered during shutdown is still correct"
                        );
                        ok += 1;
                    }
                    Err(s) => {
                        assert!(
                            matches!(
                                s.code(),
                                Code::Unavailable | Code::Unknown | Code::Cancelled
                            ),
                            "{s:?}"
                        );
                        refused += 1;
                        break;
                    }
                }
            }
            (ok, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = sidecar.terminate();
        // Until the log reader hits the exited process's end of output.
        let mut logs = Vec::new();
        while let Ok(line) = sidecar.logs.recv_timeout(Duration::from_secs(5)) {
            logs.push(line);
        }
        (status, logs)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert!(
        status.1.iter().any(|l| l.contains("drained")),
        "{:?}",
        status.1
    );
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap().0;
    }
    assert!(answered > 0);
}
