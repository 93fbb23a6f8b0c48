//! Telemetry: `tracing` logs (text or JSON), the Prometheus recorder behind the `metrics`
//! macros, and the admin HTTP server with `/metrics`, `/healthz` and `/readyz`.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogArgs, LogFormat};
use crate::probe::Readiness;

/// Telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("cannot serve the admin endpoints on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the global `tracing` subscriber.
pub fn init_logs(args: &LogArgs) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|error| ConfigError::new("RUST_LOG", error.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        // colour codes only for people at a terminal, never in log files
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let installed = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|error| TelemetryError::Subscriber(error.to_string()))
}

/// Installs the global Prometheus recorder; render with the returned handle.
pub fn install_metrics() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|error| TelemetryError::Metrics(error.to_string()))?;
    metrics::describe_gauge!(
        "chatify_build_info",
        "constant 1, labelled with the version"
    );
    metrics::gauge!("chatify_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Binds the admin listener now (so a taken port fails start-up) and returns the server
/// future, which runs until `shutdown` resolves.
pub async fn bind_admin(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<
    (
        SocketAddr,
        impl Future<Output = std::io::Result<()>> + Send + 'static,
    ),
    TelemetryError,
> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Admin { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| TelemetryError::Admin { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness });
    let server = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    };
    Ok((local_addr, server))
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    state.metrics.render()
}

/// 200 when every probe passes, else 503; the body lists each dependency.
async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    let outcomes = state.readiness.check().await;
    let mut body = String::new();
    let mut all_ok = true;
    for outcome in &outcomes {
        match &outcome.result {
            Ok(()) => body.push_str(&format!("{}: ok\n", outcome.name)),
            Err(reason) => {
                all_ok = false;
                body.push_str(&format!("{}: {reason}\n", outcome.name));
            }
        }
    }
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
}

/// What every service does before its own work: logs, metrics recorder, and the admin
/// endpoints bound on `admin_addr`, served on the current tokio runtime until `shutdown`
/// is cancelled.
pub async fn start(
    logs: &LogArgs,
    admin_addr: SocketAddr,
    readiness: Readiness,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, TelemetryError> {
    init_logs(logs)?;
    let metrics = install_metrics()?;
    let (bound, server) = bind_admin(admin_addr, metrics, readiness, async move {
        shutdown.cancelled().await
    })
    .await?;
    tracing::info!(%bound, "admin endpoints: /metrics /healthz /readyz");
    Ok(tokio::spawn(server))
}
