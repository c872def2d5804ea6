//! Building blocks that make one's own tch layers compute under a precision [`Policy`].
//!
//! A model keeps its variables in float32 (the master weights) and calls these functions
//! in its forward pass instead of `Tensor::linear` and `Tensor::conv2d`:
//!
//! - [`linear`] and [`conv2d`] cast the input, the weight and the bias to the policy's
//!   compute type and run the layer there (an input already in that type is not cast again);
//! - [`output`] casts what leaves the model (the logits) back to float32, for the loss and
//!   the softmax, as Keras advises;
//! - [`to_compute`] casts any other tensor (an input that goes through pooling first, a
//!   residual branch) to the compute type.
//!
//! Every cast is an ordinary differentiable tensor operation, so the backward pass casts the
//! gradients back and they reach the float32 variables as float32; unlike `tch::autocast`,
//! which acts on CUDA only, this works on every device. Under [`Policy::Float32`] nothing is
//! cast at all: the layers compute in the tensors' own types.
//!
//! The element types and shapes of the caller's tensors are checked before LibTorch sees
//! them, so a mistake is an [`Error`] naming the operation rather than a panic inside
//! LibTorch; what the checks cannot see (a kernel larger than its input, tensors on two
//! devices) comes back from LibTorch's fallible calls as [`Error::Torch`].
//!
//! ```
//! use tch::{nn, Device, Kind, Tensor};
//! use tensor_precision::{Policy, layers};
//!
//! // A plain-tch MLP of one's own: float32 variables `fc0.*`, `fc1.*`.
//! let vs = nn::VarStore::new(Device::Cpu);
//! let fc0 = nn::linear(vs.root() / "fc0", 784, 64, Default::default());
//! let fc1 = nn::linear(vs.root() / "fc1", 64, 10, Default::default());
//! let policy = Policy::MixedBfloat16;
//!
//! let xs = Tensor::randn([8, 784], (Kind::Float, Device::Cpu));
//! let hidden = layers::linear(policy, &xs, &fc0.ws, fc0.bs.as_ref())?.relu();
//! assert_eq!(hidden.kind(), Kind::BFloat16);
//! let logits = layers::output(policy, &layers::linear(policy, &hidden, &fc1.ws, fc1.bs.as_ref())?)?;
//! assert_eq!(logits.kind(), Kind::Float);
//!
//! // Gradients reach the float32 variables as float32.
//! logits.sum(Kind::Float).backward();
//! assert_eq!(fc0.ws.grad().kind(), Kind::Float);
//!
//! // A caller's mistake is an error, not a panic inside LibTorch.
//! let wrong = Tensor::zeros([8, 100], (Kind::Float, Device::Cpu));
//! assert!(layers::linear(policy, &wrong, &fc0.ws, fc0.bs.as_ref()).is_err());
//! # Ok::<(), tensor_precision::Error>(())
//! ```

use tch::{Kind, Tensor};

use crate::{Error, Policy, Result};

/// Stride, padding, dilation and groups of a 2-D convolution, and its memory format; the
/// default is PyTorch's (stride 1, no padding, dilation 1, one group, the input's own layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dOptions {
    /// Step between applications of the kernel, per spatial dimension.
    pub stride: [i64; 2],
    /// Zeros added on both sides of the input, per spatial dimension.
    pub padding: [i64; 2],
    /// Spacing between the kernel's taps, per spatial dimension.
    pub dilation: [i64; 2],
    /// Number of channel groups.
    pub groups: i64,
    /// Under a mixed policy, lay the 16-bit input and weight out channels-last (NHWC) before
    /// the convolution, so that it also returns its result channels-last: the layout in which
    /// LibTorch's 16-bit CPU convolution runs fastest (on an AVX2 CPU without bfloat16
    /// instructions its forward pass takes a third of the time of the NCHW one; see
    /// `docs/results/precision-policies-2026-12-05.md`). The values are the same; later
    /// element-wise layers, batch norm and pooling keep the layout. No effect under float32.
    pub channels_last: bool,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            channels_last: false,
        }
    }
}

