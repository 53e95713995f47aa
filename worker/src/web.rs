//! The worker's web server: health, readiness, metrics, the assignment, and
//! table lookups that redirect to the worker owning the key.
//!
//! | route | answer |
//! |---|---|
//! | `GET /health` | 200 while the worker runs; 503 with the cause once an error stops it |
//! | `GET /ready` | 200 when the worker is in the group with its assignment registered and every partition it owns is processing; else 503 and why |
//! | `GET /metrics` | the [`Metrics`] in the OpenMetrics text format |
//! | `GET /assignment` | this worker's active and standby partition numbers, and the group's placement |
//! | `GET /tables/{table}/{key}` | the value as JSON (of a windowed table, the key's live windows: `[{"start":ms,"end":ms,"value":...}]`); 404 when absent; 307 to the owner's URL when another worker owns the key; a global table's keys from this worker's copy (503 until it is restored) |
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

use crate::assignor::{CopartitionedAssignor, Placement};
use crate::config::WorkerConfig;
use crate::error::WorkerError;
use crate::manager::TaskManager;
use crate::metrics::Metrics;

/// Turns the text of a URL path segment into a table's key.
pub type KeyParser = Arc<dyn Fn(&str) -> Result<ParsedKey, String> + Send + Sync>;

/// A table key parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    /// The bytes the table stores it under.
    pub stored: Vec<u8>,
    /// The bytes a record of it carries as its key in the table's source
    /// topic: the partition it belongs to is murmur2 of these, as a
    /// producer picks it.
    pub written: Vec<u8>,
}

impl ParsedKey {
    /// A key stored and written as the same bytes.
    pub fn raw(bytes: Vec<u8>) -> ParsedKey {
        ParsedKey {
            written: bytes.clone(),
            stored: bytes,
        }
    }
}

/// What the routes read.
#[derive(Clone)]
pub(crate) struct WebState {
    pub manager: Arc<TaskManager>,
    pub placement: watch::Receiver<Placement>,
    pub metrics: Metrics,
    pub tables: Arc<HashMap<String, TableRoute>>,
}

/// How the web answers a table's keys.
#[derive(Clone)]
pub(crate) struct TableRoute {
    /// Reads a key from the URL.
    pub parse: KeyParser,
    /// A global table: answered here, from this worker's copy.
    pub global: bool,
}

/// Binds `addr` and serves the routes (and the app's `pages`) in the
/// background; tells the assignor the URL to advertise.
pub(crate) async fn serve(
    addr: std::net::SocketAddr,
    config: &WorkerConfig,
    assignor: &CopartitionedAssignor,
    manager: Arc<TaskManager>,
    metrics: Metrics,
    tables: HashMap<String, TableRoute>,
    pages: Vec<Router>,
) -> Result<tokio::task::JoinHandle<()>, WorkerError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        WorkerError::Config(format!("cannot listen for the web server on {addr}: {e}"))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| WorkerError::Config(format!("web server address unknown: {e}")))?;
    let url = config
        .advertised_url
        .clone()
        .unwrap_or_else(|| crate::default_url(bound));
    assignor.set_url(Some(url.clone()));
    let state = WebState {
        manager,
        placement: assignor.placement(),
        metrics,
        tables: Arc::new(tables),
    };
    let app = router(state, pages);
    tracing::info!(%bound, %url, "web server listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "web server stopped");
        }
    }))
}

/// The built-in routes merged with the app's own.
pub(crate) fn router(state: WebState, pages: Vec<Router>) -> Router {
    let builtin = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/assignment", get(assignment))
        .route("/tables/{table}/{key}", get(table_value))
        .with_state(state);
    pages.into_iter().fold(builtin, Router::merge)
}

async fn health(State(web): State<WebState>) -> Response {
    match web.manager.spec.fatal_message() {
        None => "ok".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"healthy": false, "stopping": why})),
        )
            .into_response(),
    }
}

async fn ready(State(web): State<WebState>) -> Response {
    let placement = web.placement.borrow().clone();
    match web.manager.readiness(&placement) {
        Ok(()) => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, Json(why)).into_response(),
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
    let Some(TableRoute { parse, global }) = web.tables.get(&table) else {
        return error(StatusCode::NOT_FOUND, format!("no table named {table:?}"));
    };
    let ParsedKey {
        stored: key_bytes,
        written,
    } = match parse(&key) {
        Ok(k) => k,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{key:?} is not a key of {table:?}: {e}"),
            )
        }
    };
    if *global {
        return global_value(&web, &table, &key, &written);
    }
    let partitions = web.manager.spec.partitions;
    if partitions == 0 {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no partitions".into());
    }
    let partition = partition_for_key(&written, partitions);
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
    let Some(ctx) = web.manager.context(partition) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("partition {partition} is still recovering; try again"),
        );
    };
    match ctx.windows(&table, &key_bytes).await {
        Ok(Some(windows)) if windows.is_empty() => {
            return error(
                StatusCode::NOT_FOUND,
                format!("{key:?} has no live windows in table {table:?}"),
            )
        }
        Ok(Some(windows)) => {
            let windows: Vec<_> = windows
                .into_iter()
                .map(|(w, bytes)| json!({"start": w.start, "end": w.end, "value": json_of(&bytes)}))
                .collect();
            return Json(windows).into_response();
        }
        Ok(None) => {}
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let stored = match ctx.table(&table).await {
        Ok(t) => t.get(&key_bytes),
        Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
    };
    match stored {
        Ok(Some(bytes)) => Json(json_of(&bytes)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{key:?} is not in table {table:?}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A key of a global table, answered from this worker's copy once it is
/// restored.
fn global_value(web: &WebState, table: &str, key: &str, written: &[u8]) -> Response {
    let Some(globals) = web.manager.spec.globals.get() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("global table {table:?} is still restoring; try again"),
        );
    };
    match globals.get(table, written) {
        Some(Ok(Some(bytes))) => Json(json_of(&bytes)).into_response(),
        Some(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("{key:?} is not in global table {table:?}"),
        ),
        Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no global table named {table:?}"),
        ),
    }
}

/// A stored value as JSON: itself when it is JSON, else its text.
fn json_of(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(bytes)))
}
