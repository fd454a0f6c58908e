//! The one error type of this crate. Every message names what was being checked, what was expected and
//! what came, so a caller several layers up can act on it without reading this crate's code.

/// Why a quantization entry point refused its input.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum QuantError {
    /// A buffer does not have the length its shape implies.
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A dimension is not a multiple of the block or group size it is split into.
    #[error("{what}: expected a multiple of {divisor}, got {value}")]
    NotDivisible {
        what: &'static str,
        value: usize,
        divisor: usize,
    },
    /// A block, group or tile size of zero, which would split nothing.
    #[error("{what}: expected a size of at least 1, got 0")]
    ZeroSize { what: &'static str },
    /// A shape whose element count does not fit in `usize`.
    #[error("{what}: expected an element count that fits in usize, got a product that overflows")]
    Overflow { what: &'static str },
    /// A scale or amax that is zero, negative, NaN or infinite where a finite positive value is needed.
    #[error("{what}: expected a finite value > 0, got {value}")]
    InvalidScale { what: &'static str, value: f32 },
    /// A value passed as a 4-bit E2M1 code that does not fit in 4 bits.
    #[error("{what}: expected a 4-bit code (0..=15), got {value}")]
    InvalidCode { what: &'static str, value: u8 },
}
