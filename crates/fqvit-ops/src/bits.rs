//! Bit types: how many bits a code has and whether it is signed (spec §1).

use std::fmt;

/// A code width in bits, `2..=15`.
///
/// Weights and most activations are stored in bytes (`2..=8`, [`Bits::fits_byte`]); only the
/// residual stream, which the integer LayerNorm and residual add read, may be wider: its codes
/// minus the zero point, shifted by a PTF factor `α ≤ 15 − bits` ([`crate::PtfFactor::cap`]),
/// stay below 2^15.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bits(u8);

impl Bits {
    /// The widest code: unsigned 15-bit codes minus their zero point stay below 2^15.
    pub const MAX: Bits = Bits(15);
    /// The widest code stored in a byte.
    pub const BYTE: Bits = Bits(8);

    /// The width as a number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Whether the codes are stored in a byte (int8 / uint8).
    pub const fn fits_byte(self) -> bool {
        self.0 <= Bits::BYTE.0
    }
}

/// The error of a width outside `2..=15`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitsOutOfRange(pub u8);

impl fmt::Display for BitsOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bits is out of range: code widths are 2..={}", self.0, Bits::MAX.0)
    }
}

impl std::error::Error for BitsOutOfRange {}

impl TryFrom<u8> for Bits {
    type Error = BitsOutOfRange;
    fn try_from(bits: u8) -> Result<Self, Self::Error> {
        if (2..=Bits::MAX.0).contains(&bits) { Ok(Bits(bits)) } else { Err(BitsOutOfRange(bits)) }
    }
}

/// A bit type: width and signedness.
///
/// Signed types span `-2^(b-1) ..= 2^(b-1)-1`, unsigned ones `0 ..= 2^b-1`.
/// The original decides symmetric versus asymmetric quantization by signedness alone (spec §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BitType {
    /// Code width.
    pub bits: Bits,
    /// Whether codes are signed.
    pub signed: bool,
}

impl BitType {
    /// All weights.
    pub const INT8: BitType = BitType { bits: Bits(8), signed: true };
    /// All activations, and the softmax output without LIS.
    pub const UINT8: BitType = BitType { bits: Bits(8), signed: false };
    /// The Log-Int-Softmax output (log2 codes).
    pub const UINT4: BitType = BitType { bits: Bits(4), signed: false };

    /// The smallest code.
    pub const fn lower(self) -> i32 {
        if self.signed { -(1 << (self.bits.0 - 1)) } else { 0 }
    }

    /// The largest code.
    pub const fn upper(self) -> i32 {
        if self.signed { (1 << (self.bits.0 - 1)) - 1 } else { (1 << self.bits.0) - 1 }
    }

    /// `upper - lower`, the denominator of asymmetric scales (255 for 8 bits).
    pub const fn span(self) -> i32 {
        self.upper() - self.lower()
    }

    /// The original's name for this type (`int8`, `uint4`, ...).
    pub fn name(self) -> String {
        format!("{}int{}", if self.signed { "" } else { "u" }, self.bits.0)
    }
}

impl fmt::Display for BitType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The storage of unsigned activation codes: a byte, or two for the residual stream's wider
/// codes ([`Bits::MAX`]).
pub trait Code: Copy + Default + Send + Sync + 'static {
    /// The widest codes the type holds here.
    const BITS: Bits;
    /// The code as an integer.
    fn int(self) -> i32;
    /// An integer-valued float in the type's range, as a code.
    fn from_f32(q: f32) -> Self;
    /// An integer in the type's range, as a code.
    fn from_code(q: i64) -> Self;
}

macro_rules! code {
    ($t:ty, $bits:expr) => {
        impl Code for $t {
            const BITS: Bits = $bits;
            #[inline(always)]
            fn int(self) -> i32 {
                i32::from(self)
            }
            #[inline(always)]
            fn from_f32(q: f32) -> $t {
                q as $t
            }
            #[inline(always)]
            fn from_code(q: i64) -> $t {
                q as $t
            }
        }
    };
}

code!(u8, Bits::BYTE);
code!(u16, Bits::MAX);
