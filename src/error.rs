//! Every way sluice refuses or fails a request: a short code, its HTTP status and the JSON body
//! the client receives. One place maps Pingora's errors onto these codes.

use pingora_error::{Error, ErrorSource, ErrorType};

/// The short codes sent in `Sluice-Error`, logged, and used as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    BadRequest,
    BadTarget,
    RateLimited,
    AuthRequired,
    AuthFailed,
    ForbiddenDestination,
    ForbiddenHost,
    ForbiddenPort,
    UriTooLong,
    BodyTooLarge,
    TooManyConnections,
    NoTarget,
    HeadTooLarge,
    RequestTimeout,
    Dns,
    ConnectRefused,
    ConnectTimeout,
    ConnectFailed,
    UpstreamTls,
    UpstreamTimeout,
    UpstreamClosed,
    UpstreamProtocol,
    ClientClosed,
    /// A TLS handshake sent to the plain listener (a proxy URL written `https://`).
    TlsOnPlainListener,
    NoHealthyRegion,
    LoopDetected,
    SharedStateUnavailable,
    /// The request's estimated tokens exceed the whole of one of its host's token budgets: it
    /// could never be sent.
    OverTokenBudget,
    /// No such job (or not this client's), or no such API path.
    NotFound,
    /// The job's call was already sent: it can no longer be canceled.
    JobStarted,
    /// The job store is not open (yet): another process still holds it, or it failed.
    JobsUnavailable,
    Internal,
}

impl Code {
    pub const ALL: [Code; 32] = [
        Code::BadRequest,
        Code::BadTarget,
        Code::RateLimited,
        Code::AuthRequired,
        Code::AuthFailed,
        Code::ForbiddenDestination,
        Code::ForbiddenHost,
        Code::ForbiddenPort,
        Code::UriTooLong,
        Code::BodyTooLarge,
        Code::TooManyConnections,
        Code::NoTarget,
        Code::HeadTooLarge,
        Code::RequestTimeout,
        Code::Dns,
        Code::ConnectRefused,
        Code::ConnectTimeout,
        Code::ConnectFailed,
        Code::UpstreamTls,
        Code::UpstreamTimeout,
        Code::UpstreamClosed,
        Code::UpstreamProtocol,
        Code::ClientClosed,
        Code::TlsOnPlainListener,
        Code::NoHealthyRegion,
        Code::LoopDetected,
        Code::SharedStateUnavailable,
        Code::OverTokenBudget,
        Code::NotFound,
        Code::JobStarted,
        Code::JobsUnavailable,
        Code::Internal,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::BadTarget => "bad_target",
            Code::RateLimited => "rate_limited",
            Code::AuthRequired => "auth_required",
            Code::AuthFailed => "auth_failed",
            Code::ForbiddenDestination => "forbidden_destination",
            Code::ForbiddenHost => "forbidden_host",
            Code::ForbiddenPort => "forbidden_port",
            Code::UriTooLong => "uri_too_long",
            Code::BodyTooLarge => "body_too_large",
            Code::TooManyConnections => "too_many_connections",
            Code::NoTarget => "no_target",
            Code::HeadTooLarge => "head_too_large",
            Code::RequestTimeout => "request_timeout",
            Code::Dns => "dns",
            Code::ConnectRefused => "connect_refused",
            Code::ConnectTimeout => "connect_timeout",
            Code::ConnectFailed => "connect_failed",
            Code::UpstreamTls => "upstream_tls",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::UpstreamClosed => "upstream_closed",
            Code::UpstreamProtocol => "upstream_protocol",
            Code::ClientClosed => "client_closed",
            Code::TlsOnPlainListener => "tls_on_plain_listener",
            Code::NoHealthyRegion => "no_healthy_region",
            Code::LoopDetected => "loop_detected",
            Code::SharedStateUnavailable => "shared_state_unavailable",
            Code::OverTokenBudget => "over_token_budget",
            Code::NotFound => "not_found",
            Code::JobStarted => "job_started",
            Code::JobsUnavailable => "jobs_unavailable",
            Code::Internal => "internal",
        }
    }

    /// The status sent to the client; 0 when the client is gone and nothing can be sent.
    pub const fn status(self) -> u16 {
        match self {
            Code::BadRequest | Code::BadTarget | Code::NoTarget => 400,
            Code::HeadTooLarge => 431,
            Code::RateLimited => 429,
            Code::AuthRequired | Code::AuthFailed => 407,
            Code::ForbiddenDestination | Code::ForbiddenHost | Code::ForbiddenPort => 403,
            Code::UriTooLong => 414,
            Code::BodyTooLarge | Code::OverTokenBudget => 413,
            Code::TooManyConnections | Code::SharedStateUnavailable | Code::JobsUnavailable => 503,
            Code::NotFound => 404,
            Code::JobStarted => 409,
            Code::RequestTimeout => 408,
            Code::Dns
            | Code::ConnectRefused
            | Code::ConnectFailed
            | Code::UpstreamTls
            | Code::UpstreamClosed
            | Code::UpstreamProtocol => 502,
            Code::ConnectTimeout | Code::UpstreamTimeout => 504,
            // Nothing can be sent: the client is gone, or waits for a TLS answer.
            Code::ClientClosed | Code::TlsOnPlainListener => 0,
            Code::NoHealthyRegion => 503,
            Code::LoopDetected => 508,
            Code::Internal => 500,
        }
    }

    /// Classify any error raised while proxying: sluice's own failures by the typed code
    /// they carry, Pingora's by their type and source.
    pub fn of(e: &Error) -> Code {
        use ErrorType::*;
        if let Some(f) = e.root_cause().downcast_ref::<Failure>() {
            return f.code;
        }
        let upstream = e.esource() == &ErrorSource::Upstream;
        match e.etype() {
            CustomCode(..) => Code::Internal,
            // Pingora's body framing errors.
            Custom("InvalidChunk" | "InvalidTrailerEnd") if upstream => Code::UpstreamProtocol,
            Custom("InvalidChunk" | "InvalidTrailerEnd") => Code::BadRequest,
            Custom("PrematureBodyEnd") if upstream => Code::UpstreamClosed,
            Custom("PrematureBodyEnd") => Code::ClientClosed,
            ConnectTimedout => Code::ConnectTimeout,
            ConnectRefused => Code::ConnectRefused,
            ConnectNoRoute | ConnectError | SocketError | BindError | ConnectProxyFailure => {
                Code::ConnectFailed
            }
            TLSWantX509Lookup | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert
            | HandshakeError => Code::UpstreamTls,
            ReadTimedout | WriteTimedout if upstream => Code::UpstreamTimeout,
            ReadTimedout | WriteTimedout => Code::RequestTimeout,
            ConnectionClosed | ReadError | WriteError if upstream => Code::UpstreamClosed,
            ConnectionClosed | ReadError | WriteError => Code::ClientClosed,
            InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade if upstream => {
                Code::UpstreamProtocol
            }
            InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => Code::BadRequest,
            HTTPStatus(s) if (400..500).contains(s) => Code::BadRequest,
            HTTPStatus(_) if upstream => Code::UpstreamProtocol,
            _ => Code::Internal,
        }
    }
}

