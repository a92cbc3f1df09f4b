//! Expressions: `${{ inputs.x }}`, `${{ steps.build.outputs.code == 0 }}`, `${{ failure() }}`.
//!
//! Evaluated by minijinja's expression language with strict undefined values (a name that is
//! not there is an error, never an empty string) and a fuel limit (an expression cannot loop
//! for long). Secrets are not in scope: fields that take a secret name it (`secret: NAME`),
//! so a value never passes through an expression.
//!
//! [`render`] turns a step's `with` into data: a string that is exactly one `${{ ... }}` becomes
//! the expression's value with its type (a number stays a number, a list a list); any other
//! string has each expression's text put in its place. Values are never put into a shell line:
//! an exec step's arguments are argv items, whatever they hold.

use std::sync::OnceLock;

use minijinja::{Environment, State, UndefinedBehavior, Value};
use serde_json::Value as Json;

/// Work one expression may do (instructions of minijinja's machine).
pub const FUEL: u64 = 50_000;
/// The longest expression (bytes between `${{` and `}}`): longer ones nest deep enough to
/// exhaust a thread's stack in the parser.
pub const MAX_EXPR: usize = 1024;
/// The longest rendered value (bytes of JSON), per `with` value.
pub const MAX_RENDERED: usize = 256 * 1024;

/// What a step's expressions can see.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `{inputs, steps, trigger, run}`.
    pub context: Json,
    /// For the status functions: the needed steps all succeeded...
    pub needs_ok: bool,
    /// ... one of them failed (or timed out) ...
    pub needs_failed: bool,
    /// ... the run was cancelled.
    pub cancelled: bool,
}

/// Why an expression could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError(pub String);

impl std::fmt::Display for ExprError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExprError {}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        let flag = |state: &State<'_, '_>, name: &str| {
            state
                .lookup("__status")
                .and_then(|s| s.get_attr(name).ok())
                .is_some_and(|v| v.is_true())
        };
        env.add_function("success", move |state: &State<'_, '_>| {
            flag(state, "ok") && !flag(state, "cancelled")
        });
        env.add_function("failure", move |state: &State<'_, '_>| {
            flag(state, "failed") && !flag(state, "cancelled")
        });
        env.add_function("cancelled", move |state: &State<'_, '_>| {
            flag(state, "cancelled")
        });
        env.add_function("always", |_: &State<'_, '_>| true);
        env
    })
}

fn message(e: &minijinja::Error) -> String {
    let mut s = match e.kind() {
        minijinja::ErrorKind::UndefinedError => "undefined value".to_owned(),
        minijinja::ErrorKind::OutOfFuel => {
            return "the expression does too much work (fuel limit)".into()
        }
        _ => e.kind().to_string(),
    };
    if let Some(d) = e.detail() {
        s.push_str(": ");
        s.push_str(d);
    }
    s
}

fn compile(src: &str) -> Result<minijinja::Expression<'static, 'static>, ExprError> {
    if src.len() > MAX_EXPR {
        let head: String = src.chars().take(40).collect();
        return Err(ExprError(format!(
            "`{head}...`: an expression is at most {MAX_EXPR} bytes"
        )));
    }
    env()
        .compile_expression_owned(src.to_owned())
        .map_err(|e| ExprError(format!("`{}`: {}", src.trim(), message(&e))))
}

fn context(scope: &Scope) -> Value {
    let ctx = Value::from_serialize(&scope.context);
    let status = Value::from_serialize(serde_json::json!({
        "ok": scope.needs_ok,
        "failed": scope.needs_failed,
        "cancelled": scope.cancelled,
    }));
    minijinja::context! { __status => status, ..ctx }
}

/// Evaluate one bare expression (the text between `${{` and `}}`).
pub fn eval(src: &str, scope: &Scope) -> Result<Json, ExprError> {
    let expr = compile(src)?;
    let v = expr
        .eval(context(scope))
        .map_err(|e| ExprError(format!("`{}`: {}", src.trim(), message(&e))))?;
    if v.is_undefined() {
        return Err(ExprError(format!("`{}`: undefined value", src.trim())));
    }
    serde_json::to_value(&v).map_err(|e| ExprError(format!("`{}`: {e}", src.trim())))
}

