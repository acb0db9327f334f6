//! Exact credit amounts.
//!
//! Credits behave like money: a balance must always equal the sum of the
//! ledger entries that made it. Floating point cannot promise that, so an
//! amount is kept as a whole number of *thousandths* of a credit. Prices have
//! at most three decimals (SPEC §2), and a charge is rounded up to the next
//! thousandth.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::ops::{Add, AddAssign, Neg, Sub, SubAssign};
use std::str::FromStr;

/// An amount of credits, in thousandths. May be negative: settlement charges
/// the real cost of a request even when it exceeds the reservation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(i64);

const SCALE: i64 = 1000;

impl Credits {
    pub const ZERO: Credits = Credits(0);
    /// The largest amount tollgate takes as input, and the largest balance
    /// (either sign) an adjustment may leave: a trillion credits, far from
    /// where the stores' 64-bit thousandths would overflow.
    pub const MAX: Credits = Credits(1_000_000_000_000 * SCALE);

    pub const fn from_millis(millis: i64) -> Self {
        Credits(millis)
    }

    pub const fn whole(credits: i64) -> Self {
        Credits(credits * SCALE)
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// The cost of `tokens` tokens at this price per 1,000 tokens, in
    /// thousandths of a credit times 1,000 (so callers can add several token
    /// costs before rounding once).
    pub fn per_1k_cost_micros(self, tokens: u64) -> i128 {
        i128::from(self.0) * i128::from(tokens)
    }

    /// Rounds an amount of millionths of a credit up to thousandths.
    pub fn from_micros_ceil(micros: i128) -> Self {
        let millis = micros.div_euclid(1000) + i128::from(micros.rem_euclid(1000) != 0);
        Credits(i64::try_from(millis).unwrap_or(i64::MAX))
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }
}

/// Why a text is not an amount of credits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseCreditsError {
    #[error("not a number")]
    NotANumber,
    #[error("more than three decimals")]
    TooPrecise,
    #[error("too large")]
    TooLarge,
}

impl FromStr for Credits {
    type Err = ParseCreditsError;

    /// Parses `10`, `-2`, `0.5`, `1.125`: at most three decimals, no exponent.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() && frac.is_empty() || !all_digits(int) || !all_digits(frac) {
            return Err(ParseCreditsError::NotANumber);
        }
        if frac.len() > 3 {
            return Err(ParseCreditsError::TooPrecise);
        }
        let int: i64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| ParseCreditsError::TooLarge)?
        };
        let frac_millis = format!("{frac:0<3}")
            .parse::<i64>()
            .map_err(|_| ParseCreditsError::NotANumber)?;
        let millis = int
            .checked_mul(SCALE)
            .and_then(|m| m.checked_add(frac_millis))
            .filter(|m| *m <= Credits::MAX.0)
            .ok_or(ParseCreditsError::TooLarge)?;
        Ok(Credits(if negative { -millis } else { millis }))
    }
}

impl TryFrom<f64> for Credits {
    type Error = ParseCreditsError;