/// The code of a failure sluice decided itself (and the `Retry-After` of a refusal by
/// admission), carried as the cause of its Pingora error so that the edge reads it back by
/// type (no code is ever recovered from a name).
#[derive(Debug)]
struct Failure {
    code: Code,
    retry_after: Option<u64>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code.as_str())
    }
}

impl std::error::Error for Failure {}

/// A Pingora error carrying one of our codes and a human reason.
pub fn error(code: Code, message: impl Into<String>) -> Box<Error> {
    error_with_status(code, code.status(), message)
}

/// As `error`, with a status other than the code's usual one (401 instead of 407).
pub fn error_with_status(code: Code, status: u16, message: impl Into<String>) -> Box<Error> {
    refusal(code, status, message, None)
}

/// As `error_with_status`, with the `Retry-After` (seconds) its answer carries.
pub fn refusal(
    code: Code,
    status: u16,
    message: impl Into<String>,
    retry_after: Option<u64>,
) -> Box<Error> {
    Error::create(
        ErrorType::CustomCode(code.as_str(), status),
        ErrorSource::Unset,
        Some(message.into().into()),
        Some(Box::new(Failure { code, retry_after })),
    )
}

/// The `Retry-After` (seconds) a refusal carries.
pub fn retry_after_of(e: &Error) -> Option<u64> {
    e.root_cause()
        .downcast_ref::<Failure>()
        .and_then(|f| f.retry_after)
}

/// The status to answer an error with.
pub fn status_of(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::CustomCode(_, status) => *status,
        _ => Code::of(e).status(),
    }
}

