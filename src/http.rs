//! HTTP: Prometheus text at `/metrics`, the replica list as JSON at
//! `/status` (what anyone may see of it: world-readable sources, no
//! processes), and `/healthz`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use replicad_replicator::engine::Viewer;
use replicad_replicator::Replicator;

/// Serve until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, engine: Replicator) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(engine);
    axum::serve(listener, app).await
}

async fn metrics(State(engine): State<Replicator>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        engine.metrics().render(),
    )
}

/// Anyone who can connect may ask: what anyone could read, no processes
/// (root reads the whole list over the control socket).
async fn status(State(engine): State<Replicator>) -> impl IntoResponse {
    let report = tokio::task::spawn_blocking(move || {
        crate::wire::status(&engine.status_for(&Viewer::Anonymous))
    })
    .await
    .unwrap_or_default();
    Json(report)
}
