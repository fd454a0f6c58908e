//! Shape checks shared by the quantizers, so every entry point reports bad shapes the same way.

use crate::QuantError;

/// The product of `dims`, or [`QuantError::Overflow`] when it does not fit in `usize`.
pub(crate) fn element_count(what: &'static str, dims: &[usize]) -> Result<usize, QuantError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(QuantError::Overflow { what })
}

/// Fails with [`QuantError::Length`] unless `got == expected`.
pub(crate) fn expect_len(
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Length {
            what,
            expected,
            got,
        })
    }
}

/// `value / divisor` when `divisor` is non-zero and divides `value` exactly.
pub(crate) fn exact_div(
    what: &'static str,
    value: usize,
    divisor: usize,
) -> Result<usize, QuantError> {
    if divisor == 0 {
        return Err(QuantError::ZeroSize { what });
    }
    if !value.is_multiple_of(divisor) {
        return Err(QuantError::NotDivisible {
            what,
            value,
            divisor,
        });
    }
    Ok(value / divisor)
}

/// Fails with [`QuantError::ZeroSize`] when `value` is zero.
pub(crate) fn nonzero(what: &'static str, value: usize) -> Result<usize, QuantError> {
    if value == 0 {
        Err(QuantError::ZeroSize { what })
    } else {
        Ok(value)
    }
}
