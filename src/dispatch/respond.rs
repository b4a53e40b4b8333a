//! Both heads of an exchange and the answer's way back: the head sent upstream (upstream
//! path, header hygiene, `Via`, the destination's `Host`), the head the client gets (the same
//! `Sluice-Region`, `Sluice-Attempts` and `Sluice-Queued-Ms` on every answer, the host's pause
//! in `Retry-After`), and the winning answer's body streamed to the client.

use super::attempt::Answer;
use super::prepare::Plan;
use super::{headers, pace, Ctx};
use crate::admission::TokenCost;
use crate::error::{self, Code};
use crate::generation::Generation;
use crate::state::Shared;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use std::time::Duration;

/// Turn the client's request head into the one sent upstream: the upstream path, no
/// hop-by-hop or control headers, this hop in `Via`, and the destination's `Host`.
pub fn upstream_head(
    upstream: &mut RequestHeader,
    plan: &Plan,
    via: &http::HeaderValue,
) -> Result<()> {
    let uri = http::Uri::try_from(plan.upstream_path.as_str()).map_err(|e| {
        error::error(
            Code::BadTarget,
            format!("invalid upstream path {:?}: {e}", plan.upstream_path),
        )
    })?;
    upstream.set_uri(uri);
    headers::clean_request(upstream, via);
    // Most requests (a forward proxy's, whose head the front made) carry the destination's
    // `Host` already, as their one `Host`.
    let mut hosts = upstream.headers.get_all(http::header::HOST).iter();
    let carried = match (hosts.next(), hosts.next()) {
        (Some(h), None) => plan.origin.is_host_header(h.as_bytes()),
        _ => false,
    };
    if !carried {
        upstream.insert_header(http::header::HOST, plan.origin.host_header())?;
    }
    Ok(())
}

/// Turn an upstream response head into the one the client gets: counted, no hop-by-hop or
/// `Sluice-*` headers from upstream, this hop in `Via`, and which region answered after how
/// many attempts and how long a wait.
pub fn client_head(
    shared: &Shared,
    resp: &mut ResponseHeader,
    ctx: &Ctx,
    region: &str,
) -> Result<()> {
    shared
        .metrics
        .record_upstream_status(ctx.way, resp.status.as_u16());
    headers::clean_response(resp, &shared.via);
    // An h2 answer goes to an HTTP/1.1 client as HTTP/1.1 (an h2 client's session writes
    // h2 whatever the head says).
    resp.set_version(http::Version::HTTP_11);
    resp.insert_header("Sluice-Region", region)?;
    resp.insert_header("Sluice-Attempts", http::HeaderValue::from(ctx.attempts))?;
    let queued_ms = u64::try_from(ctx.queued.as_millis()).unwrap_or(u64::MAX);
    resp.insert_header("Sluice-Queued-Ms", http::HeaderValue::from(queued_ms))?;
    Ok(())
}

/// Timeouts of a connection to an upstream endpoint.
pub fn peer_options(peer: &mut HttpPeer, generation: &Generation, read_timeout: Option<Duration>) {
    let server = &generation.config.server;
    peer.options.connection_timeout = Some(server.connect_timeout.get());
    peer.options.total_connection_timeout = Some(server.connect_timeout.get());
    peer.options.read_timeout = read_timeout;
    peer.options.write_timeout = Some(server.write_timeout.get());
    peer.options.idle_timeout = Some(crate::upstream::IDLE);
}

