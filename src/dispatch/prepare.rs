//! From a request head to a plan: which destination, may this client go there, under which
//! limits and controls, and over which route (configured regions, or the DNS answers that
//! pass the egress policy). Every refusal here is answered before any wait or upstream byte.

use super::{pace, Control, Ctx};
use crate::config::HostLimits;
use crate::error::{self, Code};
use crate::gate::{self, Refusal};
use crate::policy::auth::{self, SLUICE_KEY};
use crate::regions::HostRoute;
use crate::state::Shared;
use crate::target::{self, Origin, WayIn};
use pingora_error::Result;
use pingora_proxy::Session;

/// A request ready for its attempts.
pub struct Plan {
    pub origin: Origin,
    pub limits: HostLimits,
    pub control: Control,
    pub route: HostRoute,
}

pub async fn prepare(shared: &Shared, session: &Session, ctx: &mut Ctx) -> Result<Plan> {
    let req = session.req_header();
    let via = req.headers.get_all(http::header::VIA);
    gate::not_a_loop(via.iter().map(|v| v.as_bytes()), shared, "request")
        .map_err(Refusal::into_error)?;
    let dest = match target::destination(req, &ctx.generation.routes) {
        Ok(d) => d,
        Err((way, code, message)) => {
            ctx.way = way;
            return Err(error::error(code, message));
        }
    };
    ctx.way = dest.way;
    // Inside a tunnel sluice serves itself, the front made the target absolute with the
    // tunnel's authority (and nothing else is allowed there).
    if crate::intercept::tunnel_of(session.digest()).is_some() {
        ctx.way = WayIn::Intercept;
    }
    ctx.origin = Some(dest.origin.clone());
    if ctx.generation.clients.enabled() {
        authenticate(shared, session, ctx)?;
    }
    if let Some(v) = req.headers.get(pace::SLUICE_TIMEOUT) {
        let t = pace::parse_timeout(v).map_err(|m| error::error(Code::BadRequest, m))?;
        ctx.deadline = ctx.started.checked_add(t);
        ctx.deadline_from_client = true;
    }
    let security = &ctx.generation.config.security;
    if req.raw_path().len() > security.max_uri_bytes {
        return Err(error::error(
            Code::UriTooLong,
            format!("request target over {} bytes", security.max_uri_bytes),
        ));
    }
    if let Some(len) = content_length(req) {
        if len > security.max_body_bytes {
            return Err(error::error(
                Code::BodyTooLarge,
                format!("request body over {} bytes", security.max_body_bytes),
            ));
        }
    }
    let generation = ctx.generation.clone();
    let origin = dest.origin;
    gate::check_host(&generation, &origin.host).map_err(Refusal::into_error)?;
    let key = origin.host_port();
    let (profile, named) = generation.profile_for(&origin.host, &key);
    let limits = generation.limits(profile).clone();
    if ctx.deadline.is_none() {
        // No `Sluice-Timeout`: the host's own bound, so that no request waits forever.
        ctx.deadline = ctx.started.checked_add(limits.request_timeout.get());
    }
    let control = Control::read(req, &limits).map_err(|m| error::error(Code::BadRequest, m))?;
    let configured = (named && generation.has_regions)
        .then(|| shared.regions.get(generation.host_label(profile)))
        .flatten();
    let route = match configured {
        // Configured regions carry their own addresses (trusted as configured).
        Some(host) => HostRoute { host },
        None => {
            let addrs = gate::addresses(shared, &generation, &origin.host, origin.port)
                .await
                .map_err(Refusal::into_error)?;
            shared.regions.implicit(&key, &addrs)
        }
    };
    ctx.upstream_path = dest.path;
    ctx.cell = Some(shared.admission.host(key, &origin.host, &generation));
    Ok(Plan {
        origin,
        limits,
        control,
        route,
    })
}

/// Authenticate the client (see `policy::auth::authenticate`) and take its pace cell.
fn authenticate(shared: &Shared, session: &Session, ctx: &mut Ctx) -> Result<()> {
    let h = &session.req_header().headers;
    let proxy_way = matches!(ctx.way, WayIn::Forward | WayIn::Connect | WayIn::Intercept);
    let job = h
        .get(crate::jobs::JOB_TOKEN)
        .is_some_and(|t| auth::same_secret(t.as_bytes(), shared.jobs.token.as_bytes()));
    let client = if job {
        // One of this process's own job requests: the client that submitted the job (its
        // credentials were checked then) is the one whose limits apply.
        let name = h
            .get(crate::jobs::JOB_CLIENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        ctx.generation.clients.by_name(name).ok_or_else(|| {
            error::error_with_status(
                Code::AuthFailed,
                401,
                format!("the job's client {name:?} is no longer configured"),
            )
        })?
    } else {
        gate::authenticate(
            &ctx.generation,
            proxy_way,
            h.get(http::header::PROXY_AUTHORIZATION)
                .map(|v| v.as_bytes()),
            h.get(SLUICE_KEY).map(|v| v.as_bytes()),
        )
        .map_err(Refusal::into_error)?
    };
    if let Some(l) = &client.limits {
        let cell = shared.admission.client_cell(&client.name, l.rps, l.burst);
        ctx.client_cell = Some(crate::admission::Host::Cell(cell));
    }
    ctx.client = Some(client.name.clone());
    Ok(())
}

/// The request's declared body length.
fn content_length(req: &pingora_http::RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}