/// A condition (`if:`), written with or without `${{ }}`; absent means `success()`.
pub fn condition(src: Option<&str>, scope: &Scope) -> Result<bool, ExprError> {
    let Some(src) = src else {
        return Ok(scope.needs_ok && !scope.cancelled);
    };
    let bare = match pieces(src)?.as_slice() {
        [Piece::Expr(e)] => e.to_string(),
        p if p.iter().all(|p| matches!(p, Piece::Text(_))) => src.to_owned(),
        _ => return Err(ExprError(format!("`{src}`: a condition is one expression"))),
    };
    let v = eval(&bare, scope)?;
    Ok(truthy(&v))
}

fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    Expr(&'a str),
}

/// Split a string into text and `${{ ... }}` expressions.
fn pieces(s: &str) -> Result<Vec<Piece<'_>>, ExprError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 3..];
        let end = after
            .find("}}")
            .ok_or_else(|| ExprError(format!("`{s}`: `${{{{` without its `}}}}`")))?;
        let e = after[..end].trim();
        if e.is_empty() {
            return Err(ExprError(format!("`{s}`: an empty `${{{{ }}}}`")));
        }
        out.push(Piece::Expr(e));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Render every string in `v` (recursively) against `scope`.
pub fn render(v: &Json, scope: &Scope) -> Result<Json, ExprError> {
    let out = match v {
        Json::String(s) => render_str(s, scope)?,
        Json::Array(items) => Json::Array(
            items
                .iter()
                .map(|i| render(i, scope))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, scope)?)))
                .collect::<Result<_, ExprError>>()?,
        ),
        other => other.clone(),
    };
    Ok(out)
}

fn render_str(s: &str, scope: &Scope) -> Result<Json, ExprError> {
    let parts = pieces(s)?;
    let v = match parts.as_slice() {
        [] => Json::String(String::new()),
        [Piece::Expr(e)] => eval(e, scope)?,
        _ => {
            let mut out = String::new();
            for p in &parts {
                match p {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Expr(e) => match eval(e, scope)? {
                        Json::String(v) => out.push_str(&v),
                        Json::Null => {}
                        other => out.push_str(&other.to_string()),
                    },
                }
                if out.len() > MAX_RENDERED {
                    break;
                }
            }
            Json::String(out)
        }
    };
    let len = match &v {
        Json::String(s) => s.len(),
        other => other.to_string().len(),
    };
    if len > MAX_RENDERED {
        let head: String = s.chars().take(80).collect();
        return Err(ExprError(format!(
            "`{head}` renders to more than {} KiB",
            MAX_RENDERED / 1024
        )));
    }
    Ok(v)
}

/// Check every expression in `v` compiles, and return the top-level names and the steps they
/// read (`steps.NAME`), for validation against the workflow.
pub fn references(v: &Json) -> Result<Vec<String>, ExprError> {
    let mut names = Vec::new();
    walk_strings(v, &mut |s| {
        for p in pieces(s)? {
            if let Piece::Expr(e) = p {
                names.extend(expression_names(e)?);
            }
        }
        Ok(())
    })?;
    Ok(names)
}

/// The names one bare expression reads: `inputs.x`, `steps.build`, `trigger`...
pub fn expression_names(e: &str) -> Result<Vec<String>, ExprError> {
    let expr = compile(e)?;
    let globals: Vec<&str> = env().globals().map(|(name, _)| name).collect();
    let mut names: Vec<String> = expr
        .undeclared_variables(true)
        .into_iter()
        .filter(|n| !globals.contains(&n.split('.').next().unwrap_or_default()))
        .collect();
    names.sort();
    Ok(names)
}

