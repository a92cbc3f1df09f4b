//! The secrets page: names, versions, who and when; a form that stores a new version (the value
//! goes in and is never shown again) and a button that removes a secret.

use nebula_controller::secrets::SecretValue;

use crate::prelude::*;

pub(crate) async fn secrets_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let list = match cp.list_secrets(&user.cx()).await {
        Ok(l) => l,
        Err(e) => return op_error(e),
    };
    let admin = user.authorize(&cp, Op::ManageSecrets).is_ok();
    let body = html! {
        h1 { "Secrets" }
        p.dim { "Encrypted at rest under the controller's key file. Values are never shown: store a new version to change one." }
        @if list.is_empty() { p.dim id="no-secrets" { "No secrets yet." } }
        @else {
            table id="secrets" {
                thead { tr { th { "Name" } th { "Latest" } th { "Versions" } th { "By" } th { "At" } @if admin { th {} } } }
                tbody {
                    @for s in &list {
                        tr id={"secret-" (s.name)} {
                            td { code { (s.name) } }
                            td { (s.latest) }
                            td { (s.versions.len()) }
                            td { (s.updated_by) }
                            td { (s.updated_at) }
                            @if admin {
                                td {
                                    form method="post" action={"/ui/secrets/" (s.name) "/remove"} {
                                        (csrf_field(&user))
                                        button.secondary type="submit" { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if admin {
            form.actions method="post" action="/ui/secrets" id="secret-form" {
                (csrf_field(&user))
                label { "Name " input name="name" required pattern="[A-Za-z_][A-Za-z0-9_.\\-]*" maxlength="128"; }
                " "
                label { "Value " input name="value" type="password" autocomplete="off" required size="40"; }
                " "
                button type="submit" { "Store a new version" }
            }
        }
    };
    page(&user, "Secrets", "/ui/secrets", None, body).into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct SecretForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: String,
}

pub(crate) async fn set_secret(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<SecretForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    match cp
        .set_secret(&user.cx(), f.name.trim(), SecretValue::new(f.value))
        .await
    {
        Ok(_) => Redirect::to("/ui/secrets").into_response(),
        Err(e) => op_error(e),
    }
}

pub(crate) async fn remove_secret(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    form: Result<Form<SecretForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    match cp.remove_secret(&user.cx(), &name).await {
        Ok(()) => Redirect::to("/ui/secrets").into_response(),
        Err(e) => op_error(e),
    }
}
