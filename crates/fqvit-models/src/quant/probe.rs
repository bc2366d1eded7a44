//! Looking into a quantized forward module by module.

use tch::Tensor;

/// Sees every quantizer-bearing module of a quantized forward (the original's `QAct`,
/// `QLinear`, `QConv2d`, `QIntLayerNorm`, `QIntSoftmax`) under the original's module name, and
/// may replace what flows through it: given the original's recorded tensors, a probe that
/// substitutes them checks each operation on the original's inputs, and the code between
/// modules (matmuls, residual additions, GELU) on the original's outputs.
pub trait Probe {
    /// Input `index` of `module` as the forward computed it (a softmax's input 1 is the scale
    /// it uses, reported only). `Some` replaces it.
    fn input(&mut self, module: &str, index: usize, xs: &Tensor) -> Option<Tensor>;
    /// The output of `module` computed from its (possibly replaced) input. `Some` replaces it.
    fn output(&mut self, module: &str, ys: &Tensor) -> Option<Tensor>;
}

/// Runs one module under an optional probe.
pub(crate) fn module(
    probe: &mut Option<&mut dyn Probe>,
    name: &str,
    xs: &Tensor,
    f: impl FnOnce(&Tensor) -> Tensor,
) -> Tensor {
    let Some(probe) = probe else { return f(xs) };
    let replaced = probe.input(name, 0, xs);
    let ys = f(replaced.as_ref().unwrap_or(xs));
    probe.output(name, &ys).unwrap_or(ys)
}
