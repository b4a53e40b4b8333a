//! Tokens, for hosts with token budgets: what a request is expected to use, estimated from
//! its body before it is admitted ([`estimate`]), and what its answer says it used, read from
//! the answer as it streams past to the client ([`Tap`]): the `usage` object of a JSON body,
//! or the usage events of a server-sent event stream (OpenAI's final chunk, Anthropic's
//! `message_start` and `message_delta`, the Responses API's `response.completed`).
//!
//! The estimate: output is the request's own bound (`max_tokens`, `max_completion_tokens` or
//! `max_output_tokens`, times `n` choices); input is the characters of every string in the
//! body divided by 4, rounded up, plus one per string (an image or file sent inline as base64
//! counts as 1,600 tokens, about what providers charge for one image, not its size / 4). A
//! body that is not JSON counts its bytes / 4. The tap reads bytes only: the answer goes to
//! the client chunk by chunk as it comes, whether or not usage is found in it.

use crate::admission::TokenCost;
use bytes::Bytes;
use serde_json::Value;
use std::io::Write;
use std::sync::Arc;

/// Most tokens any one figure in a request or an answer may count for.
const MAX_FIGURE: u64 = crate::admission::MAX_TOKENS_PER_MINUTE;
/// An inline image or file (a data URL, or a long run of base64) counts as this many tokens.
const INLINE_BLOB_TOKENS: u64 = 1_600;
/// A string this long without a space is taken for inline base64.
const BLOB_CHARS: usize = 16 * 1024;
/// Most bytes of a JSON answer kept to find its usage, and of one event stream line.
const MAX_JSON: usize = 4 * 1024 * 1024;
const MAX_LINE: usize = 1024 * 1024;

/// Longest model name taken as one (a longer one counts as none named).
const MAX_MODEL: usize = 128;

/// The tokens a request with this body is expected to use, and the model it names.
pub fn estimate(body: &[u8]) -> (TokenCost, Option<Arc<str>>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let cost = TokenCost {
            input: (body.len() as u64).div_ceil(4),
            ..TokenCost::default()
        };
        return (cost, None);
    };
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL)
        .map(Arc::<str>::from);
    let bound = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_u64))
        .unwrap_or(0)
        .min(MAX_FIGURE);
    let choices = v
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128);
    let mut input = Input::default();
    input.walk(&v);
    let cost = TokenCost {
        input: (input.chars.div_ceil(4) + input.strings + input.blobs * INLINE_BLOB_TOKENS)
            .min(MAX_FIGURE),
        output: (bound * choices).min(MAX_FIGURE),
        model: model.as_deref().map_or(0, crate::admission::model_id),
    };
    (cost, model)
}

#[derive(Default)]
struct Input {
    chars: u64,
    strings: u64,
    blobs: u64,
}

impl Input {
    fn walk(&mut self, v: &Value) {
        match v {
            Value::String(s) => {
                if s.starts_with("data:") || (s.len() >= BLOB_CHARS && !s.contains(' ')) {
                    self.blobs += 1;
                } else {
                    self.chars += s.chars().count() as u64;
                    self.strings += 1;
                }
            }
            Value::Array(a) => a.iter().for_each(|v| self.walk(v)),
            Value::Object(o) => o.values().for_each(|v| self.walk(v)),
            _ => {}
        }
    }
}

/// Usage figures seen so far in one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    input: Option<u64>,
    output: Option<u64>,
}

impl Seen {
    /// Take in a `usage` object. Figures only grow: a stream's later events repeat or extend
    /// its earlier ones (Anthropic's `output_tokens` counts up).
    fn merge(&mut self, usage: &Value) {
        let n = |k: &str| {
            usage
                .get(k)
                .and_then(Value::as_u64)
                .map(|v| v.min(MAX_FIGURE))
        };
        let input = match (
            n("prompt_tokens")
                .or(n("input_tokens"))
                .or(n("promptTokenCount")),
            n("cache_creation_input_tokens"),
        ) {
            (Some(i), c) => Some(i.saturating_add(c.unwrap_or(0))),
            (None, c) => c,
        };
        let output = n("completion_tokens")
            .or(n("output_tokens"))
            .or(n("candidatesTokenCount"));
        self.input = self.input.max(input);
        self.output = self.output.max(output);
    }

