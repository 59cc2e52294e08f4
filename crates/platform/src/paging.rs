//! Pagination of list RPCs (`tandem.common.v1.PageRequest` / `PageResponse`): page sizes 1..=100
//! with 0 meaning 20, and opaque page tokens that carry a keyset cursor as hex text. Services map
//! a [`PageError`] to `INVALID_ARGUMENT` with its path.

use tandem_proto::pb::common::v1 as common;

/// Page size used when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: usize = 20;
/// Largest page size.
pub const MAX_PAGE_SIZE: i32 = 100;
/// Longest token accepted (hex characters).
const MAX_TOKEN_CHARS: usize = 512;

/// A malformed page request: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageError {
    /// `page.page_size` or `page.page_token`.
    pub path: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Returns the requested page size.
pub fn page_size(page: Option<&common::PageRequest>) -> Result<usize, PageError> {
    match page.map_or(0, |p| p.page_size) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n @ 1..=MAX_PAGE_SIZE => Ok(usize::try_from(n).unwrap_or(DEFAULT_PAGE_SIZE)),
        n => Err(PageError {
            path: "page.page_size",
            message: format!("is {n}, outside 0..={MAX_PAGE_SIZE}"),
        }),
    }
}

/// Returns the cursor carried by the request's token, `None` for the first page.
pub fn page_token(page: Option<&common::PageRequest>) -> Result<Option<String>, PageError> {
    let token = page.map_or("", |p| p.page_token.as_str());
    if token.is_empty() {
        return Ok(None);
    }
    decode_token(token).map(Some).ok_or_else(|| PageError {
        path: "page.page_token",
        message: "is not a token this service issued".into(),
    })
}

/// Builds the response page: a token for the cursor `last` when there is more.
pub fn next_page(has_more: bool, last: Option<String>) -> Option<common::PageResponse> {
    Some(common::PageResponse {
        next_page_token: if has_more {
            last.map(|l| encode_token(&l)).unwrap_or_default()
        } else {
            String::new()
        },
    })
}

fn encode_token(raw: &str) -> String {
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > MAX_TOKEN_CHARS {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: i32, token: &str) -> common::PageRequest {
        common::PageRequest {
            page_size: size,
            page_token: token.into(),
        }
    }

    #[test]
    fn sizes_default_and_are_bounded() {
        assert_eq!(page_size(None), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(Some(&req(7, ""))), Ok(7));
        assert_eq!(
            page_size(Some(&req(101, ""))).map_err(|e| e.path),
            Err("page.page_size")
        );
    }

    #[test]
    fn tokens_round_trip_and_reject_forgeries() {
        let token = next_page(true, Some("1700:abc".into())).map(|p| p.next_page_token);
        let token = token.unwrap_or_default();
        assert_eq!(
            page_token(Some(&req(0, &token))),
            Ok(Some("1700:abc".into()))
        );
        assert!(page_token(Some(&req(0, "zz"))).is_err());
        assert_eq!(
            next_page(false, Some("x".into())).map(|p| p.next_page_token),
            Some(String::new())
        );
    }
}
