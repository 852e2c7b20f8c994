//! Just enough DER to read a certificate's validity and common names for messages. rustls and
//! webpki do the real parsing and verification; this never decides anything.

/// What fm shows about a certificate.
pub struct CertInfo {
    pub not_before: i64,
    pub not_after: i64,
    pub subject_cn: Option<String>,
    pub issuer_cn: Option<String>,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;
/// 2.5.4.3, id-at-commonName.
const CN: &[u8] = &[0x55, 0x04, 0x03];

/// One tag-length-value off the front of `input`.
fn tlv<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let (value, after) = rest.split_at(len);
    *input = after;
    Some((tag, value))
}

fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
    match tlv(input)? {
        (t, value) if t == tag => Some(value),
        _ => None,
    }
}

pub fn parse_certificate(der: &[u8]) -> Option<CertInfo> {
    let mut input = der;
    let mut cert = expect(&mut input, SEQUENCE)?;
    let mut tbs = expect(&mut cert, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tlv(&mut tbs)?;
    }
    tlv(&mut tbs)?; // serialNumber
    expect(&mut tbs, SEQUENCE)?; // signature
    let issuer = expect(&mut tbs, SEQUENCE)?;
    let mut validity = expect(&mut tbs, SEQUENCE)?;
    let subject = expect(&mut tbs, SEQUENCE)?;
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    Some(CertInfo {
        not_before,
        not_after,
        subject_cn: common_name(subject),
        issuer_cn: common_name(issuer),
    })
}

/// The last CN of a Name (RDNSequence), as text.
fn common_name(mut name: &[u8]) -> Option<String> {
    let mut found = None;
    while !name.is_empty() {
        let mut set = expect(&mut name, SET)?;
        while !set.is_empty() {
            let mut attribute = expect(&mut set, SEQUENCE)?;
            let oid = expect(&mut attribute, OID)?;
            let (_, value) = tlv(&mut attribute)?;
            if oid == CN {
                found = Some(String::from_utf8_lossy(value).into_owned());
            }
        }
    }
    found
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as Unix seconds.
fn time(input: &mut &[u8]) -> Option<i64> {
    let (tag, value) = tlv(input)?;
    let text = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            // RFC 5280: 50..99 are 19xx, 00..49 are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    if !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(
        crate::time::days_from_civil(year, month, day) * 86_400
            + hour * 3600
            + minute * 60
            + second,
    )
}
