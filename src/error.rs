//! Errors that tollgate itself answers, mapped to responses in this one
//! place.
//!
//! Every error is JSON. On the native and simple endpoints it has Ollama's
//! shape, `{"error": "message"}`, so the Ollama SDKs raise `ResponseError`
//! with the right status; on `/v1/*` [`openai_shape`] rewrites it into
//! OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
//! Errors that Ollama itself answers are passed through untouched and never
//! pass through here.

use crate::credits::Credits;
use crate::store::StoreError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("insufficient credits: {available} available")]
    PaymentRequired { available: Credits },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{message}")]
    TooManyRequests { retry_after: u64, message: String },
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PaymentRequired { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn openai_kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest(_)
            | ApiError::PayloadTooLarge { .. }
            | ApiError::RequestTimeout(_)
            | ApiError::MethodNotAllowed(_) => ("invalid_request_error", None),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::PaymentRequired { .. } => ("insufficient_quota", Some("insufficient_quota")),
            ApiError::Forbidden(_) => ("permission_error", None),
            ApiError::NotFound(_) => ("not_found_error", None),
            ApiError::TooManyRequests { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            ApiError::BadGateway(_)
            | ApiError::GatewayTimeout(_)
            | ApiError::Unavailable(_)
            | ApiError::Internal(_) => ("api_error", None),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InsufficientCredits { available } => {
                ApiError::PaymentRequired { available }
            }
            StoreError::NoSuchKey(id) => ApiError::NotFound(format!("no key with id {id}")),
            StoreError::DuplicateKey => ApiError::BadRequest("that key already exists".into()),
            e @ StoreError::BalanceOutOfRange => ApiError::BadRequest(e.to_string()),
            StoreError::Backend(msg) => {
                tracing::error!(error = %msg, "store failure");
                ApiError::Internal("storage failure".into())
            }
            StoreError::Unconfirmed(msg) => {
                tracing::error!(error = %msg, "a write the database did not confirm");
                ApiError::Internal(
                    "storage failure: the database did not confirm the change, which may \
                     have been applied; look at the key (its balance, or the key list for a \
                     new key) before making it again"
                        .into(),
                )
            }
        }
    }
}

impl From<crate::admin::keys::KeyError> for ApiError {
    fn from(e: crate::admin::keys::KeyError) -> Self {
        match e {
            crate::admin::keys::KeyError::Store(e) => e.into(),
            invalid => ApiError::BadRequest(invalid.to_string()),
        }
    }
}

/// Attached to error responses so [`openai_shape`] can re-shape them.
#[derive(Clone, Debug)]
struct OpenAiError {
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        let (kind, code) = self.openai_kind();
        let mut response = (status, axum::Json(json!({ "error": message }))).into_response();
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response.extensions_mut().insert(OpenAiError {
            message,
            kind,
            code,
        });
        response
    }
}

/// Middleware for `/v1/*`: gives tollgate's own errors OpenAI's shape.
pub async fn openai_shape(request: Request, next: Next) -> Response {
    in_openai_shape(next.run(request).await)
}

/// `response` in OpenAI's shape if it is one of tollgate's own errors.
pub fn in_openai_shape(response: Response) -> Response {
    let Some(err) = response.extensions().get::<OpenAiError>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    let body = json!({
        "error": {
            "message": err.message,
            "type": err.kind,
            "param": null,
            "code": err.code,
        }
    });
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}

/// The fallback for a method that a path does not take (axum adds the
/// `Allow` header).
pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::MethodNotAllowed(format!("method {method} is not allowed here"))
}

/// The fallback for paths tollgate does not serve.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("404 page not found".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    /// A store failure's details stay in the log, but a change the
    /// database may have applied says so: the admin must not make it again
    /// blindly.
    #[tokio::test]
    async fn an_unconfirmed_change_is_told_as_such() {
        let hidden = ApiError::from(StoreError::Backend("connection reset".into())).into_response();
        let told =
            ApiError::from(StoreError::Unconfirmed("connection reset".into())).into_response();
        assert_eq!(hidden.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(told.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = |r: Response| async move {
            let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let hidden = body(hidden).await;
        let told = body(told).await;
        assert!(
            !hidden.contains("connection reset") && !hidden.contains("may have"),
            "{hidden}"
        );
        assert!(told.contains("may have been applied"), "{told}");
        assert!(!told.contains("connection reset"), "{told}");
    }
}
