//! Quantity rules: the limits on what a request may ask and the arithmetic of the derived figures
//! (`available`, `sellable`), done without overflow.

use serde::{Deserialize, Serialize};

/// Most units in one sale or return line.
pub const LINE_QTY_MAX: u64 = 100_000;
/// Most lines in one request.
pub const LINES_MAX: usize = 100;
/// Largest absolute adjustment in one request.
pub const ADJUST_DELTA_MAX: i64 = 1_000_000;
/// Largest physical count.
pub const COUNT_MAX: i64 = 10_000_000;
/// Longest free-text reason, in bytes.
pub const REASON_MAX_LEN: usize = 200;

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // each variant is documented by its #[error] text
pub enum QtyError {
    #[error("{field} must be between {min} and {max}, got {got}")]
    OutOfRange { field: &'static str, min: i64, max: i64, got: i64 },
    #[error("{field} must not be zero")]
    Zero { field: &'static str },
}

/// Checks `got` is within `min..=max`.
pub fn check_range(field: &'static str, got: i64, min: i64, max: i64) -> Result<i64, QtyError> {
    if got < min || got > max {
        return Err(QtyError::OutOfRange { field, min, max, got });
    }
    Ok(got)
}

/// The stock figures of one (store, sku), named as Shopify and Square users know them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockFigures {
    /// Physical units in the store (the PN-counter). Negative is a fact to surface.
    pub on_hand: i64,
    /// Units promised to online reservations allocated to this store, not yet picked.
    pub held: u64,
    /// Units never offered online.
    pub safety_stock: u64,
}

impl StockFigures {
    /// `max(0, on_hand − held − safety_stock)`: what the storefront may still promise.
    pub fn available(&self) -> u64 {
        let v = self.on_hand as i128 - self.held as i128 - self.safety_stock as i128;
        clamp_u64(v)
    }

    /// `on_hand − held`: what the store can sell without touching an online promise.
    pub fn sellable(&self) -> i64 {
        clamp_i64(self.on_hand as i128 - self.held as i128)
    }
}

/// Clamps into u64 (negatives become zero).
pub fn clamp_u64(v: i128) -> u64 {
    v.clamp(0, u64::MAX as i128) as u64
}

/// Clamps into i64.
pub fn clamp_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_figures() {
        let f = StockFigures { on_hand: 10, held: 3, safety_stock: 2 };
        assert_eq!(f.available(), 5);
        assert_eq!(f.sellable(), 7);
        let f = StockFigures { on_hand: -4, held: 3, safety_stock: 0 };
        assert_eq!(f.available(), 0);
        assert_eq!(f.sellable(), -7);
        let f = StockFigures { on_hand: i64::MIN, held: u64::MAX, safety_stock: u64::MAX };
        assert_eq!(f.available(), 0);
        assert_eq!(f.sellable(), i64::MIN);
    }

    #[test]
    fn ranges_name_the_field() {
        let e = check_range("qty", 0, 1, 5).unwrap_err();
        assert_eq!(e.to_string(), "qty must be between 1 and 5, got 0");
        assert_eq!(check_range("qty", 5, 1, 5), Ok(5));
    }
}
