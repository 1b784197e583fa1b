//! Glue between axum and ruma: every endpoint takes a ruma request type and returns a
//! ruma response type, so handlers read like the spec.

use std::{any::TypeId, collections::HashMap, future::Future, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, FromRequest, Path, Query, Request, State},
    response::{IntoResponse, Response},
    routing::{MethodFilter, on},
};
use bytes::BytesMut;
use ruma::{
    OwnedDeviceId, OwnedUserId,
    api::{
        IncomingRequest, IncomingRequestExt, OutgoingResponse, OutgoingResponseExt,
        auth_scheme::{AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional},
        error::{DeserializationError, FromHttpRequestError},
        path_builder::PathBuilder,
    },
};

use crate::{
    error::Error,
    service::{Services, appservice::Appservice},
};

/// A parsed, authenticated request.
pub struct Ruma<T> {
    pub request: T,
    pub user: Option<OwnedUserId>,
    pub device: Option<OwnedDeviceId>,
    /// The client session of the access token (the scope of transaction ids).
    pub client_session: Option<String>,
    pub ip: Option<std::net::IpAddr>,
    /// The appservice whose `as_token` authenticated the request.
    pub appservice: Option<Arc<Appservice>>,
    /// `?ts=`: the timestamp an appservice wants its events to carry.
    pub massaged_ts: Option<ruma::MilliSecondsSinceUnixEpoch>,
}

pub use crate::service::users::APPSERVICE_DEVICE;

impl<T> Ruma<T> {
    /// The authenticated user; only call on endpoints that require a token.
    pub fn user(&self) -> &ruma::UserId {
        self.user
            .as_deref()
            .expect("endpoint requires authentication")
    }
    pub fn device(&self) -> &ruma::DeviceId {
        self.device
            .as_deref()
            .expect("endpoint requires authentication")
    }
    /// The client session: sees the transaction ids it sent events with.
    pub fn client_session(&self) -> &str {
        self.client_session
            .as_deref()
            .expect("endpoint requires authentication")
    }
    /// The authenticated user and the request, taken apart (to move large bodies).
    pub fn into_user_and_request(self) -> (OwnedUserId, T) {
        (
            self.user.expect("endpoint requires authentication"),
            self.request,
        )
    }
    pub fn ip_key(&self) -> String {
        self.ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

impl<T> std::ops::Deref for Ruma<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.request
    }
}

fn query_param(parts: &http::request::Parts, name: &str) -> Option<String> {
    let Query(mut query) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri).ok()?;
    query.remove(name)
}

/// Who an appservice request acts as: its own user, or (`?user_id=`) one of the users
/// of its namespace that exists.
fn appservice_identity(
    services: &Services,
    parts: &http::request::Parts,
    appservice: &Appservice,
) -> Result<OwnedUserId, Error> {
    let Some(raw) = query_param(parts, "user_id") else {
        return Ok(appservice.sender.clone());
    };
    let user = ruma::UserId::parse(raw.as_str())
        .map_err(|e| Error::invalid_param(format!("user_id: {e}")))?;
    if !appservice.claims_user(&user) {
        return Err(Error::exclusive(format!(
            "{user} is not in the namespace of appservice {:?}",
            appservice.id()
        )));
    }
    if !services.users.exists(&user)? {
        return Err(Error::forbidden(format!(
            "{user} has not been registered by the appservice"
        )));
    }
    Ok(user)
}

fn access_token(parts: &http::request::Parts) -> Option<String> {
    if let Some(h) = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        && let Some(t) = h.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_owned());
    }
    // The deprecated query parameter.
    query_param(parts, "access_token")
}

