//! Bit types: how many bits a code has and whether it is signed (spec §1).

use std::fmt;

/// A code width in bits, `2..=8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bits(u8);

impl Bits {
    /// The width as a number.
    pub const fn get(self) -> u8 {
        self.0
    }
}

/// The error of a width outside `2..=8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitsOutOfRange(pub u8);

impl fmt::Display for BitsOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bits is out of range: code widths are 2..=8", self.0)
    }
}

impl std::error::Error for BitsOutOfRange {}

impl TryFrom<u8> for Bits {
    type Error = BitsOutOfRange;
    fn try_from(bits: u8) -> Result<Self, Self::Error> {
        if (2..=8).contains(&bits) { Ok(Bits(bits)) } else { Err(BitsOutOfRange(bits)) }
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
