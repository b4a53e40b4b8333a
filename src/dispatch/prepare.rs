//! From a request head to a plan: which destination, may this client go there, under which
//! limits, controls and deadline, and over which route (configured regions, or the DNS
//! answers that pass the egress policy), its endpoints in order. Every refusal here is
//! answered before any wait or upstream byte. The plan is the whole request as the next
//! stages see it: admission (`pace::admit`) and the attempts (`exec::run`) only read it.

use super::{control, headers, Control, Ctx};
use crate::admission::{Ask, Caller, Due, Host, TokenCost};
use crate::config::HostLimits;
use crate::error::{self, Code};
use crate::gate::{self, Refusal};
use crate::generation::Generation;
use crate::policy::auth::{self, Client, SLUICE_KEY};
use crate::regions::HostRoute;
use crate::state::Shared;
use crate::target::{self, Origin, WayIn};
use pingora_error::Result;
use pingora_proxy::Session;
use std::time::{Duration, Instant};

/// A request ready for admission and its attempts.
pub struct Plan {
    pub origin: Origin,
    /// The path and query to send upstream.
    pub upstream_path: String,
    pub limits: HostLimits,
    pub control: Control,
    pub route: HostRoute,
    /// The route's endpoints to try, best first (none: no configured region is in rotation,
    /// refused before admission by [`Plan::endpoints_left`]).
    pub order: Vec<usize>,
    /// The destination host's admission state.
    pub cell: Host,
    /// The authenticated client's own pace, when its `[[clients]]` entry sets one.
    pub client: Option<ClientPace>,
    /// Who is asking, as the destination host tells its callers apart.
    pub caller: Caller,
    /// End-to-end deadline from `Sluice-Timeout`, else the host's `request_timeout`: the
    /// wait, the connects and the response head (never a streamed body).
    pub deadline: Option<Instant>,
    /// The deadline is the client's `Sluice-Timeout` (else the host's `request_timeout`,
    /// whose clock stops while the request body streams in).
    pub deadline_from_client: bool,
    /// Its estimated tokens, for a host with token budgets (set once its body was read).
    pub cost: TokenCost,
    /// Its body, when it was read before admission (to estimate its tokens).
    pub body: Option<bytes::Bytes>,
    /// The model its body asks for (`"model"`), when it was read.
    pub model: Option<std::sync::Arc<str>>,
    /// A gRPC call (`content-type: application/grpc...`): it goes to the upstream over h2.
    pub grpc: bool,
    /// The client accepts trailers (`te: trailers`), asked of an h2 upstream too.
    pub trailers: bool,
    /// An upgrade (a WebSocket): always HTTP/1.1 to the upstream.
    pub upgrade: bool,
    /// It came over h2 with a body of no stated length: to an HTTP/1.1 upstream it goes
    /// chunked.
    pub unsized_body: bool,
}

/// The deadline rule: the slot must leave the answer its expected time before the deadline.
impl Due for Plan {
    fn slot_within(&self) -> Duration {
        self.deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
                .saturating_sub(self.expected_head_time())
        })
    }
}

/// A client's own pace (across all hosts).
pub struct ClientPace {
    pub name: String,
    pub cell: Host,
    /// Its `max_queue_wait`.
    pub wait: Duration,
}

impl Plan {
    /// `limit`, cut to the time left before the deadline.
    pub fn within_deadline(&self, limit: Duration) -> Duration {
        self.deadline.map_or(limit, |d| {
            d.saturating_duration_since(Instant::now()).min(limit)
        })
    }

    /// Refuse a request none of whose configured regions is in rotation (`Sluice-Regions`
    /// may have narrowed them), before it waits for admission.
    pub fn endpoints_left(&self) -> Result<()> {
        if !self.order.is_empty() {
            return Ok(());
        }
        let which = match &self.control.regions {
            Some(names) => format!("of {}", names.join(",")),
            None => "at all".to_string(),
        };
        Err(error::error(
            Code::NoHealthyRegion,
            format!("{}: no healthy region {which}", self.origin.host_port()),
        ))
    }

    /// How long the request may wait for its host's admission now: the host's
    /// `max_queue_wait`, within the deadline.
    pub fn max_wait(&self) -> Duration {
        self.within_deadline(self.limits.max_queue_wait.get())
    }