impl<T> FromRequest<Arc<Services>> for Ruma<T>
where
    T: IncomingRequest + Send + 'static,
{
    type Rejection = Error;

    async fn from_request(req: Request, services: &Arc<Services>) -> Result<Self, Error> {
        let (mut parts, body) = req.into_parts();
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let expected = T::PATH_BUILDER._path_parameters().len();
        let mut path_args: Vec<String> = if expected == 0 {
            Vec::new()
        } else {
            match <Path<Vec<String>> as axum::extract::FromRequestParts<()>>::from_request_parts(
                &mut parts,
                &(),
            )
            .await
            {
                Ok(Path(args)) => args,
                Err(_) => return Err(Error::invalid_param("a path parameter is not valid")),
            }
        };
        // Routes registered without a trailing empty segment (`/state/{type}/`) still
        // need every parameter the endpoint declares.
        while path_args.len() < expected {
            path_args.push(String::new());
        }
        let limit = if is_json_endpoint(&parts) {
            services.globals.config.limits.max_request_bytes
        } else {
            services.media.max_upload_bytes()
        };
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
            Error::too_large(format!("request bodies may be at most {limit} bytes"))
        })?;

        let auth = TypeId::of::<T::Authentication>();
        let token = access_token(&parts);
        let mut appservice = None;
        let (user, device, client_session) = if auth == TypeId::of::<AccessToken>()
            || auth == TypeId::of::<AccessTokenOptional>()
        {
            match token {
                Some(token) => match services.users.authenticate(&token)? {
                    Some(s) => (Some(s.user_id), Some(s.device_id), Some(s.client_session)),
                    None => match services.appservices.by_as_token(&token) {
                        Some(a) => {
                            let user = appservice_identity(services, &parts, &a)?;
                            appservice = Some(a);
                            (
                                Some(user),
                                Some(OwnedDeviceId::from(APPSERVICE_DEVICE)),
                                Some(APPSERVICE_DEVICE.to_owned()),
                            )
                        }
                        None => return Err(Error::unknown_token(false)),
                    },
                },
                None if auth == TypeId::of::<AccessToken>() => return Err(Error::missing_token()),
                None => (None, None, None),
            }
        } else if auth == TypeId::of::<AppserviceToken>()
            || auth == TypeId::of::<AppserviceTokenOptional>()
        {
            match token {
                Some(token) => match services.appservices.by_as_token(&token) {
                    Some(a) => {
                        let user = a.sender.clone();
                        appservice = Some(a);
                        (Some(user), None, None)
                    }
                    None => return Err(Error::unknown_token(false)),
                },
                None if auth == TypeId::of::<AppserviceToken>() => {
                    return Err(Error::missing_token());
                }
                None => (None, None, None),
            }
        } else {
            (None, None, None)
        };
        let massaged_ts = appservice
            .as_ref()
            .and_then(|_| query_param(&parts, "ts"))
            .and_then(|t| t.parse::<u64>().ok())
            .and_then(ruma::UInt::new)
            .map(ruma::MilliSecondsSinceUnixEpoch);

        let has_body = !bytes.is_empty();
        if has_body
            && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err()
            && is_json_endpoint(&parts)
        {
            return Err(Error::not_json("The request body is not valid JSON"));
        }
        let body_bytes: &[u8] =
            if !has_body && matches!(parts.method, http::Method::POST | http::Method::PUT) {
                b"{}"
            } else {
                &bytes
            };
        let path_for_log = parts.uri.path().to_owned();
        let http_req = http::Request::from_parts(parts, body_bytes);
        let args: Vec<&str> = path_args.iter().map(String::as_str).collect();
        // Parsing is ruma's; a panic on some odd input must still be a client error.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            T::try_from_http_request(http_req, &args)
        }));
        let request = match parsed {
            Ok(result) => result.map_err(map_parse_error)?,
            Err(_) => {
                tracing::warn!(path = %path_for_log, "request parser panicked; answered M_BAD_JSON");
                return Err(Error::bad_json(
                    "The request body does not match the endpoint",
                ));
            }
        };
        Ok(Self {
            request,
            user,
            device,
            client_session,
            ip,
            appservice,
            massaged_ts,
        })
    }
}

