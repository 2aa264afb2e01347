//! The one place that maps failures and rejections to an HTTP status and protocol error code.

use crate::auth::AuthError;
use crate::ledger::CommandError;
use crate::protocol::BadRequest;
use serde_json::json;
use std::time::Duration;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: status_of(code),
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new("bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new("unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new("forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new("not_found", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new("internal", message)
    }

    pub fn rate_limited(retry_after: Duration) -> ApiError {
        let mut e = Self::new("rate_limited", "too many attempts; retry later");
        e.retry_after = Some(retry_after);
        e
    }

    /// `rate_limited` naming the budget that is spent (`what`), with `Retry-After`.
    pub fn budget_spent(what: &str, retry_after: Duration) -> ApiError {
        let mut e = Self::new(
            "rate_limited",
            format!("{what}; retry after the Retry-After delay"),
        );
        e.retry_after = Some(retry_after);
        e
    }

    /// `503 overloaded` with `Retry-After: 1`: a bounded resource is busy, retry shortly.
    pub fn overloaded(message: impl Into<String>) -> ApiError {
        let mut e = Self::new("overloaded", message);
        e.retry_after = Some(Duration::from_secs(1));
        e
    }

    pub fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        if let Some(d) = self.retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = warp::http::HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}

/// Status of each protocol error code (PROTOCOL.md).
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "bad_request" => StatusCode::BAD_REQUEST,
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "not_triggered" | "not_acknowledged" | "version_conflict" | "alarm_deleted"
        | "ledger_mismatch" | "conflict" => StatusCode::CONFLICT,
        "offset_out_of_range" => StatusCode::RANGE_NOT_SATISFIABLE,
        // HTTP only (README: an addition): a path the server has, with another method.
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "overloaded" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let mut err = ApiError::new(e.code(), e.to_string());
        if matches!(e, CommandError::Overloaded | CommandError::ShuttingDown) {
            err.retry_after = Some(Duration::from_secs(1));
        }
        err
    }
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        ApiError::bad_request(e.0)
    }
}

impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::internal(e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match &e {
            AuthError::UserExists(..) => {
                let mut err = ApiError::new("conflict", e.to_string());
                err.status = StatusCode::CONFLICT;
                err
            }
            AuthError::UnknownUser(_) => ApiError::not_found(e.to_string()),
            AuthError::BadCredentials | AuthError::Disabled | AuthError::TokenRevoked => {
                ApiError::unauthorized(e.to_string())
            }
            _ if e.is_client_fault() => ApiError::bad_request(e.to_string()),
            _ => {
                tracing::error!(error = %e, "auth storage failure");
                ApiError::internal("internal error")
            }
        }
    }
}
