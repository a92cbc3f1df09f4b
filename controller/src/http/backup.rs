//! `POST /api/v1/backup`: a backup of the running controller, streamed as it is read.

use axum::body::Body;
use futures::StreamExt;
use nebula_types::api::secrets::TakeBackup;

use super::prelude::*;

pub(super) async fn take(
    State(cp): State<Arc<ControlPlane>>,
    Extension(who): Extension<OpCtx>,
    body: Result<Json<TakeBackup>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(TakeBackup { passphrase }) = body?;
    // Refusals (role, passphrase) are answered before the body starts.
    cp.authorize(&who, Op::Backup)?;
    if passphrase.chars().count() < crate::backup::keys::MIN_PASSPHRASE {
        return Err(ApiError::bad_request(format!(
            "the passphrase needs at least {} characters",
            crate::backup::keys::MIN_PASSPHRASE
        )));
    }
    let (w, r) = tokio::io::duplex(256 * 1024);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = cp.backup(&who, &passphrase, w).await;
        let _ = done_tx.send(r.map(|(_, summary)| summary));
    });
    // After the last byte: a failed backup breaks the response instead of ending it cleanly,
    // so a client never takes a partial file for a whole one.
    let tail = futures::stream::once(async move {
        match done.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Err(std::io::Error::other(e.to_string()))),
            Err(_) => Some(Err(std::io::Error::other("the backup stopped"))),
        }
    })
    .filter_map(|x| async move { x });
    let stream = tokio_util::io::ReaderStream::new(r).chain(tail);
    let name = format!(
        "attachment; filename=\"nebula-backup-{}.jsonl.gz\"",
        nebula_protocol::time::UnixMillis::now().as_i64()
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/gzip")
        .header(header::CONTENT_DISPOSITION, name)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}
