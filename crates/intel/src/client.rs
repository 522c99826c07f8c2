//! The one HTTP exchange every provider uses: pooled client, whole-call deadline, body cap
//! enforced while streaming, and the rate-limit headers.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use enrichd_core::{ProviderError, ProviderId, Secret};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, redirect};
use tokio::time::Instant;

use crate::config::{BuildError, ProviderConfig};
use crate::hooks::QuotaObservation;

/// Longest failure reason kept: reasons are stored and logged, never a body dump.
const MAX_REASON_CHARS: usize = 160;
/// A park with no usable hint lasts this long.
const DEFAULT_PARK: TimeDelta = TimeDelta::hours(1);
/// No park lasts longer than this, whatever the provider says.
const MAX_PARK: TimeDelta = TimeDelta::hours(24);
/// A header number at least this large is an epoch timestamp, not a delay (2001-09-09).
const EPOCH_THRESHOLD: i64 = 1_000_000_000;

/// A pooled client bound to one provider's base URL and limits.
#[derive(Debug, Clone)]
pub(crate) struct HttpClient {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
    body_limit: u64,
}

/// What came back: the status and headers always, the body only if it arrived whole,
/// within the deadline and under the cap.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Result<Vec<u8>, ProviderError>,
}

impl HttpClient {
    pub(crate) fn new(provider: ProviderId, config: &ProviderConfig) -> Result<Self, BuildError> {
        let base = config.base_url.trim().trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|e| BuildError::BaseUrl {
            provider,
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(BuildError::BaseUrl {
                provider,
                reason: "expected an absolute http or https url".into(),
            });
        }
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .redirect(redirect::Policy::none())
            .connect_timeout(config.timeout)
            .build()
            .map_err(|source| BuildError::Client { provider, source })?;
        Ok(Self {
            client,
            base,
            timeout: config.timeout,
            body_limit: config.body_limit,
        })
    }