    /// The usage objects of one JSON value: top level, or inside `message` (Anthropic's
    /// `message_start`) or `response` (the Responses API's events).
    fn take(&mut self, v: &Value) {
        for u in [
            v.get("usage"),
            v.get("usageMetadata"),
            v.get("message").and_then(|m| m.get("usage")),
            v.get("response").and_then(|r| r.get("usage")),
        ]
        .into_iter()
        .flatten()
        {
            if u.is_object() {
                self.merge(u);
            }
        }
    }
}

enum Kind {
    /// A JSON body, kept whole (up to `MAX_JSON`) and read at its end.
    Json(Vec<u8>),
    /// An event stream, read line by line: the line being read, and whether the current line
    /// outgrew `MAX_LINE` (skipped to its end).
    Events { line: Vec<u8>, skipping: bool },
}

enum Decode {
    Identity,
    Gzip(Box<flate2::write::GzDecoder<Limited>>),
    Deflate(Box<flate2::write::ZlibDecoder<Limited>>),
}

/// Where decoded bytes go: a buffer the tap empties after every write, bounded.
#[derive(Default)]
struct Limited(Vec<u8>);

impl Write for Limited {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_JSON {
            return Err(std::io::Error::other("decoded answer too large"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads the usage an answer reports as its body streams past.
pub struct Tap {
    kind: Kind,
    decode: Decode,
    seen: Seen,
    /// The body could not be read (too large, an unknown encoding, corrupt).
    broken: bool,
}

impl Tap {
    /// A tap for an answer with these headers, if its body may report usage: JSON or an
    /// event stream, plain, gzip or deflate.
    pub fn for_answer(headers: &http::HeaderMap) -> Option<Tap> {
        let ctype = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let kind = if ctype.starts_with("text/event-stream") {
            Kind::Events {
                line: Vec::new(),
                skipping: false,
            }
        } else if ctype.starts_with("application/json") || ctype.contains("+json") {
            Kind::Json(Vec::new())
        } else {
            return None;
        };
        let decode = match headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("identity") | Some("") => Decode::Identity,
            Some("gzip") | Some("x-gzip") => {
                Decode::Gzip(Box::new(flate2::write::GzDecoder::new(Limited::default())))
            }
            Some("deflate") => Decode::Deflate(Box::new(flate2::write::ZlibDecoder::new(
                Limited::default(),
            ))),
            Some(_) => return None,
        };
        Some(Tap {
            kind,
            decode,
            seen: Seen::default(),
            broken: false,
        })
    }

    /// Look at the next piece of the body (as it goes to the client).
    pub fn feed(&mut self, chunk: &Bytes) {
        if self.broken {
            return;
        }
        match self.decode_step(Some(chunk)) {
            Some(out) => self.take(&out),
            None if matches!(self.decode, Decode::Identity) => self.take(chunk),
            None => self.broken = true,
        }
    }

    /// Bytes through the decoder (`None` input: the body ended); `None` for identity or a
    /// corrupt or oversized body.
    fn decode_step(&mut self, chunk: Option<&Bytes>) -> Option<Vec<u8>> {
        fn step<W: Write>(
            d: &mut W,
            inner: impl FnOnce(&mut W) -> &mut Limited,
            chunk: Option<&Bytes>,
            finish: impl FnOnce(&mut W) -> std::io::Result<()>,
        ) -> Option<Vec<u8>> {
            let r = match chunk {
                Some(c) => d.write_all(c),
                None => finish(d),
            };
            r.ok()?;
            Some(std::mem::take(&mut inner(d).0))
        }
        match &mut self.decode {
            Decode::Identity => None,
            Decode::Gzip(d) => step(&mut **d, |d| d.get_mut(), chunk, |d| d.try_finish()),
            Decode::Deflate(d) => step(&mut **d, |d| d.get_mut(), chunk, |d| d.try_finish()),
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        match &mut self.kind {
            Kind::Json(buf) => {
                if buf.len() + bytes.len() > MAX_JSON {
                    self.broken = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(bytes);
                }
            }
            Kind::Events { line, skipping } => {
                let mut rest = bytes;
                while !rest.is_empty() {
                    let (part, ended) = match memchr(b'\n', rest) {
                        Some(i) => (&rest[..i], true),
                        None => (rest, false),
                    };
                    rest = if ended { &rest[part.len() + 1..] } else { &[] };
                    if !*skipping {
                        if line.len() + part.len() > MAX_LINE {
                            *skipping = true;
                            line.clear();
                        } else {
                            line.extend_from_slice(part);
                        }
                    }
                    if ended {
                        if !*skipping {
                            event_line(line, &mut self.seen);
                        }
                        line.clear();
                        *skipping = false;
                    }
                }
            }
        }
    }

    /// The body ended: the tokens it reports it used, if it reported any.
    pub fn finish(mut self) -> Option<TokenCost> {
        if !self.broken && !matches!(self.decode, Decode::Identity) {
            match self.decode_step(None) {
                Some(out) => self.take(&out),
                None => self.broken = true,
            }
        }
        match &mut self.kind {
            Kind::Json(buf) if !self.broken => {
                if let Ok(v) = serde_json::from_slice::<Value>(buf) {
                    self.seen.take(&v);
                }
            }
            // A last line without its newline.
            Kind::Events { line, skipping } if !*skipping => event_line(line, &mut self.seen),
            _ => {}
        }
        let Seen { input, output } = self.seen;
        (input.is_some() || output.is_some()).then(|| TokenCost {
            input: input.unwrap_or(0),
            output: output.unwrap_or(0),
            model: 0,
        })
    }
}

fn memchr(b: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|c| *c == b)
}

/// One line of an event stream: a `data:` line that mentions usage is read as JSON.
fn event_line(line: &[u8], seen: &mut Seen) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    if !data.windows(5).any(|w| w == b"usage" || w == b"Usage") {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        seen.take(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn headers(ctype: &str, encoding: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, ctype.parse().expect("value"));
        if let Some(e) = encoding {
            h.insert(http::header::CONTENT_ENCODING, e.parse().expect("value"));
        }
        h
    }

    /// The answer fed to a tap in pieces of `size` bytes (every size from 1 up covers a line
    /// split anywhere, a CRLF alone, several events in one piece).
    fn tap_in_pieces(h: &HeaderMap, body: &[u8], size: usize) -> Option<TokenCost> {
        let mut tap = Tap::for_answer(h).expect("a tap");
        for piece in body.chunks(size) {
            tap.feed(&Bytes::copy_from_slice(piece));
        }
        tap.finish()
    }

    fn cost(input: u64, output: u64) -> Option<TokenCost> {
        Some(TokenCost {
            input,
            output,
            model: 0,
        })
    }

    fn amounts(e: (TokenCost, Option<Arc<str>>)) -> (u64, u64) {
        (e.0.input, e.0.output)
    }

    #[test]
    fn the_estimate_is_the_bound_on_output_plus_the_prompt_in_characters_over_four() {
        let body = br#"{"model":"gpt-x","max_tokens":150,"messages":[{"role":"user","content":"abcdefghij"}]}"#;
        // Strings: "gpt-x" (5), "user" (4), "abcdefghij" (10): 19 chars -> 5, plus 3 strings.
        let (e, model) = estimate(body);
        assert_eq!((e.input, e.output), (8, 150));
        assert_eq!(model.as_deref(), Some("gpt-x"));
        assert_eq!(e.model, crate::admission::model_id("gpt-x"));
        let body = br#"{"max_completion_tokens":10,"n":3,"input":"x"}"#;
        assert_eq!(amounts(estimate(body)), (2, 30));
        assert_eq!(estimate(body).1, None, "no model named");
        let body = br#"{"max_output_tokens":99999999999999,"input":"x"}"#;
        assert_eq!(estimate(body).0.output, MAX_FIGURE);
        // An inline image is not its base64 size over four.
        let image = format!(
            r#"{{"max_tokens":1,"messages":[{{"content":[{{"type":"image","source":{{"data":"{}"}}}}]}}]}}"#,
            "A".repeat(200_000)
        );
        let (e, _) = estimate(image.as_bytes());
        assert!(e.input < 1_700 && e.input >= INLINE_BLOB_TOKENS, "{e:?}");
        // Not JSON: bytes over four.
        assert_eq!(amounts(estimate(b"hello world")), (3, 0));
        // Multi-byte characters count once.
        let body = r#"{"input":"ééééé"}"#;
        assert_eq!(estimate(body.as_bytes()).0.input, 2 + 1);
        // A model name too long to be one is none.
        let body = format!(r#"{{"model":"{}"}}"#, "m".repeat(500));
        assert_eq!(estimate(body.as_bytes()).0.model, 0);
    }

    #[test]
    fn usage_in_a_json_answer_split_every_way() {
        let openai = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let anthropic = br#"{"type":"message","usage":{"input_tokens":20,"cache_creation_input_tokens":5,"output_tokens":7}}"#;
        let h = headers("application/json; charset=utf-8", None);
        for size in 1..=openai.len() {
            assert_eq!(tap_in_pieces(&h, openai, size), cost(12, 30), "{size}");
            assert_eq!(tap_in_pieces(&h, anthropic, size), cost(25, 7), "{size}");
        }
        assert_eq!(tap_in_pieces(&h, br#"{"usage":null}"#, 3), None);
        assert_eq!(tap_in_pieces(&h, b"{not json", 3), None);
        assert!(Tap::for_answer(&headers("text/plain", None)).is_none());
        assert!(Tap::for_answer(&headers("application/json", Some("br"))).is_none());
    }

    #[test]
    fn usage_in_event_streams_split_every_way() {
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\r\n\r\n\
                      data: [DONE]\n\n";
        let anthropic = "event: message_start\n\
                         data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
                         event: content_block_delta\n\
                         data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage is fine\"}}\n\n\
                         event: message_delta\n\
                         data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        let responses = "event: response.completed\n\
                         data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":2,\"total_tokens\":5}}}";
        let h = headers("text/event-stream", None);
        for size in 1..=anthropic.len() {
            assert_eq!(tap_in_pieces(&h, openai.as_bytes(), size), cost(9, 4));
            assert_eq!(tap_in_pieces(&h, anthropic.as_bytes(), size), cost(25, 15));
            assert_eq!(tap_in_pieces(&h, responses.as_bytes(), size), cost(3, 2));
        }
        // Without usage events: nothing to tell.
        let plain = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert_eq!(tap_in_pieces(&h, plain.as_bytes(), 7), None);
        // A line too long to keep is skipped, not kept, and the next is read.
        let long = format!(
            "data: {{\"usage\":{{\"output_tokens\":999}},\"x\":\"{}\"}}\n\
             data: {{\"usage\":{{\"output_tokens\":3}}}}\n",
            "y".repeat(MAX_LINE)
        );
        assert_eq!(tap_in_pieces(&h, long.as_bytes(), 65_536), cost(0, 3));
    }

    #[test]
    fn usage_in_compressed_answers() {
        use flate2::write::{GzEncoder, ZlibEncoder};
        let body = br#"{"usage":{"prompt_tokens":100,"completion_tokens":50}}"#;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let mut zl = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(body).expect("zlib");
        let zl = zl.finish().expect("zlib");
        for size in 1..=gz.len() {
            let h = headers("application/json", Some("gzip"));
            assert_eq!(tap_in_pieces(&h, &gz, size), cost(100, 50), "{size}");
        }
        for size in 1..=zl.len() {
            let h = headers("application/json", Some("deflate"));
            assert_eq!(tap_in_pieces(&h, &zl, size), cost(100, 50), "{size}");
        }
        // Corrupt: nothing, and no panic.
        let h = headers("application/json", Some("gzip"));
        assert_eq!(tap_in_pieces(&h, b"not gzip at all", 4), None);
    }
}
