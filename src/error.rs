//! The one error type every layer above storage returns.
//!
//! Each variant a client can cause carries the Matrix error code of the spec, so that
//! the HTTP layer can answer with `{"errcode": …, "error": …}` and the right status.

use std::time::Duration;

use http::StatusCode;
use ruma::api::{
    client::uiaa::UiaaInfo,
    error::{
        ErrorKind, LimitExceededErrorData, RetryAfter, StandardErrorBody, UnknownTokenErrorData,
        WrongRoomKeysVersionErrorData,
    },
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A failure with a Matrix error code, caused by the request.
    #[error("{message}")]
    Matrix {
        status: StatusCode,
        kind: ErrorKind,
        message: String,
    },

    /// The request needs (more) user-interactive authentication.
    #[error("user-interactive authentication required")]
    Uiaa(Box<UiaaInfo>),

    /// A failure of the server itself. The details are logged, not shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    fn matrix(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Matrix {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::FORBIDDEN, ErrorKind::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::BadJson, message)
    }
    pub fn not_json(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::NotJson, message)
    }
    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::InvalidParam, message)
    }
    pub fn missing_param(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::MissingParam, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::TooLarge, message)
    }
    pub fn unrecognized(status: StatusCode, message: impl Into<String>) -> Self {
        Self::matrix(status, ErrorKind::Unrecognized, message)
    }
    pub fn missing_token() -> Self {
        Self::matrix(
            StatusCode::UNAUTHORIZED,
            ErrorKind::MissingToken,
            "This endpoint needs an access token: send it as 'Authorization: Bearer <token>'",
        )
    }
    pub fn missing_token_msg(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, ErrorKind::MissingToken, message)
    }
    pub fn unknown_token(soft_logout: bool) -> Self {
        let mut data = UnknownTokenErrorData::new();
        data.soft_logout = soft_logout;
        Self::matrix(
            StatusCode::UNAUTHORIZED,
            ErrorKind::UnknownToken(data),
            "The access token is not recognised; log in again",
        )
    }
    pub fn user_in_use(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::UserInUse, message)
    }
    pub fn invalid_username(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::InvalidUsername, message)
    }
    pub fn exclusive(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::Exclusive, message)
    }
    pub fn user_deactivated() -> Self {
        Self::matrix(
            StatusCode::FORBIDDEN,
            ErrorKind::UserDeactivated,
            "This account has been deactivated",
        )
    }
    pub fn user_locked() -> Self {
        Self::matrix(
            StatusCode::UNAUTHORIZED,
            ErrorKind::UserLocked,
            "This account is locked: the directory no longer lists it",
        )
    }
    pub fn limit_exceeded(retry_after: Duration) -> Self {
        let mut data = LimitExceededErrorData::new();
        data.retry_after = Some(RetryAfter::Delay(retry_after));
        Self::matrix(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::LimitExceeded(data),
            "Too many requests; wait before trying again",
        )
    }
    pub fn unsupported_room_version(message: impl Into<String>) -> Self {
        Self::matrix(
            StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedRoomVersion,
            message,
        )
    }
    pub fn room_in_use(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::RoomInUse, message)
    }
    pub fn bad_state(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::FORBIDDEN, ErrorKind::BadState, message)
    }
    pub fn unknown(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::Unknown, message)
    }
    pub fn weak_password(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::WeakPassword, message)
    }
    pub fn token_incorrect(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, message)
    }
    pub fn wrong_room_keys_version(current: Option<String>) -> Self {
        match current {
            Some(v) => Self::matrix(
                StatusCode::FORBIDDEN,
                ErrorKind::WrongRoomKeysVersion(WrongRoomKeysVersionErrorData::new(v)),
                "This is not the current backup version",
            ),
            None => Self::not_found("No backup version exists"),
        }
    }
    pub fn cannot_overwrite_media() -> Self {
        Self::matrix(
            StatusCode::CONFLICT,
            ErrorKind::CannotOverwriteMedia,
            "This media id already has its content",
        )
    }
    pub fn not_yet_uploaded() -> Self {
        Self::matrix(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::NotYetUploaded,
            "The content of this media id has not been uploaded yet",
        )
    }
    /// A failed `/appservice/{id}/ping`: 502 for a bad answer, 504 for none.
    pub fn ping_failed(kind: ErrorKind, message: impl Into<String>) -> Self {
        let status = match kind {
            ErrorKind::UrlNotSet => StatusCode::BAD_REQUEST,
            ErrorKind::ConnectionTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self::matrix(status, kind, message)
    }
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::Internal(message.to_string())
    }

    /// The Matrix error code, for logs and tests.
    pub fn errcode(&self) -> String {
        match self {
            Self::Matrix { kind, .. } => kind.errcode().to_string(),
            Self::Uiaa(_) => "M_FORBIDDEN".to_owned(),
            Self::Internal(_) => "M_UNKNOWN".to_owned(),
        }
    }

    /// Status code and JSON body of the error as sent to a client.
    pub fn to_response_parts(&self) -> (StatusCode, serde_json::Value) {
        match self {
            Self::Matrix {
                status,
                kind,
                message,
            } => {
                let body = StandardErrorBody::new(kind.clone(), message.clone());
                let json = serde_json::to_value(&body).unwrap_or_else(
                    |_| serde_json::json!({"errcode": "M_UNKNOWN", "error": message}),
                );
                (*status, json)
            }
            Self::Uiaa(info) => (
                StatusCode::UNAUTHORIZED,
                serde_json::to_value(info.as_ref()).unwrap_or_default(),
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"errcode": "M_UNKNOWN", "error": "Internal server error"}),
            ),
        }
    }
}

impl From<rust_rocksdb::Error> for Error {
    fn from(e: rust_rocksdb::Error) -> Self {
        Self::Internal(format!("database: {e}"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::Internal(format!("json: {e}"))
    }
}

impl From<ruma::IdParseError> for Error {
    fn from(e: ruma::IdParseError) -> Self {
        Self::invalid_param(format!("invalid identifier: {e}"))
    }
}