/// The human reason of an error: our own explanation, or Pingora's: the context of each
/// error in the chain, outermost first, then the first cause that is not a Pingora error
/// (a TLS library's reason, say), with advice where a reason is known to puzzle.
pub fn message_of(e: &Error) -> String {
    if matches!(e.etype(), ErrorType::CustomCode(..)) {
        return e.context.as_ref().map_or_else(
            || e.etype().as_str().to_string(),
            |c| c.as_str().to_string(),
        );
    }
    let mut parts: Vec<String> = Vec::new();
    let mut at: &Error = e;
    // Chains are short (a few hops); the bound only guards against a surprise.
    for _ in 0..8 {
        if let Some(c) = at.context.as_ref() {
            parts.push(c.as_str().to_string());
        }
        match at.cause.as_ref() {
            Some(cause) => match cause.downcast_ref::<Error>() {
                Some(inner) => at = inner,
                None => {
                    parts.push(cause.to_string());
                    break;
                }
            },
            None => break,
        }
    }
    // Pingora's socket addresses say nothing about why; its chains embedded in a context
    // read better with plain separators.
    parts.retain(|p| !p.starts_with("local address") && !p.starts_with("peer addr"));
    if parts.is_empty() {
        parts.push(e.etype().as_str().to_string());
    }
    let mut message = parts
        .join(": ")
        .replace(" context: ", ": ")
        .replace(" cause: ", ": ")
        .replace(":  ", ": ");
    for noise in [": local address ", ": peer addr: "] {
        while let Some(at) = message.find(noise) {
            let rest = &message[at + noise.len()..];
            let end = at + noise.len() + rest.find([' ', ',']).unwrap_or(rest.len());
            message.replace_range(at..end, "");
        }
    }
    if message.contains("CaUsedAsEndEntity") {
        message.push_str(
            " (the upstream's certificate is a CA certificate, as `openssl req -x509` makes by \
             default: sign a leaf certificate for the host with that CA and give the CA as \
             server.upstream_ca_file; the README's Security section shows how)",
        );
    }
    message
}

/// The small JSON body sent with every refusal.
pub fn json_body(code: Code, message: &str) -> Vec<u8> {
    let value = serde_json::json!({
        "error": code.as_str(),
        "message": message,
    });
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    body
}

/// A whole HTTP/1.1 error response with an optional `Retry-After` (seconds).
pub fn raw_response_with(code: Code, message: &str, retry_after: Option<u64>) -> Vec<u8> {
    let status = code.status();
    let extra = match code {
        Code::AuthRequired | Code::AuthFailed => "Proxy-Authenticate: Basic realm=\"sluice\"\r\n",
        _ => "",
    };
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = json_body(code, message);
    let retry = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nSluice-Error: {}\r\n{retry}{extra}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        code.as_str(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_pingora_errors() {
        for code in Code::ALL {
            assert_eq!(Code::of(&error(code, "x")), code);
        }
    }

    #[test]
    fn a_code_survives_more_context_and_wrapping_but_not_a_lookalike_name() {
        let e = error(Code::RateLimited, "x")
            .more_context("region a")
            .into_up();
        assert_eq!(Code::of(&e), Code::RateLimited);
        let wrapped = Error::because(ErrorType::InternalError, "while sending", e);
        assert_eq!(Code::of(&wrapped), Code::RateLimited);
        // A name alone is no code: only sluice's own errors carry one.
        let forged = Error::explain(ErrorType::CustomCode("rate_limited", 429), "x");
        assert_eq!(Code::of(&forged), Code::Internal);
    }

    #[test]
    fn pingora_errors_map_by_source() {
        let mut e = Error::new(ErrorType::ReadTimedout);
        e.esource = ErrorSource::Upstream;
        assert_eq!(Code::of(&e), Code::UpstreamTimeout);
        e.esource = ErrorSource::Downstream;
        assert_eq!(Code::of(&e), Code::RequestTimeout);
        assert_eq!(
            Code::of(&Error::new(ErrorType::ConnectRefused)),
            Code::ConnectRefused
        );
    }

    #[test]
    fn no_code_is_a_bare_500_without_a_body() {
        for code in Code::ALL {
            let body: serde_json::Value =
                serde_json::from_slice(&json_body(code, "why")).expect("json");
            assert_eq!(body["error"], code.as_str());
        }
        let raw =
            String::from_utf8(raw_response_with(Code::ConnectRefused, "no", None)).expect("utf8");
        assert!(raw.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(raw.contains("Sluice-Error: connect_refused\r\n"));
    }
}