fn is_json_endpoint(parts: &http::request::Parts) -> bool {
    !parts.uri.path().starts_with("/_matrix/media/")
}

fn map_parse_error(e: FromHttpRequestError) -> Error {
    match e {
        FromHttpRequestError::MethodMismatch { .. } => Error::unrecognized(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed for this endpoint",
        ),
        FromHttpRequestError::Deserialization(d) => match d {
            DeserializationError::Json(e) => {
                Error::bad_json(format!("The request body does not match the endpoint: {e}"))
            }
            DeserializationError::Ident(e) => {
                Error::invalid_param(format!("Invalid identifier: {e}"))
            }
            DeserializationError::Query(e) => {
                Error::invalid_param(format!("Invalid query parameter: {e}"))
            }
            other => Error::bad_json(format!("Invalid request: {other}")),
        },
        other => Error::bad_json(format!("Invalid request: {other}")),
    }
}

/// A ruma response, as an axum response.
pub struct RumaResponse<R>(pub R);

impl<R: OutgoingResponse> IntoResponse for RumaResponse<R> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<BytesMut>() {
            Ok(res) => res.map(|b| Body::from(b.freeze())).into_response(),
            Err(e) => Error::internal(format!("cannot serialise response: {e}")).into_response(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let (status, body) = self.to_response_parts();
        let mut res = (status, axum::Json(body)).into_response();
        if let Error::Matrix {
            kind: ruma::api::error::ErrorKind::LimitExceeded(data),
            ..
        } = &self
            && let Some(ruma::api::error::RetryAfter::Delay(d)) = data.retry_after
            && let Ok(v) = http::HeaderValue::from_str(&d.as_secs().max(1).to_string())
        {
            res.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        res
    }
}

/// Every path (stable and legacy) of a ruma endpoint. An empty state key travels as a
/// trailing slash or no segment at all, so those forms are routed too.
fn paths_of<T: IncomingRequest>() -> Vec<String> {
    let mut paths: Vec<String> = T::PATH_BUILDER.all_paths().map(str::to_owned).collect();
    for p in paths.clone() {
        if let Some(base) = p.strip_suffix("/{state_key}") {
            paths.push(format!("{base}/"));
            paths.push(base.to_owned());
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

/// Register a handler for every path of a ruma endpoint.
pub fn route<T, F, Fut>(router: Router<Arc<Services>>, handler: F) -> Router<Arc<Services>>
where
    T: IncomingRequest + Send + 'static,
    T::OutgoingResponse: Send,
    F: Fn(Arc<Services>, Ruma<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T::OutgoingResponse, Error>> + Send + 'static,
{
    let filter = MethodFilter::try_from(T::METHOD).expect("ruma endpoints use standard methods");
    let mut router = router;
    for path in paths_of::<T>() {
        let h = handler.clone();
        router = router.route(
            &path,
            on(
                filter,
                move |State(s): State<Arc<Services>>, req: Ruma<T>| {
                    let h = h.clone();
                    async move { h(s, req).await.map(RumaResponse) }
                },
            ),
        );
    }
    router
}

/// Like [`route`], for handlers that build their response themselves: `/sync`, whose
/// JSON is assembled directly, and media downloads, which add security headers.
pub fn route_with<T, F, Fut, R>(router: Router<Arc<Services>>, handler: F) -> Router<Arc<Services>>
where
    T: IncomingRequest + Send + 'static,
    F: Fn(Arc<Services>, Ruma<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
    R: IntoResponse + 'static,
{
    let filter = MethodFilter::try_from(T::METHOD).expect("ruma endpoints use standard methods");
    let mut router = router;
    for path in paths_of::<T>() {
        let h = handler.clone();
        router = router.route(
            &path,
            on(
                filter,
                move |State(s): State<Arc<Services>>, req: Ruma<T>| {
                    let h = h.clone();
                    async move { h(s, req).await }
                },
            ),
        );
    }
    router
}
