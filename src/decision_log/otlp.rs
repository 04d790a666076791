//! Optional export through OpenTelemetry (OTLP/gRPC), for organisations that
//! already run a collector: every spooled record as a log record (body = the
//! masked, chained record JSON), and for calls that carried a W3C
//! `traceparent`, a span `arbiter.decide` in the caller's trace.
//!
//! This is a copy for observability, best effort: batches the collector
//! cannot take are counted and dropped. The lossless path is the spool and
//! the control plane.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, logs_service_client::LogsServiceClient,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::chain;
use crate::telemetry::DecisionLogMetrics;

/// Batches of chained lines waiting for the exporter.
pub type Lines = bytes::Bytes;

/// The fields of a record an export needs.
#[derive(Deserialize)]
struct Fields<'a> {
    seq: u64,
    kind: &'a str,
    time: &'a str,
    #[serde(default)]
    decision_id: Option<&'a str>,
    #[serde(default)]
    outcome: Option<&'a str>,
    #[serde(default)]
    revision: Option<&'a str>,
    #[serde(default)]
    latency_us: Option<u64>,
    #[serde(default)]
    trace_id: Option<&'a str>,
    #[serde(default)]
    span_id: Option<&'a str>,
    #[serde(default)]
    policy_ids: Vec<&'a str>,
}

fn attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Converts chained lines into an OTLP logs request and a traces request.
pub fn convert(
    instance: &str,
    lines: &[u8],
) -> (ExportLogsServiceRequest, ExportTraceServiceRequest) {
    let mut logs = Vec::new();
    let mut spans = Vec::new();
    for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(parsed) = chain::parse_line(line) else {
            continue;
        };
        let Ok(f) = serde_json::from_slice::<Fields>(parsed.body) else {
            continue;
        };
        let start = super::time::parse_micros(f.time).unwrap_or(0) * 1000;
        let mut attributes = vec![
            attr("arbiter.instance", instance),
            attr("arbiter.seq", f.seq.to_string()),
            attr("arbiter.kind", f.kind),
        ];
        if let Some(id) = f.decision_id {
            attributes.push(attr("arbiter.decision_id", id));
        }
        if let Some(o) = f.outcome {
            attributes.push(attr("arbiter.outcome", o));
        }
        let trace = f.trace_id.and_then(unhex).filter(|t| t.len() == 16);
        let parent = f.span_id.and_then(unhex).filter(|s| s.len() == 8);
        let own_span = trace
            .as_ref()
            .map(|_| fastrand::u64(1..).to_be_bytes().to_vec());
        logs.push(LogRecord {
            time_unix_nano: start,
            observed_time_unix_nano: start,
            severity_number: 9, // INFO
            severity_text: "INFO".into(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(
                    String::from_utf8_lossy(parsed.body).into_owned(),
                )),
            }),
            attributes: attributes.clone(),
            trace_id: trace.clone().unwrap_or_default(),
            span_id: own_span.clone().unwrap_or_default(),
            ..Default::default()
        });
        if let (Some(trace_id), Some(span_id)) = (trace, own_span) {
            attributes.push(attr("arbiter.revision", f.revision.unwrap_or_default()));
            attributes.push(attr("arbiter.policy_ids", f.policy_ids.join(",")));
            spans.push(Span {
                trace_id,
                span_id,
                parent_span_id: parent.unwrap_or_default(),
                name: "arbiter.decide".into(),
                kind: span::SpanKind::Internal as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: start + f.latency_us.unwrap_or(0) * 1000,
                attributes,
                status: Some(Status {
                    code: status::StatusCode::Ok as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    let resource = Some(Resource {
        attributes: vec![
            attr("service.name", "arbiter"),
            attr("service.instance.id", instance),
        ],
        ..Default::default()
    });
    let logs = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource.clone(),
            scope_logs: vec![ScopeLogs {
                log_records: logs,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let traces = ExportTraceServiceRequest {
        resource_spans: if spans.is_empty() {
            Vec::new()
        } else {
            vec![ResourceSpans {
                resource,
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }]
        },
    };
    (logs, traces)
}

/// Sends what the writer hands over until the channel closes.
pub async fn run(
    endpoint: String,
    instance: String,
    mut batches: mpsc::Receiver<Lines>,
    metrics: DecisionLogMetrics,
) {
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy(),
        Err(e) => {
            tracing::error!(%endpoint, "decision log: bad OTLP endpoint: {e}");
            return;
        }
    };
    let mut logs = LogsServiceClient::new(channel.clone());
    let mut traces = TraceServiceClient::new(channel);
    let mut failing = false;
    while let Some(lines) = batches.recv().await {
        let (log_req, trace_req) = convert(&instance, &lines);
        let n = log_req.resource_logs[0].scope_logs[0].log_records.len() as u64;
        let mut result = logs.export(log_req).await.map(|_| ());
        if result.is_ok() && !trace_req.resource_spans.is_empty() {
            result = traces.export(trace_req).await.map(|_| ());
        }
        match result {
            Ok(()) => {
                metrics.otlp_exported.inc_by(n);
                if failing {
                    tracing::info!(%endpoint, "decision log: OTLP export works again");
                    failing = false;
                }
            }
            Err(e) => {
                metrics.otlp_dropped.inc_by(n);
                if !failing {
                    tracing::warn!(%endpoint, "decision log: OTLP export failed, dropping this copy of the records: {}", e.message());
                    failing = true;
                }
            }
        }
    }
}