    /// What the request asks of its host's admission now: its caller, at most `wait`, and a
    /// slot that leaves its answer the time it is expected to take before the deadline.
    pub fn ask(&self, wait: Duration) -> Ask<'_> {
        Ask {
            caller: Some(&self.caller),
            max_wait: wait,
            due: self.deadline.is_some().then_some(self as &dyn Due),
            cost: self.cost,
        }
    }

    /// The time from a slot to the response head this request can expect: the p90 of the
    /// region it goes to first (its average while it has too few answers for a percentile),
    /// never less than the host's `head_time_floor`.
    pub fn expected_head_time(&self) -> Duration {
        let floor = self.limits.head_time_floor.get();
        let Some(first) = self.order.first() else {
            return floor;
        };
        let state = &self.route.host.regions[*first].state;
        state
            .percentile(90)
            .or_else(|| state.ewma())
            .map_or(floor, |d| d.max(floor))
    }
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
    // Every header this stage reads but `Host`, `Via` and the framing is a `Sluice-*` one.
    let has_sluice = headers::names_sluice(&req.headers);
    let sluice_field = |name| has_sluice.then(|| req.headers.get(name)).flatten();
    let job = sluice_field(crate::jobs::JOB_TOKEN)
        .is_some_and(|t| auth::same_secret(t.as_bytes(), shared.jobs.token.as_bytes()));
    // The client is borrowed from this handle on the generation (`ctx` is written meanwhile).
    let generation = ctx.generation.clone();
    let authenticated = match generation.clients.enabled() {
        true => Some(authenticate(session, &generation, ctx, job)?),
        false => None,
    };
    let client = authenticated.and_then(|c| client_pace(shared, c));
    let mut deadline = None;
    if let Some(v) = sluice_field(control::SLUICE_TIMEOUT) {
        let t = control::parse_timeout(v).map_err(|m| error::error(Code::BadRequest, m))?;
        deadline = ctx.started.checked_add(t);
    }
    let deadline_from_client = deadline.is_some();
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
    let origin = dest.origin;
    gate::check_host(&generation, &origin.host).map_err(Refusal::into_error)?;
    let key = origin.host_port();
    let (profile, named) = generation.profile_for(&origin.host, &key);
    let limits = generation.limits(profile).clone();
    if deadline.is_none() {
        // No `Sluice-Timeout`: the host's own bound, so that no request waits forever.
        deadline = ctx.started.checked_add(limits.request_timeout.get());
    }
    let control = match has_sluice {
        true => Control::read(req, &limits).map_err(|m| error::error(Code::BadRequest, m))?,
        false => Control::of(&limits),
    };
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
    let who = gate::Who {
        client: authenticated,
        job,
        caller_header: sluice_field(gate::SLUICE_CALLER).map(|v| v.as_bytes()),
        priority_header: sluice_field(gate::SLUICE_PRIORITY).map(|v| v.as_bytes()),
        addr: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
    };
    let caller = gate::caller(&generation, &limits, &who).map_err(Refusal::into_error)?;
    let cell = shared.admission.host(key, &origin.host, &generation);
    ctx.profile = Some(cell.profile());
    let order = endpoints(shared, &route, &control);
    let grpc = headers::is_grpc(req);
    let trailers = headers::accepts_trailers(req);
    let upgrade = headers::upgrade_of(req).is_some();
    let unsized_body = content_length(req).is_none()
        && session
            .as_downstream()
            .as_http2()
            .is_some_and(|h2| !h2.is_body_empty());
    Ok(Plan {
        origin,
        upstream_path: dest.path,
        limits,
        control,
        route,
        order,
        cell,
        client,
        caller,
        deadline,
        deadline_from_client,
        cost: TokenCost::default(),
        body: None,
        model: None,
        grpc,
        trailers,
        upgrade,
        unsized_body,
    })
}

/// The route's endpoints to try, best first: those in rotation (of the regions
/// `Sluice-Regions` names, when it names some). With every DNS answer ejected, all of them in
/// DNS order, as a client with no proxy would; with no configured region left, none.
fn endpoints(shared: &Shared, route: &HostRoute, control: &Control) -> Vec<usize> {
    let host = &route.host;
    let only = if host.implicit {
        None
    } else {
        control.regions.as_deref()
    };
    let mut order = host.order(shared.regions.now(), only);
    if order.is_empty() && host.implicit {
        order = (0..host.regions.len()).collect();
    }
    order
}

/// Authenticate the client (see `policy::auth::authenticate`). One of this process's own
/// job requests (`job`) is the client that submitted the job (its credentials were checked
/// then).
fn authenticate<'g>(
    session: &Session,
    generation: &'g Generation,
    ctx: &mut Ctx,
    job: bool,
) -> Result<&'g Client> {
    let h = &session.req_header().headers;
    let proxy_way = matches!(ctx.way, WayIn::Forward | WayIn::Connect | WayIn::Intercept);
    let client = if job {
        let name = h
            .get(crate::jobs::JOB_CLIENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        generation.clients.by_name(name).ok_or_else(|| {
            error::error_with_status(
                Code::AuthFailed,
                401,
                format!("the job's client {name:?} is no longer configured"),
            )
        })?
    } else {
        gate::authenticate(
            generation,
            proxy_way,
            h.get(http::header::PROXY_AUTHORIZATION)
                .map(|v| v.as_bytes()),
            h.get(SLUICE_KEY).map(|v| v.as_bytes()),
        )
        .map_err(Refusal::into_error)?
    };
    ctx.client = Some(client.name.clone());
    Ok(client)
}

/// A client's own pace (across all hosts), when its entry sets one.
fn client_pace(shared: &Shared, client: &Client) -> Option<ClientPace> {
    client.limits.as_ref().map(|l| ClientPace {
        name: client.name.clone(),
        cell: Host::Cell(shared.admission.client_cell(&client.name, l.rps, l.burst)),
        wait: l.max_queue_wait.get(),
    })
}

/// The request's declared body length.
fn content_length(req: &pingora_http::RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}
