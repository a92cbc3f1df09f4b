//! The HTTP listener: hyper's HTTP/1 server under the limits of [`HttpLimits`].
//!
//! One accept loop; one task per connection, tracked by the controller's `TaskTracker`. A
//! connection cap (new connections wait in the kernel's queue while it is reached), a deadline
//! on each request's headers (which also ends idle keep-alive connections) and on its body, so
//! slow clients cannot hold the listener. Each request carries the peer's address as axum's
//! `ConnectInfo<SocketAddr>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::debug;

use crate::config::HttpLimits;

/// How long open connections get to finish after shutdown begins (live event streams end by
/// themselves on shutdown; this bounds everything else).
const DRAIN: Duration = Duration::from_secs(5);

/// Serve `router` on `listener` until `shutdown`, over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_timeout,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // No Nagle: a streamed answer's tokens and the dashboard's live events are small
        // writes that must leave at once.
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let shutdown = shutdown.clone();
        let header_timeout = limits.header_timeout;
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(tcp, peer, router, header_timeout, false, shutdown).await,
                Some(tls) => {
                    // The handshake shares the headers' deadline: a client that stalls in it
                    // holds its slot no longer than one that stalls in its headers.
                    match tokio::time::timeout(header_timeout, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, router, header_timeout, true, shutdown)
                                .await
                        }
                        Ok(Err(e)) => debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    over_tls: bool,
    shutdown: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            if over_tls {
                // Said by the listener, whatever the client sent: cookies get `Secure`, and
                // HSTS goes out.
                req.headers_mut().insert(
                    "x-forwarded-proto",
                    axum::http::HeaderValue::from_static("https"),
                );
            }
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        // WebSockets (container terminals) take the connection over after the upgrade.
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, "HTTP connection: {e}");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}
