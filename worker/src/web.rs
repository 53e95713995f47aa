//! The worker's web server: health, readiness, metrics, the assignment, and
//! table lookups that redirect to the worker owning the key.
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 while the process runs |
//! | `GET /ready` | 200 once every assigned partition is recovered and processing, else 503 |
//! | `GET /metrics` | the [`Metrics`] in the OpenMetrics text format |
//! | `GET /assignment` | this worker's active and standby partition numbers, and the group's placement |
//! | `GET /tables/{table}/{key}` | the value as JSON; 404 when absent; 307 to the owner's URL when another worker owns the key |
//!
//! Apps add their own routes with [`Worker::page`](crate::Worker::page).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use strom_client::partitioner::partition_for_key;
use tokio::sync::watch;

use crate::assignor::Placement;
use crate::metrics::Metrics;
use crate::Runtime;

/// Turns the text of a URL path segment into a table's key bytes.
pub type KeyParser = Arc<dyn Fn(&str) -> Result<Vec<u8>, String> + Send + Sync>;

/// What the routes read.
#[derive(Clone)]
pub(crate) struct WebState {
    pub runtime: Arc<Runtime>,
    pub placement: watch::Receiver<Placement>,
    pub metrics: Metrics,
    pub tables: Arc<HashMap<String, KeyParser>>,
}

/// The built-in routes merged with the app's own.
pub(crate) fn router(state: WebState, pages: Vec<Router>) -> Router {
    let builtin = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/assignment", get(assignment))
        .route("/tables/{table}/{key}", get(table_value))
        .with_state(state);
    pages.into_iter().fold(builtin, Router::merge)
}

async fn ready(State(web): State<WebState>) -> Response {
    let placement = web.placement.borrow().clone();
    if placement.generation < 0 {
        let body = json!({"ready": false, "why": "not yet in the group"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let recovering = web.runtime.recovering();
    if recovering.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        let body = json!({"ready": false, "recovering": recovering});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn metrics(State(web): State<WebState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        web.metrics.render(),
    )
        .into_response()
}

async fn assignment(State(web): State<WebState>) -> Response {
    let placement = web.placement.borrow().clone();
    let mine = placement.mine().cloned().unwrap_or_default();
    Json(json!({
        "member_id": placement.me,
        "generation": placement.generation,
        "active": mine.active,
        "standby": mine.standby,
        "members": placement.members,
    }))
    .into_response()
}

fn error(status: StatusCode, what: String) -> Response {
    (status, Json(json!({ "error": what }))).into_response()
}

async fn table_value(
    State(web): State<WebState>,
    Path((table, key)): Path<(String, String)>,
    uri: Uri,
) -> Response {
    let Some(parse) = web.tables.get(&table) else {
        return error(StatusCode::NOT_FOUND, format!("no table named {table:?}"));
    };
    let key_bytes = match parse(&key) {
        Ok(k) => k,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{key:?} is not a key of {table:?}: {e}"),
            )
        }
    };
    let partitions = web.runtime.spec.partitions;
    if partitions == 0 {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no partitions".into());
    }
    let partition = partition_for_key(&key_bytes, partitions);
    let placement = web.placement.borrow().clone();
    let Some(owner) = placement.owner(partition) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("partition {partition} has no owner right now (rebalancing); try again"),
        );
    };
    if owner.member_id != placement.me {
        let Some(url) = &owner.url else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "partition {partition} is owned by {} which has no web address",
                    owner.member_id
                ),
            );
        };
        let location = format!("{}{}", url.trim_end_matches('/'), uri.path());
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response();
    }
    let Some(ctx) = web.runtime.context(partition) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("partition {partition} is still recovering; try again"),
        );
    };
    let stored = match ctx.table(&table).await {
        Ok(t) => t.get(&key_bytes),
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    };
    match stored {
        Ok(Some(bytes)) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(value) => Json(value).into_response(),
            Err(_) => Json(json!(String::from_utf8_lossy(&bytes))).into_response(),
        },
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{key:?} is not in table {table:?}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