impl Conv2dOptions {
    /// The same stride and padding in both spatial dimensions, dilation 1, one group.
    pub fn square(stride: i64, padding: i64) -> Self {
        Self {
            stride: [stride, stride],
            padding: [padding, padding],
            ..Self::default()
        }
    }
}

fn floating(tensor: &Tensor) -> Result<Kind> {
    let kind = tensor.f_kind()?;
    if matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    ) {
        Ok(kind)
    } else {
        Err(Error::NotFloatingPoint { kind })
    }
}

fn cast(tensor: &Tensor, kind: Kind) -> Result<Tensor> {
    if floating(tensor)? == kind {
        Ok(tensor.shallow_clone())
    } else {
        Ok(tensor.f_to_kind(kind)?)
    }
}

/// `tensor` (`[n, c, h, w]`) with the same shape and values, stored channels-last (NHWC
/// strides), as PyTorch's `contiguous(memory_format=torch.channels_last)` gives; no copy when
/// it already is.
fn to_channels_last(tensor: &Tensor) -> Result<Tensor> {
    Ok(tensor
        .f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

fn shape_error(op: &'static str, detail: String) -> Error {
    Error::Shape { op, detail }
}

/// `tensor` in the policy's compute type: a differentiable cast, or the tensor itself
/// (shallow: no copy) when it already has that type or the policy is float32.
pub fn to_compute(policy: Policy, tensor: &Tensor) -> Result<Tensor> {
    if policy.is_mixed() {
        cast(tensor, policy.compute_kind())
    } else {
        floating(tensor)?;
        Ok(tensor.shallow_clone())
    }
}

/// What leaves a model (its logits) in the policy's variable type, float32: a differentiable
/// cast under a mixed policy, the tensor itself under float32.
pub fn output(policy: Policy, tensor: &Tensor) -> Result<Tensor> {
    if policy.is_mixed() {
        cast(tensor, policy.variable_kind())
    } else {
        floating(tensor)?;
        Ok(tensor.shallow_clone())
    }
}

fn check_bias(op: &'static str, bias: Option<&Tensor>, out: i64) -> Result<()> {
    if let Some(bias) = bias {
        floating(bias)?;
        let size = bias.size();
        if size != [out] {
            return Err(shape_error(
                op,
                format!("bias of shape {size:?} for {out} outputs"),
            ));
        }
    }
    Ok(())
}

/// `xs W^T + b` under `policy`: input (`[..., in]`), weight (`[out, in]`) and bias (`[out]`)
/// cast to the compute type; the result (`[..., out]`) stays in it.
pub fn linear(
    policy: Policy,
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "linear";
    floating(xs)?;
    floating(weight)?;
    let (x, w) = (xs.size(), weight.size());
    let [out, inputs] = w[..] else {
        return Err(shape_error(
            OP,
            format!("weight of shape {w:?}, expected [out, in]"),
        ));
    };
    if x.last() != Some(&inputs) {
        return Err(shape_error(
            OP,
            format!("input of shape {x:?} for a weight of shape {w:?}"),
        ));
    }
    check_bias(OP, bias, out)?;
    if !policy.is_mixed() {
        return Ok(xs.f_linear(weight, bias)?);
    }
    let kind = policy.compute_kind();
    let bias = bias.map(|b| cast(b, kind)).transpose()?;
    Ok(cast(xs, kind)?.f_linear(&cast(weight, kind)?, bias.as_ref())?)
}

/// A 2-D convolution under `policy`: input (`[n, c, h, w]` or `[c, h, w]`), weight
/// (`[out, c / groups, kh, kw]`) and bias (`[out]`) cast to the compute type; the result
/// stays in it.
pub fn conv2d(
    policy: Policy,
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    options: Conv2dOptions,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    floating(xs)?;
    floating(weight)?;
    let (x, w) = (xs.size(), weight.size());
    let [out, per_group, _, _] = w[..] else {
        return Err(shape_error(
            OP,
            format!("weight of shape {w:?}, expected [out, in / groups, kh, kw]"),
        ));
    };
    if options.groups < 1 || out % options.groups != 0 {
        return Err(shape_error(
            OP,
            format!("{} groups for {out} output channels", options.groups),
        ));
    }
    let channels = match x[..] {
        [_, c, _, _] | [c, _, _] => c,
        _ => {
            return Err(shape_error(
                OP,
                format!("input of shape {x:?}, expected [n, c, h, w] or [c, h, w]"),
            ));
        }
    };
    if channels != per_group * options.groups {
        return Err(shape_error(
            OP,
            format!(
                "input of {channels} channels for a weight of shape {w:?} in {} groups",
                options.groups
            ),
        ));
    }
    check_bias(OP, bias, out)?;
    let Conv2dOptions {
        stride,
        padding,
        dilation,
        groups,
        channels_last,
    } = options;
    if !policy.is_mixed() {
        return Ok(xs.f_conv2d(weight, bias, stride, padding, dilation, groups)?);
    }
    let kind = policy.compute_kind();
    let bias = bias.map(|b| cast(b, kind)).transpose()?;
    let (mut xs, mut weight) = (cast(xs, kind)?, cast(weight, kind)?);
    if channels_last && xs.dim() == 4 {
        xs = to_channels_last(&xs)?;
        weight = to_channels_last(&weight)?;
    }
    Ok(xs.f_conv2d(&weight, bias.as_ref(), stride, padding, dilation, groups)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Largest difference between a bfloat16 layer and its float32 twin, relative to the
    /// largest float32 output: a few units of bfloat16's roundoff (2^-8) on sums of 64
    /// products.
    const BF16_LAYER_TOLERANCE: f64 = 0.02;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_kind(Kind::Float);
        let b = b.to_kind(Kind::Float);
        (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    #[test]
    fn float32_casts_nothing_and_matches_libtorch_exactly() {
        tch::manual_seed(0);
        let (x, w, b) = (randn(&[4, 8]), randn(&[3, 8]), randn(&[3]));
        let ours = linear(Policy::Float32, &x, &w, Some(&b)).unwrap();
        assert!(ours.equal(&x.linear(&w, Some(&b))));
        let (x, w) = (randn(&[2, 3, 9, 9]), randn(&[5, 3, 3, 3]));
        let options = Conv2dOptions::square(2, 1);
        let ours = conv2d(Policy::Float32, &x, &w, Some(&b.narrow(0, 0, 3)), options);
        assert!(ours.is_err(), "a bias of 3 for 5 outputs");
        let b = randn(&[5]);
        let ours = conv2d(Policy::Float32, &x, &w, Some(&b), options).unwrap();
        assert!(ours.equal(&x.conv2d(&w, Some(&b), [2, 2], [1, 1], [1, 1], 1)));
        assert!(output(Policy::Float32, &ours).unwrap().equal(&ours));
    }

    #[test]
    fn mixed_layers_compute_in_the_compute_type_close_to_float32() {
        tch::manual_seed(1);
        let (x, w, b) = (randn(&[4, 64]), randn(&[16, 64]), randn(&[16]));
        for policy in [Policy::MixedBfloat16, Policy::MixedFloat16] {
            let y = linear(policy, &x, &w, Some(&b)).unwrap();
            assert_eq!(y.kind(), policy.compute_kind());
            let reference = x.linear(&w, Some(&b));
            let difference = relative_difference(&y, &reference);
            assert!(
                difference > 0.0 && difference < BF16_LAYER_TOLERANCE,
                "{difference}"
            );
            let logits = output(policy, &y).unwrap();
            assert_eq!(logits.kind(), Kind::Float);
        }
        let (x, w) = (randn(&[2, 4, 8, 8]), randn(&[6, 2, 3, 3]));
        let options = Conv2dOptions {
            groups: 2,
            ..Conv2dOptions::default()
        };
        let y = conv2d(Policy::MixedBfloat16, &x, &w, None, options).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(y.size(), [2, 6, 6, 6]);
        let reference = x.conv2d(&w, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 2);
        assert!(relative_difference(&y, &reference) < BF16_LAYER_TOLERANCE);
    }

    #[test]
    fn channels_last_changes_the_layout_not_the_values() {
        tch::manual_seed(3);
        let (x, w, b) = (randn(&[2, 3, 9, 9]), randn(&[4, 3, 3, 3]), randn(&[4]));
        let plain = Conv2dOptions::square(1, 1);
        let nhwc = Conv2dOptions {
            channels_last: true,
            ..plain
        };
        let a = conv2d(Policy::MixedBfloat16, &x, &w, Some(&b), plain).unwrap();
        let c = conv2d(Policy::MixedBfloat16, &x, &w, Some(&b), nhwc).unwrap();
        assert!(a.is_contiguous() && !c.is_contiguous());
        assert!(relative_difference(&c, &a) < BF16_LAYER_TOLERANCE);
        let d = conv2d(Policy::Float32, &x, &w, Some(&b), nhwc).unwrap();
        assert!(d.is_contiguous(), "float32 keeps the input's layout");
    }

    #[test]
    fn an_input_already_in_the_compute_type_is_not_copied() {
        let x = randn(&[2, 3]).to_kind(Kind::BFloat16);
        let same = to_compute(Policy::MixedBfloat16, &x).unwrap();
        assert_eq!(same.data_ptr(), x.data_ptr());
        let y = to_compute(Policy::Float32, &x).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
    }

    #[test]
    fn gradients_reach_float32_variables_as_float32() {
        tch::manual_seed(2);
        let w = randn(&[4, 3, 3, 3]).set_requires_grad(true);
        let b = randn(&[4]).set_requires_grad(true);
        let x = randn(&[2, 3, 6, 6]);
        let y = conv2d(
            Policy::MixedBfloat16,
            &x,
            &w,
            Some(&b),
            Conv2dOptions::default(),
        );
        let loss = output(Policy::MixedBfloat16, &y.unwrap())
            .unwrap()
            .sum(Kind::Float);
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        for grad in [w.grad(), b.grad()] {
            assert_eq!(grad.kind(), Kind::Float);
            assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }

    #[test]
    fn wrong_shapes_and_kinds_are_errors_naming_the_operation() {
        let (w, b) = (randn(&[3, 8]), randn(&[3]));
        for policy in Policy::ALL {
            let err = linear(policy, &randn(&[4, 7]), &w, Some(&b)).unwrap_err();
            assert!(matches!(err, Error::Shape { op: "linear", .. }), "{err}");
            let err = linear(policy, &randn(&[4, 8]), &randn(&[3, 8, 1]), None).unwrap_err();
            assert!(matches!(err, Error::Shape { op: "linear", .. }), "{err}");
            let ints = Tensor::zeros([4, 8], (Kind::Int64, Device::Cpu));
            let err = linear(policy, &ints, &w, None).unwrap_err();
            assert!(
                matches!(err, Error::NotFloatingPoint { kind: Kind::Int64 }),
                "{err}"
            );
            let weight = randn(&[5, 3, 3, 3]);
            let err = conv2d(
                policy,
                &randn(&[1, 2, 8, 8]),
                &weight,
                None,
                Conv2dOptions::default(),
            )
            .unwrap_err();
            assert!(matches!(err, Error::Shape { op: "conv2d", .. }), "{err}");
            let err = conv2d(
                policy,
                &randn(&[8, 8]),
                &weight,
                None,
                Conv2dOptions::default(),
            )
            .unwrap_err();
            assert!(matches!(err, Error::Shape { op: "conv2d", .. }), "{err}");
            // What only LibTorch sees (a kernel larger than the image) comes back as its error.
            let err = conv2d(
                policy,
                &randn(&[1, 3, 2, 2]),
                &weight,
                None,
                Conv2dOptions::default(),
            )
            .unwrap_err();
            assert!(matches!(err, Error::Torch(_)), "{err}");
        }
        // Float32 casts nothing, so mixing element types is LibTorch's error, not a panic.
        let x = randn(&[4, 8]).to_kind(Kind::BFloat16);
        let err = linear(Policy::Float32, &x, &w, Some(&b)).unwrap_err();
        assert!(matches!(err, Error::Torch(_)), "{err}");
    }
}
