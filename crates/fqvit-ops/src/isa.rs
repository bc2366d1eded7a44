//! How wide the vector loops may go: the one setting every vectorised kernel takes.
//!
//! The loops are written once and compiled by [`pulp`] for each instruction set; [`Isa`] caps
//! the one they run, so that one machine runs (and tests) the code an AVX2-only CPU runs. The
//! integers do not depend on it.

/// The widest vector instruction set a kernel's loops may use; every level gives the same
/// integers.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Isa {
    /// The widest this CPU has (AVX-512 where present).
    #[default]
    Native,
    /// At most AVX2 with FMA (x86-64-v3): what an AVX2-only CPU runs.
    Avx2,
    /// No vector extension beyond the target's baseline.
    Scalar,
}

impl Isa {
    /// Every level, widest first.
    pub const ALL: [Isa; 3] = [Isa::Native, Isa::Avx2, Isa::Scalar];

    /// The name `--isa` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Native => "native",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    /// The widest instruction set this CPU has within the cap (detection is cached by std).
    pub fn arch(self) -> pulp::Arch {
        match self {
            Isa::Native => pulp::Arch::new(),
            Isa::Avx2 => capped_to_avx2(),
            Isa::Scalar => pulp::Arch::Scalar,
        }
    }

    /// Whether this CPU runs the level as named, not narrower: `Avx2` needs AVX2.
    pub fn available(self) -> bool {
        match self {
            Isa::Native | Isa::Scalar => true,
            Isa::Avx2 => !matches!(capped_to_avx2(), pulp::Arch::Scalar),
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn capped_to_avx2() -> pulp::Arch {
    pulp::x86::V3::try_new().map_or(pulp::Arch::Scalar, pulp::Arch::V3)
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
fn capped_to_avx2() -> pulp::Arch {
    pulp::Arch::Scalar
}

#[cfg(test)]
mod tests {
    use super::Isa;

    #[test]
    fn scalar_is_scalar_and_avx2_is_never_wider() {
        assert!(matches!(Isa::Scalar.arch(), pulp::Arch::Scalar));
        #[cfg(target_arch = "x86_64")]
        assert!(!matches!(Isa::Avx2.arch(), pulp::Arch::V4(_)));
        for isa in Isa::ALL {
            assert_eq!(isa.to_string(), isa.name());
        }
    }
}