fn walk_strings(
    v: &Json,
    f: &mut dyn FnMut(&str) -> Result<(), ExprError>,
) -> Result<(), ExprError> {
    match v {
        Json::String(s) => f(s),
        Json::Array(items) => items.iter().try_for_each(|i| walk_strings(i, f)),
        Json::Object(map) => map.values().try_for_each(|i| walk_strings(i, f)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> Scope {
        Scope {
            context: json!({
                "inputs": {"service": "web", "count": 3, "tags": ["a", "b"]},
                "steps": {"build": {"state": "succeeded", "outputs": {"code": 0, "stdout": "ok"}}},
                "trigger": {"body": {"ref": "main; rm -rf /"}},
            }),
            needs_ok: true,
            needs_failed: false,
            cancelled: false,
        }
    }

    #[test]
    fn a_whole_expression_keeps_its_type_and_text_interpolates() {
        let s = scope();
        assert_eq!(render(&json!("${{ inputs.count }}"), &s).unwrap(), json!(3));
        assert_eq!(
            render(&json!("${{ inputs.tags }}"), &s).unwrap(),
            json!(["a", "b"])
        );
        assert_eq!(
            render(
                &json!("deploy ${{ inputs.service }} x${{ inputs.count }}"),
                &s
            )
            .unwrap(),
            json!("deploy web x3")
        );
        assert_eq!(
            render(
                &json!({"args": ["${{ trigger.body.ref }}", "plain"], "n": 1}),
                &s
            )
            .unwrap(),
            json!({"args": ["main; rm -rf /", "plain"], "n": 1})
        );
        assert_eq!(
            render(&json!("${{ steps.build.outputs.code == 0 }}"), &s).unwrap(),
            json!(true)
        );
    }

    #[test]
    fn undefined_names_and_bad_syntax_are_errors_not_empty_strings() {
        let s = scope();
        let e = render(&json!("${{ inputs.nope }}"), &s).unwrap_err();
        assert!(e.0.contains("undefined"), "{e}");
        assert!(render(&json!("x ${{ secrets.TOKEN }}"), &s).is_err());
        assert!(render(&json!("${{ inputs.service ++ }}"), &s).is_err());
        assert!(render(&json!("${{ inputs.service"), &s).is_err());
        assert!(render(&json!("${{ }}"), &s).is_err());
    }

    #[test]
    fn fuel_and_the_size_cap_stop_expensive_expressions() {
        let s = scope();
        let long = format!("1{}", "+1".repeat(40_000));
        let e = eval(&long, &s).unwrap_err();
        assert!(e.0.contains("at most 1024 bytes"), "{e}");
        // The longest allowed, however nested, is evaluated or refused without harm.
        assert_eq!(
            eval(&format!("1{}", "+1".repeat(511)), &s).unwrap(),
            json!(512)
        );
        let deep = format!("{}1{}", "(".repeat(511), ")".repeat(511));
        let _ = eval(&deep, &s);
        let deep = format!("{}1{}", "[".repeat(511), "]".repeat(511));
        let _ = eval(&deep, &s);
        let e = render(&json!("${{ range(100000) | join(',') }}"), &s).unwrap_err();
        assert!(e.0.contains("renders to more than"), "{e}");
    }

    #[test]
    fn status_functions_follow_the_needed_steps_and_the_run() {
        let mut s = scope();
        assert!(condition(None, &s).unwrap());
        assert!(condition(Some("${{ success() }}"), &s).unwrap());
        assert!(!condition(Some("failure()"), &s).unwrap());
        s.needs_ok = false;
        s.needs_failed = true;
        assert!(!condition(None, &s).unwrap());
        assert!(condition(Some("${{ failure() }}"), &s).unwrap());
        assert!(condition(Some("always()"), &s).unwrap());
        assert!(condition(Some("failure() and inputs.count > 2"), &s).unwrap());
        s.cancelled = true;
        assert!(!condition(Some("failure()"), &s).unwrap());
        assert!(condition(Some("cancelled()"), &s).unwrap());
        assert!(condition(Some("${{ always() }} and x"), &s).is_err());
    }

    #[test]
    fn references_name_what_expressions_read() {
        let names =
            references(&json!({"a": "${{ steps.build.outputs.code }} ${{ inputs.x }}"})).unwrap();
        assert!(
            names.iter().any(|n| n.starts_with("steps.build")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.starts_with("inputs")), "{names:?}");
    }
}
