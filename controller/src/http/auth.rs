//! Authentication of API requests: a bearer token to an `OpCtx` for the handlers.

use super::prelude::*;

pub(super) async fn authenticate(
    State(cp): State<Arc<ControlPlane>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return unauthorized("missing bearer token (Authorization: Bearer <token>)");
    };
    match cp.api_token(&crate::hash_secret(token)).await {
        Ok(Some(rec)) if rec.role == AI_ROLE => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is scoped to the AI gateway (/v1/chat/completions and the like)",
        )
        .into_response(),
        Ok(Some(rec)) => {
            req.extensions_mut()
                .insert(OpCtx::new(rec.name, Role::parse(&rec.role), Via::Api));
            next.run(req).await
        }
        Ok(None) => unauthorized("invalid API token"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}