/// Stream the winning answer to the client, then pool its connection. An h2 answer's
/// trailers (a gRPC call's status) go to a client on h2; a gRPC `RESOURCE_EXHAUSTED` in them
/// pauses the host like a 429.
pub async fn stream(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut Ctx,
    plan: &Plan,
    answer: Answer,
    body_idle: Duration,
) -> Result<()> {
    let (host, cell) = (&plan.route.host, &plan.cell);
    let Answer {
        session: mut upstream,
        region,
        started: _,
        permit,
        in_flight,
    } = answer;
    ctx.upstream_protocol = Some(upstream.protocol());
    let Some(up_head) = upstream.response_header() else {
        return Err(error::error(
            Code::Internal,
            "answer without a response head",
        ));
    };
    let mut resp: ResponseHeader = up_head.clone();
    let mut permit = permit;
    // Tokens charged to the host's budgets are settled from the usage the answer reports
    // (read as the body goes by); a 429 was settled already (it used none). A request sent
    // before its host had a budget is counted from its usage too.
    let charged = permit
        .as_ref()
        .map_or(TokenCost::default(), |p| p.charged());
    let counted = !charged.is_zero() || shared.admission.counts_tokens(cell);
    let mut tap = match counted && up_head.status.as_u16() != 429 {
        true => super::usage::Tap::for_answer(&up_head.headers),
        false => None,
    };
    if pace::pause_signal(&resp) {
        if resp.status.as_u16() == 429 {
            shared
                .metrics
                .upstream_429
                .with_label_values(&["passed"])
                .inc();
        }
        pace::set_retry_after(&mut resp, pace::pause_left(shared, cell))?;
    }
    let name = &host.regions[region].name;
    client_head(shared, &mut resp, ctx, name)?;
    ctx.region = Some(name.clone());
    let switched = resp.status.as_u16() == 101;
    if switched {
        // The client asked for this upgrade: its headers go back with the 101.
        if let Some(protocol) = up_head.headers.get(http::header::UPGRADE).cloned() {
            resp.insert_header(http::header::UPGRADE, protocol)?;
            resp.insert_header(http::header::CONNECTION, "upgrade")?;
        }
    }
    // Decided on the head the client gets: a framing header the upstream named in its own
    // `Connection` is gone from it.
    if !switched && close_delimited(session.req_header(), &resp) {
        // The upstream ends this body by closing (or, over h2, by its stream's end, which
        // an HTTP/1.1 client cannot be told otherwise), so its end cannot be told from a
        // cut. The client gets it chunked (HTTP/1.0: close-delimited, the connection not
        // kept), so a body cut upstream reaches it without a last chunk, never as complete.
        if session.req_header().version >= http::Version::HTTP_11 {
            resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        } else {
            session.set_keepalive(None);
        }
    }
    // An h2 answer that ended with its head (gRPC's trailers-only answer: its status in the
    // head) ends with its head for an h2 client too.
    let head_only = session.as_downstream().is_http2()
        && matches!(&*upstream, HttpSession::H2(h2) if h2.response_finished());
    if head_only {
        use pingora_core::protocols::http::HttpTask;
        session
            .as_downstream_mut()
            .response_duplex_vec(vec![HttpTask::Header(Box::new(resp), true)])
            .await?;
        drop(in_flight);
        drop(permit);
        upstream.release().await;
        return Ok(());
    }
    session.write_response_header(Box::new(resp), false).await?;
    // The body is bounded by its silences, never by the deadline (a long stream is not cut).
    upstream.set_read_timeout(Some(body_idle));
    if switched {
        // Rare, and a large future: boxed.
        return Box::pin(relay_upgraded(shared, session, upstream, permit, in_flight)).await;
    }
    while let Some(chunk) = upstream
        .read_response_body()
        .await
        .map_err(|e| e.into_up())?
    {
        if let Some(t) = &mut tap {
            t.feed(&chunk);
        }
        session.write_response_body(Some(chunk), false).await?;
    }
    let mut trailers = match &mut *upstream {
        HttpSession::H2(h2) => h2.read_trailers().await.map_err(|e| e.into_up())?,
        _ => None,
    };
    if let Some(t) = &mut trailers {
        // A host without regions speaks for its whole quota (as in `exec`).
        let host_quota = host.implicit || plan.limits.quota == crate::config::Quota::Host;
        pace::learn_trailers(shared, cell, &ctx.generation, t, host_quota);
        headers::clean_trailers(t);
    }
    // The usage the answer reported is settled before the client sees its end: whoever reads
    // the metrics (or the budget) once the answer is over finds it counted.
    if let (Some(used), Some(p)) = (tap.and_then(super::usage::Tap::finish), &mut permit) {
        let estimated = shared.admission.settle(p, used);
        if !estimated.is_zero() {
            shared
                .metrics
                .tokens
                .settled(ctx.host_label(), estimated, used);
        }
    }
    match trailers {
        // Sending the trailers ends the client's stream.
        Some(t) if session.as_downstream().is_http2() => {
            session
                .as_downstream_mut()
                .write_response_trailers(t)
                .await?
        }
        // An HTTP/1.1 client gets none (Pingora 0.9.1 writes no HTTP/1.1 trailers).
        _ => session.write_response_body(None, true).await?,
    }
    drop(in_flight);
    drop(permit);
    if upstream.response_done() {
        upstream.release().await;
    }
    Ok(())
}

/// Does this response's body end only when the upstream closes (RFC 9112 6.3: a body is
/// allowed, and neither `Content-Length` nor `Transfer-Encoding` says where it ends)?
fn close_delimited(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    let status = resp.status.as_u16();
    let no_body = req.method == http::Method::HEAD
        || (100..200).contains(&status)
        || status == 204
        || status == 304;
    !no_body
        && !resp.headers.contains_key(http::header::CONTENT_LENGTH)
        && !resp.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// After a `101`, the connection is the new protocol's (a WebSocket): bytes both ways until
/// either side closes, counted as a tunnel. The host's in-flight place is held throughout.
async fn relay_upgraded(
    shared: &Shared,
    session: &mut Session,
    mut upstream: crate::upstream::Session,
    permit: Option<crate::admission::Permit>,
    in_flight: crate::regions::state::InFlight,
) -> Result<()> {
    let HttpSession::H1(up) = &mut *upstream else {
        return Err(error::error(
            Code::UpstreamProtocol,
            "an upgrade over HTTP/2",
        ));
    };
    up.maybe_upgrade_body_writer();
    let m = &shared.metrics;
    m.tunnels_opened.inc();
    m.tunnels_active.inc();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut client_open = true;
    let result: Result<()> = async {
        loop {
            tokio::select! {
                chunk = session.read_request_body(), if client_open => match chunk? {
                    Some(b) => {
                        sent += b.len() as u64;
                        up.write_body(&b).await.map_err(|e| e.into_up())?;
                    }
                    None => {
                        client_open = false;
                        up.finish_body().await.map_err(|e| e.into_up())?;
                    }
                },
                chunk = up.read_body_bytes() => match chunk.map_err(|e| e.into_up())? {
                    Some(b) => {
                        received += b.len() as u64;
                        session.write_response_body(Some(b), false).await?;
                    }
                    None => break,
                },
            }
        }
        session.write_response_body(None, true).await
    }
    .await;
    m.tunnels_active.dec();
    m.tunnel_bytes.with_label_values(&["up"]).inc_by(sent);
    m.tunnel_bytes.with_label_values(&["down"]).inc_by(received);
    drop(in_flight);
    drop(permit);
    result
}