    /// Converts a JSON number; it must be a whole number of thousandths.
    fn try_from(v: f64) -> Result<Self, Self::Error> {
        if !v.is_finite() {
            return Err(ParseCreditsError::NotANumber);
        }
        let millis = (v * SCALE as f64).round();
        if (millis - v * SCALE as f64).abs() > 1e-6 {
            return Err(ParseCreditsError::TooPrecise);
        }
        if millis.abs() > Credits::MAX.0 as f64 {
            return Err(ParseCreditsError::TooLarge);
        }
        Ok(Credits(millis as i64))
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (int, frac) = (abs / SCALE as u64, abs % SCALE as u64);
        if frac == 0 {
            write!(f, "{sign}{int}")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl Serialize for Credits {
    /// Credits are JSON numbers (SPEC §5): `12`, `0.5`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % SCALE == 0 {
            s.serialize_i64(self.0 / SCALE)
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        let parsed = match n.as_i64() {
            Some(i) => i
                .checked_mul(SCALE)
                .filter(|m| m.abs() <= Credits::MAX.0)
                .map(Credits)
                .ok_or(ParseCreditsError::TooLarge),
            None => n.to_string().parse(),
        };
        parsed.map_err(|e| serde::de::Error::custom(format!("invalid credits {n}: {e}")))
    }
}

impl Add for Credits {
    type Output = Credits;
    fn add(self, rhs: Credits) -> Credits {
        Credits(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Credits {
    fn add_assign(&mut self, rhs: Credits) {
        *self = *self + rhs;
    }
}

impl Sub for Credits {
    type Output = Credits;
    fn sub(self, rhs: Credits) -> Credits {
        Credits(self.0.saturating_sub(rhs.0))
    }
}

impl SubAssign for Credits {
    fn sub_assign(&mut self, rhs: Credits) {
        *self = *self - rhs;
    }
}

impl Neg for Credits {
    type Output = Credits;
    fn neg(self) -> Credits {
        Credits(-self.0)
    }
}

impl std::iter::Sum for Credits {
    fn sum<I: Iterator<Item = Credits>>(iter: I) -> Credits {
        iter.fold(Credits::ZERO, Add::add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_and_fractional_amounts() {
        assert_eq!("10".parse(), Ok(Credits::whole(10)));
        assert_eq!("0.5".parse(), Ok(Credits::from_millis(500)));
        assert_eq!("1.125".parse(), Ok(Credits::from_millis(1125)));
        assert_eq!("-2.01".parse(), Ok(Credits::from_millis(-2010)));
        assert_eq!(".25".parse(), Ok(Credits::from_millis(250)));
    }

    #[test]
    fn rejects_what_is_not_an_exact_amount() {
        assert_eq!(
            "1.0001".parse::<Credits>(),
            Err(ParseCreditsError::TooPrecise)
        );
        assert_eq!("abc".parse::<Credits>(), Err(ParseCreditsError::NotANumber));
        assert_eq!("1e3".parse::<Credits>(), Err(ParseCreditsError::NotANumber));
        assert_eq!("".parse::<Credits>(), Err(ParseCreditsError::NotANumber));
        assert_eq!(".".parse::<Credits>(), Err(ParseCreditsError::NotANumber));
        assert_eq!(
            "99999999999999999999".parse::<Credits>(),
            Err(ParseCreditsError::TooLarge)
        );
    }

    #[test]
    fn rounds_token_costs_up_to_a_thousandth() {
        // 0.001 credits per 1k tokens, 1 token: 0.000001 credits -> 0.001.
        let price = Credits::from_millis(1);
        assert_eq!(
            Credits::from_micros_ceil(price.per_1k_cost_micros(1)),
            Credits::from_millis(1)
        );
        // 2 credits per 1k tokens, 500 tokens: exactly 1 credit.
        let price = Credits::whole(2);
        assert_eq!(
            Credits::from_micros_ceil(price.per_1k_cost_micros(500)),
            Credits::whole(1)
        );
        assert_eq!(Credits::from_micros_ceil(0), Credits::ZERO);
    }

    #[test]
    fn displays_and_serializes_as_plain_numbers() {
        assert_eq!(Credits::from_millis(1500).to_string(), "1.5");
        assert_eq!(Credits::from_millis(-20).to_string(), "-0.02");
        assert_eq!(Credits::whole(7).to_string(), "7");
        assert_eq!(serde_json::to_string(&Credits::whole(7)).unwrap(), "7");
        assert_eq!(
            serde_json::to_string(&Credits::from_millis(1250)).unwrap(),
            "1.25"
        );
        let back: Credits = serde_json::from_str("0.125").unwrap();
        assert_eq!(back, Credits::from_millis(125));
        assert!(serde_json::from_str::<Credits>("0.1255").is_err());
        assert!(serde_json::from_str::<Credits>("\"5\"").is_err());
    }
}