    /// `{base}{path}`; `path` starts with `/`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn get(&self, url: &str) -> RequestBuilder {
        self.client.get(url)
    }

    pub(crate) fn post(&self, url: &str) -> RequestBuilder {
        self.client.post(url)
    }

    /// Sends the request and reads the body, all within one deadline.
    ///
    /// `Err` means no status line arrived (timeout, refused, reset, closed without a
    /// response). Once the headers are in, failures reading the body land in
    /// [`Exchange::body`], so callers still see the status and its headers.
    pub(crate) async fn exchange(
        &self,
        request: RequestBuilder,
    ) -> Result<Exchange, ProviderError> {
        let deadline = Instant::now() + self.timeout;
        let mut response = match tokio::time::timeout_at(deadline, request.send()).await {
            Err(_) => return Err(ProviderError::Timeout(self.timeout)),
            Ok(Err(err)) => return Err(self.transport(err)),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match tokio::time::timeout_at(deadline, self.read_capped(&mut response)).await {
            Err(_) => Err(ProviderError::Timeout(self.timeout)),
            Ok(body) => body,
        };
        Ok(Exchange {
            status,
            headers,
            body,
        })
    }

    /// Reads the body chunk by chunk, failing as soon as it would exceed the cap, so a huge
    /// body never sits in memory.
    async fn read_capped(
        &self,
        response: &mut reqwest::Response,
    ) -> Result<Vec<u8>, ProviderError> {
        let too_large = ProviderError::TooLarge {
            limit_bytes: self.body_limit,
        };
        let announced = response.content_length();
        if announced.is_some_and(|len| len > self.body_limit) {
            return Err(too_large);
        }
        let capacity = announced.unwrap_or(0).min(self.body_limit).min(1 << 20);
        let mut body = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(e))? {
            if (body.len() as u64).saturating_add(chunk.len() as u64) > self.body_limit {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A short, URL-free reason for a transport failure.
    fn transport(&self, err: reqwest::Error) -> ProviderError {
        let err = err.without_url();
        if err.is_timeout() {
            return ProviderError::Timeout(self.timeout);
        }
        let io_kind = io_error_kind(&err);
        let reason = match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
            Some(std::io::ErrorKind::ConnectionReset) => "connection reset".to_owned(),
            _ => enrichd_core::error::chain(&err),
        };
        ProviderError::Transport(short(&reason))
    }
}

fn io_error_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// Cuts a reason to a loggable length.
pub(crate) fn short(reason: &str) -> String {
    enrichd_core::text::column_text(reason, MAX_REASON_CHARS)
}

/// A header value carrying a key, marked sensitive so it never shows in `Debug` output.
pub(crate) fn key_header(provider: ProviderId, key: &Secret) -> Result<HeaderValue, BuildError> {
    let mut value =
        HeaderValue::from_str(key.expose()).map_err(|_| BuildError::KeyNotHeaderSafe(provider))?;
    value.set_sensitive(true);
    Ok(value)
}

/// When a rate-limited provider may be asked again: `Retry-After` (seconds or an HTTP date),
/// else `X-RateLimit-Reset` (epoch seconds, or seconds from now), else one hour; never in
/// the past and at most 24 h ahead.
pub(crate) fn resume_at(headers: &HeaderMap, now: DateTime<Utc>) -> DateTime<Utc> {
    let hinted = header_str(headers, "retry-after")
        .and_then(|v| parse_time_hint(v, now))
        .or_else(|| header_str(headers, "x-ratelimit-reset").and_then(|v| parse_time_hint(v, now)));
    hinted
        .unwrap_or(now + DEFAULT_PARK)
        .clamp(now, now + MAX_PARK)
}

/// AbuseIPDB's quota headers, when `X-RateLimit-Remaining` is present and numeric.
pub(crate) fn quota_observation(
    headers: &HeaderMap,
    now: DateTime<Utc>,
) -> Option<QuotaObservation> {
    let remaining = header_str(headers, "x-ratelimit-remaining")?;
    let remaining = parse_number(remaining)?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "clamped into u32's range first"
    )]
    let remaining = remaining.clamp(0.0, f64::from(u32::MAX)) as u32;
    let reset_at = header_str(headers, "x-ratelimit-reset").and_then(|v| parse_time_hint(v, now));
    Some(QuotaObservation {
        remaining,
        reset_at,
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn parse_number(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// A time hint: a number of seconds (an epoch timestamp when it is that large), or an HTTP
/// date (RFC 9110 IMF-fixdate, which RFC 2822 parsing accepts), or RFC 3339.
fn parse_time_hint(text: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Some(number) = parse_number(text) {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "clamped into a sane range first"
        )]
        let secs = number.clamp(-1e12, 1e12) as i64;
        return if secs >= EPOCH_THRESHOLD {
            DateTime::from_timestamp(secs, 0)
        } else {
            Some(now + TimeDelta::seconds(secs.max(0)))
        };
    }
    DateTime::parse_from_rfc2822(text)
        .or_else(|_| DateTime::parse_from_rfc3339(text))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn resume_time_from_rate_limit_headers() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let at = |h: &[(&'static str, &str)]| resume_at(&headers(h), now);
        let in_ten_minutes = (now.timestamp() + 600).to_string();
        let cases = [
            (vec![("retry-after", "120")], now + TimeDelta::seconds(120)),
            (
                vec![("retry-after", "Mon, 23 Nov 2026 13:30:00 GMT")],
                now + TimeDelta::minutes(90),
            ),
            // Retry-After wins over X-RateLimit-Reset.
            (
                vec![("retry-after", "60"), ("x-ratelimit-reset", "1795000000")],
                now + TimeDelta::seconds(60),
            ),
            // AbuseIPDB: epoch seconds.
            (
                vec![("x-ratelimit-reset", in_ten_minutes.as_str())],
                now + TimeDelta::seconds(600),
            ),
            // Tolerated: a small number is a delay.
            (
                vec![("x-ratelimit-reset", "30")],
                now + TimeDelta::seconds(30),
            ),
            // Unusable hints fall back to one hour.
            (vec![("retry-after", "soon")], now + TimeDelta::hours(1)),
            (vec![], now + TimeDelta::hours(1)),
            // Capped at 24 h; never in the past.
            (vec![("retry-after", "999999")], now + TimeDelta::hours(24)),
            (vec![("retry-after", "-5")], now),
            (vec![("retry-after", "Mon, 23 Nov 2026 11:00:00 GMT")], now),
        ];
        for (h, expected) in cases {
            assert_eq!(at(&h), expected, "{h:?}");
        }
    }

    #[test]
    fn quota_headers_are_read_tolerantly() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let reset = now.timestamp() + 3600;
        let q = quota_observation(
            &headers(&[
                ("x-ratelimit-remaining", "998"),
                ("x-ratelimit-reset", &reset.to_string()),
            ]),
            now,
        )
        .unwrap();
        assert_eq!(q.remaining, 998);
        assert_eq!(q.reset_at, Some(now + TimeDelta::hours(1)));
        let q = quota_observation(&headers(&[("x-ratelimit-remaining", "-3")]), now).unwrap();
        assert_eq!((q.remaining, q.reset_at), (0, None));
        assert!(quota_observation(&headers(&[("x-ratelimit-remaining", "lots")]), now).is_none());
        assert!(quota_observation(&HeaderMap::new(), now).is_none());
    }

    #[test]
    fn key_headers_are_sensitive_and_refuse_control_characters() {
        let value = key_header(ProviderId::Threatfox, &Secret::new("abc")).unwrap();
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("abc"));
        let err = key_header(ProviderId::Threatfox, &Secret::new("a\u{1}b")).unwrap_err();
        assert!(!err.to_string().contains("a\u{1}b"));
    }
}
