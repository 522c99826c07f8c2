//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off by default): thin
//! wrappers that reach the providers' private wire parsers with plain inputs, so the fuzz
//! crate needs neither reqwest nor chrono. Not an API: nothing else may depend on it.
//!
//! The Feodo feed parser needs no wrapper: [`crate::FeodoIndex::from_json`] is public.

use chrono::{DateTime, Utc};
use enrichd_core::{CanonicalIp, ProviderError, ProviderReport};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::hooks::QuotaObservation;

/// The earliest and latest clock the wrappers use (1970-01-01 and 2100-01-01): `now` is the
/// system clock, never near chrono's limits, where the parsers' `now + 24 h` would overflow.
const NOW_RANGE: (i64, i64) = (0, 4_102_444_800);

/// One HTTP answer as a fuzz target describes it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The headers as `name: value` lines separated by `\n` (see [`headers`]).
    pub headers: Vec<u8>,
    /// The body, or why it did not arrive whole.
    pub body: Result<Vec<u8>, ProviderError>,
    /// The clock, in seconds since the epoch (clamped into 1970..=2100).
    pub now_secs: i64,
}

/// Builds a header map from `name: value` lines separated by `\n`; a line that is not a
/// valid header is skipped, as the HTTP client would never deliver it.
pub fn headers(block: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in block.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// The clock for `secs` seconds since the epoch, clamped into 1970..=2100.
pub fn now(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs.clamp(NOW_RANGE.0, NOW_RANGE.1), 0).unwrap_or_default()
}

/// GreyNoise's wire mapping (`greynoise::wire::report`).
pub fn greynoise(answer: Answer) -> Result<ProviderReport, ProviderError> {
    crate::greynoise::wire::report(
        answer.status,
        &headers(&answer.headers),
        answer.body,
        now(answer.now_secs),
    )
}

/// AbuseIPDB's wire mapping (`abuseipdb::wire::report`).
pub fn abuseipdb(answer: Answer) -> Result<ProviderReport, ProviderError> {
    crate::abuseipdb::wire::report(
        answer.status,
        &headers(&answer.headers),
        answer.body,
        now(answer.now_secs),
    )
}

/// AbuseIPDB's quota headers, read on every answer.
pub fn abuseipdb_quota(headers_block: &[u8], now_secs: i64) -> Option<QuotaObservation> {
    crate::client::quota_observation(&headers(headers_block), now(now_secs))
}

/// When a rate-limited provider may be asked again, from the rate-limit headers.
pub fn resume_at(headers_block: &[u8], now_secs: i64) -> DateTime<Utc> {
    crate::client::resume_at(&headers(headers_block), now(now_secs))
}

/// ThreatFox's wire mapping for a search of `ip` (`threatfox::wire::report`).
pub fn threatfox(answer: Answer, ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
    crate::threatfox::wire::report(
        answer.status,
        &headers(&answer.headers),
        answer.body,
        ip,
        now(answer.now_secs),
    )
}

/// Whether a ThreatFox IOC is exactly `ip` (`threatfox::wire::ioc_is`).
pub fn threatfox_ioc_is(ioc: &str, ip: CanonicalIp) -> bool {
    crate::threatfox::wire::ioc_is(ioc, ip)
}
